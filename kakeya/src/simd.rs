//! Runtime dispatch of the hot loops to AVX2 where the CPU has it.
//!
//! The crate is built for the baseline of its target (SSE2 on x86-64), so a wheel runs on
//! any machine. [`dispatch`] runs a closure inside a function compiled with AVX2 and FMA
//! enabled, into which the `#[inline(always)]` kernels (Hadamard butterflies, quantizer,
//! bit packing, code lookup) inline and vectorise at twice the width; the closures and
//! block functions between the dispatch and the kernels are `#[inline(always)]` too, since a
//! function that is not inlined keeps the baseline instruction set. The values are the
//! same bit for bit: the kernels only add, multiply, compare and shift lane by lane, and
//! Rust never contracts a multiply and an add into an FMA, so wider lanes change the speed,
//! not the result (tested: `simd_and_baseline_write_the_same_bytes`).

use std::sync::atomic::{AtomicBool, Ordering};

static BASELINE_ONLY: AtomicBool = AtomicBool::new(false);

/// Whether [`dispatch`] uses the wider instructions (the CPU has them and
/// [`set_enabled`] did not turn them off).
pub fn enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !BASELINE_ONLY.load(Ordering::Relaxed)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Turns the wider instructions off (`false`) or back on, for the whole process: for
/// benchmarks and for tests that compare both paths.
pub fn set_enabled(on: bool) {
    BASELINE_ONLY.store(!on, Ordering::Relaxed);
}

/// The name of the instruction set [`dispatch`] uses now (`"avx2"` or `"baseline"`).
pub fn level() -> &'static str {
    if enabled() {
        "avx2"
    } else {
        "baseline"
    }
}

/// Runs `f`, compiled with AVX2 and FMA when [`enabled`].
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if enabled() {
        // SAFETY: `enabled` checked that the CPU has AVX2 and FMA.
        return unsafe { with_avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `Σ v²` in f64 as eight interleaved partial sums combined pairwise: a fixed order (so
/// the same value on every instruction set and thread count) that vectorises, unlike one
/// running sum.
#[inline(always)]
pub fn sum_squares(values: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f64::from(v) * f64::from(v);
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// `Σ aᵢbᵢ` over the common length in f32, eight partial sums in the fixed order of
/// [`sum_squares`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += u * v;
        }
    }
    for ((s, &u), &v) in acc.iter_mut().zip(ra).zip(rb) {
        *s += u * v;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_is_exact_on_integers() {
        for len in [0usize, 1, 7, 8, 9, 64, 100] {
            let v: Vec<f32> = (0..len).map(|i| i as f32 - 3.0).collect();
            let expected: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert_eq!(sum_squares(&v), expected, "len {len}");
        }
    }
}
