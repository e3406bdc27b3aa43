//! `kdx bench`: median time of every op at the encoder's shapes, and of whole encoder passes.
//!
//! Entry names are `model-or-op/what/shape[/dtype]`. Each entry runs a few warm-up iterations, then
//! repeats until it has `--runs` samples or its time budget is spent, and reports the median.
//!
//! On a GPU (`--device cuda`) entries build their inputs on the device, and each call is timed with
//! CUDA events on the device's stream. Entries rotate between copies of their inputs, together
//! several times the L2 cache, so that no call finds its inputs left in the cache by the one before.
//! The bench first measures the device's ceilings (copy bandwidth, cuBLAS matrix rate: see
//! `backend::cuda::peak`) and reports each rate as a share of them. bf16 variants, BERT-base shapes,
//! retrieval over a million f16 keys and a BERT-base training step run on a GPU only (on the CPU a
//! BERT-base step takes minutes).
//! Entries whose op has no CUDA kernel yet are listed as skipped, with the reason.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::common::backend_with;
use crate::backend::cpu::rope::rope_table;
use crate::backend::cuda::peak::{self, Ceilings};
use crate::backend::cuda::{CudaBackend, Gemm, Gpu, NotImplemented};
use crate::backend::head_kl::{head_kl, HeadInput};
use crate::backend::{
    backend, mix64, AdamW, AttnShape, Backend, CausalShape, Dropout, KlDirection, KlTerms, PerRow,
    Pooling, Prefix, Sampling, SoftmaxKl, Teacher, Transpose,
};
use crate::model::bert::{Batch, Mode};
use crate::model::classifier::{Head, SequenceClassifier};
use crate::model::config::BertConfig;
use crate::model::llama::{next_token_targets, Llama, TokenBatch};
use crate::model::params::{ParamStore, Rng};
use crate::model::prompts::DeepPrompts;
use crate::tensor::{DType, Device, Storage, Tensor};
use crate::train::AdamWState;

#[derive(clap::Args)]
pub struct Args {
    /// Device to benchmark
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Samples per entry after warm-up (default: 10 on the CPU, 50 on a GPU)
    #[arg(long)]
    runs: Option<usize>,
    /// Time budget per entry in seconds (an entry stops sampling when it is spent)
    #[arg(long, default_value_t = 10.0)]
    budget: f64,
    /// Matrix products on the engine's kernels (kdx) or on cuBLAS (a baseline: whole models then
    /// run on cuBLAS's GEMM; --device cuda only)
    #[arg(long, default_value = "kdx")]
    gemm: Gemm,
    /// Only entries whose name contains this
    filter: Option<String>,
}

#[derive(Serialize, Default)]
struct Entry {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    median_ms: Option<f64>,
    runs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    gflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
    /// The rate over the device's measured ceiling for it (GPU only).
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_peak: Option<f64>,
    /// Why the entry did not run: its op is not implemented on this device.
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct Report {
    device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ceilings: Option<CeilingsReport>,
    entries: Vec<Entry>,
}

#[derive(Serialize)]
struct CeilingsReport {
    copy_gbps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    gemm_bf16_gflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gemm_f32_gflops: Option<f64>,
    /// Why there is no matrix-rate ceiling.
    #[serde(skip_serializing_if = "Option::is_none")]
    gemm_missing: Option<String>,
}

impl From<&Ceilings> for CeilingsReport {
    fn from(c: &Ceilings) -> CeilingsReport {
        CeilingsReport {
            copy_gbps: c.copy_gbps,
            gemm_bf16_gflops: c.gflops(DType::BF16),
            gemm_f32_gflops: c.gflops(DType::F32),
            gemm_missing: c.gemm.as_ref().err().cloned(),
        }
    }
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
    /// The dtype it computes in, whose ceiling its rate is measured against.
    dtype: DType,
    setup: Box<dyn FnOnce() -> Result<Body>>,
}

impl Case {
    /// An f32 entry (see [`Case::in_dtype`]).
    fn new(
        name: impl Into<String>,
        work: Work,
        setup: impl FnOnce() -> Result<Body> + 'static,
    ) -> Case {
        Case {
            name: name.into(),
            work,
            dtype: DType::F32,
            setup: Box::new(setup),
        }
    }

    fn in_dtype(self, dtype: DType) -> Case {
        Case { dtype, ..self }
    }
}

/// Normal random values, seeded by the entry so each entry's inputs are the same in every run.
fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(data, shape).expect("shape matches data")
}

/// `rows` random unit vectors of `d` elements in f16 (a key store), built in parallel, each row from
/// its own seeded stream.
fn unit_rows_f16(rows: usize, d: usize, seed: u64) -> Result<Tensor> {
    let mut data = vec![half::f16::ZERO; rows * d];
    data.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
        let mut rng = Rng::new(mix64(seed ^ mix64(r as u64)));
        let v: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        let inv = 1.0 / v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        for (out, x) in row.iter_mut().zip(v) {
            *out = half::f16::from_f32(x * inv);
        }
    });
    Tensor::new(Storage::F16(data), &[rows, d])
}

/// At most this many copies of an entry's inputs.
const MAX_COPIES: usize = 16;

/// Where entries run.
#[derive(Clone, Copy)]
struct Target {
    be: &'static dyn Backend,
    /// The GPU's L2 cache size, which input rotation must defeat; `None` on the CPU.
    l2_bytes: Option<usize>,
}

impl Target {
    fn is_gpu(&self) -> bool {
        self.l2_bytes.is_some()
    }

    /// The dtypes op families are timed in: f32, and on a GPU bf16 too.
    fn dtypes(&self) -> &'static [DType] {
        if self.is_gpu() {
            &[DType::F32, DType::BF16]
        } else {
            &[DType::F32]
        }
    }

    /// Host tensors placed on the bench's device in `dtype`: once on the CPU; on a GPU as many
    /// copies as make three times its L2 cache (at most [`MAX_COPIES`]), handed out in turn.
    fn place<const N: usize>(
        &self,
        host: [Tensor; N],
        dtype: DType,
    ) -> Result<Rotation<[Tensor; N]>> {
        let bytes = host.iter().map(Tensor::numel).sum::<usize>() * dtype.size_in_bytes();
        let copies = self
            .l2_bytes
            .map_or(1, |l2| (3 * l2).div_ceil(bytes.max(1)).clamp(1, MAX_COPIES));
        let device = self.be.device();
        let sets = (0..copies)
            .map(|_| {
                let set = host
                    .iter()
                    .map(|t| t.to_dtype(dtype)?.to_device(device))
                    .collect::<Result<Vec<Tensor>>>()?;
                Ok(set.try_into().expect("one tensor placed per tensor given"))
            })
            .collect::<Result<_>>()?;
        Ok(Rotation { sets, next: 0 })
    }
}

/// Copies of an entry's inputs (and outputs), one per call in turn.
struct Rotation<T> {
    sets: Vec<T>,
    next: usize,
}

impl<T> Rotation<T> {
    fn next(&mut self) -> &mut T {
        let i = self.next;
        self.next = (i + 1) % self.sets.len();
        &mut self.sets[i]
    }
}

/// Hinton's soft term at T = 2: what tools/torch_bench.py times PyTorch's `kl_div` at.
const KD_TERMS: KlTerms<'static> = KlTerms {
    temperature: PerRow::Same(2.0),
    kl_weight: PerRow::Same(1.0),
    direction: KlDirection::TeacherStudent,
    labels: None,
    ce_weight: PerRow::Same(0.0),
};

fn op_cases(target: Target) -> Vec<Case> {
    let be = target.be;
    let mut cases = Vec::new();
    let rows = 32 * 128;
    const F32: f64 = 4.0;

    // MiniLM-L6's projections; on a GPU also BERT-base's (its weight gradient as the TN product)
    // and a square product as large as the cuBLAS ceiling's.
    let mut products = vec![
        (rows, 384, 1536, Transpose::NN, "nn"),
        (rows, 1536, 384, Transpose::NN, "nn"),
        (rows, 384, 384, Transpose::NT, "nt"),
        (384, 1536, rows, Transpose::TN, "tn"),
    ];
    if target.is_gpu() {
        products.extend([
            (rows, 768, 3072, Transpose::NN, "nn"),
            (rows, 3072, 768, Transpose::NN, "nn"),
            (rows, 768, 768, Transpose::NT, "nt"),
            (3072, rows, 768, Transpose::TN, "tn"),
            (8192, 8192, 8192, Transpose::NN, "nn"),
        ]);
    }
    for &dtype in target.dtypes() {
        for &(m, k, n, t, tag) in &products {
            cases.push(
                Case::new(
                    format!("matmul/{tag}/{m}x{k}x{n}/{dtype}"),
                    Work::Flops(2.0 * (m * n * k) as f64),
                    move || {
                        let mut rng = Rng::new(1);
                        let a = random(&if t.a { [k, m] } else { [m, k] }, &mut rng);
                        let b = random(&if t.b { [n, k] } else { [k, n] }, &mut rng);
                        let out = Tensor::zeros(&[m, n], DType::F32);
                        let mut sets = target.place([a, b, out], dtype)?;
                        Ok(Box::new(move || {
                            let [a, b, out] = sets.next();
                            be.matmul(a, b, t, out, false)
                        }))
                    },
                )
                .in_dtype(dtype),
            );
        }
    }

    // BERT-base's intermediate projection, bias included; the backward accumulates dw and dbias.
    if target.is_gpu() {
        let (inp, outp) = (768, 3072);
        let linear_flops = 2.0 * (rows * inp * outp) as f64;
        for &dtype in target.dtypes() {
            let inputs = move || {
                let mut rng = Rng::new(12);
                [
                    random(&[rows, inp], &mut rng),
                    random(&[outp, inp], &mut rng),
                    random(&[outp], &mut rng),
                    random(&[rows, outp], &mut rng),
                    Tensor::zeros(&[outp, inp], DType::F32),
                    Tensor::zeros(&[outp], DType::F32),
                ]
            };
            cases.push(
                Case::new(
                    format!("linear/fwd/{rows}x{inp}x{outp}/{dtype}"),
                    Work::Flops(linear_flops),
                    move || {
                        let mut sets = target.place(inputs(), dtype)?;
                        Ok(Box::new(move || {
                            let [x, w, bias, ..] = sets.next();
                            be.linear(x, w, Some(bias)).map(drop)
                        }))
                    },
                )
                .in_dtype(dtype),
            );
            cases.push(
                Case::new(
                    format!("linear/fwd-bwd/{rows}x{inp}x{outp}/{dtype}"),
                    Work::Flops(3.0 * linear_flops),
                    move || {
                        let mut sets = target.place(inputs(), dtype)?;
                        Ok(Box::new(move || {
                            let [x, w, bias, dy, dw, dbias] = sets.next();
                            be.linear(x, w, Some(bias))?;
                            be.linear_backward(dy, x, w, dw, Some(dbias)).map(drop)
                        }))
                    },
                )
                .in_dtype(dtype),
            );
        }
    }

    // MiniLM-L6's attention (12 heads of 32); on a GPU also BERT-base's (12 heads of 64).
    let mut attention_widths = vec![384];
    if target.is_gpu() {
        attention_widths.push(768);
    }
    let shape = AttnShape {
        batch: 32,
        seq: 128,
        heads: 12,
    };
    for &dtype in target.dtypes() {
        for &width in &attention_widths {
            let qkv = move || {
                let mut rng = Rng::new(2);
                let x: [Tensor; 4] = std::array::from_fn(|_| random(&[rows, width], &mut rng));
                target.place(x, dtype)
            };
            let lengths = vec![128u32; 32];
            let head_dim = width / shape.heads;
            let attn_flops = 4.0 * (32 * 12 * 128 * 128 * head_dim) as f64;
            let lengths_fwd = lengths.clone();
            let attn = format!("b32-h12-t128-d{head_dim}/{dtype}");
            cases.push(
                Case::new(
                    format!("attention/fwd/{attn}"),
                    Work::Flops(attn_flops),
                    move || {
                        let mut sets = qkv()?;
                        Ok(Box::new(move || {
                            let [q, k, v, _] = sets.next();
                            be.attention(q, k, v, shape, &lengths_fwd, Dropout::OFF)
                                .map(drop)
                        }))
                    },
                )
                .in_dtype(dtype),
            );
            cases.push(
                Case::new(
                    format!("attention/fwd-bwd/{attn}"),
                    Work::Flops(attn_flops * 2.5),
                    move || {
                        let mut sets = qkv()?;
                        Ok(Box::new(move || {
                            let [q, k, v, dout] = sets.next();
                            let (_, probs) =
                                be.attention(q, k, v, shape, &lengths, Dropout::OFF)?;
                            be.attention_backward(
                                dout,
                                q,
                                k,
                                v,
                                &probs,
                                shape,
                                &lengths,
                                Dropout::OFF,
                            )
                            .map(drop)
                        }))
                    },
                )
                .in_dtype(dtype),
            );
        }
    }

    for &dtype in target.dtypes() {
        let size = dtype.size_in_bytes() as f64;
        let norm_inputs = move || {
            let mut rng = Rng::new(3);
            let x = random(&[rows, 384], &mut rng);
            let dy = random(&[rows, 384], &mut rng);
            let (gamma, beta) = (random(&[384], &mut rng), random(&[384], &mut rng));
            let (dg, db) = (gamma.zeros_like(), beta.zeros_like());
            target.place([x, dy, gamma, beta, dg, db], dtype)
        };
        let elems = (rows * 384) as f64;
        cases.push(
            Case::new(
                format!("layernorm/fwd/4096x384/{dtype}"),
                Work::Bytes(2.0 * elems * size),
                move || {
                    let mut sets = norm_inputs()?;
                    Ok(Box::new(move || {
                        let [x, _, gamma, beta, ..] = sets.next();
                        be.layer_norm(x, gamma, beta, 1e-12).map(drop)
                    }))
                },
            )
            .in_dtype(dtype),
        );
        cases.push(
            Case::new(
                format!("layernorm/fwd-bwd/4096x384/{dtype}"),
                Work::Bytes(5.0 * elems * size),
                move || {
                    let mut sets = norm_inputs()?;
                    Ok(Box::new(move || {
                        let [x, dy, gamma, beta, dg, db] = sets.next();
                        let (_, stats) = be.layer_norm(x, gamma, beta, 1e-12)?;
                        be.layer_norm_backward(dy, x, gamma, &stats, dg, db)
                            .map(drop)
                    }))
                },
            )
            .in_dtype(dtype),
        );

        let gelu_elems = (rows * 1536) as f64;
        let gelu_inputs = move || {
            let mut rng = Rng::new(4);
            let (h, dh) = (
                random(&[rows, 1536], &mut rng),
                random(&[rows, 1536], &mut rng),
            );
            target.place([h, dh], dtype)
        };
        cases.push(
            Case::new(
                format!("gelu/fwd/4096x1536/{dtype}"),
                Work::Bytes(2.0 * gelu_elems * size),
                move || {
                    let mut sets = gelu_inputs()?;
                    Ok(Box::new(move || {
                        let [h, _] = sets.next();
                        be.gelu(h).map(drop)
                    }))
                },
            )
            .in_dtype(dtype),
        );
        cases.push(
            Case::new(
                format!("gelu/bwd/4096x1536/{dtype}"),
                Work::Bytes(3.0 * gelu_elems * size),
                move || {
                    let mut sets = gelu_inputs()?;
                    Ok(Box::new(move || {
                        let [h, dh] = sets.next();
                        be.gelu_backward(h, dh).map(drop)
                    }))
                },
            )
            .in_dtype(dtype),
        );
    }

    // The decoder's ops at SmolLM2's shapes: hidden 576 in 9 query / 3 key-value heads of 64, MLP
    // width 1536, RoPE base 100000, an 8-vector deep prompt in attention.
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
            let dweight = weight.zeros_like();
            let mut sets = target.place([x, dy, weight, dweight], DType::F32)?;
            Ok(Box::new(move || {
                let [x, dy, weight, dweight] = sets.next();
                let (_, stats) = be.rms_norm(x, weight, 1e-5)?;
                be.rms_norm_backward(dy, x, weight, &stats, Some(dweight))
                    .map(drop)
            }))
        },
    ));
    cases.push(Case::new(
        "rope/fwd/4096x576-h9/f32",
        Work::Bytes(2.0 * llama_elems * F32),
        move || {
            let x = random(&[rows, 576], &mut Rng::new(13));
            let table = rope_table(128, 64, 100_000.0, DType::F32);
            let mut sets = target.place([x, table], DType::F32)?;
            let positions: Vec<u32> = (0..rows as u32).map(|r| r % 128).collect();
            Ok(Box::new(move || {
                let [x, table] = sets.next();
                be.rope(x, 9, &positions, table, false)
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
            let inputs: [Tensor; 3] = std::array::from_fn(|_| random(&[rows, 1536], &mut rng));
            let mut sets = target.place(inputs, DType::F32)?;
            Ok(Box::new(move || {
                let [gate, up, dy] = sets.next();
                be.swiglu(gate, up)?;
                be.swiglu_backward(gate, up, dy).map(drop)
            }))
        },
    ));
    let causal = CausalShape {
        batch: 8,
        q_len: 64,
        kv_len: 64,
        heads: 9,
        kv_heads: 3,
    };
    cases.push(Case::new(
        "causal-attention/fwd-bwd/b8-h9-kv3-t64-d64-p8/f32",
        // Forward: QKᵀ and PV; backward 2.5× that; scores over 8 prefix + 64 keys.
        Work::Flops(3.5 * 2.0 * 2.0 * (8 * 9 * 64 * 72 * 64) as f64),
        move || {
            let mut rng = Rng::new(15);
            let inputs = [
                random(&[512, 576], &mut rng),
                random(&[512, 192], &mut rng),
                random(&[512, 192], &mut rng),
                random(&[512, 576], &mut rng),
                random(&[8, 192], &mut rng),
                random(&[8, 192], &mut rng),
            ];
            let mut sets = target.place(inputs, DType::F32)?;
            let start = vec![0u32; 8];
            Ok(Box::new(move || {
                let [q, k, v, dout, keys, values] = sets.next();
                let prefix = Some(Prefix { keys, values });
                let (_, probs) = be.causal_attention(q, k, v, prefix, causal, &start)?;
                be.causal_attention_backward(dout, q, k, v, prefix, &probs, causal, &start)
                    .map(drop)
            }))
        },
    ));

    cases.push(Case::new(
        "softmax-ce/fwd-bwd/32x2/f32",
        Work::Bytes(2.0 * 64.0 * F32),
        move || {
            let mut sets = target.place([random(&[32, 2], &mut Rng::new(5))], DType::F32)?;
            let labels: Vec<u32> = (0..32).map(|i| i % 2).collect();
            Ok(Box::new(move || {
                let [logits] = sets.next();
                be.cross_entropy(logits, &labels).map(drop)
            }))
        },
    ));

    // The shapes PyTorch's `kl_div(log_softmax(s/T), softmax(t/T))·T²` is timed at in
    // tools/torch_bench.py: read both logit arrays, write the gradient. On a GPU also SmolLM2's
    // vocabulary over 8192 rows.
    let mut kl_shapes = vec![(4096, 32000), (256, 2)];
    if target.is_gpu() {
        kl_shapes.push((8192, 49152));
    }
    for ((r, c), &dtype) in kl_shapes
        .into_iter()
        .flat_map(|s| target.dtypes().iter().map(move |d| (s, d)))
    {
        cases.push(Case::new(
            format!("softmax-kl/fwd-bwd/{r}x{c}/{dtype}"),
            Work::Bytes(3.0 * (r * c * dtype.size_in_bytes()) as f64),
            move || {
                let mut rng = Rng::new(6);
                let (student, teacher) = (random(&[r, c], &mut rng), random(&[r, c], &mut rng));
                let mut sets = target.place([student, teacher], dtype)?;
                Ok(Box::new(move || {
                    let [student, teacher] = sets.next();
                    let spec = SoftmaxKl {
                        teacher: Teacher::Logits(teacher),
                        terms: KD_TERMS,
                    };
                    be.softmax_kl(student, &spec).map(drop)
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
            let d_weight = weight.zeros_like();
            let mut sets =
                target.place([hidden, weight, t_hidden, t_weight, d_weight], DType::F32)?;
            Ok(Box::new(move || {
                let [hidden, weight, t_hidden, t_weight, d_weight] = sets.next();
                let student = HeadInput { hidden, weight };
                let teacher = HeadInput {
                    hidden: t_hidden,
                    weight: t_weight,
                };
                head_kl(be, student, teacher, &KD_TERMS, 64, Some(d_weight)).map(drop)
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
            let mut sets = target.place([student, teacher], DType::F32)?;
            Ok(Box::new(move || {
                let [student, teacher] = sets.next();
                be.listwise_cos_kl(student, teacher, 0.1, 0.2, KlDirection::StudentTeacher)
                    .map(drop)
            }))
        },
    ));

    cases.push(Case::new(
        "cos-topk/q256-n100000-d384-k16/f32",
        Work::Flops(2.0 * 256.0 * 100_000.0 * 384.0),
        move || {
            let mut rng = Rng::new(8);
            // Unit keys, as a store holds them: normalised once, on the host.
            let keys = backend(Device::Cpu)?.l2_normalize(&random(&[100_000, 384], &mut rng))?;
            let queries = random(&[256, 384], &mut rng);
            let mut sets = target.place([keys, queries], DType::F32)?;
            Ok(Box::new(move || {
                let [keys, queries] = sets.next();
                be.cosine_topk(keys, queries, 16).map(drop)
            }))
        },
    ));

    if target.is_gpu() {
        // A million f16 keys (768 MB), uploaded once: a single copy is far larger than the L2.
        let (q, n, d) = (1024, 1_000_000, 384);
        cases.push(Case::new(
            format!("cos-topk/q{q}-n{n}-d{d}-k16/f16"),
            Work::Flops(2.0 * (q * n * d) as f64),
            move || {
                let keys = unit_rows_f16(n, d, 12)?.to_device(be.device())?;
                let mut sets = target.place([random(&[q, d], &mut Rng::new(13))], DType::F32)?;
                Ok(Box::new(move || {
                    let [queries] = sets.next();
                    be.cosine_topk(&keys, queries, 16).map(drop)
                }))
            },
        ));
    }

    cases.push(Case::new(
        "sampling/nucleus/b16x49152/f32",
        Work::Bytes(16.0 * 49152.0 * F32),
        move || {
            let mut sets = target.place([random(&[16, 49152], &mut Rng::new(9))], DType::F32)?;
            let mut draw = 0;
            Ok(Box::new(move || {
                draw += 1;
                let s = Sampling {
                    temperature: 0.9,
                    top_k: 0,
                    top_p: 0.9,
                    seed: 1,
                };
                let [vocab_logits] = sets.next();
                be.sample(vocab_logits, &s, draw).map(drop)
            }))
        },
    ));

    let n = 1 << 22;
    cases.push(Case::new(
        "adamw/step/4194304/f32",
        Work::Bytes(7.0 * n as f64 * F32),
        move || {
            let mut rng = Rng::new(10);
            let (p, g) = (random(&[n], &mut rng), random(&[n], &mut rng));
            let (m, v) = (p.zeros_like(), p.zeros_like());
            let mut sets = target.place([p, g, m, v], DType::F32)?;
            let mut step = 0;
            Ok(Box::new(move || {
                step += 1;
                let [p, g, m, v] = sets.next();
                be.adamw(p, g, m, v, &AdamW::default(), step)
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

/// A randomly initialised classifier of `config`'s shape, its parameters on the bench's device, and
/// a full-length batch for it.
fn encoder_setup(
    config: &BertConfig,
    target: Target,
) -> Result<(SequenceClassifier, ParamStore, Batch)> {
    let mut params = ParamStore::new();
    let model = SequenceClassifier::register(config, 2, Head::Mean, &mut params);
    params.initialise(1)?;
    let params = params.to_device(target.be.device())?;
    let batch = random_batch(32, 128, config.vocab_size, &mut Rng::new(3));
    Ok((model, params, batch))
}

/// BERT-base's shape: 12 layers, hidden 768 in 12 heads, intermediate 3072.
fn bert_base() -> BertConfig {
    BertConfig {
        hidden_size: 768,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        intermediate_size: 3072,
        ..BertConfig::minilm_l6()
    }
}

/// Why an entry cannot run here (its model is not fetched, or its path is CPU-only so far):
/// listed as skipped, like an op without a kernel.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unavailable(String);

/// SmolLM2-135M from `weights/` (installed by `kdx fetch smollm2-135m`), and random token ids.
fn smollm2_setup(
    target: Target,
    batch: usize,
    seq: usize,
) -> Result<(Llama, ParamStore, TokenBatch)> {
    let dir = crate::model::fetch::default_weights_dir().join("smollm2-135m");
    if !dir.join("model.safetensors").exists() {
        return Err(Unavailable(format!(
            "{} is missing: run `kdx fetch smollm2-135m`",
            dir.display()
        ))
        .into());
    }
    let (model, params) = Llama::load(&dir)?;
    let device = target.be.device();
    let (model, params) = (model.on_device(device)?, params.to_device(device)?);
    let mut rng = Rng::new(12);
    let vocab = model.config.vocab_size as u64;
    let sequences: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..seq).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    let tokens = TokenBatch::from_sequences(&sequences, 0)?;
    Ok((model, params, tokens))
}

/// The decoder entries: prefill and decoding as generation runs them, and prompt tuning's step.
fn smollm2_cases(target: Target) -> Vec<Case> {
    let be = target.be;
    let mut cases = vec![Case::new(
        "smollm2-135m/prefill/b8x64",
        Work::Tokens(512.0),
        move || {
            let (model, params, batch) = smollm2_setup(target, 8, 64)?;
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
                let (model, params, batch) = smollm2_setup(target, b, 64)?;
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
            let (model, params, batch) = smollm2_setup(target, 8, 64)?;
            let prompts = DeepPrompts::random(&model.config, 8, 0.02, 1, "smollm2-135m")?
                .to_device(be.device())?;
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

fn model_cases(target: Target) -> Vec<Case> {
    let mut models = vec![("minilm-l6", BertConfig::minilm_l6())];
    if target.is_gpu() {
        models.push(("bert-base", bert_base()));
    }
    models
        .into_iter()
        .flat_map(|(name, config)| encoder_cases(name, config, target))
        .collect()
}

/// A forward pass (mean-pooled, evaluation mode) and a training step (forward, backward, AdamW) of
/// a classifier of `config`'s shape on a batch of 32 sequences of 128 tokens.
fn encoder_cases(model_name: &str, config: BertConfig, target: Target) -> Vec<Case> {
    let be = target.be;
    let (b, t) = (32, 128);
    let tokens = (b * t) as f64;
    let forward_config = config.clone();
    let forward = Case::new(
        format!("{model_name}/forward/b{b}x{t}"),
        Work::Tokens(tokens),
        move || {
            let (model, params, batch) = encoder_setup(&forward_config, target)?;
            Ok(Box::new(move || {
                let (hidden, _) = model.encoder.forward(be, &params, &batch, Mode::Eval)?;
                be.pool(&hidden, batch.seq, &batch.lengths, Pooling::Mean)
                    .map(drop)
            }))
        },
    );
    let train = Case::new(
        format!("{model_name}/train-step/b{b}x{t}"),
        Work::Tokens(tokens),
        move || {
            let (model, mut params, batch) = encoder_setup(&config, target)?;
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

/// How entries are sampled.
struct Sampler {
    /// Timing with CUDA events on this GPU's stream; `None`: host time on the CPU.
    gpu: Option<&'static Gpu>,
    warmup: usize,
    runs: usize,
    budget: Duration,
}

impl Sampler {
    /// Seconds one call of `body` takes.
    fn time(&self, body: &mut Body) -> Result<f64> {
        match self.gpu {
            Some(gpu) => gpu.time(body.as_mut()),
            None => {
                let t0 = Instant::now();
                body()?;
                Ok(t0.elapsed().as_secs_f64())
            }
        }
    }

    /// The samples of one entry, after its warm-up.
    fn samples(&self, setup: Box<dyn FnOnce() -> Result<Body>>) -> Result<Vec<f64>> {
        let mut body = setup()?;
        let started = Instant::now();
        for _ in 0..self.warmup {
            self.time(&mut body)?;
        }
        let mut samples = Vec::with_capacity(self.runs);
        while samples.len() < self.runs.max(1)
            && (samples.len() < 3 || started.elapsed() < self.budget)
        {
            samples.push(self.time(&mut body)?);
        }
        Ok(samples)
    }
}

/// Times one entry; an op the device does not implement makes it skipped, any other error failed.
fn measure(case: Case, sampler: &Sampler, ceilings: Option<&Ceilings>) -> Entry {
    let name = case.name;
    let mut samples = match sampler.samples(case.setup) {
        Ok(samples) => samples,
        Err(e) => {
            let skipped = e
                .downcast_ref::<NotImplemented>()
                .map(ToString::to_string)
                .or_else(|| e.downcast_ref::<Unavailable>().map(ToString::to_string));
            return match skipped {
                Some(why) => Entry {
                    name,
                    skipped: Some(why),
                    ..Entry::default()
                },
                None => Entry {
                    name,
                    error: Some(format!("{e:#}")),
                    ..Entry::default()
                },
            };
        }
    };
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    let rate = |w: f64| Some(w / median / 1e9);
    let (gflops, gbps, tokens_per_s) = match case.work {
        Work::Flops(f) => (rate(f), None, None),
        Work::Bytes(b) => (None, rate(b), None),
        Work::Tokens(t) => (None, None, Some(t / median)),
    };
    let share_of_peak = ceilings.and_then(|c| match (gflops, gbps) {
        (Some(g), _) => c.gflops(case.dtype).map(|peak| g / peak),
        (_, Some(b)) => Some(b / c.copy_gbps),
        _ => None,
    });
    Entry {
        name,
        median_ms: Some(median * 1e3),
        runs: samples.len(),
        gflops,
        gbps,
        tokens_per_s,
        share_of_peak,
        ..Entry::default()
    }
}

/// One line of the table: on a GPU matrix rates in TFLOP/s and a share-of-peak column.
fn table_row(e: &Entry, gpu: bool) -> String {
    let width = if gpu { 46 } else { 42 };
    let Some(median_ms) = e.median_ms else {
        let why = match (&e.skipped, &e.error) {
            (Some(reason), _) => format!("skipped: {reason}"),
            (_, Some(error)) => format!("FAILED: {error}"),
            _ => String::new(),
        };
        return format!("{:<width$} {why}", e.name);
    };
    let rate = match (e.gflops, e.gbps, e.tokens_per_s) {
        (Some(g), _, _) if gpu => format!("{:.1} TFLOP/s", g / 1e3),
        (Some(g), _, _) => format!("{g:.1} GFLOP/s"),
        (_, Some(b), _) => format!("{b:.1} GB/s"),
        (_, _, Some(t)) => format!("{t:.0} tok/s"),
        _ => String::new(),
    };
    if gpu {
        let share = e
            .share_of_peak
            .map_or(String::new(), |s| format!("{:.1}%", 100.0 * s));
        format!(
            "{:<width$} {median_ms:>11.3} {rate:>14} {share:>8} {:>6}",
            e.name, e.runs
        )
    } else {
        format!(
            "{:<width$} {median_ms:>11.3} {rate:>12} {:>6}",
            e.name, e.runs
        )
    }
}

fn describe_ceilings(c: &Ceilings) -> String {
    let gemm = match &c.gemm {
        Ok(r) => format!(
            "cuBLAS matrix products {:.1} TFLOP/s bf16, {:.1} TFLOP/s f32",
            r.bf16_gflops / 1e3,
            r.f32_gflops / 1e3
        ),
        Err(why) => format!("no matrix-rate ceiling: {why}"),
    };
    format!(
        "ceilings: device copy {:.0} GB/s (read + write); {gemm}",
        c.copy_gbps
    )
}

pub fn run(args: Args) -> Result<()> {
    let be = backend_with(args.device, args.gemm)?;
    let gpu = match args.device {
        Device::Cuda(ordinal) => Some(CudaBackend::get(ordinal)?.gpu()),
        Device::Cpu => None,
    };
    let target = Target {
        be,
        l2_bytes: gpu.map(Gpu::l2_bytes),
    };
    let sampler = Sampler {
        gpu,
        warmup: if gpu.is_some() { 5 } else { 2 },
        runs: args.runs.unwrap_or(if gpu.is_some() { 50 } else { 10 }),
        budget: Duration::from_secs_f64(args.budget),
    };
    let ceilings = gpu.map(peak::measure).transpose()?;
    let mut cases = op_cases(target);
    cases.extend(model_cases(target));
    cases.extend(smollm2_cases(target));
    let wanted = |c: &Case| args.filter.as_deref().is_none_or(|f| c.name.contains(f));
    if !args.json {
        println!("kdx bench on {}", be.describe());
        match &ceilings {
            Some(c) => {
                println!("{}", describe_ceilings(c));
                println!(
                    "{:<46} {:>11} {:>14} {:>8} {:>6}",
                    "entry", "median ms", "rate", "of peak", "runs"
                );
            }
            None => println!(
                "{:<42} {:>11} {:>12} {:>6}",
                "entry", "median ms", "rate", "runs"
            ),
        }
    }
    let mut entries = Vec::new();
    for case in cases.into_iter().filter(wanted) {
        let _range = crate::trace::range(&case.name);
        let e = measure(case, &sampler, ceilings.as_ref());
        if !args.json {
            println!("{}", table_row(&e, gpu.is_some()));
        }
        entries.push(e);
    }
    let failed = entries.iter().filter(|e| e.error.is_some()).count();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&Report {
                device: be.describe(),
                ceilings: ceilings.as_ref().map(CeilingsReport::from),
                entries
            })?
        );
    }
    if failed > 0 {
        bail!("{failed} bench entries failed (see their errors above)");
    }
    Ok(())
}
