//! Attention for one decode step computed on the codes, without decoding K or V.
//!
//! With basis `"none"` a key decodes as `k̂ = μ̂ + Rᵀ(s ẑ)` (`R` the seeded Hadamard
//! rotation, `s` the row's scale, `ẑ` the centroids of its codes, outliers in place), so
//! `q·k̂ = q·μ̂ + s (R q)·ẑ` and `Σ p v̂ = (Σ p) μ̂_v + Rᵀ Σ (p s) ẑ`. [`attend`] rotates each
//! query once per chunk rotation, dequantizes a tile of codes in registers/L1, scores it,
//! keeps a running max and sum (online softmax), accumulates V in the rotated domain and
//! applies one inverse rotation per head at the end. All query rows that share a kv head
//! (GQA groups, several query positions) run in one pass over the codes. K chunks in the
//! RoPE-mean layout add `q·RoPE_p(μ_pre)` from a shared `cos`/`sin` table ([`RopeTable`]).
//!
//! The result is partial — `(out, max, sum)` per query row over the compressed tokens only —
//! and is merged with attention over the exact tokens (sink, window, current) by
//! log-sum-exp ([`softmax::merge`]). Jobs are (batch row, kv head) pairs, each computed
//! serially, so the result does not depend on the thread count.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod chunk;
mod kernel;
pub mod rope;
pub mod softmax;

pub use chunk::AttnChunk;
pub use rope::RopeTable;

use crate::error::{CodecError, Result};
use crate::parallel::map_jobs;

/// One decode step's inputs.
pub struct Request<'a> {
    /// `[batch, kv_heads, rows, dim]` query rows (post-RoPE, not yet multiplied by `scale`):
    /// the query heads of each kv head (times query positions), in any fixed order.
    pub queries: &'a [f32],
    /// Batch rows.
    pub batch: usize,
    /// kv heads.
    pub kv_heads: usize,
    /// Query rows per kv head.
    pub rows: usize,
    /// Head dimension.
    pub dim: usize,
    /// K chunks of each batch row, in token order.
    pub keys: &'a [Vec<&'a AttnChunk>],
    /// V chunks of each batch row, paired with `keys` (same token counts).
    pub values: &'a [Vec<&'a AttnChunk>],
    /// Per batch row: how many leading compressed tokens are masked out (left padding).
    pub skip: &'a [usize],
    /// `cos`/`sin` table, needed when a K chunk carries a pre-RoPE mean.
    pub rope: Option<&'a RopeTable>,
    /// Softmax scale applied to the scores (`1/√dim` for most models).
    pub scale: f32,
}

/// Attention over the compressed tokens only, per (batch row, kv head, query row).
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// `[batch, kv_heads, rows, dim]`: `Σ p v / Σ p` (zeros where no token is attended).
    pub out: Vec<f32>,
    /// `[batch, kv_heads, rows]`: the largest score (−∞ where no token is attended).
    pub max: Vec<f32>,
    /// `[batch, kv_heads, rows]`: `Σ e^{score − max}` (0 where no token is attended).
    pub sum: Vec<f32>,
}

fn check(req: &Request<'_>) -> Result<()> {
    let shape_err = |msg: String| Err(CodecError::Shape(msg));
    let want = [req.batch, req.kv_heads, req.rows, req.dim]
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b));
    if want != Some(req.queries.len()) {
        return shape_err(format!(
            "queries have {} values, expected batch × kv_heads × rows × dim = {} × {} × {} × {}",
            req.queries.len(),
            req.batch,
            req.kv_heads,
            req.rows,
            req.dim
        ));
    }
    if req.keys.len() != req.batch || req.values.len() != req.batch || req.skip.len() != req.batch {
        return shape_err(format!(
            "expected {} batch rows of keys, values and skip, got {}, {} and {}",
            req.batch,
            req.keys.len(),
            req.values.len(),
            req.skip.len()
        ));
    }
    if !req.scale.is_finite() {
        return shape_err(format!("scale must be finite, got {}", req.scale));
    }
    if let Some(bad) = req.queries.iter().find(|v| !v.is_finite()) {
        return Err(CodecError::NonFinite {
            token: 0,
            head: 0,
            dim: 0,
            value: *bad,
        });
    }
    for b in 0..req.batch {
        let (ks, vs) = (&req.keys[b], &req.values[b]);
        if ks.len() != vs.len() {
            return shape_err(format!(
                "batch row {b}: {} K chunks but {} V chunks",
                ks.len(),
                vs.len()
            ));
        }
        for (i, (k, v)) in ks.iter().zip(vs.iter()).enumerate() {
            for (name, c) in [("K", k), ("V", v)] {
                if c.heads != req.kv_heads || c.dim != req.dim {
                    return shape_err(format!(
                        "batch row {b}, {name} chunk {i}: [heads, dim] = [{}, {}], expected [{}, {}]",
                        c.heads, c.dim, req.kv_heads, req.dim
                    ));
                }
            }
            if k.tokens != v.tokens {
                return shape_err(format!(
                    "batch row {b}, chunk {i}: K has {} tokens, V has {}",
                    k.tokens, v.tokens
                ));
            }
            if v.rope_mean.is_some() {
                return shape_err(format!(
                    "batch row {b}, V chunk {i} carries a pre-RoPE mean (only K chunks may)"
                ));
            }
            if k.rope_mean.is_some() {
                let Some(table) = req.rope else {
                    return shape_err(format!(
                        "batch row {b}, K chunk {i} carries a pre-RoPE mean but no RoPE table was given"
                    ));
                };
                if table.half() * 2 != req.dim {
                    return shape_err(format!(
                        "RoPE table has {} frequencies, head_dim {} needs {}",
                        table.half(),
                        req.dim,
                        req.dim / 2
                    ));
                }
                if k.position + k.tokens > table.len() {
                    return shape_err(format!(
                        "batch row {b}, K chunk {i} covers positions {}..{} but the RoPE table holds {}",
                        k.position,
                        k.position + k.tokens,
                        table.len()
                    ));
                }
                if table.rows() != 1 && table.rows() != req.batch {
                    return shape_err(format!(
                        "RoPE table has {} rows for a batch of {}",
                        table.rows(),
                        req.batch
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Attention of the query rows over the compressed chunks (see the module docs). Validates
/// every shape first (errors name expected versus actual); `threads` as for the codec.
pub fn attend(req: &Request<'_>, threads: Option<usize>) -> Result<Partial> {
    check(req)?;
    let jobs = req.batch * req.kv_heads;
    let results = map_jobs(
        threads,
        jobs,
        #[inline(always)]
        |job| kernel::run(req, job / req.kv_heads, job % req.kv_heads),
    );
    let mut out = Vec::with_capacity(req.queries.len());
    let mut max = Vec::with_capacity(jobs * req.rows);
    let mut sum = Vec::with_capacity(jobs * req.rows);
    for (o, m, s) in results {
        out.extend_from_slice(&o);
        max.extend_from_slice(&m);
        sum.extend_from_slice(&s);
    }
    Ok(Partial { out, max, sum })
}

#[cfg(test)]
mod tests;
