//! PCA skeleton of a block: rounded mean plus an orthonormal basis, exact or randomized.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use crate::config::{Basis, CodecConfig, PcaMethod, SkeletonDtype};
use crate::error::{CodecError, Result};
use crate::rng::{SplitMix64, DOMAIN_SKETCH};

/// Key of the randomized sketch of a shared (per-head) skeleton.
pub const SHARED_BLOCK_KEY: u64 = u64::MAX;

/// Mean and basis as stored (already rounded to the skeleton dtype).
#[derive(Debug, Clone, PartialEq)]
pub struct Skeleton {
    /// Number of basis vectors `r`.
    pub rank: usize,
    /// Mean, `D` values.
    pub mean: Vec<f32>,
    /// Basis transposed: `r` rows of `D` values; empty for `basis = "none"` (the identity,
    /// `r = D`).
    pub basis_t: Vec<f32>,
}

impl Skeleton {
    /// Whether the basis is the identity (`basis = "none"`).
    pub fn has_identity_basis(&self) -> bool {
        self.rank > 0 && self.basis_t.is_empty()
    }
}

/// Components found by a PCA, strongest first.
struct Components {
    /// Eigenvalues (squared singular values), descending.
    values: Vec<f64>,
    /// The components as rows: `k × D`, row-major.
    vectors_t: Vec<f32>,
}

/// Fits the skeleton of `n` rows of `dim` values (row-major `rows`).
#[inline(always)]
pub fn fit(
    rows: &[f32],
    dim: usize,
    config: &CodecConfig,
    head: usize,
    block_key: u64,
) -> Result<Skeleton> {
    Ok(fit_centered(rows.to_vec(), dim, config, head, block_key)?.0)
}

/// [`fit`] on rows the caller hands over, returned centred on the stored mean (what
/// [`project`] takes), so an encoder makes no second copy.
#[inline(always)]
pub fn fit_centered(
    mut rows: Vec<f32>,
    dim: usize,
    config: &CodecConfig,
    head: usize,
    block_key: u64,
) -> Result<(Skeleton, Vec<f32>)> {
    let n = rows.len() / dim;
    let dtype = config.skeleton_dtype;
    let mean = rounded_mean(&rows, dim, dtype)?;
    center(&mut rows, &mean);
    if config.basis == Basis::None {
        let skeleton = Skeleton {
            rank: dim,
            mean,
            basis_t: Vec::new(),
        };
        return Ok((skeleton, rows));
    }

    let components = match config.pca {
        PcaMethod::Exact => exact_components(&rows, n, dim)?,
        PcaMethod::Randomized => {
            if !crate::tensor::all_finite(&rows) {
                return Err(centring_overflow());
            }
            let centered = Mat::<f64>::from_fn(n, dim, |i, j| f64::from(rows[i * dim + j]));
            let target = config.rank.or(config.rank_cap).unwrap_or(dim);
            let width = (target + config.oversampling).clamp(1, dim);
            randomized_components(centered.as_ref(), width, config, head, block_key)?
        }
    };
    // The total variance (a pass over the block) is taken only if a rank rule needs it.
    let total = || crate::simd::sum_squares(&rows);
    let rank = choose_rank(&components.values, total, n, dim, config);

    // Plain loops into a sized buffer: `Vec::extend` over a mapping iterator is not
    // inlined, and would run outside the caller's AVX2 copy.
    let mut basis_t = vec![0.0f32; rank * dim];
    for (out, row) in basis_t
        .chunks_exact_mut(dim)
        .zip(components.vectors_t.chunks_exact(dim))
    {
        let mut peak = 0usize;
        for i in 1..dim {
            if row[i].abs() > row[peak].abs() {
                peak = i;
            }
        }
        let sign = if row[peak] < 0.0 { -1.0 } else { 1.0 };
        for (o, &v) in out.iter_mut().zip(row) {
            *o = dtype.round_f32(sign * v);
        }
    }
    let skeleton = Skeleton {
        rank,
        mean,
        basis_t,
    };
    Ok((skeleton, rows))
}

/// Finite rows whose centring overflowed (values within a mean's distance of f32's limit).
fn centring_overflow() -> CodecError {
    CodecError::Numerical(
        "centring a block overflows f32: input values beyond about 1e38 (near f32's limit); \
         rescale the input"
            .into(),
    )
}

/// Subtracts `mean` from every row.
#[inline(always)]
pub fn center(rows: &mut [f32], mean: &[f32]) {
    for row in rows.chunks_exact_mut(mean.len()) {
        row.iter_mut().zip(mean).for_each(|(v, m)| *v -= m);
    }
}

/// The mean of the rows, rounded to the skeleton dtype; an error where an f16 mean would
/// leave that type's range (an f32 mean of finite rows cannot), which no decoder could use.
#[inline(always)]
fn rounded_mean(rows: &[f32], dim: usize, dtype: SkeletonDtype) -> Result<Vec<f32>> {
    let n = rows.len() / dim;
    let mut sum = vec![0.0f64; dim];
    for row in rows.chunks_exact(dim) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    let mean: Vec<f32> = sum
        .iter()
        .map(|s| dtype.round(s / n.max(1) as f64))
        .collect();
    if let Some(i) = mean.iter().position(|m| !m.is_finite()) {
        return Err(CodecError::Numerical(format!(
            "a block's mean is {:e} at dim {i}, beyond skeleton_dtype \"f16\" (±65504); \
             use skeleton_dtype \"f32\"",
            sum[i] / n as f64
        )));
    }
    Ok(mean)
}

/// Rank rules of docs/codec.md; `total` gives the block's total variance.
#[inline(always)]
fn choose_rank(
    values: &[f64],
    total: impl FnOnce() -> f64,
    n: usize,
    dim: usize,
    config: &CodecConfig,
) -> usize {
    let cap = dim
        .min(n)
        .min(config.rank_cap.unwrap_or(dim))
        .min(values.len());
    if let Some(rank) = config.rank {
        return rank.min(cap);
    }
    if config.variance_ratio >= 1.0 {
        return cap;
    }
    let total = total();
    if total <= 0.0 {
        return 0;
    }
    let goal = config.variance_ratio * total;
    let mut acc = 0.0;
    for (i, v) in values.iter().enumerate() {
        acc += v;
        if acc >= goal {
            return (i + 1).min(cap);
        }
    }
    cap
}

/// Eigenpairs of the Gram matrix `AᵀA` of the centred rows, all in f32 (its rounding is far
/// below that of the f16 basis): the product with faer's SIMD kernels, the decomposition
/// with [`crate::eigen`].
#[inline(always)]
fn exact_components(centered: &[f32], n: usize, dim: usize) -> Result<Components> {
    let mut gram = lower_gram(centered, n, dim);
    // The diagonal holds the column energies. Far from f32's middle range the products or
    // the decomposition would underflow or overflow: the Gram matrix is then taken of the
    // rows scaled by a power of two (exact) and the eigenvalues scaled back in f64.
    let largest = (0..dim).map(|i| gram[(i, i)]).fold(0.0f32, f32::max);
    let mut value_scale = 1.0f64;
    let all_zero = || centered.iter().all(|&v| v == 0.0);
    if !(GRAM_RANGE.contains(&largest) || (largest == 0.0 && all_zero())) {
        let peak = centered.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if !peak.is_finite() {
            return Err(centring_overflow());
        }
        let exponent = -(f64::from(peak).log2().floor());
        let factor = exponent.exp2();
        let scaled: Vec<f32> = centered
            .iter()
            .map(|&v| (f64::from(v) * factor) as f32)
            .collect();
        gram = lower_gram(&scaled, n, dim);
        value_scale = (-2.0 * exponent).exp2();
    }
    let mut sym = vec![0.0f32; dim * dim];
    for i in 0..dim {
        for j in 0..=i {
            sym[i * dim + j] = gram[(i, j)];
            sym[j * dim + i] = gram[(i, j)];
        }
    }
    let eigen = crate::eigen::symmetric_eigen(&mut sym, dim)?;
    Ok(Components {
        values: eigen
            .values
            .into_iter()
            .map(|v| v.max(0.0) * value_scale)
            .collect(),
        vectors_t: eigen.vectors,
    })
}

/// Column energies (Gram diagonal) within which the exact PCA works on the rows as given.
const GRAM_RANGE: std::ops::RangeInclusive<f32> = 1e-18..=1e18;

/// The lower triangle of `AᵀA` (half the product) for `n` rows of `dim` values.
fn lower_gram(rows: &[f32], n: usize, dim: usize) -> Mat<f32> {
    let a = MatRef::from_row_major_slice(rows, n, dim);
    let mut gram = Mat::<f32>::zeros(dim, dim);
    triangular::matmul(
        gram.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        a.transpose(),
        BlockStructure::Rectangular,
        a,
        BlockStructure::Rectangular,
        1.0f32,
        Par::Seq,
    );
    gram
}

fn orthonormal_columns(m: MatRef<'_, f64>) -> Mat<f64> {
    m.qr().compute_thin_Q()
}

fn product(lhs: MatRef<'_, f64>, rhs: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(lhs.nrows(), rhs.ncols());
    matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0, Par::Seq);
    out
}

fn randomized_components(
    a: MatRef<'_, f64>,
    width: usize,
    config: &CodecConfig,
    head: usize,
    block_key: u64,
) -> Result<Components> {
    let dim = a.ncols();
    let mut gauss = vec![0.0f64; dim * width];
    SplitMix64::new(config.seed, DOMAIN_SKETCH, head as u64, block_key).fill_gaussian(&mut gauss);
    let omega = MatRef::from_row_major_slice(&gauss, dim, width);

    let mut q = orthonormal_columns(product(a, omega).as_ref());
    for _ in 0..config.power_iters {
        let z = orthonormal_columns(product(a.transpose(), q.as_ref()).as_ref());
        q = orthonormal_columns(product(a, z.as_ref()).as_ref());
    }
    let small = product(q.as_ref().transpose(), a);
    let svd = small
        .thin_svd()
        .map_err(|e| CodecError::Numerical(format!("SVD of the sketch failed: {e:?}")))?;
    let s = svd.S().column_vector();
    let values = (0..s.nrows()).map(|i| s[i] * s[i]).collect();
    let v = svd.V();
    let vectors_t = (0..v.ncols())
        .flat_map(|k| (0..dim).map(move |i| v[(i, k)] as f32))
        .collect();
    Ok(Components { values, vectors_t })
}

/// `c = y Û` for centred rows `y` (returned as they are for the identity basis).
#[inline(always)]
pub fn project(centered: Vec<f32>, dim: usize, skeleton: &Skeleton) -> Vec<f32> {
    if skeleton.has_identity_basis() {
        return centered;
    }
    let n = centered.len() / dim;
    let r = skeleton.rank;
    let mut coef = vec![0.0f32; n * r];
    if r > 0 && n > 0 {
        let x = MatRef::from_row_major_slice(&centered, n, dim);
        let basis = MatRef::from_row_major_slice(&skeleton.basis_t, r, dim);
        let out = faer::MatMut::from_row_major_slice_mut(&mut coef, n, r);
        matmul(out, Accum::Replace, x, basis.transpose(), 1.0f32, Par::Seq);
    }
    coef
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `c = (x − μ̂) Û` for every row: `n × r` coefficients, row-major.
    fn coefficients(rows: &[f32], dim: usize, skeleton: &Skeleton) -> Vec<f32> {
        let mut centered = rows.to_vec();
        center(&mut centered, &skeleton.mean);
        project(centered, dim, skeleton)
    }

    /// `x̂ = μ̂ + c Ûᵀ` for `n` rows of `r` coefficients: `n × D`, row-major.
    fn reconstruct(coef: &[f32], n: usize, skeleton: &Skeleton) -> Vec<f32> {
        let dim = skeleton.mean.len();
        let r = skeleton.rank;
        if skeleton.has_identity_basis() {
            let mut out = coef.to_vec();
            for row in out.chunks_exact_mut(dim) {
                row.iter_mut()
                    .zip(&skeleton.mean)
                    .for_each(|(v, m)| *v += m);
            }
            return out;
        }
        let mut out: Vec<f32> = Vec::with_capacity(n * dim);
        for _ in 0..n {
            out.extend_from_slice(&skeleton.mean);
        }
        if r > 0 && n > 0 {
            let c = MatRef::from_row_major_slice(coef, n, r);
            let basis = MatRef::from_row_major_slice(&skeleton.basis_t, r, dim);
            let dst = faer::MatMut::from_row_major_slice_mut(&mut out, n, dim);
            matmul(dst, Accum::Add, c, basis, 1.0f32, Par::Seq);
        }
        out
    }

    fn lowrank_rows(n: usize, dim: usize, rank: usize) -> Vec<f32> {
        let mut g = vec![0.0f64; n * rank + rank * dim];
        SplitMix64::new(1, 9, 0, 0).fill_gaussian(&mut g);
        let (coef, basis) = g.split_at(n * rank);
        (0..n * dim)
            .map(|idx| {
                let (i, j) = (idx / dim, idx % dim);
                (0..rank)
                    .map(|k| coef[i * rank + k] * basis[k * dim + j] * (4.0 - k as f64))
                    .sum::<f64>() as f32
                    + 0.5
            })
            .collect()
    }

    fn config(pca: PcaMethod) -> CodecConfig {
        CodecConfig {
            pca,
            skeleton_dtype: SkeletonDtype::F32,
            ..Default::default()
        }
    }

    #[test]
    fn basis_is_orthonormal_and_captures_low_rank_data() {
        for pca in [PcaMethod::Exact, PcaMethod::Randomized] {
            let (n, dim) = (100, 16);
            let rows = lowrank_rows(n, dim, 3);
            let cfg = CodecConfig {
                variance_ratio: 0.999999,
                ..config(pca)
            };
            let sk = fit(&rows, dim, &cfg, 0, 0).unwrap();
            assert_eq!(sk.rank, 3, "{pca:?}");
            for a in 0..3 {
                for b in 0..3 {
                    let dot: f32 = (0..dim)
                        .map(|i| sk.basis_t[a * dim + i] * sk.basis_t[b * dim + i])
                        .sum();
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-5, "{pca:?} {a} {b} {dot}");
                }
            }
            let coef = coefficients(&rows, dim, &sk);
            let back = reconstruct(&coef, n, &sk);
            let err: f32 = rows
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-3, "{pca:?} max error {err}");
        }
    }

    #[test]
    fn rank_rules() {
        let rows = lowrank_rows(50, 8, 8);
        let fixed = CodecConfig {
            rank: Some(5),
            ..config(PcaMethod::Exact)
        };
        assert_eq!(fit(&rows, 8, &fixed, 0, 0).unwrap().rank, 5);
        let capped = CodecConfig {
            rank_cap: Some(2),
            ..config(PcaMethod::Exact)
        };
        assert_eq!(fit(&rows, 8, &capped, 0, 0).unwrap().rank, 2);
        // Full rank, but never more components than rows.
        assert_eq!(
            fit(&rows, 8, &config(PcaMethod::Exact), 0, 0).unwrap().rank,
            8
        );
        assert_eq!(
            fit(&rows[..3 * 8], 8, &config(PcaMethod::Exact), 0, 0)
                .unwrap()
                .rank,
            3
        );
        // Constant rows have no variance to keep.
        let flat = vec![1.5f32; 40];
        let ratio = CodecConfig {
            variance_ratio: 0.9,
            ..config(PcaMethod::Exact)
        };
        let sk = fit(&flat, 8, &ratio, 0, 0).unwrap();
        assert_eq!(sk.rank, 0);
        assert_eq!(reconstruct(&[], 5, &sk), flat);
    }

    #[test]
    fn signs_are_canonical() {
        let rows = lowrank_rows(64, 12, 4);
        let sk = fit(&rows, 12, &config(PcaMethod::Exact), 0, 0).unwrap();
        for v in sk.basis_t.chunks_exact(12) {
            let peak = v
                .iter()
                .fold(0.0f32, |m, x| if x.abs() > m.abs() { *x } else { m });
            assert!(peak > 0.0);
        }
    }
}
