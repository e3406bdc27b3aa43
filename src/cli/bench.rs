//! `kdx bench`: median time of every op at the encoder's shapes, and of whole MiniLM-L6 passes.
//!
//! Entry names are `model-or-op/what/shape`. Each entry runs a few warm-up iterations, then repeats
//! until it has `--runs` samples or its time budget is spent, and reports the median.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::backend::cpu::rope::rope_table;
use crate::backend::head_kl::{head_kl, HeadInput};
use crate::backend::{
    backend, AdamW, AttnShape, Backend, CausalShape, Dropout, KlDirection, KlTerms, PerRow,
    Pooling, Prefix, Sampling, SoftmaxKl, Teacher, Transpose,
};
use crate::model::bert::{Batch, Mode};
use crate::model::classifier::{Head, SequenceClassifier};
use crate::model::config::BertConfig;
use crate::model::llama::{next_token_targets, Llama, TokenBatch};
use crate::model::params::{ParamStore, Rng};
use crate::model::prompts::DeepPrompts;
use crate::tensor::{DType, Device, Tensor};
use crate::train::AdamWState;

#[derive(clap::Args)]
pub struct Args {
    /// Device to benchmark
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Samples per entry (after warm-up)
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Time budget per entry in seconds (an entry stops sampling when it is spent)
    #[arg(long, default_value_t = 10.0)]
    budget: f64,
    /// Only entries whose name contains this
    filter: Option<String>,
}

#[derive(Serialize)]
struct Entry {
    name: String,
    median_ms: f64,
    runs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    gflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    entries: Vec<Entry>,
}

/// What one call of a benchmark body does, for the rate columns.
enum Work {
    Flops(f64),
    Bytes(f64),
    Tokens(f64),
}

/// The timed call of an entry.
type Body = Box<dyn FnMut() -> Result<()>>;

/// An entry: its inputs are built only when it is selected (the largest take a gigabyte).
struct Case {
    name: String,
    work: Work,
    setup: Box<dyn FnOnce() -> Result<Body>>,
}

impl Case {
    fn new(
        name: impl Into<String>,
        work: Work,
        setup: impl FnOnce() -> Result<Body> + 'static,
    ) -> Case {
        Case {
            name: name.into(),
            work,
            setup: Box::new(setup),
        }
    }
}

/// Normal random values, seeded by the entry so each entry's inputs are the same in every run.
fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(data, shape).expect("shape matches data")
}

/// Hinton's soft term at T = 2: what tools/torch_bench.py times PyTorch's `kl_div` at.
const KD_TERMS: KlTerms<'static> = KlTerms {
    temperature: PerRow::Same(2.0),
    kl_weight: PerRow::Same(1.0),
    direction: KlDirection::TeacherStudent,
    labels: None,
    ce_weight: PerRow::Same(0.0),
};

fn op_cases(be: &'static dyn Backend) -> Vec<Case> {
    let mut cases = Vec::new();
    let rows = 32 * 128;
    const F32: f64 = 4.0;
    for (m, k, n, t, tag) in [
        (rows, 384, 1536, Transpose::NN, "nn"),
        (rows, 1536, 384, Transpose::NN, "nn"),
        (rows, 384, 384, Transpose::NT, "nt"),
        (384, 1536, rows, Transpose::TN, "tn"),
    ] {
        cases.push(Case::new(
            format!("matmul/{tag}/{m}x{k}x{n}/f32"),
            Work::Flops(2.0 * (m * n * k) as f64),
            move || {
                let mut rng = Rng::new(1);
                let a = random(&if t.a { [k, m] } else { [m, k] }, &mut rng);
                let b = random(&if t.b { [n, k] } else { [k, n] }, &mut rng);
                let mut out = Tensor::zeros(&[m, n], DType::F32);
                Ok(Box::new(move || be.matmul(&a, &b, t, &mut out, false)))
            },
        ));
    }

    let shape = AttnShape {
        batch: 32,
        seq: 128,
        heads: 12,
    };
    let width = 384;
    let qkv = move || {
        let mut rng = Rng::new(2);
        let x: [Tensor; 4] = std::array::from_fn(|_| random(&[rows, width], &mut rng));
        x
    };
    let lengths = vec![128u32; 32];
    let attn_flops = 4.0 * (32 * 12 * 128 * 128 * 32) as f64;
    let lengths_fwd = lengths.clone();
    cases.push(Case::new(
        "attention/fwd/b32-h12-t128-d32/f32",
        Work::Flops(attn_flops),
        move || {
            let [q, k, v, _] = qkv();
            Ok(Box::new(move || {
                be.attention(&q, &k, &v, shape, &lengths_fwd, Dropout::OFF)
                    .map(drop)
            }))
        },
    ));
    cases.push(Case::new(
        "attention/fwd-bwd/b32-h12-t128-d32/f32",
        Work::Flops(attn_flops * 2.5),
        move || {
            let [q, k, v, dout] = qkv();
            Ok(Box::new(move || {
                let (_, probs) = be.attention(&q, &k, &v, shape, &lengths, Dropout::OFF)?;
                be.attention_backward(&dout, &q, &k, &v, &probs, shape, &lengths, Dropout::OFF)
                    .map(drop)
            }))
        },
    ));

    // The decoder's attention at SmolLM2's shapes, with an 8-vector deep prompt.
    let causal = CausalShape {
        batch: 8,
        q_len: 64,
        kv_len: 64,
        heads: 9,
        kv_heads: 3,
    };
    cases.push(Case::new(
        "causal-attention/fwd-bwd/b8-h9-kv3-t64-d64-p8/f32",
        // Four score-sized products (QKᵀ, PV forward; dP, dQ, dK, dV backward: 2.5× forward).
        Work::Flops(3.5 * 2.0 * 2.0 * (8 * 9 * 64 * 72 * 64) as f64),
        move || {
            let mut rng = Rng::new(13);
            let (q, k, v, dout) = (
                random(&[512, 576], &mut rng),
                random(&[512, 192], &mut rng),
                random(&[512, 192], &mut rng),
                random(&[512, 576], &mut rng),
            );
            let (pk, pv) = (random(&[8, 192], &mut rng), random(&[8, 192], &mut rng));
            let start = vec![0u32; 8];
            Ok(Box::new(move || {
                let prefix = Some(Prefix {
                    keys: &pk,
                    values: &pv,
                });
                let (_, probs) = be.causal_attention(&q, &k, &v, prefix, causal, &start)?;
                be.causal_attention_backward(&dout, &q, &k, &v, prefix, &probs, causal, &start)
                    .map(drop)
            }))
        },
    ));

    let norm_inputs = move || {
        let mut rng = Rng::new(3);
        let x = random(&[rows, 384], &mut rng);
        let dy = random(&[rows, 384], &mut rng);
        let (gamma, beta) = (random(&[384], &mut rng), random(&[384], &mut rng));
        (x, dy, gamma, beta)
    };
    let elems = (rows * 384) as f64;
    cases.push(Case::new(
        "layernorm/fwd/4096x384/f32",
        Work::Bytes(2.0 * elems * F32),
        move || {
            let (x, _, gamma, beta) = norm_inputs();
            Ok(Box::new(move || {
                be.layer_norm(&x, &gamma, &beta, 1e-12).map(drop)
            }))
        },
    ));
    cases.push(Case::new(
        "layernorm/fwd-bwd/4096x384/f32",
        Work::Bytes(5.0 * elems * F32),
        move || {
            let (x, dy, gamma, beta) = norm_inputs();
            let (mut dg, mut db) = (gamma.zeros_like(), beta.zeros_like());
            Ok(Box::new(move || {
                let (_, stats) = be.layer_norm(&x, &gamma, &beta, 1e-12)?;
                be.layer_norm_backward(&dy, &x, &gamma, &stats, &mut dg, &mut db)
                    .map(drop)
            }))
        },
    ));

    let gelu_elems = (rows * 1536) as f64;
    cases.push(Case::new(
        "gelu/fwd/4096x1536/f32",
        Work::Bytes(2.0 * gelu_elems * F32),
        move || {
            let h = random(&[rows, 1536], &mut Rng::new(4));
            Ok(Box::new(move || be.gelu(&h).map(drop)))
        },
    ));
    cases.push(Case::new(
        "gelu/bwd/4096x1536/f32",
        Work::Bytes(3.0 * gelu_elems * F32),
        move || {
            let mut rng = Rng::new(4);
            let (h, dh) = (
                random(&[rows, 1536], &mut rng),
                random(&[rows, 1536], &mut rng),
            );
            Ok(Box::new(move || be.gelu_backward(&h, &dh).map(drop)))
        },
    ));

    // SmolLM2's shapes: hidden 576 in 9 heads of 64, MLP width 1536, RoPE base 100000.
    let llama_elems = (rows * 576) as f64;
    cases.push(Case::new(
        "rmsnorm/fwd-bwd/4096x576/f32",
        Work::Bytes(5.0 * llama_elems * F32),
        move || {
            let mut rng = Rng::new(12);
            let (x, dy, weight) = (
                random(&[rows, 576], &mut rng),
                random(&[rows, 576], &mut rng),
                random(&[576], &mut rng),
            );
            let mut dweight = weight.zeros_like();
            Ok(Box::new(move || {
                let (_, stats) = be.rms_norm(&x, &weight, 1e-5)?;
                be.rms_norm_backward(&dy, &x, &weight, &stats, Some(&mut dweight))
                    .map(drop)
            }))
        },
    ));
    cases.push(Case::new(
        "rope/fwd/4096x576-h9/f32",
        Work::Bytes(2.0 * llama_elems * F32),
        move || {
            let mut x = random(&[rows, 576], &mut Rng::new(13));
            let positions: Vec<u32> = (0..rows as u32).map(|r| r % 128).collect();
            let table = rope_table(128, 64, 100_000.0, DType::F32);
            Ok(Box::new(move || {
                be.rope(&mut x, 9, &positions, &table, false)
            }))
        },
    ));
    let mlp_elems = (rows * 1536) as f64;
    cases.push(Case::new(
        "swiglu/fwd-bwd/4096x1536/f32",
        // Forward: read gate and up, write y; backward: read gate, up, dy, write both gradients.
        Work::Bytes(8.0 * mlp_elems * F32),
        move || {
            let mut rng = Rng::new(14);
            let (gate, up, dy) = (
                random(&[rows, 1536], &mut rng),
                random(&[rows, 1536], &mut rng),
                random(&[rows, 1536], &mut rng),
            );
            Ok(Box::new(move || {
                be.swiglu(&gate, &up)?;
                be.swiglu_backward(&gate, &up, &dy).map(drop)
            }))
        },
    ));

    cases.push(Case::new(
        "softmax-ce/fwd-bwd/32x2/f32",
        Work::Bytes(2.0 * 64.0 * F32),
        move || {
            let logits = random(&[32, 2], &mut Rng::new(5));
            let labels: Vec<u32> = (0..32).map(|i| i % 2).collect();
            Ok(Box::new(move || {
                be.cross_entropy(&logits, &labels).map(drop)
            }))
        },
    ));

    // The shapes PyTorch's `kl_div(log_softmax(s/T), softmax(t/T))·T²` is timed at in
    // tools/torch_bench.py: read both logit arrays, write the gradient.
    for (r, c) in [(4096, 32000), (256, 2)] {
        cases.push(Case::new(
            format!("softmax-kl/fwd-bwd/{r}x{c}/f32"),
            Work::Bytes(3.0 * (r * c) as f64 * F32),
            move || {
                let mut rng = Rng::new(6);
                let (student, teacher) = (random(&[r, c], &mut rng), random(&[r, c], &mut rng));
                Ok(Box::new(move || {
                    let spec = SoftmaxKl {
                        teacher: Teacher::Logits(&teacher),
                        terms: KD_TERMS,
                    };
                    be.softmax_kl(&student, &spec).map(drop)
                }))
            },
        ));
    }

    // SmolLM2's head width and vocabulary: 256 rows in chunks of 64, the head's gradient included.
    let (rows_h, width, vocab) = (256, 576, 49152);
    cases.push(Case::new(
        format!("head-kl/fwd-bwd/r{rows_h}-d{width}-v{vocab}/f32"),
        // Four products of rows × width × vocab: both heads forward, the hidden and head gradients.
        Work::Flops(4.0 * 2.0 * (rows_h * width * vocab) as f64),
        move || {
            let mut rng = Rng::new(11);
            let (hidden, weight) = (
                random(&[rows_h, width], &mut rng),
                random(&[vocab, width], &mut rng),
            );
            let (t_hidden, t_weight) = (
                random(&[rows_h, width], &mut rng),
                random(&[vocab, width], &mut rng),
            );
            let mut d_weight = weight.zeros_like();
            Ok(Box::new(move || {
                let student = HeadInput {
                    hidden: &hidden,
                    weight: &weight,
                };
                let teacher = HeadInput {
                    hidden: &t_hidden,
                    weight: &t_weight,
                };
                head_kl(be, student, teacher, &KD_TERMS, 64, Some(&mut d_weight)).map(drop)
            }))
        },
    ));

    cases.push(Case::new(
        "listwise-cos-kl/fwd-bwd/n128-d384/f32",
        // Two 128×128×384 similarity products and the 128×128×384 gradient product.
        Work::Flops(3.0 * 2.0 * (128 * 128 * 384) as f64),
        move || {
            let mut rng = Rng::new(7);
            let (student, teacher) = (random(&[128, 384], &mut rng), random(&[128, 384], &mut rng));
            Ok(Box::new(move || {
                be.listwise_cos_kl(&student, &teacher, 0.1, 0.2, KlDirection::StudentTeacher)
                    .map(drop)
            }))
        },
    ));

    cases.push(Case::new(
        "cos-topk/q256-n100000-d384-k16/f32",
        Work::Flops(2.0 * 256.0 * 100_000.0 * 384.0),
        move || {
            let mut rng = Rng::new(8);
            let keys = be.l2_normalize(&random(&[100_000, 384], &mut rng))?;
            let queries = random(&[256, 384], &mut rng);
            Ok(Box::new(move || {
                be.cosine_topk(&keys, &queries, 16).map(drop)
            }))
        },
    ));

    cases.push(Case::new(
        "sampling/nucleus/b16x49152/f32",
        Work::Bytes(16.0 * 49152.0 * F32),
        move || {
            let vocab_logits = random(&[16, 49152], &mut Rng::new(9));
            let mut draw = 0;
            Ok(Box::new(move || {
                draw += 1;
                let s = Sampling {
                    temperature: 0.9,
                    top_k: 0,
                    top_p: 0.9,
                    seed: 1,
                };
                be.sample(&vocab_logits, &s, draw).map(drop)
            }))
        },
    ));

    let n = 1 << 22;
    cases.push(Case::new(
        "adamw/step/4194304/f32",
        Work::Bytes(7.0 * n as f64 * F32),
        move || {
            let mut rng = Rng::new(10);
            let (mut p, g) = (random(&[n], &mut rng), random(&[n], &mut rng));
            let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
            let mut step = 0;
            Ok(Box::new(move || {
                step += 1;
                be.adamw(&mut p, &g, &mut m, &mut v, &AdamW::default(), step)
            }))
        },
    ));
    cases
}

/// A full-length random batch of MiniLM-L6's vocabulary.
fn random_batch(batch: usize, seq: usize, vocab: usize, rng: &mut Rng) -> Batch {
    Batch {
        ids: (0..batch * seq)
            .map(|_| rng.below(vocab as u64) as u32)
            .collect(),
        type_ids: vec![0; batch * seq],
        lengths: vec![seq as u32; batch],
        seq,
    }
}

/// A randomly initialised MiniLM-L6 classifier and a full-length batch for it.
fn minilm_setup() -> Result<(SequenceClassifier, ParamStore, Batch)> {
    let config = BertConfig::minilm_l6();
    let mut params = ParamStore::new();
    let model = SequenceClassifier::register(&config, 2, Head::Mean, &mut params);
    params.initialise(1)?;
    let batch = random_batch(32, 128, config.vocab_size, &mut Rng::new(3));
    Ok((model, params, batch))
}

/// SmolLM2-135M from `weights/` (fetched there by `kdx fetch smollm2-135m`), and random token ids.
fn smollm2_setup(batch: usize, seq: usize) -> Result<(Llama, ParamStore, TokenBatch)> {
    let dir = crate::model::fetch::default_weights_dir().join("smollm2-135m");
    if !dir.join("model.safetensors").exists() {
        anyhow::bail!(
            "{} is missing: run `kdx fetch smollm2-135m` first",
            dir.display()
        );
    }
    let (model, params) = Llama::load(&dir)?;
    let mut rng = Rng::new(12);
    let vocab = model.config.vocab_size as u64;
    let sequences: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..seq).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    let tokens = TokenBatch::from_sequences(&sequences, 0)?;
    Ok((model, params, tokens))
}

/// The decoder entries: prefill and decoding as generation runs them, and prompt tuning's step.
fn smollm2_cases(be: &'static dyn Backend) -> Vec<Case> {
    let mut cases = vec![Case::new(
        "smollm2-135m/prefill/b8x64",
        Work::Tokens(512.0),
        move || {
            let (model, params, batch) = smollm2_setup(8, 64)?;
            Ok(Box::new(move || {
                model.prefill(be, &params, &batch, None, 64).map(drop)
            }))
        },
    )];
    for b in [1, 16] {
        // One token per sequence against a cache of 64 prompt tokens (positions 64 onward; the
        // cache is refilled when it runs out).
        cases.push(Case::new(
            format!("smollm2-135m/decode/b{b}"),
            Work::Tokens(b as f64),
            move || {
                let (model, params, batch) = smollm2_setup(b, 64)?;
                let capacity = 64 + 256;
                let (_, mut cache) = model.prefill(be, &params, &batch, None, capacity)?;
                let tokens = vec![1u32; b];
                Ok(Box::new(move || {
                    if cache.lengths[0] as usize == capacity {
                        cache = model.prefill(be, &params, &batch, None, capacity)?.1;
                    }
                    model
                        .decode_step(be, &params, &mut cache, &tokens, None)
                        .map(drop)
                }))
            },
        ));
    }
    cases.push(Case::new(
        "smollm2-135m/prompt-fwd-bwd/b8x64",
        Work::Tokens(512.0),
        move || {
            let (model, params, batch) = smollm2_setup(8, 64)?;
            let prompts = DeepPrompts::random(&model.config, 8, 0.02, 1, "smollm2-135m")?;
            let targets = next_token_targets(&batch);
            Ok(Box::new(move || {
                let (hidden, cache) = model.forward(be, &params, &batch, Some(&prompts))?;
                let (_, d_hidden) = model.lm_loss(be, &params, &hidden, &targets, None)?;
                model
                    .backward(be, &params, cache, &d_hidden, Some(&prompts), None)
                    .map(drop)
            }))
        },
    ));
    cases
}

fn model_cases(be: &'static dyn Backend) -> Vec<Case> {
    let (b, t) = (32, 128);
    let tokens = (b * t) as f64;
    let forward = Case::new(
        format!("minilm-l6/forward/b{b}x{t}"),
        Work::Tokens(tokens),
        move || {
            let (model, params, batch) = minilm_setup()?;
            Ok(Box::new(move || {
                let (hidden, _) = model.encoder.forward(be, &params, &batch, Mode::Eval)?;
                be.pool(&hidden, batch.seq, &batch.lengths, Pooling::Mean)
                    .map(drop)
            }))
        },
    );
    let train = Case::new(
        format!("minilm-l6/train-step/b{b}x{t}"),
        Work::Tokens(tokens),
        move || {
            let (model, mut params, batch) = minilm_setup()?;
            let labels: Vec<u32> = (0..b as u32).map(|i| i % 2).collect();
            let mut grads = params.zeros_like();
            let mut opt = AdamWState::new(
                &params,
                AdamW {
                    lr: 5e-5,
                    ..AdamW::default()
                },
            );
            let mut step = 0u64;
            Ok(Box::new(move || {
                step += 1;
                grads.fill_zero();
                model.loss_and_grads(
                    be,
                    &params,
                    &batch,
                    &labels,
                    Mode::Train { seed: step },
                    &mut grads,
                )?;
                opt.update(be, &mut params, &grads)
            }))
        },
    );
    vec![forward, train]
}

fn measure(case: Case, runs: usize, budget: Duration) -> Result<Entry> {
    let mut body = (case.setup)()?;
    let started = Instant::now();
    for _ in 0..2 {
        body()?;
    }
    let mut samples = Vec::with_capacity(runs);
    while samples.len() < runs.max(1) && (samples.len() < 3 || started.elapsed() < budget) {
        let t0 = Instant::now();
        body()?;
        samples.push(t0.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    let rate = |w: f64| Some(w / median / 1e9);
    let (gflops, gbps, tokens_per_s) = match case.work {
        Work::Flops(f) => (rate(f), None, None),
        Work::Bytes(b) => (None, rate(b), None),
        Work::Tokens(t) => (None, None, Some(t / median)),
    };
    Ok(Entry {
        name: case.name,
        median_ms: median * 1e3,
        runs: samples.len(),
        gflops,
        gbps,
        tokens_per_s,
    })
}

pub fn run(args: Args) -> Result<()> {
    let be = backend(args.device)?;
    let mut cases = op_cases(be);
    cases.extend(model_cases(be));
    cases.extend(smollm2_cases(be));
    let wanted = |c: &Case| args.filter.as_deref().is_none_or(|f| c.name.contains(f));
    let budget = Duration::from_secs_f64(args.budget);
    if !args.json {
        println!("kdx bench on {}", be.describe());
        println!(
            "{:<42} {:>11} {:>12} {:>6}",
            "entry", "median ms", "rate", "runs"
        );
    }
    let mut entries = Vec::new();
    for case in cases.into_iter().filter(wanted) {
        let name = case.name.clone();
        let e = match measure(case, args.runs, budget) {
            Ok(e) => e,
            Err(err) => {
                // An entry that cannot run here (a model not fetched) is reported, not fatal.
                eprintln!("{name}: skipped: {err:#}");
                continue;
            }
        };
        if !args.json {
            let rate = match (e.gflops, e.gbps, e.tokens_per_s) {
                (Some(g), _, _) => format!("{g:.1} GFLOP/s"),
                (_, Some(b), _) => format!("{b:.1} GB/s"),
                (_, _, Some(t)) => format!("{t:.0} tok/s"),
                _ => String::new(),
            };
            println!(
                "{:<42} {:>11.3} {:>12} {:>6}",
                e.name, e.median_ms, rate, e.runs
            );
        }
        entries.push(e);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&Report {
                device: be.describe(),
                entries
            })?
        );
    }
    Ok(())
}
