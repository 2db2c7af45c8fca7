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

/// The Gaussian Lloyd–Max table for `bits` (1..=4), computed once.
pub fn gaussian_table(bits: u8) -> &'static [f32] {
    static TABLES: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        (1..=4)
            .map(|b| {
                gaussian_lloyd_max(1 << b)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect()
            })
            .collect()
    });
    &tables[usize::from(bits) - 1]
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
}

impl Quantizer {
    /// Coder for a sorted table (validated by the caller).
    pub fn new(centroids: &[f32]) -> Self {
        let boundaries = centroids.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        Self {
            centroids: centroids.to_vec(),
            boundaries,
        }
    }

    /// Code of `z`: the number of boundaries strictly below it.
    #[inline]
    pub fn code(&self, z: f32) -> u8 {
        self.boundaries.iter().filter(|&&b| z > b).count() as u8
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
