//! The per-(batch row, kv head) job of [`crate::attention::attend`]: score codes against the
//! rotated queries, online softmax, accumulate V in the rotated domain, one inverse rotation.

use super::chunk::{AttnChunk, HeadBlock};
use super::rope::mean_term_weights;
use super::softmax::exp_in_place;
use super::Request;
use crate::hadamard;
use crate::simd::dot;

/// Tokens scored and accumulated per step (the dequantized tile of K or V stays in L1:
/// 64 × 128 f32 = 32 KiB at most).
pub(crate) const TILE: usize = 64;

/// Running state of one query row.
struct Rows {
    rows: usize,
    dim: usize,
    /// Running max and sum of `e^{score − max}`.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// `Σ p · μ_v` (V means, model domain).
    acc_out: Vec<f32>,
    /// `Σ p · s · ẑ` (rotated domain of the current V rotation).
    acc_rot: Vec<f32>,
}

impl Rows {
    /// Adds the inverse rotation of `acc_rot` to `acc_out` and clears it.
    #[inline(always)]
    fn flush(&mut self, signs: &[f32]) {
        let dim = self.dim;
        for r in 0..self.rows {
            let rot = &mut self.acc_rot[r * dim..(r + 1) * dim];
            hadamard::unrotate(rot, signs);
            self.acc_out[r * dim..(r + 1) * dim]
                .iter_mut()
                .zip(rot.iter_mut())
                .for_each(|(o, v)| {
                    *o += *v;
                    *v = 0.0;
                });
        }
    }
}

/// One job's result: `rows × dim` outputs (normalised), `rows` maxima and sums.
pub(crate) type JobResult = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Attention of the query rows of batch row `b`, kv head `h` over its compressed chunks.
#[inline(always)]
pub(crate) fn run(req: &Request<'_>, b: usize, h: usize) -> JobResult {
    let (rows, dim) = (req.rows, req.dim);
    let half = dim / 2;
    let at = (b * req.kv_heads + h) * rows * dim;
    let q: Vec<f32> = req.queries[at..at + rows * dim]
        .iter()
        .map(|&v| v * req.scale)
        .collect();
    let mut st = Rows {
        rows,
        dim,
        max: vec![f32::NEG_INFINITY; rows],
        sum: vec![0.0; rows],
        acc_out: vec![0.0; rows * dim],
        acc_rot: vec![0.0; rows * dim],
    };
    let mut q_rot = vec![0.0f32; rows * dim];
    let mut q_rot_seed: Option<u64> = None;
    let mut v_signs: Option<&[f32]> = None;
    let mut weights = vec![0.0f32; rows * dim]; // RoPE-mean weights: a (half) then b (half)
    let mut k_tile = vec![0.0f32; TILE * dim];
    let mut v_tile = vec![0.0f32; TILE * dim];
    let mut k_scale = [0.0f32; TILE];
    let mut v_scale = [0.0f32; TILE];
    let mut scores = vec![0.0f32; rows * TILE];
    let mut offset = 0usize;
    let (keys, values) = (&req.keys[b], &req.values[b]);
    for (kc, vc) in keys.iter().zip(values.iter()) {
        let (kc, vc): (&AttnChunk, &AttnChunk) = (kc, vc);
        if q_rot_seed != Some(kc.seed) {
            q_rot.copy_from_slice(&q);
            q_rot
                .chunks_exact_mut(dim)
                .for_each(|row| hadamard::rotate(row, &kc.signs));
            q_rot_seed = Some(kc.seed);
        }
        if v_signs.is_some_and(|s| s != vc.signs.as_slice()) {
            st.flush(v_signs.unwrap_or_default());
        }
        v_signs = Some(&vc.signs);
        let rope = kc.rope_mean.as_ref().map(|mean| {
            let mean = &mean[h * dim..(h + 1) * dim];
            for (qr, w) in q.chunks_exact(dim).zip(weights.chunks_exact_mut(dim)) {
                let (a, bw) = w.split_at_mut(half);
                mean_term_weights(qr, mean, a, bw);
            }
            req.rope
                .expect("validated: a RoPE-mean chunk has a table")
                .row(b)
        });
        let (kb, vb) = (kc.head_blocks(h), vc.head_blocks(h));
        let (mut ki, mut vi) = (0usize, 0usize);
        let mut t = req.skip[b].saturating_sub(offset).min(kc.tokens);
        while t < kc.tokens {
            while kb[ki].first + kb[ki].rows <= t {
                ki += 1;
            }
            while vb[vi].first + vb[vi].rows <= t {
                vi += 1;
            }
            let (kblk, vblk): (&HeadBlock, &HeadBlock) = (&kb[ki], &vb[vi]);
            let end = (kblk.first + kblk.rows)
                .min(vblk.first + vblk.rows)
                .min(t + TILE);
            let n = end - t;
            // Scores: q·μ + s (R q)·ẑ (+ q·RoPE_p(μ_pre)).
            kc.dequantize_rows(kblk, t - kblk.first, &mut k_tile[..n * dim]);
            kblk.scales.read(t - kblk.first, &mut k_scale[..n]);
            for r in 0..rows {
                let qr = &q[r * dim..(r + 1) * dim];
                let qk = &q_rot[r * dim..(r + 1) * dim];
                let base = dot(qr, &kblk.mean);
                let sr = &mut scores[r * TILE..r * TILE + n];
                for (i, s) in sr.iter_mut().enumerate() {
                    *s = k_scale[i] * dot(qk, &k_tile[i * dim..(i + 1) * dim]) + base;
                }
                if let Some((cos, sin)) = rope {
                    let (a, bw) = weights[r * dim..(r + 1) * dim].split_at(half);
                    let p0 = kc.position + t;
                    for (i, s) in sr.iter_mut().enumerate() {
                        let p = (p0 + i) * half;
                        *s += dot(a, &cos[p..p + half]) + dot(bw, &sin[p..p + half]);
                    }
                }
                // Online softmax.
                let tile_max = sr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let new_max = st.max[r].max(tile_max);
                if st.max[r] != new_max {
                    let alpha = if st.max[r] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (st.max[r] - new_max).exp()
                    };
                    st.sum[r] *= alpha;
                    st.acc_out[r * dim..(r + 1) * dim]
                        .iter_mut()
                        .for_each(|v| *v *= alpha);
                    st.acc_rot[r * dim..(r + 1) * dim]
                        .iter_mut()
                        .for_each(|v| *v *= alpha);
                    st.max[r] = new_max;
                }
                sr.iter_mut().for_each(|s| *s -= new_max);
                exp_in_place(sr);
                st.sum[r] += sr.iter().sum::<f32>();
            }
            // Values: Σ p μ_v + Σ (p s) ẑ.
            vc.dequantize_rows(vblk, t - vblk.first, &mut v_tile[..n * dim]);
            vblk.scales.read(t - vblk.first, &mut v_scale[..n]);
            for r in 0..rows {
                let sr = &scores[r * TILE..r * TILE + n];
                let p_sum: f32 = sr.iter().sum();
                st.acc_out[r * dim..(r + 1) * dim]
                    .iter_mut()
                    .zip(&vblk.mean)
                    .for_each(|(o, m)| *o += p_sum * m);
                let acc = &mut st.acc_rot[r * dim..(r + 1) * dim];
                for (i, &p) in sr.iter().enumerate() {
                    let w = p * v_scale[i];
                    acc.iter_mut()
                        .zip(&v_tile[i * dim..(i + 1) * dim])
                        .for_each(|(a, &z)| *a += w * z);
                }
            }
            t = end;
        }
        offset += kc.tokens;
    }
    if let Some(signs) = v_signs {
        st.flush(signs);
    }
    let mut out = st.acc_out;
    for r in 0..rows {
        let l = st.sum[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        out[r * dim..(r + 1) * dim]
            .iter_mut()
            .for_each(|v| *v *= inv);
    }
    (out, st.max, st.sum)
}
