//! Lloyd–Max scalar quantizers: Gaussian-optimal tables and nearest-centroid coding.

use std::sync::OnceLock;

use crate::error::{invalid, Result};

const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn pdf(x: f64) -> f64 {
    if x.is_infinite() {
        0.0
    } else {
        INV_SQRT_2PI * (-0.5 * x * x).exp()
    }
}

fn cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// `x φ(x)`, which is 0 at ±∞.
fn x_pdf(x: f64) -> f64 {
    if x.is_infinite() {
        0.0
    } else {
        x * pdf(x)
    }
}

fn boundaries_of(centroids: &[f64]) -> Vec<f64> {
    let mut edges = Vec::with_capacity(centroids.len() + 1);
    edges.push(f64::NEG_INFINITY);
    edges.extend(centroids.windows(2).map(|w| 0.5 * (w[0] + w[1])));
    edges.push(f64::INFINITY);
    edges
}

/// Expected squared error of `centroids` (nearest-centroid coding) on N(0, 1).
pub fn gaussian_mse(centroids: &[f64]) -> f64 {
    let edges = boundaries_of(centroids);
    centroids
        .iter()
        .zip(edges.windows(2))
        .map(|(&c, e)| {
            let (a, b) = (e[0], e[1]);
            let mass = cdf(b) - cdf(a);
            let first = pdf(a) - pdf(b);
            let second = mass - (x_pdf(b) - x_pdf(a));
            second - 2.0 * c * first + c * c * mass
        })
        .sum()
}

/// Lloyd iteration on N(0, 1) for `levels` centroids, run to convergence.
pub fn gaussian_lloyd_max(levels: usize) -> Vec<f64> {
    // Start from evenly spaced points; the fixed point is unique for log-concave densities.
    let mut c: Vec<f64> = (0..levels)
        .map(|i| -2.0 + 4.0 * (i as f64 + 0.5) / levels as f64)
        .collect();
    for _ in 0..10_000 {
        let edges = boundaries_of(&c);
        let next: Vec<f64> = edges
            .windows(2)
            .map(|e| (pdf(e[0]) - pdf(e[1])) / (cdf(e[1]) - cdf(e[0])))
            .collect();
        let change = next
            .iter()
            .zip(&c)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        c = next;
        if change < 1e-13 {
            break;
        }
    }
    c
}

/// Largest bit width of a Gaussian table (variance allocation gives one component up to 8).
pub const MAX_TABLE_BITS: u8 = 8;

/// Mass of N(0, 1) on `[a, b]`, accurate in both tails (no `1 − Φ` cancellation).
fn mass(a: f64, b: f64) -> f64 {
    let q = |x: f64| 0.5 * libm::erfc(x / std::f64::consts::SQRT_2);
    if a >= 0.0 {
        q(a) - q(b)
    } else if b <= 0.0 {
        q(-b) - q(-a)
    } else {
        1.0 - q(-a) - q(b)
    }
}

/// The Lloyd–Max fixed point for `levels` centroids found by Newton's method on the
/// centroid conditions `c_i = E[x | cell_i]`, started from the companding points
/// `√3 Φ⁻¹((i + ½)/levels)`. Plain Lloyd iteration converges too slowly beyond 16 levels
/// (it had not settled after 10⁶ steps at 128 levels); the fixed point is the same.
pub fn gaussian_lloyd_max_newton(levels: usize) -> Vec<f64> {
    let mut c: Vec<f64> = (0..levels)
        .map(|i| 3f64.sqrt() * inverse_cdf((i as f64 + 0.5) / levels as f64))
        .collect();
    for _ in 0..100 {
        let edges = boundaries_of(&c);
        // Tridiagonal Jacobian of F(c) = c − m(c): sub, diagonal, super.
        let (mut sub, mut diag, mut sup, mut f) = (
            vec![0.0; levels],
            vec![0.0; levels],
            vec![0.0; levels],
            vec![0.0; levels],
        );
        for i in 0..levels {
            let (a, b) = (edges[i], edges[i + 1]);
            let m_ass = mass(a, b);
            let m = (pdf(a) - pdf(b)) / m_ass;
            let ga = if a.is_finite() {
                0.5 * pdf(a) * (m - a) / m_ass
            } else {
                0.0
            };
            let gb = if b.is_finite() {
                0.5 * pdf(b) * (b - m) / m_ass
            } else {
                0.0
            };
            sub[i] = -ga;
            diag[i] = 1.0 - ga - gb;
            sup[i] = -gb;
            f[i] = c[i] - m;
        }
        // Thomas algorithm.
        for i in 1..levels {
            let w = sub[i] / diag[i - 1];
            diag[i] -= w * sup[i - 1];
            f[i] -= w * f[i - 1];
        }
        let mut step = vec![0.0; levels];
        step[levels - 1] = f[levels - 1] / diag[levels - 1];
        for i in (0..levels - 1).rev() {
            step[i] = (f[i] - sup[i] * step[i + 1]) / diag[i];
        }
        let largest = step.iter().fold(0.0f64, |m, s| m.max(s.abs()));
        c.iter_mut().zip(&step).for_each(|(v, s)| *v -= s);
        if largest < 1e-13 {
            break;
        }
    }
    c
}

/// Φ⁻¹ by bisection on the tail-accurate mass (only used for starting points).
fn inverse_cdf(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mass(f64::NEG_INFINITY, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

fn tables() -> &'static [(Vec<f32>, f64)] {
    static TABLES: OnceLock<Vec<(Vec<f32>, f64)>> = OnceLock::new();
    TABLES.get_or_init(|| {
        (1..=MAX_TABLE_BITS)
            .map(|b| {
                // 1..=4 bits: the Lloyd iteration of format version 1 (its f32 tables are
                // pinned by the bytes); 5..=8: Newton (same fixed point, see above).
                let c = if b <= 4 {
                    gaussian_lloyd_max(1 << b)
                } else {
                    gaussian_lloyd_max_newton(1 << b)
                };
                (c.iter().map(|&v| v as f32).collect(), gaussian_mse(&c))
            })
            .collect()
    })
}

/// The Gaussian Lloyd–Max table for `bits` (1..=8), computed once.
pub fn gaussian_table(bits: u8) -> &'static [f32] {
    &tables()[usize::from(bits) - 1].0
}

/// `D(bits)`: MSE on N(0, 1) of the Gaussian Lloyd–Max quantizer (`D(0) = 1`: the mean),
/// for `bits` in 0..=8, computed once with the tables.
pub fn gaussian_distortion(bits: u8) -> f64 {
    if bits == 0 {
        1.0
    } else {
        tables()[usize::from(bits) - 1].1
    }
}

/// The uniform table of `bits`: `2^bits` levels `(i − (2^bits − 1)/2)·step`, each computed
/// in f64 and rounded to f32 once.
pub fn uniform_table(bits: u8, step: f32) -> Vec<f32> {
    let levels = 1usize << bits;
    let middle = (levels - 1) as f64 / 2.0;
    (0..levels)
        .map(|i| ((i as f64 - middle) * f64::from(step)) as f32)
        .collect()
}

/// Mid-tread uniform levels `(i − 2^(bits−1))·step`, `i = 0..2^bits`: zero is a level, so a
/// coordinate whose spread is well below the step codes to one symbol and, entropy-coded,
/// costs almost nothing (rotation "none").
pub fn midtread_table(bits: u8, step: f32) -> Vec<f32> {
    let middle = (1i64 << (bits - 1)) as f64;
    (0..1i64 << bits)
        .map(|i| ((i as f64 - middle) * f64::from(step)) as f32)
        .collect()
}

/// Checks a caller's centroid table for `bits`.
pub fn validate_centroids(centroids: &[f32], bits: u8) -> Result<()> {
    let levels = 1usize << bits;
    if centroids.len() != levels {
        return Err(invalid(
            "centroids",
            format!(
                "bits={bits} needs {levels} centroids, got {}",
                centroids.len()
            ),
        ));
    }
    if let Some(bad) = centroids.iter().find(|v| !v.is_finite()) {
        return Err(invalid("centroids", format!("non-finite centroid {bad}")));
    }
    if let Some(w) = centroids.windows(2).find(|w| w[0] >= w[1]) {
        return Err(invalid(
            "centroids",
            format!(
                "must be strictly increasing, found {} followed by {}",
                w[0], w[1]
            ),
        ));
    }
    Ok(())
}

/// Nearest-centroid coder for one table.
#[derive(Debug, Clone)]
pub struct Quantizer {
    centroids: Vec<f32>,
    boundaries: Vec<f32>,
    /// For a uniform table: its first level and `1 / step`, for a first guess of the code.
    uniform: Option<(f32, f32)>,
}

impl Quantizer {
    /// Coder for a sorted table (validated by the caller).
    pub fn new(centroids: &[f32]) -> Self {
        let boundaries = centroids.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        Self {
            centroids: centroids.to_vec(),
            boundaries,
            uniform: None,
        }
    }

    /// Coder for [`uniform_table`]`(bits, step)`: the same codes as [`Quantizer::new`] of
    /// that table, found from `z / step` and checked against the neighbouring boundaries.
    pub fn uniform(bits: u8, step: f32) -> Self {
        Self::uniform_grid(uniform_table(bits, step), step)
    }

    /// The quantizer of [`midtread_table`].
    pub fn midtread(bits: u8, step: f32) -> Self {
        Self::uniform_grid(midtread_table(bits, step), step)
    }

    fn uniform_grid(table: Vec<f32>, step: f32) -> Self {
        Self {
            uniform: Some((table[0], 1.0 / step)),
            ..Self::new(&table)
        }
    }

    /// [`Quantizer::code`] starting from a guess that is at most a code or two off.
    #[inline]
    fn code_near(&self, z: f32, guess: f32) -> u8 {
        let last = self.boundaries.len();
        let mut code = (guess.max(0.0) as usize).min(last);
        while code > 0 && self.boundaries[code - 1] >= z {
            code -= 1;
        }
        while code < last && self.boundaries[code] < z {
            code += 1;
        }
        code as u8
    }

    /// Code of `z`: the number of boundaries strictly below it.
    #[inline]
    pub fn code(&self, z: f32) -> u8 {
        // Boundaries are strictly increasing, so this is `#{j : z > β_j}`.
        self.boundaries.partition_point(|&b| b < z) as u8
    }

    /// [`Quantizer::code`] of every value of `z` into `out` (same length). Up to 4 bits the
    /// count runs boundary by boundary over chunks of values, which vectorises: about 4×
    /// faster than a search per value, whose branches mispredict on random data.
    #[inline(always)]
    pub fn codes(&self, z: &[f32], out: &mut [u8]) {
        const CHUNK: usize = 64;
        if self.boundaries.len() > 15 {
            match self.uniform {
                Some((first, inv_step)) => out
                    .iter_mut()
                    .zip(z)
                    .for_each(|(o, &v)| *o = self.code_near(v, (v - first) * inv_step + 0.5)),
                None => out.iter_mut().zip(z).for_each(|(o, &v)| *o = self.code(v)),
            }
            return;
        }
        let mut counts = [0u32; CHUNK];
        for (o, values) in out.chunks_mut(CHUNK).zip(z.chunks(CHUNK)) {
            let counts = &mut counts[..values.len()];
            counts.fill(0);
            for &b in &self.boundaries {
                for (c, &v) in counts.iter_mut().zip(values) {
                    *c += u32::from(b < v);
                }
            }
            o.iter_mut()
                .zip(counts.iter())
                .for_each(|(o, &c)| *o = c as u8);
        }
    }

    /// Centroid of `code` (codes come from validated bits, so always in range).
    #[inline]
    pub fn value(&self, code: u8) -> f32 {
        self.centroids[usize::from(code)]
    }

    /// The table.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_coder_matches_the_generic_one() {
        let mut probes: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0071).collect();
        for (bits, step) in [(5u8, 0.3376f32), (6, 0.1), (8, 0.013), (5, 1e-3)] {
            let fast = Quantizer::uniform(bits, step);
            let generic = Quantizer::new(&uniform_table(bits, step));
            probes.extend(
                generic
                    .boundaries
                    .iter()
                    .flat_map(|b| [*b, b.next_up(), b.next_down()]),
            );
            probes.extend([f32::MIN, -1e30, 1e30, f32::MAX]);
            let (mut a, mut b) = (vec![0u8; probes.len()], vec![0u8; probes.len()]);
            fast.codes(&probes, &mut a);
            generic.codes(&probes, &mut b);
            assert_eq!(a, b, "bits {bits} step {step}");
        }
    }

    #[test]
    fn code_counts_the_boundaries_strictly_below() {
        for bits in 1..=8u32 {
            let table: Vec<f32> = gaussian_lloyd_max(1 << bits)
                .iter()
                .map(|&c| c as f32)
                .collect();
            let q = Quantizer::new(&table);
            let mut probes: Vec<f32> = q.boundaries.clone();
            probes.extend(q.boundaries.iter().map(|b| b.next_up()));
            probes.extend(q.boundaries.iter().map(|b| b.next_down()));
            probes.extend([-1e30, -5.0, 0.0, 5.0, 1e30, f32::MIN, f32::MAX]);
            for &z in &probes {
                let count = q.boundaries.iter().filter(|&&b| b < z).count();
                assert_eq!(usize::from(q.code(z)), count, "bits {bits} z {z}");
            }
            let mut batch = vec![0u8; probes.len()];
            q.codes(&probes, &mut batch);
            let one_by_one: Vec<u8> = probes.iter().map(|&z| q.code(z)).collect();
            assert_eq!(batch, one_by_one, "bits {bits}");
        }
        let q = Quantizer::new(&[-1.0, 0.0, 1.0]);
        assert_eq!([-2.0, -0.5, 0.5, 2.0].map(|z| q.code(z)), [0, 0, 1, 2]);
    }

    #[test]
    fn gaussian_tables_have_the_known_mse() {
        let expected = [0.3634, 0.1175, 0.03454, 0.009497];
        for (bits, want) in (1..=4u32).zip(expected) {
            let c = gaussian_lloyd_max(1 << bits);
            let mse = gaussian_mse(&c);
            assert!(
                (mse - want).abs() < 0.5e-4 * want.max(0.01) * 10.0,
                "bits {bits}: mse {mse}, want {want}"
            );
            // Symmetric around zero.
            for (a, b) in c.iter().zip(c.iter().rev()) {
                assert!((a + b).abs() < 1e-9);
            }
        }
        assert!((gaussian_lloyd_max(2)[1] - (2.0 / std::f64::consts::PI).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn wide_tables_have_the_known_mse() {
        // MSE of the Lloyd–Max fixed point, evaluated with mpmath (40 digits, quadrature
        // of (x − c)² φ(x) over each cell) at centroids from an independent Newton solve.
        let expected = [
            (5u8, 0.002_504_668_355_674_8),
            (6, 0.000_644_239_665_317_262),
            (7, 0.000_163_478_229_980_237),
            (8, 4.118_508_286_711_75e-5),
        ];
        for (bits, want) in expected {
            let got = gaussian_distortion(bits);
            assert!(
                (got - want).abs() < 1e-9 * want,
                "bits {bits}: mse {got}, want {want}"
            );
            let c = gaussian_table(bits);
            assert_eq!(c.len(), 1 << bits);
            assert!(c.windows(2).all(|w| w[0] < w[1]));
            for (a, b) in c.iter().zip(c.iter().rev()) {
                assert!((a + b).abs() < 1e-6, "bits {bits}: asymmetric {a} {b}");
            }
        }
        // High-resolution theory: D(b) · 4^b tends to √3 π / 2 ≈ 2.72.
        let tail = gaussian_distortion(8) * 4f64.powi(8);
        assert!((2.6..2.73).contains(&tail), "{tail}");
        // Distortion decreases with diminishing returns (the greedy allocation relies on it).
        for b in 0..7u8 {
            let (d0, d1, d2) = (
                gaussian_distortion(b),
                gaussian_distortion(b + 1),
                gaussian_distortion(b + 2),
            );
            assert!(d0 - d1 > d1 - d2 && d1 - d2 > 0.0, "bits {b}");
        }
    }

    #[test]
    fn newton_finds_the_lloyd_fixed_point() {
        for bits in 1..=4u32 {
            let lloyd = gaussian_lloyd_max(1 << bits);
            let newton = gaussian_lloyd_max_newton(1 << bits);
            for (a, b) in lloyd.iter().zip(&newton) {
                assert!((a - b).abs() < 1e-9, "bits {bits}: {a} vs {b}");
                assert_eq!(*a as f32, *b as f32, "bits {bits}");
            }
        }
    }

    #[test]
    fn coding_picks_the_nearest_centroid() {
        let q = Quantizer::new(gaussian_table(2));
        for i in -400..=400 {
            let z = i as f32 / 100.0;
            let code = q.code(z);
            let best = (0..4u8)
                .min_by(|&a, &b| {
                    (q.value(a) - z)
                        .abs()
                        .partial_cmp(&(q.value(b) - z).abs())
                        .unwrap()
                })
                .unwrap();
            assert!((q.value(code) - z).abs() <= (q.value(best) - z).abs());
        }
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(validate_centroids(&[0.0, 1.0], 2).is_err());
        assert!(validate_centroids(&[1.0, 0.0], 1).is_err());
        assert!(validate_centroids(&[0.0, f32::NAN], 1).is_err());
        assert!(validate_centroids(&[-1.0, 1.0], 1).is_ok());
    }
}
