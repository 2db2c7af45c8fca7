//! Kernel == decode → attend, for every supported layout, with skip (padding), GQA,
//! several chunks and blocks, the RoPE-mean K layout, and any thread count.

use super::chunk::{Floats, Scales, CODE_PADDING};
use super::*;
use crate::config::{Basis, ScaleFormat, ScaleGranularity, SkeletonDtype};
use crate::rng::SplitMix64;
use crate::{encode, CodecConfig, Elements, Encoded, TensorView};

fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut g = vec![0.0f64; n];
    SplitMix64::new(seed, 9, 9, 9).fill_gaussian(&mut g);
    g.iter().map(|&v| v as f32).collect()
}

/// `[t, h, d]` data with heavy tails (outliers) and a per-(head, dim) offset (a mean).
fn kv(seed: u64, t: usize, h: usize, d: usize) -> Vec<f32> {
    gaussian(seed, t * h * d)
        .iter()
        .enumerate()
        .map(|(i, &v)| v + 0.3 * v * v * v + ((i % (h * d)) as f32 * 0.37).sin())
        .collect()
}

fn enc(x: &[f32], shape: [usize; 3], config: &CodecConfig) -> Encoded {
    encode(
        TensorView::new(Elements::F32(x), shape).unwrap(),
        config,
        None,
        None,
    )
    .unwrap()
}

fn layouts() -> Vec<(&'static str, CodecConfig)> {
    let mean_only = CodecConfig {
        basis: Basis::None,
        share_basis: true,
        block_size: 4096,
        outlier_threshold: Some(3.0),
        ..Default::default()
    };
    vec![
        (
            "recommended K (4-bit Lloyd-Max, f16 scales, outliers)",
            CodecConfig {
                bits: 4,
                ..mean_only.clone()
            },
        ),
        (
            "recommended V (3-bit)",
            CodecConfig {
                bits: 3,
                ..mean_only.clone()
            },
        ),
        (
            "per-block means, blocks of 40, 2-bit, seed 7",
            CodecConfig {
                bits: 2,
                block_size: 40,
                share_basis: false,
                seed: 7,
                ..mean_only.clone()
            },
        ),
        (
            "uniform-ec-log8 K (5-bit uniform, rANS, log8 scales)",
            CodecConfig {
                bits: 5,
                uniform_step: Some(0.3376),
                entropy_coding: true,
                scale_format: ScaleFormat::Log8,
                outlier_threshold: Some(4.5),
                ..mean_only.clone()
            },
        ),
        (
            "4-bit Lloyd-Max, log8 scales, outliers",
            CodecConfig {
                bits: 4,
                scale_format: ScaleFormat::Log8,
                ..mean_only.clone()
            },
        ),
        (
            "block log8 scales, entropy-coded 4-bit uniform, blocks of 50",
            CodecConfig {
                bits: 4,
                uniform_step: Some(0.6438),
                entropy_coding: true,
                scale_format: ScaleFormat::Log8,
                scale_granularity: ScaleGranularity::Block,
                block_size: 50,
                ..mean_only.clone()
            },
        ),
        (
            "block scales, entropy-coded 4-bit, no outliers",
            CodecConfig {
                bits: 4,
                uniform_step: Some(0.6438),
                entropy_coding: true,
                scale_granularity: ScaleGranularity::Block,
                outlier_threshold: None,
                block_size: 50,
                ..mean_only.clone()
            },
        ),
        (
            "f32 means (skeleton_dtype f32), per-block, blocks of 64, 3-bit",
            CodecConfig {
                bits: 3,
                block_size: 64,
                share_basis: false,
                skeleton_dtype: SkeletonDtype::F32,
                ..mean_only.clone()
            },
        ),
    ]
}

/// Reference: decode, add the RoPE of the pre-RoPE mean, softmax in f64.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    [batch, kvh, rows, d]: [usize; 4],
    keys: &[Vec<&AttnChunk>],
    values: &[Vec<&AttnChunk>],
    skip: &[usize],
    rope: Option<&RopeTable>,
    scale: f32,
) -> Partial {
    let mut p = Partial {
        out: vec![0.0; batch * kvh * rows * d],
        max: vec![f32::NEG_INFINITY; batch * kvh * rows],
        sum: vec![0.0; batch * kvh * rows],
    };
    let half = d / 2;
    for b in 0..batch {
        // Decoded K and V of this row, [t, h, d].
        let mut k_all = Vec::new();
        let mut v_all = Vec::new();
        for (kc, vc) in keys[b].iter().zip(&values[b]) {
            let mut k = kc.decode();
            if let Some(mean) = kc.rope_mean() {
                let (cos, sin) = rope.unwrap().row(b);
                for t in 0..kc.tokens {
                    let pos = kc.position() + t;
                    for h in 0..kvh {
                        let m = &mean[h * d..(h + 1) * d];
                        let row = &mut k[(t * kvh + h) * d..][..d];
                        for j in 0..half {
                            let (c, s) = (cos[pos * half + j], sin[pos * half + j]);
                            row[j] += m[j] * c - m[j + half] * s;
                            row[j + half] += m[j + half] * c + m[j] * s;
                        }
                    }
                }
            }
            k_all.extend(k);
            v_all.extend(vc.decode());
        }
        let t_all = k_all.len() / (kvh * d);
        for h in 0..kvh {
            for r in 0..rows {
                let at = ((b * kvh + h) * rows + r) * d;
                let qr = &q[at..at + d];
                let scores: Vec<f64> = (skip[b].min(t_all)..t_all)
                    .map(|t| {
                        let k = &k_all[(t * kvh + h) * d..][..d];
                        qr.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let l: f64 = w.iter().sum();
                for (i, t) in (skip[b].min(t_all)..t_all).enumerate() {
                    let v = &v_all[(t * kvh + h) * d..][..d];
                    for (o, &vj) in p.out[at..at + d].iter_mut().zip(v) {
                        *o += (w[i] / l * f64::from(vj)) as f32;
                    }
                }
                p.max[(b * kvh + h) * rows + r] = m as f32;
                p.sum[(b * kvh + h) * rows + r] = l as f32;
            }
        }
    }
    p
}

fn assert_close(got: &Partial, want: &Partial, what: &str) {
    for (i, (g, w)) in got.out.iter().zip(&want.out).enumerate() {
        assert!(
            (g - w).abs() <= 2e-4 * (1.0 + w.abs()),
            "{what}: out[{i}] = {g}, reference {w}"
        );
    }
    for (i, (g, w)) in got.max.iter().zip(&want.max).enumerate() {
        assert!(
            g == w || (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: max[{i}] = {g}, reference {w}"
        );
    }
    for (i, (g, w)) in got.sum.iter().zip(&want.sum).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: sum[{i}] = {g}, reference {w}"
        );
    }
}

fn rope_table(positions: usize, half: usize, batch: usize) -> RopeTable {
    let mut table = RopeTable::new(half).unwrap();
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for b in 0..batch {
        for p in 0..positions {
            for j in 0..half {
                let theta = (p + 3 * b) as f32 * 10000f32.powf(-(j as f32) / half as f32);
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
    }
    table.append(0, batch, &cos, &sin).unwrap();
    table
}

#[test]
fn chunk_decode_equals_codec_decode_bit_for_bit() {
    let shape = [300, 2, 64];
    let x = kv(1, 300, 2, 64);
    for (name, config) in layouts() {
        let e = enc(&x, shape, &config);
        let chunk = AttnChunk::from_encoded(&e, 0, None).unwrap();
        assert_eq!(chunk.decode(), e.decode(Some(1)).unwrap(), "{name}");
    }
}

/// Bytes of a chunk other than its outliers (whose count depends on how scales round).
fn nbytes_without_outliers(chunk: &AttnChunk) -> usize {
    chunk.nbytes()
        - chunk
            .blocks
            .iter()
            .map(|b| b.outlier_at.len() * 6)
            .sum::<usize>()
}

#[test]
fn log8_scales_are_held_as_one_byte_per_row() {
    let (tokens, heads, dim) = (300, 2, 64);
    let x = kv(1, tokens, heads, dim);
    for (name, config) in layouts() {
        if config.scale_format != ScaleFormat::Log8
            || config.scale_granularity == ScaleGranularity::Block
        {
            continue;
        }
        let log8 =
            AttnChunk::from_encoded(&enc(&x, [tokens, heads, dim], &config), 0, None).unwrap();
        assert!(
            log8.blocks
                .iter()
                .all(|b| matches!(b.scales, Scales::Log8 { .. })),
            "{name}: log8 scales not held as bytes"
        );
        let float = CodecConfig {
            scale_format: ScaleFormat::Float,
            ..config
        };
        let f16 = AttnChunk::from_encoded(&enc(&x, [tokens, heads, dim], &float), 0, None).unwrap();
        assert!(
            f16.blocks
                .iter()
                .all(|b| matches!(b.scales, Scales::Values(Floats::F16(_)))),
            "{name}: f16 scales"
        );
        // 2 bytes per row as f16; 1 byte per row and a 4-byte base per block as log8.
        let saved = nbytes_without_outliers(&f16) - nbytes_without_outliers(&log8);
        assert_eq!(saved, tokens * heads - 4 * log8.blocks.len(), "{name}");
    }
}

#[test]
fn block_scales_are_held_once_per_block() {
    let (tokens, heads, dim) = (300, 2, 64);
    let x = kv(1, tokens, heads, dim);
    for (name, config) in layouts() {
        if config.scale_granularity != ScaleGranularity::Block {
            continue;
        }
        for scale_format in [ScaleFormat::Float, ScaleFormat::Log8] {
            let config = CodecConfig {
                scale_format,
                ..config.clone()
            };
            let e = enc(&x, [tokens, heads, dim], &config);
            let chunk = AttnChunk::from_encoded(&e, 0, None).unwrap();
            assert!(
                chunk
                    .blocks
                    .iter()
                    .all(|b| matches!(b.scales, Scales::Block(_))),
                "{name}, {scale_format:?}: block scales held per row"
            );
            assert_eq!(chunk.decode(), e.decode(Some(1)).unwrap(), "{name}");
        }
    }
}

/// The bytes of a chunk's parts other than its codes, scales and outliers, as the test
/// works them out from the layout: per head and block a mean of `dim` values at the
/// skeleton's width, per head `dim` halves of pre-RoPE mean, one f32 centroid table.
fn expected_overhead(chunk: &AttnChunk, mean_bytes: usize, rope_bytes: usize) -> usize {
    let dim = chunk.dim;
    chunk.blocks.len() * dim * mean_bytes
        + chunk.heads * dim * rope_bytes
        + (1usize << chunk.bits) * 4
}

#[test]
fn a_rope_mean_k_chunk_holds_codes_scales_and_small_per_head_overheads() {
    // A SmolLM2-shaped K chunk of the cache: 128 tokens × 3 heads × 64, 4-bit Lloyd-Max,
    // log8 scales, one block per head (shared mean), the RoPE-mean layout.
    let (tokens, heads, dim) = (128usize, 3usize, 64usize);
    let config = CodecConfig {
        bits: 4,
        scale_format: ScaleFormat::Log8,
        ..layouts()[0].1.clone()
    };
    let e = enc(&kv(11, tokens, heads, dim), [tokens, heads, dim], &config);
    let halves: Vec<f32> = gaussian(12, heads * dim)
        .iter()
        .map(|&v| crate::f16::round(3.0 * v))
        .collect();
    let k = AttnChunk::from_encoded(&e, 0, Some(halves.clone())).unwrap();
    assert_eq!(k.rope_mean().unwrap(), halves);
    assert!(matches!(k.rope_mean, Some(Floats::F16(_))));
    assert_eq!(k.blocks.len(), heads);
    assert!(k.blocks.iter().all(|b| matches!(b.mean, Floats::F16(_))));
    let codes = heads * (tokens * dim * 4 / 8 + CODE_PADDING);
    let scales = heads * (tokens + 4); // a byte per row and a 4-byte base per block
    let outliers: usize = k.blocks.iter().map(|b| b.outlier_at.len() * 6).sum();
    // Per head: the block mean and the pre-RoPE mean as halves (2 · 64 B each); per chunk
    // the 16 centroids (64 B); no Hadamard signs.
    let per_head = 2 * dim + 2 * dim;
    assert_eq!(expected_overhead(&k, 2, 2), heads * per_head + 64);
    assert!(
        k.nbytes() <= codes + scales + outliers + heads * per_head + 64,
        "{} bytes held, codes {codes} + scales {scales} + outliers {outliers} + {} overhead",
        k.nbytes(),
        heads * per_head + 64
    );
    assert_eq!(
        k.nbytes(),
        codes + scales + outliers + heads * per_head + 64
    );
    // The same values given as non-halves are held as f32 (4 bytes each).
    let mut off = halves.clone();
    off[0] += off[0].abs().max(1.0) * 1e-6;
    let f32_mean = AttnChunk::from_encoded(&e, 0, Some(off)).unwrap();
    assert!(matches!(f32_mean.rope_mean, Some(Floats::F32(_))));
    assert_eq!(f32_mean.nbytes() - k.nbytes(), heads * dim * 2);
    // V: no pre-RoPE mean.
    let v = AttnChunk::from_encoded(&e, 0, None).unwrap();
    assert_eq!(k.nbytes() - v.nbytes(), heads * dim * 2);
}

#[test]
fn means_are_held_at_the_skeleton_width() {
    let (tokens, heads, dim) = (300, 2, 64);
    let x = kv(1, tokens, heads, dim);
    for (name, config) in layouts() {
        let chunk =
            AttnChunk::from_encoded(&enc(&x, [tokens, heads, dim], &config), 0, None).unwrap();
        let (width, held) = match config.skeleton_dtype {
            SkeletonDtype::F16 => (
                2,
                chunk
                    .blocks
                    .iter()
                    .all(|b| matches!(b.mean, Floats::F16(_))),
            ),
            SkeletonDtype::F32 => (
                4,
                chunk
                    .blocks
                    .iter()
                    .all(|b| matches!(b.mean, Floats::F32(_))),
            ),
        };
        assert!(
            held,
            "{name}: means not held as {:?}",
            config.skeleton_dtype
        );
        let rest: usize = chunk
            .blocks
            .iter()
            .map(|b| b.codes.len() + b.outlier_at.len() * 6)
            .sum::<usize>()
            + chunk
                .blocks
                .iter()
                .map(|b| match &b.scales {
                    Scales::Values(Floats::F16(v)) => v.len() * 2,
                    Scales::Values(Floats::F32(v)) => v.len() * 4,
                    Scales::Log8 { bytes, .. } => bytes.len() + 4,
                    Scales::Block(_) => 4,
                })
                .sum::<usize>();
        assert_eq!(
            chunk.nbytes(),
            rest + expected_overhead(&chunk, width, 0),
            "{name}"
        );
    }
}

#[test]
fn chunks_of_other_seeds_rotate_with_their_own_signs() {
    // One request over chunks of two seeds (K and V alternate): the V sums are flushed
    // through each seed's signs, as the reference decodes each chunk with its own.
    let (kvh, rows, d) = (2usize, 3usize, 64usize);
    let base = layouts()[0].1.clone();
    let lens = [40usize, 30, 50, 20];
    let owned: Vec<(AttnChunk, AttnChunk)> = lens
        .iter()
        .enumerate()
        .scan(0usize, |start, (i, &n)| {
            let seed = [0u64, 7, 7, 3][i];
            let config = CodecConfig {
                seed,
                ..base.clone()
            };
            let s = *start;
            *start += n;
            let k = enc(&kv(20 + i as u64, n, kvh, d), [n, kvh, d], &config);
            let v = enc(&kv(30 + i as u64, n, kvh, d), [n, kvh, d], &config);
            Some((
                AttnChunk::from_encoded(&k, s, None).unwrap(),
                AttnChunk::from_encoded(&v, s, None).unwrap(),
            ))
        })
        .collect();
    let keys = vec![owned.iter().map(|(k, _)| k).collect::<Vec<_>>()];
    let values = vec![owned.iter().map(|(_, v)| v).collect::<Vec<_>>()];
    let q = gaussian(13, kvh * rows * d);
    let req = Request {
        queries: &q,
        batch: 1,
        kv_heads: kvh,
        rows,
        dim: d,
        keys: &keys,
        values: &values,
        skip: &[0],
        rope: None,
        scale: 0.125,
    };
    let got = attend(&req, Some(1)).unwrap();
    let want = reference(&q, [1, kvh, rows, d], &keys, &values, &[0], None, 0.125);
    assert_close(&got, &want, "chunks of seeds 0, 7, 7, 3");
}

#[test]
fn kernel_equals_decode_then_attend_for_every_layout() {
    let (batch, kvh, groups, d) = (2usize, 2usize, 3usize, 64usize);
    let lens = [(0usize, 150usize), (150, 1), (151, 97)];
    let positions = 1 + 248;
    for (name, config) in layouts() {
        for rope_layout in [false, true] {
            let table = rope_table(positions, d / 2, batch);
            let mut owned: Vec<Vec<(AttnChunk, AttnChunk)>> = Vec::new();
            for b in 0..batch {
                let mut row = Vec::new();
                for (i, &(start, n)) in lens.iter().enumerate() {
                    let seed = (b * 10 + i) as u64;
                    let ke = enc(&kv(seed, n, kvh, d), [n, kvh, d], &config);
                    let ve = enc(&kv(seed + 100, n, kvh, d), [n, kvh, d], &config);
                    // Row 1's pre-RoPE means are halves (held as such), row 0's are not.
                    let mean = rope_layout.then(|| {
                        let m = gaussian(seed + 7, kvh * d);
                        if b == 1 {
                            m.iter().map(|&v| crate::f16::round(v)).collect()
                        } else {
                            m
                        }
                    });
                    row.push((
                        AttnChunk::from_encoded(&ke, 1 + start, mean).unwrap(),
                        AttnChunk::from_encoded(&ve, 1 + start, None).unwrap(),
                    ));
                }
                owned.push(row);
            }
            let keys: Vec<Vec<&AttnChunk>> = owned
                .iter()
                .map(|r| r.iter().map(|(k, _)| k).collect())
                .collect();
            let values: Vec<Vec<&AttnChunk>> = owned
                .iter()
                .map(|r| r.iter().map(|(_, v)| v).collect())
                .collect();
            let q = gaussian(42, batch * kvh * groups * d);
            let skip = [0usize, 5];
            let req = Request {
                queries: &q,
                batch,
                kv_heads: kvh,
                rows: groups,
                dim: d,
                keys: &keys,
                values: &values,
                skip: &skip,
                rope: Some(&table),
                scale: 0.125,
            };
            let one = attend(&req, Some(1)).unwrap();
            let two = attend(&req, Some(2)).unwrap();
            assert_eq!(one, two, "{name}: thread count changed the result");
            let want = reference(
                &q,
                [batch, kvh, groups, d],
                &keys,
                &values,
                &skip,
                Some(&table),
                0.125,
            );
            assert_close(&one, &want, &format!("{name}, rope layout {rope_layout}"));
            crate::simd::set_enabled(false);
            let baseline = attend(&req, Some(1));
            crate::simd::set_enabled(true);
            assert_close(&baseline.unwrap(), &want, &format!("{name} (baseline ISA)"));
        }
    }
}

#[test]
fn all_masked_and_empty_rows_give_zero_sum() {
    let config = CodecConfig {
        bits: 4,
        basis: Basis::None,
        ..Default::default()
    };
    let e = enc(&kv(3, 20, 1, 16), [20, 1, 16], &config);
    let k = AttnChunk::from_encoded(&e, 0, None).unwrap();
    let keys = vec![vec![&k], vec![]];
    let values = vec![vec![&k], vec![]];
    let q = gaussian(1, 2 * 16);
    let req = Request {
        queries: &q,
        batch: 2,
        kv_heads: 1,
        rows: 1,
        dim: 16,
        keys: &keys,
        values: &values,
        skip: &[20, 0],
        rope: None,
        scale: 1.0,
    };
    let p = attend(&req, None).unwrap();
    assert_eq!(p.sum, vec![0.0, 0.0]);
    assert_eq!(p.max, vec![f32::NEG_INFINITY; 2]);
    assert!(p.out.iter().all(|&v| v == 0.0));
}

#[test]
fn mismatches_are_shape_errors_naming_expected_and_actual() {
    let config = CodecConfig {
        bits: 4,
        basis: Basis::None,
        ..Default::default()
    };
    let k =
        AttnChunk::from_encoded(&enc(&kv(3, 20, 1, 16), [20, 1, 16], &config), 0, None).unwrap();
    let v =
        AttnChunk::from_encoded(&enc(&kv(4, 21, 1, 16), [21, 1, 16], &config), 0, None).unwrap();
    let keys = vec![vec![&k]];
    let values = vec![vec![&v]];
    let q = gaussian(1, 16);
    let mut req = Request {
        queries: &q,
        batch: 1,
        kv_heads: 1,
        rows: 1,
        dim: 16,
        keys: &keys,
        values: &values,
        skip: &[0],
        rope: None,
        scale: 1.0,
    };
    let err = attend(&req, None).unwrap_err().to_string();
    assert!(err.contains("K has 20 tokens, V has 21"), "{err}");
    req.rows = 2;
    let err = attend(&req, None).unwrap_err().to_string();
    assert!(err.contains("queries have 16 values"), "{err}");
    let pca = CodecConfig::default();
    let e = enc(&kv(3, 20, 1, 16), [20, 1, 16], &pca);
    let err = AttnChunk::from_encoded(&e, 0, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("basis \"none\""), "{err}");
}

#[test]
fn many_query_rows_and_head_dim_128_match_the_reference() {
    // 12 rows per kv head (more than one AVX2 call of 8), head_dim 128, 4-bit K / 3-bit V.
    let (kvh, rows, d, n) = (2usize, 12usize, 128usize, 130usize);
    let layouts = layouts();
    let (kcfg, vcfg) = (&layouts[0].1, &layouts[1].1);
    let k = AttnChunk::from_encoded(
        &enc(&kv(5, n, kvh, d), [n, kvh, d], kcfg),
        0,
        Some(gaussian(8, kvh * d)),
    )
    .unwrap();
    let v = AttnChunk::from_encoded(&enc(&kv(6, n, kvh, d), [n, kvh, d], vcfg), 0, None).unwrap();
    let table = rope_table(n, d / 2, 1);
    let keys = vec![vec![&k]];
    let values = vec![vec![&v]];
    let q = gaussian(9, kvh * rows * d);
    let req = Request {
        queries: &q,
        batch: 1,
        kv_heads: kvh,
        rows,
        dim: d,
        keys: &keys,
        values: &values,
        skip: &[3],
        rope: Some(&table),
        scale: 0.09,
    };
    let got = attend(&req, Some(2)).unwrap();
    let want = reference(
        &q,
        [1, kvh, rows, d],
        &keys,
        &values,
        &[3],
        Some(&table),
        0.09,
    );
    assert_close(&got, &want, "12 rows, head_dim 128");
}
