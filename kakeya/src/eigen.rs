//! Symmetric eigendecomposition of the small Gram matrices of PCA blocks (`D × D`, D a
//! head dimension: 64 to 256).
//!
//! Householder tridiagonalization, implicit QL with Wilkinson shifts, and back
//! transformation, as in EISPACK's `tred2`/`tql2`, laid out for row-major SIMD: the matrix
//! is kept whole (both triangles) so every product runs along contiguous rows (a step's
//! matrix-vector product as a sum of rows, in the previous step's update pass), and the
//! eigenvectors are rows, so the Givens rotations of a QL sweep run along contiguous rows
//! (as one wave per sweep); faer's general solver, which it replaces, spent most of its time
//! in a tridiagonalization that does not vectorise at these sizes. The rows are processed in
//! f32 in a fixed order (element-wise, or the partial sums of [`crate::simd::dot`]), the QL
//! recurrence in f64, so the result is the same bits with or without AVX2 and for any thread
//! count.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, Par};

use crate::error::{CodecError, Result};
use crate::simd::dot;

/// Eigenpairs of a symmetric matrix, strongest (largest eigenvalue) first.
pub struct SymmetricEigen {
    /// Eigenvalues, descending.
    pub values: Vec<f64>,
    /// Eigenvectors as rows, `n × n` row-major, in the order of `values`.
    pub vectors: Vec<f32>,
}

/// Eigendecomposition of the symmetric `n × n` row-major matrix `a` (overwritten).
#[inline(always)]
pub fn symmetric_eigen(a: &mut [f32], n: usize) -> Result<SymmetricEigen> {
    assert_eq!(a.len(), n * n);
    if n == 0 {
        return Ok(SymmetricEigen {
            values: Vec::new(),
            vectors: Vec::new(),
        });
    }
    let (mut diag, mut offdiag, tau) = tridiagonalize(a, n);
    let mut z = vec![0.0f32; n * n];
    for i in 0..n {
        z[i * n + i] = 1.0;
    }
    implicit_ql(&mut diag, &mut offdiag, &mut z, n)?;
    back_transform(a, &tau, &mut z, n);

    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| diag[j].total_cmp(&diag[i]));
    let mut vectors = Vec::with_capacity(n * n);
    for &i in &order {
        vectors.extend_from_slice(&z[i * n..(i + 1) * n]);
    }
    Ok(SymmetricEigen {
        values: order.iter().map(|&i| diag[i]).collect(),
        vectors,
    })
}

/// Reduces `a` to tridiagonal `T = Qᵀ A Q` with `Q = H₀ H₁ ⋯ H_{n−3}`,
/// `H_k = I − τ_k v_k v_kᵀ`. Returns the diagonal, the off-diagonal (`e[i]` couples `i` and
/// `i + 1`; `e[n − 1] = 0`) and the `τ_k`; `v_k` is left in row `k` of `a`, at columns
/// `k + 1..n` (`v_k[0] = 1`).
///
/// Step `k` updates the trailing matrix `A′ −= v wᵀ + w vᵀ`, `w = p − (τ/2)(pᵀv) v`, with
/// `p = τ A′ v`. As `A′` is symmetric, `A′v = Σⱼ vⱼ (row j)`: the next step's `p` accumulates
/// row by row, in the same pass as this step's update and from the updated values still in
/// registers. One pass over the trailing matrix per step, and no horizontal sums.
#[inline(always)]
fn tridiagonalize(a: &mut [f32], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
    let mut diag = vec![0.0f64; n];
    let mut offdiag = vec![0.0f64; n];
    let steps = n.saturating_sub(2);
    let mut tau = vec![0.0f32; steps];
    // At step k, `p[c]` belongs to column `k + 1 + c`; `sums` gathers the next step's `A″v`
    // aligned with this step's rows (`sums[0]`, column k + 1, lies outside `A″`).
    let mut p = vec![0.0f32; n];
    let mut sums = vec![0.0f32; n];
    if steps > 0 {
        // Row k right of the diagonal is column k below it (the matrix is kept symmetric).
        (offdiag[0], tau[0]) = reflect(&mut a[1..n]);
        let (head, trailing) = a.split_at(n);
        let v = &head[1..n];
        for (row, &vj) in trailing.chunks_exact(n).zip(v) {
            for (pc, &x) in p[..n - 1].iter_mut().zip(&row[1..]) {
                *pc += vj * x;
            }
        }
        p[..n - 1].iter_mut().for_each(|x| *x *= tau[0]);
    }
    for k in 0..steps {
        diag[k] = f64::from(a[k * n + k]);
        let m = n - k - 1;
        let t = tau[k];
        let reflects = t != 0.0;
        let (head, rest) = a.split_at_mut((k + 1) * n);
        let v = &head[k * n + k + 1..(k + 1) * n];
        // Row k + 1 first: it holds the next reflector.
        let (next_row, trailing) = rest.split_at_mut(n);
        if reflects {
            let half = 0.5 * t * dot(&p[..m], v);
            for (pc, &vc) in p[..m].iter_mut().zip(v) {
                *pc -= half * vc;
            }
            update_row(&mut next_row[k + 1..n], v, &p[..m], v[0], p[0]);
        }
        let next_tau = if k + 1 < steps {
            let (e, nt) = reflect(&mut next_row[k + 2..n]);
            (offdiag[k + 1], tau[k + 1]) = (e, nt);
            nt
        } else {
            0.0
        };
        let next_reflects = next_tau != 0.0;
        let next_v = &next_row[k + 2..n];
        let acc = &mut sums[..m];
        acc.fill(0.0);
        for (i, row) in trailing.chunks_exact_mut(n).take(m - 1).enumerate() {
            let row = &mut row[k + 1..n];
            let (vi, wi, vn) = (v[i + 1], p[i + 1], next_v[i]);
            match (reflects, next_reflects) {
                (true, true) => {
                    for (((r, &vc), &wc), pc) in
                        row.iter_mut().zip(v).zip(&p[..m]).zip(acc.iter_mut())
                    {
                        let x = *r - (vi * wc + wi * vc);
                        *r = x;
                        *pc += vn * x;
                    }
                }
                (true, false) => update_row(row, v, &p[..m], vi, wi),
                (false, true) => {
                    for (&x, pc) in row.iter().zip(acc.iter_mut()) {
                        *pc += vn * x;
                    }
                }
                (false, false) => {}
            }
        }
        // acc[c] belongs to column k + 1 + c; the next step's p starts at column k + 2.
        if next_reflects {
            for c in 0..m - 1 {
                p[c] = next_tau * acc[c + 1];
            }
        }
    }
    if n >= 2 {
        diag[n - 2] = f64::from(a[(n - 2) * n + n - 2]);
        offdiag[n - 2] = f64::from(a[(n - 2) * n + n - 1]);
    }
    diag[n - 1] = f64::from(a[n * n - 1]);
    (diag, offdiag, tau)
}

/// The Householder reflector that takes `x` (a row right of the diagonal) to `β e₀`:
/// returns `(β, τ)` and leaves `v` (`v[0] = 1`) in `x`; `τ = 0` (and `x` untouched) when
/// `x` is already `x₀ e₀`.
#[inline(always)]
fn reflect(x: &mut [f32]) -> (f64, f32) {
    let x0 = f64::from(x[0]);
    let sigma = crate::simd::sum_squares(&x[1..]);
    if sigma == 0.0 {
        return (x0, 0.0);
    }
    let norm = (x0 * x0 + sigma).sqrt();
    let beta = if x0 > 0.0 { -norm } else { norm };
    let inv = 1.0 / (x0 - beta);
    x[0] = 1.0;
    if (inv as f32).is_finite() {
        let inv = inv as f32;
        x[1..].iter_mut().for_each(|v| *v *= inv);
    } else {
        // A subnormal row (rounding residue of a rank-deficient matrix): its reciprocal
        // norm overflows f32, and 0 · ∞ would turn the whole decomposition into NaN.
        x[1..]
            .iter_mut()
            .for_each(|v| *v = (f64::from(*v) * inv) as f32);
    }
    (beta, ((beta - x0) / beta) as f32)
}

/// `row −= vᵢ wᵀ + wᵢ vᵀ`.
#[inline(always)]
fn update_row(row: &mut [f32], v: &[f32], w: &[f32], vi: f32, wi: f32) {
    for ((r, &vj), &wj) in row.iter_mut().zip(v).zip(w) {
        *r -= vi * wj + wi * vj;
    }
}

/// Eigenvalues (into `d`) and eigenvectors (rows of `z`, rotated in place) of the
/// tridiagonal matrix `(d, e)`: implicit QL with Wilkinson shifts (`tql2`).
#[inline(always)]
fn implicit_ql(d: &mut [f64], e: &mut [f64], z: &mut [f32], n: usize) -> Result<()> {
    const MAX_ITERATIONS: usize = 64;
    // The matrix came from f32 rows: an off-diagonal below f32 precision of its neighbours
    // moves no eigenvalue beyond that rounding (single-precision LAPACK's test), and
    // deflating there saves the sweeps an f64 tolerance would spend.
    let tolerance = f64::from(f32::EPSILON);
    let mut rotations: Vec<(f32, f32)> = Vec::with_capacity(n);
    for l in 0..n {
        let mut iterations = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= tolerance * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iterations += 1;
            if iterations > MAX_ITERATIONS {
                return Err(CodecError::Numerical(format!(
                    "eigendecomposition: no convergence at eigenvalue {l} of {n}"
                )));
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let r = hypot(g, 1.0);
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut underflow = false;
            rotations.clear();
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                let r = hypot(f, g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                // Divisions rather than one reciprocal and products, and 2b ready before c:
                // the recurrence is a single dependency chain, which each shortens.
                let twice_b = b + b;
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                let r = (d[i] - g) * s + c * twice_b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                rotations.push((c as f32, s as f32));
            }
            rotate_rows(z, n, m, &rotations);
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    Ok(())
}

/// `√(a² + b²)`, directly where the squares neither overflow nor underflow (libm's scaled
/// `hypot` is several times slower).
#[inline(always)]
fn hypot(a: f64, b: f64) -> f64 {
    let s = a * a + b * b;
    if s.is_finite() && s > 1e-280 {
        s.sqrt()
    } else {
        a.hypot(b)
    }
}

/// Applies the rotations of one QL sweep to the rows of `z`: the `k`-th, `(c, s)`, takes
/// rows `(i, i + 1)`, `i = top − 1 − k`, to `(c zᵢ − s zᵢ₊₁, s zᵢ + c zᵢ₊₁)`. Row `i + 1` is
/// final once rotation `i` is done, so a strip of columns carries one row through the
/// whole sweep in registers: every element is loaded and stored once per sweep instead of
/// once per rotation. Strips of 32 columns keep four independent vector chains in flight.
#[inline(always)]
fn rotate_rows(z: &mut [f32], n: usize, top: usize, rotations: &[(f32, f32)]) {
    if rotations.is_empty() {
        return;
    }
    let mut start = 0;
    while start + 32 <= n {
        rotate_strip::<32>(z, n, top, rotations, start);
        start += 32;
    }
    while start + 8 <= n {
        rotate_strip::<8>(z, n, top, rotations, start);
        start += 8;
    }
    while start < n {
        rotate_strip::<1>(z, n, top, rotations, start);
        start += 1;
    }
}

#[inline(always)]
fn rotate_strip<const W: usize>(
    z: &mut [f32],
    n: usize,
    top: usize,
    rotations: &[(f32, f32)],
    start: usize,
) {
    let at = |row: usize| row * n + start;
    let mut carry: [f32; W] = z[at(top)..at(top) + W].try_into().expect("W values");
    for (k, &(c, s)) in rotations.iter().enumerate() {
        let i = top - 1 - k;
        let x: [f32; W] = z[at(i)..at(i) + W].try_into().expect("W values");
        let below = &mut z[at(i + 1)..at(i + 1) + W];
        for j in 0..W {
            below[j] = s * x[j] + c * carry[j];
            carry[j] = c * x[j] - s * carry[j];
        }
    }
    let last = top - rotations.len();
    z[at(last)..at(last) + W].copy_from_slice(&carry);
}

/// Eigenvectors of `A` from those of `T` (rows of `z`): each row times
/// `Qᵀ = H_{n−3} ⋯ H₀`, a panel of reflectors at a time in the compact WY form
/// `H_k ⋯ H_{k+b−1} = I − V T Vᵀ` (LAPACK's `larft`), so the work is matrix products.
#[inline(always)]
fn back_transform(reflectors: &[f32], tau: &[f32], z: &mut [f32], n: usize) {
    const PANEL: usize = 32;
    let count = tau.len();
    let mut k0 = count.div_ceil(PANEL) * PANEL;
    while k0 > 0 {
        k0 -= PANEL;
        let b = PANEL.min(count - k0);
        let m = n - k0 - 1;
        // V: m × b, column j = v_{k0+j}, which starts at row j with its implicit 1.
        let mut v = Mat::<f32>::zeros(m, b);
        for j in 0..b {
            let k = k0 + j;
            let src = &reflectors[k * n + k + 1..(k + 1) * n];
            v[(j, j)] = 1.0;
            for (i, &x) in src.iter().enumerate().skip(1) {
                v[(j + i, j)] = x;
            }
        }
        // T upper triangular: T[j][j] = τ_j, T[..j, j] = −τ_j T[..j, ..j] (VᵀV)[..j, j].
        let mut gram = Mat::<f32>::zeros(b, b);
        matmul(
            gram.as_mut(),
            Accum::Replace,
            v.transpose(),
            v.as_ref(),
            1.0,
            Par::Seq,
        );
        let mut t = Mat::<f32>::zeros(b, b);
        for j in 0..b {
            let tj = tau[k0 + j];
            t[(j, j)] = tj;
            if tj == 0.0 {
                continue;
            }
            for i in 0..j {
                let acc: f32 = (i..j).map(|l| t[(i, l)] * gram[(l, j)]).sum();
                t[(i, j)] = -tj * acc;
            }
        }
        let mut zs = MatMut::from_row_major_slice_mut(z, n, n).subcols_mut(k0 + 1, m);
        // Z ← Z (I − V Tᵀ Vᵀ) = Z − ((Z V) Tᵀ) Vᵀ.
        let mut zv = Mat::<f32>::zeros(n, b);
        matmul(
            zv.as_mut(),
            Accum::Replace,
            zs.as_ref(),
            v.as_ref(),
            1.0,
            Par::Seq,
        );
        let mut zvt = Mat::<f32>::zeros(n, b);
        matmul(
            zvt.as_mut(),
            Accum::Replace,
            zv.as_ref(),
            t.transpose(),
            1.0,
            Par::Seq,
        );
        matmul(
            zs.as_mut(),
            Accum::Add,
            zvt.as_ref(),
            v.transpose(),
            -1.0,
            Par::Seq,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_symmetric(n: usize, seed: u64, spectrum: impl Fn(usize) -> f64) -> Vec<f64> {
        // Q diag(λ) Qᵀ with a random orthogonal Q (Gram–Schmidt of Gaussian columns).
        let mut g = vec![0.0f64; n * n];
        SplitMix64::new(seed, 77, 0, 0).fill_gaussian(&mut g);
        let mut q: Vec<Vec<f64>> = Vec::new();
        for j in 0..n {
            let mut col: Vec<f64> = (0..n).map(|i| g[i * n + j]).collect();
            for prev in &q {
                let d: f64 = col.iter().zip(prev).map(|(a, b)| a * b).sum();
                col.iter_mut().zip(prev).for_each(|(a, b)| *a -= d * b);
            }
            let norm = col.iter().map(|a| a * a).sum::<f64>().sqrt();
            col.iter_mut().for_each(|a| *a /= norm);
            q.push(col);
        }
        let mut a = vec![0.0f64; n * n];
        for (k, col) in q.iter().enumerate() {
            let lambda = spectrum(k);
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] += lambda * col[i] * col[j];
                }
            }
        }
        a
    }

    fn check(a64: &[f64], n: usize, tol: f64) {
        let mut a: Vec<f32> = a64.iter().map(|&v| v as f32).collect();
        let eig = symmetric_eigen(&mut a, n).unwrap();
        let scale = eig.values.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        assert!(eig.values.windows(2).all(|w| w[0] >= w[1]));
        for (k, (&lambda, v)) in eig
            .values
            .iter()
            .zip(eig.vectors.chunks_exact(n))
            .enumerate()
        {
            for i in 0..n {
                let av: f64 = (0..n).map(|j| a64[i * n + j] * f64::from(v[j])).sum();
                let r = (av - lambda * f64::from(v[i])).abs() / scale;
                assert!(r < tol, "n {n} pair {k} residual {r:e}");
            }
            for (l, w) in eig.vectors.chunks_exact(n).enumerate() {
                let d: f64 = v
                    .iter()
                    .zip(w)
                    .map(|(&x, &y)| f64::from(x) * f64::from(y))
                    .sum();
                let want = if k == l { 1.0 } else { 0.0 };
                assert!((d - want).abs() < tol, "n {n} dot({k}, {l}) = {d}");
            }
        }
    }

    #[test]
    fn decomposes_random_spectra() {
        for n in [1usize, 2, 3, 5, 16, 64, 128] {
            check(&random_symmetric(n, n as u64, |k| 1.0 + k as f64), n, 1e-5);
            // Decaying, like K/V Gram matrices, with near-zero tail.
            check(
                &random_symmetric(n, 3, |k| 10f64.powf(-(k as f64) / 8.0)),
                n,
                1e-5,
            );
            // Repeated eigenvalues.
            check(&random_symmetric(n, 4, |k| (k / 4) as f64), n, 1e-5);
        }
    }

    #[test]
    fn handles_reflectors_that_are_trivial_for_some_steps_only() {
        // Rows 0..4 already tridiagonal (τ = 0 for the first steps), coupled through (3, 4)
        // to a dense symmetric block, so the later steps reflect.
        for n in [9usize, 16, 40] {
            let dense = random_symmetric(n, 9, |k| 1.0 + (k % 5) as f64 * 0.7);
            let mut a = vec![0.0f64; n * n];
            for i in 0..4 {
                a[i * n + i] = 2.0 + i as f64;
                a[i * n + i + 1] = if i < 3 { 0.5 } else { 0.3 };
                a[(i + 1) * n + i] = a[i * n + i + 1];
            }
            for i in 4..n {
                for j in 4..n {
                    a[i * n + j] = dense[i * n + j];
                }
            }
            check(&a, n, 1e-5);
        }
    }

    #[test]
    fn handles_diagonal_zero_and_tridiagonal_input() {
        let n = 6;
        let diagonal: Vec<f64> = (0..n * n)
            .map(|i| {
                if i % (n + 1) == 0 {
                    (i / (n + 1)) as f64 - 2.0
                } else {
                    0.0
                }
            })
            .collect();
        check(&diagonal, n, 1e-6);
        check(&vec![0.0; n * n], n, 1e-6);
        let tri: Vec<f64> = (0..n * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                if r == c {
                    2.0
                } else if r.abs_diff(c) == 1 {
                    -1.0
                } else {
                    0.0
                }
            })
            .collect();
        check(&tri, n, 1e-6);
    }
}
