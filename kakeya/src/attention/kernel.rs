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
    // The V rotation's seed and signs (made from the seed: chunks do not hold them).
    let mut v_seed: Option<u64> = None;
    let mut v_signs: Vec<f32> = Vec::new();
    // The current K and V blocks' means as f32 (chunks hold them as the encoding does).
    let (mut k_mean, mut v_mean) = (vec![0.0f32; dim], vec![0.0f32; dim]);
    let mut rope_mean = vec![0.0f32; dim];
    let mut weights = vec![0.0f32; rows * dim]; // RoPE-mean weights: a (half) then b (half)
    let mut k_tile = vec![0.0f32; TILE * dim];
    let mut v_tile = vec![0.0f32; TILE * dim];
    let mut k_scale = [0.0f32; TILE];
    let mut v_scale = [0.0f32; TILE];
    let mut scores = vec![0.0f32; rows * TILE];
    let mut v_weight = vec![0.0f32; rows * TILE];
    let mut base = vec![0.0f32; rows];
    let mut offset = 0usize;
    let (keys, values) = (&req.keys[b], &req.values[b]);
    for (kc, vc) in keys.iter().zip(values.iter()) {
        let (kc, vc): (&AttnChunk, &AttnChunk) = (kc, vc);
        if q_rot_seed != Some(kc.seed) {
            let signs = kc.signs();
            q_rot.copy_from_slice(&q);
            q_rot
                .chunks_exact_mut(dim)
                .for_each(|row| hadamard::rotate(row, &signs));
            q_rot_seed = Some(kc.seed);
        }
        if v_seed != Some(vc.seed) {
            // Same seed, same signs (every chunk has `dim` values); another seed may still
            // give the same signs, and then the rotated sums go on without a flush.
            let signs = vc.signs();
            if v_seed.is_some() && signs != v_signs {
                st.flush(&v_signs);
            }
            v_signs = signs;
            v_seed = Some(vc.seed);
        }
        let rope = kc.rope_mean.as_ref().map(|mean| {
            mean.read(h * dim, &mut rope_mean);
            for (qr, w) in q.chunks_exact(dim).zip(weights.chunks_exact_mut(dim)) {
                let (a, bw) = w.split_at_mut(half);
                mean_term_weights(qr, &rope_mean, a, bw);
            }
            req.rope
                .expect("validated: a RoPE-mean chunk has a table")
                .row(b)
        });
        let (kb, vb) = (kc.head_blocks(h), vc.head_blocks(h));
        let (mut ki, mut vi) = (0usize, 0usize);
        // The blocks whose means `k_mean` and `v_mean` hold (none yet in this chunk).
        let (mut k_mean_of, mut v_mean_of) = (None, None);
        let mut t = req.skip[b].saturating_sub(offset).min(kc.tokens);
        while t < kc.tokens {
            while kb[ki].first + kb[ki].rows <= t {
                ki += 1;
            }
            while vb[vi].first + vb[vi].rows <= t {
                vi += 1;
            }
            let (kblk, vblk): (&HeadBlock, &HeadBlock) = (&kb[ki], &vb[vi]);
            if k_mean_of != Some(ki) {
                kblk.mean.read(0, &mut k_mean);
                k_mean_of = Some(ki);
            }
            if v_mean_of != Some(vi) {
                vblk.mean.read(0, &mut v_mean);
                v_mean_of = Some(vi);
            }
            let end = (kblk.first + kblk.rows)
                .min(vblk.first + vblk.rows)
                .min(t + TILE);
            let n = end - t;
            let (kf, vf) = (t - kblk.first, t - vblk.first);
            // Scores: q·μ + s (R q)·ẑ (+ q·RoPE_p(μ_pre)).
            kblk.scales.read(kf, &mut k_scale[..n]);
            for (r, b) in base.iter_mut().enumerate() {
                *b = dot(&q[r * dim..(r + 1) * dim], &k_mean);
            }
            let rope_tile = rope.map(|(cos, sin)| {
                let p0 = (kc.position + t) * half;
                (&cos[p0..p0 + n * half], &sin[p0..p0 + n * half])
            });
            let fast_k = fast::scores(
                kc,
                kblk,
                kf,
                n,
                &q_rot,
                rows,
                &k_scale,
                &base,
                &weights,
                rope_tile,
                &mut scores,
            );
            if !fast_k {
                kc.dequantize_rows(kblk, kf, &mut k_tile[..n * dim]);
                for r in 0..rows {
                    let qk = &q_rot[r * dim..(r + 1) * dim];
                    let sr = &mut scores[r * TILE..r * TILE + n];
                    for (i, s) in sr.iter_mut().enumerate() {
                        *s = k_scale[i] * dot(qk, &k_tile[i * dim..(i + 1) * dim]) + base[r];
                    }
                    if let Some((cos, sin)) = rope_tile {
                        let (a, bw) = weights[r * dim..(r + 1) * dim].split_at(half);
                        for (i, s) in sr.iter_mut().enumerate() {
                            let c = &cos[i * half..(i + 1) * half];
                            *s += dot(a, c) + dot(bw, &sin[i * half..(i + 1) * half]);
                        }
                    }
                }
            }
            // Online softmax.
            for r in 0..rows {
                let sr = &mut scores[r * TILE..r * TILE + n];
                let tile_max = lanes_max(sr);
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
                st.sum[r] += lanes_sum(sr);
            }
            // Values: Σ p μ_v + Σ (p s) ẑ.
            vblk.scales.read(vf, &mut v_scale[..n]);
            for r in 0..rows {
                let sr = &scores[r * TILE..r * TILE + n];
                let p_sum = lanes_sum(sr);
                st.acc_out[r * dim..(r + 1) * dim]
                    .iter_mut()
                    .zip(&v_mean)
                    .for_each(|(o, m)| *o += p_sum * m);
                for (w, (&p, &s)) in v_weight[r * TILE..r * TILE + n]
                    .iter_mut()
                    .zip(sr.iter().zip(&v_scale[..n]))
                {
                    *w = p * s;
                }
            }
            if !fast::accumulate(vc, vblk, vf, n, rows, &v_weight, &mut st.acc_rot) {
                vc.dequantize_rows(vblk, vf, &mut v_tile[..n * dim]);
                for r in 0..rows {
                    let acc = &mut st.acc_rot[r * dim..(r + 1) * dim];
                    for (i, &w) in v_weight[r * TILE..r * TILE + n].iter().enumerate() {
                        acc.iter_mut()
                            .zip(&v_tile[i * dim..(i + 1) * dim])
                            .for_each(|(a, &z)| *a += w * z);
                    }
                }
            }
            t = end;
        }
        offset += kc.tokens;
    }
    if v_seed.is_some() {
        st.flush(&v_signs);
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

/// The code at position `index` (`row · D + j`) of a block's packed codes.
#[inline(always)]
fn code_at(codes: &[u8], index: usize, bits: u8) -> usize {
    let bit = index * usize::from(bits);
    let (byte, shift) = (bit / 8, bit % 8);
    let lo = u16::from(codes.get(byte).copied().unwrap_or(0));
    let hi = u16::from(codes.get(byte + 1).copied().unwrap_or(0));
    usize::from(((lo | (hi << 8)) >> shift) & ((1u16 << bits) - 1))
}

/// The outliers of `block` in rows `from .. from + n`: `(row within the tile, j, z − c[code])`.
#[inline(always)]
fn outlier_deltas<'a>(
    chunk: &'a AttnChunk,
    block: &'a HeadBlock,
    from: usize,
    n: usize,
) -> impl Iterator<Item = (usize, usize, f32)> + 'a {
    let dim = chunk.dim;
    let (lo, hi) = ((from * dim) as u32, ((from + n) * dim) as u32);
    let first = block.outlier_at.partition_point(|&i| i < lo);
    block.outlier_at[first..]
        .iter()
        .zip(&block.outlier_z[first..])
        .take_while(move |(&at, _)| at < hi)
        .map(move |(&at, &z)| {
            let at = at as usize;
            let c = chunk.centroids[code_at(&block.codes, at, chunk.bits)];
            (at / dim - from, at % dim, crate::f16::to_f32(z) - c)
        })
}

/// The AVX2 paths (codes of 1–4 bits, `head_dim % 16 == 0`); each returns `false` where it
/// does not apply, and the caller runs the portable loops.
mod fast {
    use super::{outlier_deltas, AttnChunk, HeadBlock, TILE};

    /// Query rows per AVX2 call (accumulators kept in registers).
    #[cfg(target_arch = "x86_64")]
    const MAX_ROWS: usize = 8;

    #[inline(always)]
    fn applies(chunk: &AttnChunk) -> bool {
        cfg!(target_arch = "x86_64")
            && crate::simd::enabled()
            && chunk.bits <= 4
            && chunk.dim % 16 == 0
    }

    #[cfg(target_arch = "x86_64")]
    macro_rules! by_bits_rows {
        ($bits:expr, $rows:expr, $f:ident, ($($arg:expr),*)) => {
            match ($bits, $rows) {
                (1, 1) => crate::attention::avx2::$f::<1, 1>($($arg),*), (1, 2) => crate::attention::avx2::$f::<1, 2>($($arg),*),
                (1, 3) => crate::attention::avx2::$f::<1, 3>($($arg),*), (1, 4) => crate::attention::avx2::$f::<1, 4>($($arg),*),
                (1, 5) => crate::attention::avx2::$f::<1, 5>($($arg),*), (1, 6) => crate::attention::avx2::$f::<1, 6>($($arg),*),
                (1, 7) => crate::attention::avx2::$f::<1, 7>($($arg),*), (1, _) => crate::attention::avx2::$f::<1, 8>($($arg),*),
                (2, 1) => crate::attention::avx2::$f::<2, 1>($($arg),*), (2, 2) => crate::attention::avx2::$f::<2, 2>($($arg),*),
                (2, 3) => crate::attention::avx2::$f::<2, 3>($($arg),*), (2, 4) => crate::attention::avx2::$f::<2, 4>($($arg),*),
                (2, 5) => crate::attention::avx2::$f::<2, 5>($($arg),*), (2, 6) => crate::attention::avx2::$f::<2, 6>($($arg),*),
                (2, 7) => crate::attention::avx2::$f::<2, 7>($($arg),*), (2, _) => crate::attention::avx2::$f::<2, 8>($($arg),*),
                (3, 1) => crate::attention::avx2::$f::<3, 1>($($arg),*), (3, 2) => crate::attention::avx2::$f::<3, 2>($($arg),*),
                (3, 3) => crate::attention::avx2::$f::<3, 3>($($arg),*), (3, 4) => crate::attention::avx2::$f::<3, 4>($($arg),*),
                (3, 5) => crate::attention::avx2::$f::<3, 5>($($arg),*), (3, 6) => crate::attention::avx2::$f::<3, 6>($($arg),*),
                (3, 7) => crate::attention::avx2::$f::<3, 7>($($arg),*), (3, _) => crate::attention::avx2::$f::<3, 8>($($arg),*),
                (_, 1) => crate::attention::avx2::$f::<4, 1>($($arg),*), (_, 2) => crate::attention::avx2::$f::<4, 2>($($arg),*),
                (_, 3) => crate::attention::avx2::$f::<4, 3>($($arg),*), (_, 4) => crate::attention::avx2::$f::<4, 4>($($arg),*),
                (_, 5) => crate::attention::avx2::$f::<4, 5>($($arg),*), (_, 6) => crate::attention::avx2::$f::<4, 6>($($arg),*),
                (_, 7) => crate::attention::avx2::$f::<4, 7>($($arg),*), (_, _) => crate::attention::avx2::$f::<4, 8>($($arg),*),
            }
        };
    }

    /// Scores of a K tile into `scores[r · TILE + i]` (see `avx2::scores`), outliers corrected.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn scores(
        kc: &AttnChunk,
        kblk: &HeadBlock,
        from: usize,
        n: usize,
        q_rot: &[f32],
        rows: usize,
        k_scale: &[f32],
        base: &[f32],
        weights: &[f32],
        rope: Option<(&[f32], &[f32])>,
        scores: &mut [f32],
    ) -> bool {
        if !applies(kc) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use crate::attention::avx2;
            let dim = kc.dim;
            let row_bytes = dim * usize::from(kc.bits) / 8;
            // SAFETY: `applies` checked AVX2+FMA (`simd::enabled`), bits ≤ 4 and dim % 16 == 0;
            // the slices hold what `avx2::scores` asserts (tile rows of codes, R query rows).
            unsafe {
                let table = avx2::Table::new(&kc.centroids, kc.bits);
                let mut r0 = 0;
                while r0 < rows {
                    let r = (rows - r0).min(MAX_ROWS);
                    let tile = avx2::ScoreTile {
                        codes: &kblk.codes[from * row_bytes..],
                        n,
                        dim,
                        q_rot: &q_rot[r0 * dim..],
                        scale: k_scale,
                        base: &base[r0..],
                        rope: rope.map(|(c, s)| (&weights[r0 * dim..], c, s)),
                    };
                    let out = &mut scores[r0 * TILE..];
                    by_bits_rows!(kc.bits, r, scores, (&table, &tile, out, TILE));
                    r0 += r;
                }
            }
            for (i, j, delta) in outlier_deltas(kc, kblk, from, n) {
                for r in 0..rows {
                    scores[r * TILE + i] += k_scale[i] * (q_rot[r * dim + j] * delta);
                }
            }
        }
        true
    }

    /// `acc_rot[r] += Σ_i w[r · TILE + i] ẑ_i` over a V tile, outliers corrected.
    #[inline(always)]
    pub(super) fn accumulate(
        vc: &AttnChunk,
        vblk: &HeadBlock,
        from: usize,
        n: usize,
        rows: usize,
        w: &[f32],
        acc_rot: &mut [f32],
    ) -> bool {
        if !applies(vc) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use crate::attention::avx2;
            let dim = vc.dim;
            let row_bytes = dim * usize::from(vc.bits) / 8;
            // SAFETY: as in `scores`; `acc_rot` holds `rows · dim` values, `w` `rows` rows of
            // `TILE` weights.
            unsafe {
                let table = avx2::Table::new(&vc.centroids, vc.bits);
                let codes = &vblk.codes[from * row_bytes..];
                let mut r0 = 0;
                while r0 < rows {
                    let r = (rows - r0).min(MAX_ROWS);
                    let (wr, acc) = (&w[r0 * TILE..], &mut acc_rot[r0 * dim..]);
                    by_bits_rows!(
                        vc.bits,
                        r,
                        accumulate,
                        (&table, codes, n, dim, wr, TILE, acc)
                    );
                    r0 += r;
                }
            }
            for (i, j, delta) in outlier_deltas(vc, vblk, from, n) {
                for r in 0..rows {
                    acc_rot[r * dim + j] += w[r * TILE + i] * delta;
                }
            }
        }
        true
    }
}

/// `Σ x` as eight interleaved partial sums combined pairwise (a fixed order that vectorises).
#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a += v);
    }
    acc.iter_mut().zip(rest).for_each(|(a, &v)| *a += v);
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// The largest of `x` (−∞ for none), eight lanes at a time (NaN-free input).
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        acc.iter_mut()
            .zip(c)
            .for_each(|(a, &v)| *a = if v > *a { v } else { *a });
    }
    acc.iter_mut()
        .zip(rest)
        .for_each(|(a, &v)| *a = if v > *a { v } else { *a });
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}
