//! Randomized Walsh–Hadamard rotation: seeded signs, then an orthonormal in-place butterfly.

use crate::rng::{SplitMix64, DOMAIN_SIGNS};

/// `P = next_pow2(r)`, with `P = 0` for `r = 0`.
pub fn padded_len(rank: usize) -> usize {
    if rank == 0 {
        0
    } else {
        rank.next_power_of_two()
    }
}

/// The ±1 signs of the rotation of length `len`, for `seed`.
pub fn signs(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed, DOMAIN_SIGNS, len as u64, 0);
    (0..len)
        .map(|_| if rng.next_u64() >> 63 == 0 { 1.0 } else { -1.0 })
        .collect()
}

/// Unnormalised fast Walsh–Hadamard transform in place (Sylvester order).
/// `x.len()` must be a power of two.
#[inline(always)]
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two() || n == 0);
    let mut half = 1;
    if n >= 4 {
        // The first two stages in registers, four values at a time (the same sums in the
        // same order as the generic loop; its short strides do not vectorise).
        for q in x.chunks_exact_mut(4) {
            let (u0, u1, u2, u3) = (q[0] + q[1], q[0] - q[1], q[2] + q[3], q[2] - q[3]);
            q.copy_from_slice(&[u0 + u2, u1 + u3, u0 - u2, u1 - u3]);
        }
        half = 4;
    }
    while half < n {
        for block in x.chunks_exact_mut(2 * half) {
            let (lo, hi) = block.split_at_mut(half);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        half *= 2;
    }
}

/// `H_P X` for `X` = `P` rows of `width` values (row-major): the butterflies of [`fwht`]
/// with whole rows for values.
#[inline(always)]
pub fn fwht_rows(x: &mut [f32], width: usize) {
    let p = x.len() / width.max(1);
    debug_assert!(p.is_power_of_two() || p == 0);
    let mut half = 1;
    while half < p {
        for block in x.chunks_exact_mut(2 * half * width) {
            let (lo, hi) = block.split_at_mut(half * width);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        half *= 2;
    }
}

/// `y = H (σ ⊙ x) / √P` in place.
#[inline(always)]
pub fn rotate(x: &mut [f32], signs: &[f32]) {
    for (v, s) in x.iter_mut().zip(signs) {
        *v *= s;
    }
    fwht(x);
    let norm = 1.0 / (x.len() as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

/// Inverse of [`rotate`]: `x = σ ⊙ (H y) / √P` in place.
#[inline(always)]
pub fn unrotate(y: &mut [f32], signs: &[f32]) {
    fwht(y);
    let norm = 1.0 / (y.len() as f32).sqrt();
    for (v, s) in y.iter_mut().zip(signs) {
        *v *= s * norm;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_lengths() {
        assert_eq!(
            [0, 1, 2, 3, 5, 64, 65].map(padded_len),
            [0, 1, 2, 4, 8, 64, 128]
        );
    }

    #[test]
    fn row_butterflies_transform_every_column() {
        let (p, width) = (16usize, 5usize);
        let x: Vec<f32> = (0..p * width).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut rows = x.clone();
        fwht_rows(&mut rows, width);
        for j in 0..width {
            let mut col: Vec<f32> = (0..p).map(|i| x[i * width + j]).collect();
            fwht(&mut col);
            let got: Vec<f32> = (0..p).map(|i| rows[i * width + j]).collect();
            assert_eq!(got, col, "column {j}");
        }
    }

    #[test]
    fn fast_stages_match_the_plain_butterflies_bit_for_bit() {
        for len in [1usize, 2, 4, 8, 64, 128, 256] {
            let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.71).sin() * 3.0).collect();
            let mut plain = x.clone();
            let mut half = 1;
            while half < len {
                for block in plain.chunks_exact_mut(2 * half) {
                    let (lo, hi) = block.split_at_mut(half);
                    for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                        let (u, v) = (*a, *b);
                        *a = u + v;
                        *b = u - v;
                    }
                }
                half *= 2;
            }
            let mut fast = x;
            fwht(&mut fast);
            assert_eq!(fast, plain, "len {len}");
        }
    }

    #[test]
    fn hadamard_of_unit_vector_is_flat() {
        let mut x = vec![0.0f32; 8];
        x[0] = 1.0;
        fwht(&mut x);
        assert!(x.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn rotation_is_orthonormal_and_invertible() {
        for len in [1usize, 2, 4, 16, 128] {
            let s = signs(3, len);
            let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y = x.clone();
            rotate(&mut y, &s);
            let nx: f32 = x.iter().map(|v| v * v).sum();
            let ny: f32 = y.iter().map(|v| v * v).sum();
            assert!((nx - ny).abs() <= 1e-5 * nx.max(1.0));
            unrotate(&mut y, &s);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn signs_are_seeded() {
        assert_eq!(signs(5, 64), signs(5, 64));
        assert_ne!(signs(5, 64), signs(6, 64));
        assert!(signs(5, 64).iter().any(|&v| v < 0.0));
    }
}
