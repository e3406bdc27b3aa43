//! Criterion benches of the Llama decoder's ops on the CPU at SmolLM2-135M shapes (hidden 576,
//! 9 query / 3 key-value heads of 64, intermediate 1536), batch 8 × 64 tokens, a deep prompt of 8.

mod common;

use common::{cpu, random};
use criterion::{criterion_group, criterion_main, Criterion};
use kdx::backend::cpu::rope::rope_table;
use kdx::backend::{CausalShape, Prefix};
use kdx::DType;

const ROWS: usize = 8 * 64;

fn rms_norm(c: &mut Criterion) {
    let (x, w, dy) = (
        random(&[ROWS, 576], 1),
        random(&[576], 2),
        random(&[ROWS, 576], 3),
    );
    c.bench_function("rmsnorm/fwd-bwd/512x576", |bench| {
        bench.iter(|| {
            let (_, stats) = cpu().rms_norm(&x, &w, 1e-5).unwrap();
            cpu().rms_norm_backward(&dy, &x, &w, &stats, None).unwrap()
        })
    });
}

fn rope(c: &mut Criterion) {
    let table = rope_table(8192, 64, 100_000.0, DType::F32);
    let mut q = random(&[ROWS, 576], 4);
    let positions: Vec<u32> = (0..ROWS as u32).map(|i| i % 64).collect();
    c.bench_function("rope/fwd/512x576-h9", |bench| {
        bench.iter(|| cpu().rope(&mut q, 9, &positions, &table, false).unwrap())
    });
}

fn swiglu(c: &mut Criterion) {
    let (gate, up, dy) = (
        random(&[ROWS, 1536], 5),
        random(&[ROWS, 1536], 6),
        random(&[ROWS, 1536], 7),
    );
    c.bench_function("swiglu/fwd-bwd/512x1536", |bench| {
        bench.iter(|| {
            cpu().swiglu(&gate, &up).unwrap();
            cpu().swiglu_backward(&gate, &up, &dy).unwrap()
        })
    });
}

fn causal_attention(c: &mut Criterion) {
    let shape = CausalShape {
        batch: 8,
        q_len: 64,
        kv_len: 64,
        heads: 9,
        kv_heads: 3,
    };
    let (q, k, v) = (
        random(&[ROWS, 576], 8),
        random(&[ROWS, 192], 9),
        random(&[ROWS, 192], 10),
    );
    let (pk, pv, dout) = (
        random(&[8, 192], 11),
        random(&[8, 192], 12),
        random(&[ROWS, 576], 13),
    );
    let prefix = Some(Prefix {
        keys: &pk,
        values: &pv,
    });
    let start = vec![0u32; 8];
    c.bench_function("causal-attention/fwd-bwd/b8-h9-kv3-t64-d64-p8", |bench| {
        bench.iter(|| {
            let (_, probs) = cpu()
                .causal_attention(&q, &k, &v, prefix, shape, &start)
                .unwrap();
            cpu()
                .causal_attention_backward(&dout, &q, &k, &v, prefix, &probs, shape, &start)
                .unwrap()
        })
    });
}

criterion_group!(benches, rms_norm, rope, swiglu, causal_attention);
criterion_main!(benches);
