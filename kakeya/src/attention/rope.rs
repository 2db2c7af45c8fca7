//! The `cos`/`sin` of every cached position, half width (rotate-half RoPE: `cos = [c, c]`),
//! shared by all layers and heads: the kernel takes the RoPE term of a K chunk's pre-RoPE
//! mean from it (see [`mean_term_weights`]).

use crate::error::{CodecError, Result};

/// `cos`/`sin` tables, one row per batch element or one row for all.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RopeTable {
    half: usize,
    len: usize,
    /// Per row: `len × half` cosines and sines.
    rows: Vec<(Vec<f32>, Vec<f32>)>,
}

impl RopeTable {
    /// An empty table for `half = head_dim / 2` frequencies.
    pub fn new(half: usize) -> Result<Self> {
        if half == 0 {
            return Err(CodecError::Shape("RoPE table needs half >= 1".into()));
        }
        Ok(Self {
            half,
            len: 0,
            rows: vec![(Vec::new(), Vec::new())],
        })
    }

    /// Frequencies per position (`head_dim / 2`).
    pub fn half(&self) -> usize {
        self.half
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows held: 1 when every batch element shares the positions.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Appends positions `start .. start + n` from `cos`/`sin` of shape `[batch, n, half]`
    /// (`batch` 1: the same for every row). Positions already held are skipped (another
    /// layer recorded them); a gap is an error.
    pub fn append(&mut self, start: usize, batch: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
        let per = batch.checked_mul(self.half).filter(|&p| p > 0);
        let Some(per) = per else {
            return Err(CodecError::Shape(format!(
                "RoPE append needs batch >= 1, got {batch}"
            )));
        };
        if cos.len() != sin.len() || cos.len() % per != 0 {
            return Err(CodecError::Shape(format!(
                "cos/sin have {} and {} values, expected [batch={batch}, n, half={}]",
                cos.len(),
                sin.len(),
                self.half
            )));
        }
        let n = cos.len() / per;
        if start + n <= self.len {
            return Ok(());
        }
        if start != self.len {
            return Err(CodecError::Shape(format!(
                "RoPE table holds {} positions but positions {start}..{} were appended",
                self.len,
                start + n
            )));
        }
        if batch > 1 && self.rows.len() == 1 {
            self.rows = vec![self.rows[0].clone(); batch];
        }
        if batch != 1 && batch != self.rows.len() {
            return Err(CodecError::Shape(format!(
                "RoPE table has {} rows, append has batch {batch}",
                self.rows.len()
            )));
        }
        let m = n * self.half;
        for (r, (c, s)) in self.rows.iter_mut().enumerate() {
            let at = if batch == 1 { 0 } else { r * m };
            c.extend_from_slice(&cos[at..at + m]);
            s.extend_from_slice(&sin[at..at + m]);
        }
        self.len += n;
        Ok(())
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for (c, s) in &mut self.rows {
            c.truncate(len * self.half);
            s.truncate(len * self.half);
        }
        self.len = len;
    }

    /// Rows `indices` of a per-row table (beam search, batch selection); a shared table
    /// stays shared.
    pub fn select(&mut self, indices: &[usize]) -> Result<()> {
        if self.rows.len() == 1 {
            return Ok(());
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.rows.len()) {
            return Err(CodecError::Shape(format!(
                "row index {bad} out of range for a RoPE table of {} rows",
                self.rows.len()
            )));
        }
        self.rows = indices.iter().map(|&i| self.rows[i].clone()).collect();
        Ok(())
    }

    /// `cos`, `sin` of batch row `row` (`len × half` each).
    pub fn row(&self, row: usize) -> (&[f32], &[f32]) {
        let (c, s) = &self.rows[if self.rows.len() == 1 { 0 } else { row }];
        (c, s)
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.rows.iter().map(|(c, s)| (c.len() + s.len()) * 4).sum()
    }
}

/// For a query `q` and a pre-RoPE mean `μ` (both `D = 2·half`), the weights `(a, b)` with
/// `q · RoPE_p(μ) = a · cos_p + b · sin_p` (rotate-half RoPE: `RoPE_p(μ) = μ ⊙ [c, c] +
/// [−μ₂, μ₁] ⊙ [s, s]`): `a_j = q_j μ_j + q_{j+h} μ_{j+h}`, `b_j = q_{j+h} μ_j − q_j μ_{j+h}`.
pub fn mean_term_weights(q: &[f32], mean: &[f32], a: &mut [f32], b: &mut [f32]) {
    let h = a.len();
    let (q1, q2) = q.split_at(h);
    let (m1, m2) = mean.split_at(h);
    for j in 0..h {
        a[j] = q1[j] * m1[j] + q2[j] * m2[j];
        b[j] = q2[j] * m1[j] - q1[j] * m2[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_truncate_select_and_errors() {
        let mut t = RopeTable::new(2).unwrap();
        t.append(0, 1, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0])
            .unwrap();
        assert_eq!((t.len(), t.rows()), (2, 1));
        t.append(1, 1, &[3.0, 4.0], &[7.0, 8.0]).unwrap(); // already held: skipped
        assert_eq!(t.len(), 2);
        let err = t
            .append(5, 1, &[0.0; 2], &[0.0; 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds 2 positions but positions 5..6"),
            "{err}"
        );
        // a per-row append widens a shared table
        t.append(2, 2, &[9.0, 9.5, 10.0, 10.5], &[0.0; 4]).unwrap();
        assert_eq!((t.len(), t.rows()), (3, 2));
        assert_eq!(t.row(1).0, &[1.0, 2.0, 3.0, 4.0, 10.0, 10.5]);
        t.select(&[1, 1, 0]).unwrap();
        assert_eq!(t.rows(), 3);
        assert_eq!(t.row(2).0[4..], [9.0, 9.5]);
        assert!(t.select(&[7]).is_err());
        t.truncate(1);
        assert_eq!((t.len(), t.row(0).0.len()), (1, 2));
        assert_eq!(t.nbytes(), 3 * 2 * 2 * 4);
        let err = t
            .append(1, 2, &[0.0; 3], &[0.0; 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected [batch=2, n, half=2]"), "{err}");
    }

    #[test]
    fn mean_term_weights_give_the_rope_of_the_mean() {
        let (q, mean) = ([0.3f32, -1.2, 0.7, 2.0], [1.5f32, -0.4, 0.2, 0.9]);
        let (c, s) = ([0.6f32, -0.1], [0.8f32, 0.995]);
        let (mut a, mut b) = ([0.0f32; 2], [0.0f32; 2]);
        mean_term_weights(&q, &mean, &mut a, &mut b);
        // RoPE(mean) = mean ⊙ [c, c] + [−m₂, m₁] ⊙ [s, s]
        let rot = [
            mean[0] * c[0] - mean[2] * s[0],
            mean[1] * c[1] - mean[3] * s[1],
            mean[2] * c[0] + mean[0] * s[0],
            mean[3] * c[1] + mean[1] * s[1],
        ];
        let want: f32 = q.iter().zip(&rot).map(|(x, y)| x * y).sum();
        let got = a[0] * c[0] + a[1] * c[1] + b[0] * s[0] + b[1] * s[1];
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
