//! Criterion benchmarks of encode and decode at SmolLM2 shapes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kakeya::{encode, CodecConfig, Elements, TensorView};

fn bench(c: &mut Criterion) {
    let shape = [4096usize, 3, 64];
    let n: usize = shape.iter().product();
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut group = c.benchmark_group("smollm2");
    group.throughput(Throughput::Bytes((n * 2) as u64));
    for bits in [2u8, 3, 4] {
        let config = CodecConfig {
            bits,
            ..Default::default()
        };
        let view = TensorView::new(Elements::F32(&x), shape).unwrap();
        group.bench_function(format!("encode_{bits}bit"), |b| {
            b.iter(|| encode(view, &config, None, None).unwrap())
        });
        let enc = encode(view, &config, None, None).unwrap();
        group.bench_function(format!("decode_{bits}bit"), |b| {
            b.iter(|| enc.decode(None).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
