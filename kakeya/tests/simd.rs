//! The AVX2 path of `kakeya::simd::dispatch` writes the same bytes and decodes the same
//! values as the baseline path, for every stage the dispatch covers. Its own test binary:
//! switching the instruction set is process-wide.

use kakeya::rng::SplitMix64;
use kakeya::{
    encode, simd, Allocation, Basis, CodecConfig, Elements, Metric, PcaMethod, ScaleFormat,
    TensorView,
};

/// Heavy-tailed values with a per-channel offset, so outliers and means matter.
fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut g = vec![0.0f64; n];
    SplitMix64::new(seed, 91, 0, 0).fill_gaussian(&mut g);
    g.iter()
        .enumerate()
        .map(|(i, &v)| (v * (1.0 + 0.5 * v * v)) as f32 + (i % dim) as f32 * 0.05)
        .collect()
}

fn lower(heads: usize, dim: usize) -> Vec<f32> {
    let mut l = vec![0.0f32; heads * dim * dim];
    for h in 0..heads {
        for i in 0..dim {
            for j in 0..=i {
                l[(h * dim + i) * dim + j] = if i == j { 1.0 + 0.1 * h as f32 } else { 0.05 };
            }
        }
    }
    l
}

fn configs() -> Vec<CodecConfig> {
    let mut out = Vec::new();
    for bits in 1..=4u8 {
        out.push(CodecConfig {
            bits,
            outlier_threshold: Some(2.5),
            ..Default::default()
        });
        out.push(CodecConfig {
            bits,
            basis: Basis::None,
            share_basis: true,
            block_size: 300,
            ..Default::default()
        });
    }
    out.push(CodecConfig {
        bits: 3,
        pca: PcaMethod::Randomized,
        variance_ratio: 0.9,
        ..Default::default()
    });
    out.push(CodecConfig {
        bits: 3,
        allocation: Allocation::Variance,
        outlier_threshold: Some(3.0),
        ..Default::default()
    });
    out.push(CodecConfig {
        bits: 5,
        basis: Basis::None,
        uniform_step: Some(0.3376),
        entropy_coding: true,
        outlier_threshold: Some(4.5),
        scale_format: ScaleFormat::Log8,
        ..Default::default()
    });
    out.push(CodecConfig {
        bits: 4,
        metric: Metric::InnerProduct,
        ..Default::default()
    });
    out
}

#[test]
fn simd_and_baseline_write_the_same_bytes() {
    if !simd::enabled() {
        eprintln!("this CPU has no AVX2: both runs take the baseline path");
    }
    for shape in [[513usize, 2, 64], [200, 3, 48], [130, 1, 128]] {
        let [_, heads, dim] = shape;
        let x = data(shape.iter().product(), dim, 5);
        let view = TensorView::new(Elements::F32(&x), shape).unwrap();
        let pre = lower(heads, dim);
        for config in configs() {
            let l = (config.metric == Metric::InnerProduct).then_some(&pre[..]);
            let run = |wide: bool| {
                simd::set_enabled(wide);
                let enc = encode(view, &config, l, Some(2)).unwrap();
                let values = enc.decode(Some(2)).unwrap();
                (enc.into_bytes(), values)
            };
            let (wide_bytes, wide_values) = run(true);
            let (base_bytes, base_values) = run(false);
            simd::set_enabled(true);
            assert!(
                wide_bytes == base_bytes,
                "{shape:?} {config:?}: bytes differ"
            );
            let same = wide_values
                .iter()
                .zip(&base_values)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{shape:?} {config:?}: decoded values differ");
        }
    }
}
