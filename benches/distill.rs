//! Criterion benches of the distillation and retrieval ops on the CPU: fused softmax-KL (vocabulary
//! rows and two-class rows), the LM head fused with it, RetriKT's listwise loss, cosine top-k and
//! nucleus sampling. `kdx bench` times the same ops at the full shapes beside PyTorch.

mod common;

use common::{cpu, random};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kdx::backend::head_kl::{head_kl, HeadInput};
use kdx::backend::{KlDirection, KlTerms, PerRow, Sampling, SoftmaxKl, Teacher};

/// Hinton's soft term at T = 2, as `kdx bench` and tools/torch_bench.py time it.
const KD_TERMS: KlTerms<'static> = KlTerms {
    temperature: PerRow::Same(2.0),
    kl_weight: PerRow::Same(1.0),
    direction: KlDirection::TeacherStudent,
    labels: None,
    ce_weight: PerRow::Same(0.0),
};

fn softmax_kl(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax-kl");
    group.sample_size(10);
    for (rows, classes) in [(1024, 32000), (256, 2)] {
        let (student, teacher) = (random(&[rows, classes], 1), random(&[rows, classes], 2));
        let spec = SoftmaxKl {
            teacher: Teacher::Logits(&teacher),
            terms: KD_TERMS,
        };
        group.throughput(Throughput::Bytes((3 * rows * classes * 4) as u64));
        group.bench_function(format!("fwd-bwd/{rows}x{classes}"), |bench| {
            bench.iter(|| cpu().softmax_kl(&student, &spec).unwrap())
        });
    }
    group.finish();
}

fn fused_head_kl(c: &mut Criterion) {
    let mut group = c.benchmark_group("head-kl");
    group.sample_size(10);
    let (rows, width, vocab) = (64, 576, 49152);
    let (hidden, weight) = (random(&[rows, width], 3), random(&[vocab, width], 4));
    let (t_hidden, t_weight) = (random(&[rows, width], 5), random(&[vocab, width], 6));
    let student = HeadInput {
        hidden: &hidden,
        weight: &weight,
    };
    let teacher = HeadInput {
        hidden: &t_hidden,
        weight: &t_weight,
    };
    let mut d_weight = weight.zeros_like();
    group.bench_function(format!("fwd-bwd/r{rows}-d{width}-v{vocab}"), |bench| {
        bench.iter(|| head_kl(cpu(), student, teacher, &KD_TERMS, 32, Some(&mut d_weight)).unwrap())
    });
    group.finish();
}

fn listwise_cos_kl(c: &mut Criterion) {
    let (student, teacher) = (random(&[128, 384], 7), random(&[128, 384], 8));
    c.bench_function("listwise-cos-kl/fwd-bwd/n128-d384", |bench| {
        bench.iter(|| {
            cpu()
                .listwise_cos_kl(&student, &teacher, 0.1, 0.2, KlDirection::StudentTeacher)
                .unwrap()
        })
    });
}

fn cosine_topk(c: &mut Criterion) {
    let mut group = c.benchmark_group("cos-topk");
    group.sample_size(10);
    let keys = cpu().l2_normalize(&random(&[20_000, 384], 9)).unwrap();
    let queries = random(&[256, 384], 10);
    group.bench_function("q256-n20000-d384-k16", |bench| {
        bench.iter(|| cpu().cosine_topk(&keys, &queries, 16).unwrap())
    });
    group.finish();
}

fn nucleus_sampling(c: &mut Criterion) {
    let logits = random(&[16, 49152], 11);
    let s = Sampling {
        temperature: 0.9,
        top_k: 0,
        top_p: 0.9,
        seed: 1,
    };
    let mut step = 0;
    c.bench_function("sampling/nucleus/b16x49152", |bench| {
        bench.iter(|| {
            step += 1;
            cpu().sample(&logits, &s, step).unwrap()
        })
    });
}

criterion_group!(
    benches,
    softmax_kl,
    fused_head_kl,
    listwise_cos_kl,
    cosine_topk,
    nucleus_sampling
);
criterion_main!(benches);
