//! AVX2 + FMA inner loops of the kernel for codes of 1–4 bits and `head_dim` a multiple
//! of 16: eight codes are dequantized in a register (`vpermps` on the centroid table) and
//! multiplied straight into the query rows' accumulators, never stored. Outliers are not
//! seen here: the caller adds their correction (`z_out − c[code]`) afterwards.

use std::arch::x86_64::*;

/// The centroid table in two registers (entries 0–7, 8–15) and the shift pattern.
#[derive(Clone, Copy)]
pub(crate) struct Table {
    lo: __m256,
    hi: __m256,
    shifts: __m256i,
    mask: __m256i,
}

impl Table {
    /// # Safety
    /// The CPU must have AVX2; `centroids` holds `2^bits` values, `bits ≤ 4`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn new(centroids: &[f32], bits: u8) -> Self {
        let mut t = [0.0f32; 16];
        t[..centroids.len().min(16)].copy_from_slice(&centroids[..centroids.len().min(16)]);
        let b = i32::from(bits);
        Self {
            lo: _mm256_loadu_ps(t.as_ptr()),
            hi: _mm256_loadu_ps(t.as_ptr().add(8)),
            shifts: _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b),
            mask: _mm256_set1_epi32((1 << bits) - 1),
        }
    }
}

/// The eight centroids of the eight `B`-bit codes in `bytes[..B]`.
///
/// # Safety
/// AVX2; `bytes` has at least 4 readable bytes.
#[inline(always)]
unsafe fn decode8<const B: usize>(t: &Table, bytes: *const u8) -> __m256 {
    // Four bytes even for B < 4: the codes are padded (`CODE_PADDING`), and the bits beyond
    // the group's 8·B are masked off below.
    let word = _mm256_set1_epi32(bytes.cast::<i32>().read_unaligned());
    let codes = _mm256_and_si256(_mm256_srlv_epi32(word, t.shifts), t.mask);
    let v = _mm256_permutevar8x32_ps(t.lo, codes);
    if B == 4 {
        let high = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes));
        _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(t.hi, codes), high)
    } else {
        v
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Inputs of [`scores`] for one tile.
pub(crate) struct ScoreTile<'a> {
    /// Codes of the tile's rows (starting at its first row), `dim · B / 8` bytes per row,
    /// then at least `4 − B` readable bytes.
    pub codes: &'a [u8],
    pub n: usize,
    pub dim: usize,
    /// `R` rotated query rows, `dim` each.
    pub q_rot: &'a [f32],
    pub scale: &'a [f32],
    pub base: &'a [f32],
    /// RoPE-mean term: `R` rows of weights `[a | b]` (`dim` each) and the tile's `cos`, `sin`
    /// rows (`n × dim/2` each).
    pub rope: Option<(&'a [f32], &'a [f32], &'a [f32])>,
}

/// `out[r · stride + i] = scale_i · (q̃_r · ẑ_i) + base_r (+ a_r · cos_i + b_r · sin_i)` for the
/// `R` rows and `n` keys of the tile.
///
/// # Safety
/// AVX2 and FMA; `dim % 16 == 0`; slices as documented on [`ScoreTile`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn scores<const B: usize, const R: usize>(
    t: &Table,
    tile: &ScoreTile<'_>,
    out: &mut [f32],
    stride: usize,
) {
    let dim = tile.dim;
    let groups = dim / 8;
    let row_bytes = dim * B / 8;
    let half = dim / 2;
    assert!(tile.codes.len() >= tile.n * row_bytes + 4 - B && tile.q_rot.len() >= R * dim);
    assert!(tile.scale.len() >= tile.n && tile.base.len() >= R);
    assert!(out.len() >= (R - 1) * stride + tile.n);
    if let Some((w, c, s)) = tile.rope {
        assert!(w.len() >= R * dim && c.len() >= tile.n * half && s.len() >= tile.n * half);
    }
    let q = tile.q_rot.as_ptr();
    for i in 0..tile.n {
        let codes = tile.codes.as_ptr().add(i * row_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        for g in 0..groups {
            let z = decode8::<B>(t, codes.add(g * B));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(r * dim + g * 8)), z, *a);
            }
        }
        let s = _mm256_set1_ps(tile.scale[i]);
        for a in acc.iter_mut() {
            *a = _mm256_mul_ps(*a, s);
        }
        if let Some((w, cos, sin)) = tile.rope {
            let (cp, sp, wp) = (
                cos.as_ptr().add(i * half),
                sin.as_ptr().add(i * half),
                w.as_ptr(),
            );
            for g in 0..half / 8 {
                let c = _mm256_loadu_ps(cp.add(g * 8));
                let sn = _mm256_loadu_ps(sp.add(g * 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(r * dim + g * 8)), c, *a);
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(r * dim + half + g * 8)), sn, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[r * stride + i] = hsum(*a) + tile.base[r];
        }
    }
}

/// `acc[r · dim ..] += Σ_i w[r · stride + i] · ẑ_i` over the `n` rows of codes (`R` rows of
/// weights, `dim % 16 == 0`).
///
/// # Safety
/// AVX2 and FMA; `codes` holds `n` rows of `dim · B / 8` bytes and `4 − B` more; `acc` `R · dim` values; `w`
/// `R` rows of `n` weights at `stride`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn accumulate<const B: usize, const R: usize>(
    t: &Table,
    codes: &[u8],
    n: usize,
    dim: usize,
    w: &[f32],
    stride: usize,
    acc: &mut [f32],
) {
    let groups = dim / 8;
    let row_bytes = dim * B / 8;
    assert!(codes.len() >= n * row_bytes + 4 - B && acc.len() >= R * dim);
    assert!(n == 0 || w.len() >= (R - 1) * stride + n);
    let (cp, wp, ap) = (codes.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
    for g in 0..groups {
        let mut a = [_mm256_setzero_ps(); R];
        for (r, v) in a.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(ap.add(r * dim + g * 8));
        }
        for i in 0..n {
            let z = decode8::<B>(t, cp.add(i * row_bytes + g * B));
            for (r, v) in a.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(_mm256_broadcast_ss(&*wp.add(r * stride + i)), z, *v);
            }
        }
        for (r, v) in a.iter().enumerate() {
            _mm256_storeu_ps(ap.add(r * dim + g * 8), *v);
        }
    }
}
