//! Criterion benches of the encoder's hot ops on the CPU at MiniLM-L6 shapes (batch 32 × 128 tokens).

mod common;

use common::{cpu, random};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kdx::backend::{AttnShape, Dropout, Transpose};
use kdx::Tensor;

const ROWS: usize = 32 * 128;

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10);
    for (m, k, n) in [(ROWS, 384, 1536), (ROWS, 1536, 384), (ROWS, 384, 384)] {
        let (a, b) = (random(&[m, k], 1), random(&[k, n], 2));
        let mut out = Tensor::zeros(&[m, n], kdx::DType::F32);
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new("nn", format!("{m}x{k}x{n}")), |bench| {
            bench.iter(|| {
                cpu()
                    .matmul(&a, &b, Transpose::NN, &mut out, false)
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    let shape = AttnShape {
        batch: 32,
        seq: 128,
        heads: 12,
    };
    let (q, k, v, dout) = (
        random(&[ROWS, 384], 3),
        random(&[ROWS, 384], 4),
        random(&[ROWS, 384], 5),
        random(&[ROWS, 384], 6),
    );
    let lengths = vec![128u32; 32];
    group.bench_function("fwd/b32-h12-t128-d32", |bench| {
        bench.iter(|| {
            cpu()
                .attention(&q, &k, &v, shape, &lengths, Dropout::OFF)
                .unwrap()
        })
    });
    let (_, probs) = cpu()
        .attention(&q, &k, &v, shape, &lengths, Dropout::OFF)
        .unwrap();
    group.bench_function("bwd/b32-h12-t128-d32", |bench| {
        bench.iter(|| {
            cpu()
                .attention_backward(&dout, &q, &k, &v, &probs, shape, &lengths, Dropout::OFF)
                .unwrap()
        })
    });
    group.finish();
}

fn layer_norm(c: &mut Criterion) {
    let mut group = c.benchmark_group("layernorm");
    let (x, g, b, dy) = (
        random(&[ROWS, 384], 7),
        random(&[384], 8),
        random(&[384], 9),
        random(&[ROWS, 384], 10),
    );
    group.throughput(Throughput::Bytes((ROWS * 384 * 4 * 2) as u64));
    group.bench_function("fwd/4096x384", |bench| {
        bench.iter(|| cpu().layer_norm(&x, &g, &b, 1e-12).unwrap())
    });
    let (_, stats) = cpu().layer_norm(&x, &g, &b, 1e-12).unwrap();
    let (mut dg, mut db) = (g.zeros_like(), b.zeros_like());
    group.bench_function("bwd/4096x384", |bench| {
        bench.iter(|| {
            cpu()
                .layer_norm_backward(&dy, &x, &g, &stats, &mut dg, &mut db)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, matmul, attention, layer_norm);
criterion_main!(benches);
