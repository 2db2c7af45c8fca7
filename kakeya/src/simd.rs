//! Runtime dispatch of the hot loops to AVX2 where the CPU has it.
//!
//! The crate is built for the baseline of its target (SSE2 on x86-64), so a wheel runs on
//! any machine. [`dispatch`] runs a closure inside a function compiled with AVX2 and FMA
//! enabled, into which the `#[inline(always)]` kernels (Hadamard butterflies, quantizer,
//! bit packing, code lookup) inline and vectorise at twice the width. The values are the
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
