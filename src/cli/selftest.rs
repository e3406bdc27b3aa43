//! `kdx selftest`: every op a device implements, run there and on a reference backend on the same
//! seeded random inputs, compared element by element: `|got − ref| ≤ atol·s + rtol·|ref|` with
//! tolerances per dtype, `s` being the output's RMS where that exceeds 1 (a sum over many terms,
//! such as a bias gradient, carries rounding errors in proportion to its magnitude, not to each
//! element's, which may cancel to near zero). `--device cuda` checks the GPU (f32 and bf16) against the CPU in f32;
//! `--device cpu` checks the CPU in f32 against itself in f64.
//!
//! Integer outputs (sampled tokens) must equal the reference's; top-k lists must have the same
//! scores within the tolerance and the same keys wherever the reference's scores are far enough
//! apart that rounding cannot reorder them ([`compare_ranked`]).
//!
//! A new op adds one [`Case`] (or one per shape) to [`cases`]: its inputs, and a closure running it
//! on a [`Side`] and returning its named outputs.

use std::fmt::Write as _;

use anyhow::{bail, Result};

use crate::backend::cuda::CudaBackend;
use crate::backend::{
    backend, AdamW, AttnShape, Backend, CausalShape, Dropout, KlDirection, KlTerms, NotImplemented,
    PerRow, Pooling, Prefix, Sampling, SoftmaxKl, Teacher, TopK, Transpose, IGNORE_INDEX,
};
use crate::model::bert::{Batch, Mode};
use crate::model::classifier::{Head, SequenceClassifier};
use crate::model::config::BertConfig;
use crate::model::llama::{next_token_targets, Llama, LlamaConfig, TokenBatch};
use crate::model::params::{ParamStore, Rng};
use crate::model::prompts::DeepPrompts;
use crate::tensor::{DType, Device, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Device to check: cuda[:N] (against the CPU, f32 and bf16) or cpu (f32 against f64)
    #[arg(long, default_value = "cuda")]
    device: Device,
    /// Seed of the random inputs
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only cases whose op name contains this
    filter: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let report = selftest(args.device, args.seed, args.filter.as_deref())?;
    print!("{}", report.table());
    let failed = report.failures().count();
    if failed > 0 {
        bail!(
            "{failed} of {} checks failed on {}",
            report.checks.len(),
            args.device
        );
    }
    let missing = report.checks.iter().filter(|c| c.missing.is_some()).count();
    if missing > 0 {
        println!(
            "all {} checks passed; {missing} cases have no kernel on {} yet",
            report.checks.len() - missing,
            args.device
        );
    } else {
        println!("all {} checks passed", report.checks.len());
    }
    Ok(())
}

/// One output of one case in one dtype.
#[derive(Clone, Debug)]
pub struct Check {
    pub op: String,
    pub shape: String,
    pub dtype: DType,
    pub output: String,
    pub max_abs: f64,
    /// Over the elements whose reference exceeds `atol` in magnitude (relative error means little
    /// below it).
    pub max_rel: f64,
    /// The largest `|got − ref| / (atol·s + rtol·|ref|)`: the share of the tolerance used (≤ 1 passes).
    pub tolerance_used: f64,
    /// Why the check failed without numbers (an error, a missing or misshapen output).
    pub error: Option<String>,
    /// The device has no kernel for the op yet: listed, neither passed nor failed.
    pub missing: Option<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.missing.is_some() || (self.error.is_none() && self.tolerance_used <= 1.0)
    }
}

pub struct Report {
    pub candidate: String,
    pub reference: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed())
    }

    pub fn table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.output.chars().count())
            .fold(7, usize::max);
        let mut out = format!(
            "candidate: {}\nreference: {}\n\n{:<28} {:<26} {:<5} {:<width$} {:>11} {:>11} {:>8}  result\n",
            self.candidate, self.reference, "op", "shape", "dtype", "output", "max abs", "max rel", "of tol"
        );
        for c in &self.checks {
            let result = match (&c.error, &c.missing) {
                (_, Some(why)) => format!("no kernel yet: {why}"),
                (Some(e), None) => format!("FAIL: {e}"),
                (None, None) if c.passed() => "ok".to_string(),
                (None, None) => "FAIL".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<28} {:<26} {:<5} {:<width$} {:>11.3e} {:>11.3e} {:>8.3}  {result}",
                c.op,
                c.shape,
                c.dtype.name(),
                c.output,
                c.max_abs,
                c.max_rel,
                c.tolerance_used
            );
        }
        out
    }
}

/// `|got − ref| ≤ atol·s + rtol·|ref|` (`s` = max(1, RMS of the reference output)) for a candidate
/// computing in `dtype`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// f32 results differ from the reference by summation order and by the CPU's own `exp`/`erf`
    /// approximations (about 1e-6 absolute); bf16 results are rounded once to 8 significant bits.
    pub fn of(dtype: DType) -> Tolerance {
        match dtype {
            DType::BF16 | DType::F16 => Tolerance {
                atol: 1e-4,
                rtol: 2e-2,
            },
            DType::F32 | DType::F64 => Tolerance {
                atol: 1e-5,
                rtol: 1e-5,
            },
        }
    }

    /// The allowed `|got − ref|` for each reference value `w` of the output `want`.
    fn allowance(self, want: &[f64]) -> impl Fn(f64) -> f64 {
        let rms = (want.iter().map(|w| w * w).sum::<f64>() / want.len().max(1) as f64).sqrt();
        let atol = self.atol * rms.max(1.0);
        move |w| atol + self.rtol * w.abs()
    }
}

/// The tolerance of a whole model's step, run in f32 only: rounding differences compound through
/// every layer (f32 against f64 too), and a bf16 step is a training recipe, not an op's rounding.
const MODEL_STEP: Tolerance = Tolerance {
    atol: 1e-6,
    rtol: 1e-3,
};

/// Where a case runs: a backend, and the dtype its activations take there.
struct Side {
    backend: &'static dyn Backend,
    dtype: DType,
}

impl Side {
    /// An activation input: in this side's dtype, on its device.
    fn put(&self, t: &Tensor) -> Result<Tensor> {
        t.to_dtype(self.dtype)?.to_device(self.backend.device())
    }

    /// An f32 master value (AdamW's parameters and moments): f32 unless this side computes in f64.
    fn put_master(&self, t: &Tensor) -> Result<Tensor> {
        let dtype = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        t.to_dtype(dtype)?.to_device(self.backend.device())
    }
}

/// What a case returns, by name: tensors (on any device), scalars, integers or top-k lists.
#[derive(Clone)]
enum Value {
    Tensor(Tensor),
    Scalar(f64),
    /// Compared exactly (sampled tokens).
    Ids(Vec<u32>),
    Ranked(Ranked),
}

/// Top-k lists of `k` keys per query (fewer than asked if there are fewer keys), best first, as
/// `Backend::cosine_topk` returns them, and the score of each query's first key left out (the
/// (k+1)-th best; `None` when every key is listed), against which the last rank is checked.
#[derive(Clone, Debug)]
pub struct Ranked {
    pub k: usize,
    pub indices: Vec<u32>,
    pub scores: Vec<f32>,
    pub next: Option<Vec<f32>>,
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Value {
        Value::Tensor(t)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Scalar(v)
    }
}

impl From<Vec<u32>> for Value {
    fn from(ids: Vec<u32>) -> Value {
        Value::Ids(ids)
    }
}

impl Value {
    /// The value with tensors copied to the host.
    fn to_host(&self) -> Result<Value> {
        Ok(match self {
            Value::Tensor(t) => Value::Tensor(t.to_device(Device::Cpu)?),
            other => other.clone(),
        })
    }

    /// The elements of a tensor or a scalar.
    fn numbers(&self) -> Option<Vec<f64>> {
        match self {
            Value::Tensor(t) => Some(t.to_vec_f64()),
            Value::Scalar(v) => Some(vec![*v]),
            Value::Ids(_) | Value::Ranked(_) => None,
        }
    }
}

/// Compares a candidate's output with the reference's (both from [`Value::to_host`]): the numbers
/// of the check, or why it fails without them.
fn compare_outputs(want: &Value, got: &Value, tol: Tolerance) -> Result<(f64, f64, f64), String> {
    match (want, got) {
        (Value::Ids(w), Value::Ids(g)) => {
            if w.len() != g.len() {
                return Err(format!("{} ids, expected {}", g.len(), w.len()));
            }
            match w.iter().zip(g).position(|(a, b)| a != b) {
                Some(i) => Err(format!("id {i} is {}, expected {}", g[i], w[i])),
                None => Ok((0.0, 0.0, 0.0)),
            }
        }
        (Value::Ranked(w), Value::Ranked(g)) => compare_ranked(w, g, tol),
        _ => match (want.numbers(), got.numbers()) {
            (Some(w), Some(g)) if w.len() != g.len() => {
                Err(format!("{} elements, expected {}", g.len(), w.len()))
            }
            (Some(w), Some(g)) => Ok(compare(&w, &g, tol)),
            _ => Err("a different kind of output than the reference's".into()),
        },
    }
}

/// Named outputs; names are literals for ops, parameter names for a whole training step.
type Outputs<N = String> = Vec<(N, Value)>;
type Run = Box<dyn Fn(&Side, &[Tensor]) -> Result<Outputs>>;

/// One op on one set of inputs.
struct Case {
    op: &'static str,
    shape: String,
    /// Host f32 values; each side converts what it needs with [`Side::put`] / [`Side::put_master`].
    inputs: Vec<Tensor>,
    run: Run,
    /// A whole model's step rather than an op: see [`MODEL_STEP`].
    model_step: bool,
}

impl Case {
    fn new<N: Into<String>>(
        op: &'static str,
        shape: impl Into<String>,
        inputs: Vec<Tensor>,
        run: impl Fn(&Side, &[Tensor]) -> Result<Outputs<N>> + 'static,
    ) -> Case {
        Case {
            op,
            shape: shape.into(),
            inputs,
            run: Box::new(move |side, inputs| {
                let outputs = run(side, inputs)?;
                Ok(outputs.into_iter().map(|(n, v)| (n.into(), v)).collect())
            }),
            model_step: false,
        }
    }

    fn model_step(self) -> Case {
        Case {
            model_step: true,
            ..self
        }
    }
}

/// Runs every case (whose op contains `filter`) on `device` and on its reference.
pub fn selftest(device: Device, seed: u64, filter: Option<&str>) -> Result<Report> {
    let cpu = backend(Device::Cpu)?;
    let (reference, candidates) = match device {
        Device::Cpu => (
            Side {
                backend: cpu,
                dtype: DType::F64,
            },
            vec![Side {
                backend: cpu,
                dtype: DType::F32,
            }],
        ),
        Device::Cuda(ordinal) => {
            let cuda = CudaBackend::get(ordinal)?;
            // Every launch waits and reports its own error; fresh outputs start as NaN.
            cuda.gpu().set_checked(true);
            let candidates = [DType::F32, DType::BF16]
                .map(|dtype| Side {
                    backend: cuda,
                    dtype,
                })
                .into();
            (
                Side {
                    backend: cpu,
                    dtype: DType::F32,
                },
                candidates,
            )
        }
    };
    let mut checks = Vec::new();
    for case in cases(seed) {
        if filter.is_some_and(|f| !case.op.contains(f)) {
            continue;
        }
        for side in candidates
            .iter()
            .filter(|s| !case.model_step || s.dtype == DType::F32)
        {
            checks.extend(check_case(&case, &reference, side));
        }
    }
    Ok(Report {
        candidate: format!(
            "{} in {}",
            candidates[0].backend.describe(),
            candidates
                .iter()
                .map(|s| s.dtype.name())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
        reference: format!("{} in {}", reference.backend.describe(), reference.dtype),
        checks,
    })
}

/// Runs `case` on both sides, on inputs rounded to the candidate's dtype (so both see the same
/// values), and compares each output.
fn check_case(case: &Case, reference: &Side, candidate: &Side) -> Vec<Check> {
    let check = |output: &str, error: Option<String>| Check {
        op: case.op.to_string(),
        shape: case.shape.clone(),
        dtype: candidate.dtype,
        output: output.to_string(),
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        tolerance_used: f64::NAN,
        error,
        missing: None,
    };
    let run = |side: &Side| -> Result<Vec<(String, Value)>> {
        let inputs = case
            .inputs
            .iter()
            .map(|t| t.to_dtype(candidate.dtype)?.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        (case.run)(side, &inputs)?
            .into_iter()
            .map(|(name, value)| Ok((name, value.to_host()?)))
            .collect()
    };
    let (expected, got) = match (run(reference), run(candidate)) {
        (Ok(e), Ok(g)) => (e, g),
        (Err(e), _) => return vec![check("-", Some(format!("reference: {e:#}")))],
        (_, Err(e)) => {
            return vec![match e.downcast_ref::<NotImplemented>() {
                Some(missing) => Check {
                    missing: Some(missing.op.to_string()),
                    ..check("-", None)
                },
                None => check("-", Some(format!("{e:#}"))),
            }]
        }
    };
    let tolerance = if case.model_step {
        MODEL_STEP
    } else {
        Tolerance::of(candidate.dtype)
    };
    expected
        .iter()
        .map(|(name, want)| match got.iter().find(|(n, _)| n == name) {
            None => check(name, Some("no such output".into())),
            Some((_, have)) => match compare_outputs(want, have, tolerance) {
                Ok((max_abs, max_rel, tolerance_used)) => Check {
                    max_abs,
                    max_rel,
                    tolerance_used,
                    ..check(name, None)
                },
                Err(why) => check(name, Some(why)),
            },
        })
        .collect()
}

/// `(max |got − ref|, max relative error where |ref| > atol, max share of the tolerance used)`;
/// a NaN where the reference has a value uses an infinite share.
pub fn compare(want: &[f64], got: &[f64], tol: Tolerance) -> (f64, f64, f64) {
    let allowed = tol.allowance(want);
    let (mut max_abs, mut max_rel, mut used) = (0f64, 0f64, 0f64);
    for (&w, &g) in want.iter().zip(got) {
        let diff = (g - w).abs();
        let share = if diff.is_nan() {
            f64::INFINITY
        } else {
            diff / allowed(w)
        };
        used = used.max(share);
        max_abs = max_abs.max(if diff.is_nan() { f64::INFINITY } else { diff });
        if w.abs() > tol.atol {
            max_rel = max_rel.max(diff / w.abs());
        }
    }
    (max_abs, max_rel, used)
}

/// Top-k lists: [`compare`]'s numbers for the scores, which must be within the tolerance. A key
/// must equal the reference's wherever the reference's score at that rank is apart from both
/// neighbours' (the last rank's next being the first score left out) by more than the two
/// tolerances together: then no rounding within the tolerance can reorder them. Keys whose scores
/// are that close to a neighbour's may come in either order.
pub fn compare_ranked(
    want: &Ranked,
    got: &Ranked,
    tol: Tolerance,
) -> Result<(f64, f64, f64), String> {
    if got.k != want.k || got.indices.len() != want.indices.len() {
        return Err(format!(
            "{} keys in lists of {}, expected {} in lists of {}",
            got.indices.len(),
            got.k,
            want.indices.len(),
            want.k
        ));
    }
    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (w, g) = (widen(&want.scores), widen(&got.scores));
    let numbers = compare(&w, &g, tol);
    let allowed = tol.allowance(&w);
    let apart = |a: f64, b: f64| (a - b).abs() > allowed(a) + allowed(b);
    let k = want.k.max(1);
    for (row, (scores, (keys, got_keys))) in w
        .chunks(k)
        .zip(want.indices.chunks(k).zip(got.indices.chunks(k)))
        .enumerate()
    {
        let next = want.next.as_ref().map(|n| n[row] as f64);
        for j in 0..scores.len() {
            let above = j == 0 || apart(scores[j - 1], scores[j]);
            let below = match scores.get(j + 1).copied().or(next) {
                Some(s) => apart(scores[j], s),
                None => true,
            };
            if above && below && keys[j] != got_keys[j] {
                return Err(format!(
                    "query {row}, rank {j}: key {}, expected {} (score {:.6}, apart from its \
                     neighbours)",
                    got_keys[j], keys[j], scores[j]
                ));
            }
        }
    }
    Ok(numbers)
}

/// Normal random values: never zeros or constants.
fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(values, shape).expect("length matches the shape")
}

/// Uniform in (−1, 1): outputs of tanh.
fn uniform_pm1(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| 2.0 * rng.uniform() - 1.0).collect();
    Tensor::from_vec(values, shape).expect("length matches the shape")
}

fn below(rng: &mut Rng, n: usize, bound: u32) -> Vec<u32> {
    (0..n).map(|_| rng.below(bound as u64) as u32).collect()
}

/// All NaN: an output that a kernel must overwrite in full.
fn nan(shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(vec![f32::NAN; n], shape).expect("length matches the shape")
}

fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("×")
}

/// Every case, inputs drawn from `seed`. Shapes are deliberately odd (not multiples of a warp or a
/// block), some rows longer than a block, some tensors larger than one grid-stride pass.
fn cases(seed: u64) -> Vec<Case> {
    let mut rng = Rng::new(seed);
    let rng = &mut rng;
    let mut cases = Vec::new();
    const ODD: [usize; 3] = [3, 47, 31];
    // 1.28M elements: more than the 4096 blocks × 256 threads of one grid-stride pass.
    const LARGE: [usize; 2] = [1031, 1237];

    for shape in [&ODD[..], &LARGE[..]] {
        let inputs = vec![randn(rng, shape), randn(rng, shape)];
        cases.push(Case::new("add", dims(shape), inputs, |s, x| {
            let out = s.backend.add(&s.put(&x[0])?, &s.put(&x[1])?)?;
            Ok(vec![("out", out.into())])
        }));
        cases.push(Case::new(
            "sum_squares",
            dims(shape),
            vec![randn(rng, shape)],
            |s, x| Ok(vec![("sum", s.backend.sum_squares(&s.put(&x[0])?)?.into())]),
        ));
        let d = Dropout {
            p: 0.13,
            seed: rng.next_u64(),
        };
        cases.push(Case::new(
            "dropout",
            dims(shape),
            vec![randn(rng, shape)],
            move |s, x| Ok(vec![("out", s.backend.dropout(s.put(&x[0])?, d)?.into())]),
        ));
    }
    cases.push(Case::new(
        "add_assign",
        dims(&ODD),
        vec![randn(rng, &ODD), randn(rng, &ODD)],
        |s, x| {
            let mut a = s.put(&x[0])?;
            s.backend.add_assign(&mut a, &s.put(&x[1])?)?;
            Ok(vec![("a", a.into())])
        },
    ));
    cases.push(Case::new(
        "scale",
        dims(&ODD),
        vec![randn(rng, &ODD)],
        |s, x| {
            let mut a = s.put(&x[0])?;
            s.backend.scale(&mut a, -0.37)?;
            Ok(vec![("x", a.into())])
        },
    ));

    type Forward = fn(&dyn Backend, &Tensor) -> Result<Tensor>;
    type Backward = fn(&dyn Backend, &Tensor, &Tensor) -> Result<Tensor>;
    let activations: [(&str, Forward, &str, Backward); 2] = [
        (
            "gelu",
            |b, x| b.gelu(x),
            "gelu_backward",
            |b, x, dy| b.gelu_backward(x, dy),
        ),
        (
            "tanh",
            |b, x| b.tanh(x),
            "tanh_backward",
            |b, y, dy| b.tanh_backward(y, dy),
        ),
    ];
    for (op, forward, backward_op, backward) in activations {
        cases.push(Case::new(
            op,
            dims(&ODD),
            vec![randn(rng, &ODD)],
            move |s, t| Ok(vec![("y", forward(s.backend, &s.put(&t[0])?)?.into())]),
        ));
        // GELU's backward takes the forward's input, tanh's its output (in (−1, 1)).
        let saved = if op == "tanh" {
            uniform_pm1(rng, &ODD)
        } else {
            randn(rng, &ODD)
        };
        cases.push(Case::new(
            backward_op,
            dims(&ODD),
            vec![saved, randn(rng, &ODD)],
            move |s, t| {
                let dx = backward(s.backend, &s.put(&t[0])?, &s.put(&t[1])?)?;
                Ok(vec![("dx", dx.into())])
            },
        ));
    }

    // [rows, cols]: a row shorter than a warp, rows longer than a block, and enough rows for many
    // chunks in the dγ/dβ reduction.
    for [rows, cols] in [[141, 31], [5, 7], [37, 1537], [2100, 67]] {
        let shape = [rows, cols];
        let x = randn(rng, &shape);
        // A mean far from zero: the two-pass variance must not lose it.
        let x = Tensor::from_vec(
            x.to_vec_f32()
                .iter()
                .map(|v| 2.0 * v + 3.0)
                .collect::<Vec<f32>>(),
            &shape,
        )
        .expect("same shape");
        let (gamma, beta) = (randn(rng, &[cols]), randn(rng, &[cols]));
        cases.push(Case::new(
            "layer_norm",
            dims(&shape),
            vec![x.clone(), gamma.clone(), beta.clone()],
            |s, x| {
                let (y, stats) =
                    s.backend
                        .layer_norm(&s.put(&x[0])?, &s.put(&x[1])?, &s.put(&x[2])?, 1e-5)?;
                Ok(vec![
                    ("y", y.into()),
                    ("mean", stats.mean.into()),
                    ("rstd", stats.rstd.into()),
                ])
            },
        ));
        let inputs = vec![
            x,
            gamma,
            beta,
            randn(rng, &shape),
            randn(rng, &[cols]),
            randn(rng, &[cols]),
        ];
        cases.push(Case::new(
            "layer_norm_backward",
            dims(&shape),
            inputs,
            |s, t| {
                let (x, gamma) = (s.put(&t[0])?, s.put(&t[1])?);
                let (_, stats) = s.backend.layer_norm(&x, &gamma, &s.put(&t[2])?, 1e-5)?;
                let (mut dgamma, mut dbeta) = (s.put(&t[4])?, s.put(&t[5])?);
                let dx = s.backend.layer_norm_backward(
                    &s.put(&t[3])?,
                    &x,
                    &gamma,
                    &stats,
                    &mut dgamma,
                    &mut dbeta,
                )?;
                Ok(vec![
                    ("dx", dx.into()),
                    ("dgamma", dgamma.into()),
                    ("dbeta", dbeta.into()),
                ])
            },
        ));
    }
    for [rows, cols] in [[141, 31], [7, 1537]] {
        cases.push(Case::new(
            "l2_normalize",
            dims(&[rows, cols]),
            vec![randn(rng, &[rows, cols])],
            |s, x| Ok(vec![("y", s.backend.l2_normalize(&s.put(&x[0])?)?.into())]),
        ));
    }

    // Ids drawn from a few rows only, so many positions share a row in the backward.
    for (vocab, dim, n, distinct) in [(97, 31, 141, 13), (50, 385, 67, 50)] {
        let ids = below(rng, n, distinct);
        let shape = format!("{vocab}×{dim}, {n} ids");
        let lookup_ids = ids.clone();
        cases.push(Case::new(
            "embedding",
            shape.clone(),
            vec![randn(rng, &[vocab, dim])],
            move |s, t| {
                let out = s.backend.embedding(&s.put(&t[0])?, &lookup_ids)?;
                Ok(vec![("out", out.into())])
            },
        ));
        cases.push(Case::new(
            "embedding_backward",
            shape,
            vec![randn(rng, &[n, dim]), randn(rng, &[vocab, dim])],
            move |s, t| {
                let mut dtable = s.put(&t[1])?;
                s.backend
                    .embedding_backward(&s.put(&t[0])?, &ids, &mut dtable)?;
                Ok(vec![("dtable", dtable.into())])
            },
        ));
    }

    for [rows, classes] in [[37, 1013], [5, 7], [3, 5003]] {
        let labels = below(rng, rows, classes as u32);
        let logits = randn(rng, &[rows, classes]);
        let logits = Tensor::from_vec(
            logits
                .to_vec_f32()
                .iter()
                .map(|v| 3.0 * v)
                .collect::<Vec<f32>>(),
            &[rows, classes],
        )
        .expect("same shape");
        cases.push(Case::new(
            "cross_entropy",
            dims(&[rows, classes]),
            vec![logits],
            move |s, t| {
                let (loss, grad) = s.backend.cross_entropy(&s.put(&t[0])?, &labels)?;
                Ok(vec![("loss", loss.into()), ("grad", grad.into())])
            },
        ));
    }

    // Three sequences of 47 positions: one full, one of a single token, one in between.
    let (seq, hidden) = (47, 31);
    let lengths = vec![47, 1, 1 + rng.below(46) as u32];
    let batch = lengths.len();
    for (pooling, op, backward_op) in [
        (Pooling::Mean, "pool(mean)", "pool_backward(mean)"),
        (Pooling::Cls, "pool(cls)", "pool_backward(cls)"),
    ] {
        let lengths_fwd = lengths.clone();
        cases.push(Case::new(
            op,
            format!("{batch}×{seq}×{hidden}"),
            vec![randn(rng, &[batch * seq, hidden])],
            move |s, t| {
                let out = s.backend.pool(&s.put(&t[0])?, seq, &lengths_fwd, pooling)?;
                Ok(vec![("out", out.into())])
            },
        ));
        let lengths_bwd = lengths.clone();
        cases.push(Case::new(
            backward_op,
            format!("{batch}×{seq}×{hidden}"),
            vec![randn(rng, &[batch, hidden])],
            move |s, t| {
                let dx = s
                    .backend
                    .pool_backward(&s.put(&t[0])?, seq, &lengths_bwd, pooling)?;
                Ok(vec![("dx", dx.into())])
            },
        ));
    }

    matmul_cases(rng, &mut cases);
    linear_cases(rng, &mut cases);
    attention_cases(rng, &mut cases);
    decoder_cases(rng, &mut cases);
    distillation_cases(rng, &mut cases);

    // The second moment must be non-negative: squares of normal values.
    let v = randn(rng, &ODD);
    let v = Tensor::from_vec(
        v.to_vec_f32()
            .iter()
            .map(|x| 1e-3 * x * x)
            .collect::<Vec<f32>>(),
        &ODD,
    )
    .expect("same shape");
    let inputs = vec![randn(rng, &ODD), randn(rng, &ODD), randn(rng, &ODD), v];
    cases.push(Case::new("adamw", dims(&ODD), inputs, |s, t| {
        let hp = AdamW {
            lr: 1e-2,
            ..AdamW::default()
        };
        let (mut param, grad) = (s.put_master(&t[0])?, s.put(&t[1])?);
        let (mut m, mut v) = (s.put_master(&t[2])?, s.put_master(&t[3])?);
        s.backend.adamw(&mut param, &grad, &mut m, &mut v, &hp, 3)?;
        Ok(vec![
            ("param", param.into()),
            ("m", m.into()),
            ("v", v.into()),
        ])
    }));
    retrieval_cases(rng, &mut cases);
    sampling_cases(rng, &mut cases);
    cases.push(bert_training_step());
    cases.push(llama_prompt_step());
    cases
}

/// A whole training step of a small BERT classifier (2 layers, odd widths, padded sequences,
/// dropout on): the loss and every parameter's gradient. Parameters are drawn on the host from a
/// fixed seed, then copied to each side.
fn bert_training_step() -> Case {
    let config = BertConfig {
        vocab_size: 211,
        hidden_size: 51,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 67,
        max_position_embeddings: 64,
        // Far above BERT's 0.02, so attention scores (and the query and key gradients) are not
        // vanishingly small.
        initializer_range: 0.1,
        ..BertConfig::minilm_l6()
    };
    let mut rng = Rng::new(11);
    let (seq, lengths) = (13, vec![13, 7, 1]);
    let batch = Batch {
        ids: (0..lengths.len() * seq)
            .map(|_| rng.below(config.vocab_size as u64) as u32)
            .collect(),
        type_ids: (0..lengths.len() * seq).map(|i| (i % 2) as u32).collect(),
        lengths,
        seq,
    };
    let labels = vec![2, 0, 1];
    let shape = format!("b3×{seq} h51 l2");
    Case::new("bert_train_step", shape, vec![], move |s, _| {
        let mut params = ParamStore::new();
        let model = SequenceClassifier::register(&config, 3, Head::Pooler, &mut params);
        params.initialise(5)?;
        let params = params.to_dtype(s.dtype)?.to_device(s.backend.device())?;
        let mut grads = params.zeros_like();
        let mode = Mode::Train { seed: 9 };
        let loss = model.loss_and_grads(s.backend, &params, &batch, &labels, mode, &mut grads)?;
        let mut outputs: Outputs = vec![("loss".into(), loss.into())];
        for (name, grad) in grads.iter() {
            outputs.push((format!("d {name}"), grad.clone().into()));
        }
        Ok(outputs)
    })
    .model_step()
}

/// A whole step of a small Llama with deep prompts (2 layers, grouped-query attention, odd widths,
/// a padded batch, untied head): the LM loss, the prompts' gradients and every weight's gradient.
fn llama_prompt_step() -> Case {
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 97, "hidden_size": 60, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 32, "tie_word_embeddings": false
    }))
    .expect("a valid config");
    let batch = TokenBatch::from_sequences(
        &[
            vec![5, 17, 3, 88, 41, 2, 9, 60, 11],
            vec![7, 7, 30, 96],
            vec![1, 50],
        ],
        0,
    )
    .expect("a valid batch");
    Case::new(
        "llama_prompt_step",
        "b3×9 h60 6/2 heads",
        vec![],
        move |s, _| {
            let device = s.backend.device();
            let mut params = ParamStore::new();
            let model = Llama::register(&config, &mut params)?
                .with_dtype(s.dtype)?
                .on_device(device)?;
            params.initialise(7)?;
            let params = params.to_dtype(s.dtype)?.to_device(device)?;
            let mut prompts = DeepPrompts::random(&config, 3, 0.5, 8, "selftest")?;
            prompts.store = prompts.store.to_dtype(s.dtype)?.to_device(device)?;
            let (hidden, cache) = model.forward(s.backend, &params, &batch, Some(&prompts))?;
            let targets = next_token_targets(&batch);
            let mut grads = params.zeros_like();
            let head = params
                .ids()
                .find(|&i| params.name(i) == "lm_head.weight")
                .expect("an untied head");
            let (loss, d_hidden) = model.lm_loss(
                s.backend,
                &params,
                &hidden,
                &targets,
                Some(&mut grads[head]),
            )?;
            let layer_grads = model
                .backward(
                    s.backend,
                    &params,
                    cache,
                    &d_hidden,
                    Some(&prompts),
                    Some(&mut grads),
                )?
                .expect("prompts were given");
            let mut prompt_grads = prompts.store.zeros_like();
            prompts.accumulate(&mut prompt_grads, &layer_grads, s.backend)?;
            let mut outputs: Outputs = vec![("loss".into(), loss.into())];
            for (store, grads) in [(&prompts.store, prompt_grads), (&params, grads)] {
                for id in store.ids() {
                    outputs.push((format!("d {}", store.name(id)), grads[id].clone().into()));
                }
            }
            Ok(outputs)
        },
    )
    .model_step()
}

/// How a batch of matrix products is laid out.
#[derive(Clone, Copy)]
enum BatchLayout {
    /// Plain 2-D operands.
    Single,
    /// `[count, rows, cols]` operands.
    Each(usize),
    /// `[count, rows, cols]` a and out, one 2-D b for every product.
    SharedB(usize),
}

/// Matrix products in every transpose combination. The shapes: odd (no dimension a multiple of 8,
/// so the bf16 kernel loads element by element), an empty k (zeros), mixed (some operands in whole
/// chunks of 8, some not), in chunks of 8 but not in whole 128 × 128 × 32 tiles (16-byte copies,
/// edge tiles), batches, a b shared by a batch, accumulation onto random values, and transformer
/// shapes (a long k, a weight gradient). Outputs start as NaN where they are overwritten.
fn matmul_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    const ALL: [Transpose; 4] = [Transpose::NN, Transpose::NT, Transpose::TN, Transpose::TT];
    let specs: [(&'static str, BatchLayout, [usize; 3], &[Transpose]); 11] = [
        ("matmul", BatchLayout::Single, [3, 47, 31], &ALL),
        ("matmul", BatchLayout::Single, [5, 0, 7], &[Transpose::NN]),
        ("matmul", BatchLayout::Single, [130, 200, 70], &ALL),
        ("matmul", BatchLayout::Each(3), [37, 45, 29], &ALL),
        ("matmul", BatchLayout::Each(2), [136, 72, 264], &ALL),
        (
            "matmul",
            BatchLayout::Single,
            [128, 3072, 768],
            &[Transpose::NN],
        ),
        (
            "matmul",
            BatchLayout::Single,
            [768, 512, 3072],
            &[Transpose::TN],
        ),
        ("matmul(shared b)", BatchLayout::SharedB(3), [5, 9, 7], &ALL),
        (
            "matmul(shared b)",
            BatchLayout::SharedB(3),
            [40, 56, 24],
            &ALL,
        ),
        (
            "matmul(accumulate)",
            BatchLayout::Each(2),
            [37, 45, 29],
            &ALL,
        ),
        (
            "matmul(accumulate)",
            BatchLayout::Single,
            [136, 72, 264],
            &ALL,
        ),
    ];
    for (op, batch, [m, k, n], transposes) in specs {
        for &t in transposes {
            let (leading, b_leading, label) = match batch {
                BatchLayout::Single => (vec![], vec![], String::new()),
                BatchLayout::Each(c) => (vec![c], vec![c], format!("b{c} ")),
                BatchLayout::SharedB(c) => (vec![c], vec![], format!("b{c} ")),
            };
            let shape = |leading: &[usize], matrix: [usize; 2]| [leading, &matrix].concat();
            let a = randn(rng, &shape(&leading, if t.a { [k, m] } else { [m, k] }));
            let b = randn(rng, &shape(&b_leading, if t.b { [n, k] } else { [k, n] }));
            let out_shape = shape(&leading, [m, n]);
            let accumulate = op == "matmul(accumulate)";
            let out = if accumulate {
                randn(rng, &out_shape)
            } else {
                nan(&out_shape)
            };
            let tag = match (t.a, t.b) {
                (false, false) => "nn",
                (false, true) => "nt",
                (true, false) => "tn",
                (true, true) => "tt",
            };
            cases.push(Case::new(
                op,
                format!("{label}{m}×{k}×{n} {tag}"),
                vec![a, b, out],
                move |s, x| {
                    let mut out = s.put(&x[2])?;
                    s.backend
                        .matmul(&s.put(&x[0])?, &s.put(&x[1])?, t, &mut out, accumulate)?;
                    Ok(vec![("out", out.into())])
                },
            ));
        }
    }
}

/// `linear` and its backward: odd shapes, a 3-D input without a bias, BERT-base's projections,
/// and enough rows for the bias gradient's column sum to take many chunks.
fn linear_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    // (leading dimensions of x, in, out, with a bias)
    let specs: [(&[usize], usize, usize, bool); 6] = [
        (&[3], 47, 31, true),
        (&[2, 5], 47, 31, false),
        (&[512], 768, 3072, true),
        (&[512], 3072, 768, true),
        (&[2100], 40, 24, true),
        (&[64], 8, 1, true),
    ];
    for (leading, inp, outp, with_bias) in specs {
        let (op, backward_op) = if with_bias {
            ("linear", "linear_backward")
        } else {
            ("linear(no bias)", "linear_backward(no bias)")
        };
        let x_shape = [leading, &[inp]].concat();
        let y_shape = [leading, &[outp]].concat();
        let label = format!("{} → {outp}", dims(&x_shape));
        let (x, w, bias) = (
            randn(rng, &x_shape),
            randn(rng, &[outp, inp]),
            randn(rng, &[outp]),
        );
        cases.push(Case::new(
            op,
            label.clone(),
            vec![x.clone(), w.clone(), bias],
            move |s, t| {
                let bias = if with_bias { Some(s.put(&t[2])?) } else { None };
                let y = s
                    .backend
                    .linear(&s.put(&t[0])?, &s.put(&t[1])?, bias.as_ref())?;
                Ok(vec![("y", y.into())])
            },
        ));
        // dw and dbias start random: the backward accumulates into them.
        let inputs = vec![
            randn(rng, &y_shape),
            x,
            w,
            randn(rng, &[outp, inp]),
            randn(rng, &[outp]),
        ];
        cases.push(Case::new(backward_op, label, inputs, move |s, t| {
            let (mut dw, mut dbias) = (s.put(&t[3])?, s.put(&t[4])?);
            let dx = s.backend.linear_backward(
                &s.put(&t[0])?,
                &s.put(&t[1])?,
                &s.put(&t[2])?,
                &mut dw,
                with_bias.then_some(&mut dbias),
            )?;
            let mut outputs = vec![("dx", dx.into()), ("dw", dw.into())];
            if with_bias {
                outputs.push(("dbias", dbias.into()));
            }
            Ok(outputs)
        }));
    }
}

/// The encoder's attention: odd sizes with a full, a partial and a one-token sequence (padded query
/// rows still attend, as on the CPU), without and with dropout on the probabilities; and head_dim
/// 128 (the kernels' widest) over several tiles of rows. The backward is a case of its own on
/// probabilities given as an input (the CPU's, in f32), so that both sides read the same ones: a
/// bf16 forward's probabilities, fed to the backward, would move dq, dk and dv by much more than
/// bf16's tolerance on their own, whatever the kernels do.
fn attention_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let cpu = backend(Device::Cpu).expect("the CPU backend is always there");
    let specs: [(AttnShape, usize, &[u32], f32); 3] = [
        (
            AttnShape {
                batch: 3,
                seq: 47,
                heads: 3,
            },
            31,
            &[47, 20, 1],
            0.0,
        ),
        (
            AttnShape {
                batch: 3,
                seq: 47,
                heads: 3,
            },
            31,
            &[47, 20, 1],
            0.1,
        ),
        (
            AttnShape {
                batch: 2,
                seq: 77,
                heads: 2,
            },
            128,
            &[77, 40],
            0.1,
        ),
    ];
    for (shape, d, lengths, p) in specs {
        let lengths = lengths.to_vec();
        let dropout = Dropout {
            p,
            seed: rng.next_u64(),
        };
        let (op, backward_op) = if dropout.is_active() {
            ("attention(dropout)", "attention_backward(dropout)")
        } else {
            ("attention", "attention_backward")
        };
        let x_shape = [shape.batch * shape.seq, shape.heads * d];
        let [q, k, v, dout] = [(); 4].map(|_| randn(rng, &x_shape));
        let (_, probs) = cpu
            .attention(&q, &k, &v, shape, &lengths, dropout)
            .expect("a valid attention call");
        let label = format!(
            "b{}-s{}-h{}-d{d} {lengths:?}",
            shape.batch, shape.seq, shape.heads
        );
        let forward_lengths = lengths.clone();
        cases.push(Case::new(
            op,
            label.clone(),
            vec![q.clone(), k.clone(), v.clone()],
            move |s, t| {
                let (out, probs) = s.backend.attention(
                    &s.put(&t[0])?,
                    &s.put(&t[1])?,
                    &s.put(&t[2])?,
                    shape,
                    &forward_lengths,
                    dropout,
                )?;
                Ok(vec![("out", out.into()), ("probs", probs.into())])
            },
        ));
        cases.push(Case::new(
            backward_op,
            label,
            vec![q, k, v, dout, probs],
            move |s, t| {
                let [q, k, v, dout, probs] = [0, 1, 2, 3, 4].map(|i| s.put(&t[i]));
                let (dq, dk, dv) = s
                    .backend
                    .attention_backward(&dout?, &q?, &k?, &v?, &probs?, shape, &lengths, dropout)?;
                Ok(vec![
                    ("dq", dq.into()),
                    ("dk", dk.into()),
                    ("dv", dv.into()),
                ])
            },
        ));
    }
}

/// The Llama decoder's ops at odd sizes: RMSNorm, RoPE, SwiGLU and causal grouped-query attention
/// with and without a deep-prompt prefix, forward and backward.
fn decoder_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let (rows, width) = (3 * 47, 62);
    let inputs = vec![
        randn(rng, &[rows, width]),
        randn(rng, &[width]),
        randn(rng, &[rows, width]),
    ];
    cases.push(Case::new(
        "rms_norm",
        dims(&[rows, width]),
        inputs,
        |s, t| {
            let (x, w, dy) = (s.put(&t[0])?, s.put(&t[1])?, s.put(&t[2])?);
            let (y, stats) = s.backend.rms_norm(&x, &w, 1e-5)?;
            let mut dw = Tensor::zeros_on(w.shape(), w.dtype(), w.device())?;
            let dx = s
                .backend
                .rms_norm_backward(&dy, &x, &w, &stats, Some(&mut dw))?;
            Ok(vec![
                ("y", y.into()),
                ("dx", dx.into()),
                ("dweight", dw.into()),
            ])
        },
    ));

    // Two heads of 62; positions up to 300 of a table of 512.
    let table = crate::backend::cpu::rope::rope_table(512, 62, 10_000.0, DType::F32);
    let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 7) % 300).collect();
    let inputs = vec![randn(rng, &[rows, 2 * 62]), table];
    cases.push(Case::new(
        "rope",
        dims(&[rows, 2 * 62]),
        inputs,
        move |s, t| {
            let table = s.put(&t[1])?;
            let mut x = s.put(&t[0])?;
            s.backend.rope(&mut x, 2, &positions, &table, false)?;
            let rotated = x.clone();
            s.backend.rope(&mut x, 2, &positions, &table, true)?;
            Ok(vec![("y", rotated.into()), ("inverse", x.into())])
        },
    ));

    let odd = [3, 47, 31];
    let inputs = vec![randn(rng, &odd), randn(rng, &odd), randn(rng, &odd)];
    cases.push(Case::new("swiglu", dims(&odd), inputs, |s, t| {
        let (gate, up, dy) = (s.put(&t[0])?, s.put(&t[1])?, s.put(&t[2])?);
        let y = s.backend.swiglu(&gate, &up)?;
        let (dgate, dup) = s.backend.swiglu_backward(&gate, &up, &dy)?;
        Ok(vec![
            ("y", y.into()),
            ("dgate", dgate.into()),
            ("dup", dup.into()),
        ])
    }));

    // Prefill with a prefix (3 sequences of 47, 6 query heads sharing 2 key/value heads of 31),
    // one decoding step against a cache at different positions, and, without a prefix and with a
    // key/value head per query head, chunks of 19 queries at different positions.
    let (batch, seq, d) = (3, 47, 31);
    let prefill = CausalShape {
        batch,
        q_len: seq,
        kv_len: seq,
        heads: 6,
        kv_heads: 2,
    };
    let decode = CausalShape {
        q_len: 1,
        ..prefill
    };
    let chunked = CausalShape {
        q_len: 19,
        heads: 3,
        kv_heads: 3,
        ..prefill
    };
    for (shape, q_start, prefix) in [
        (prefill, vec![0u32; batch], Some(5)),
        (decode, vec![0, 20, 46], Some(5)),
        (chunked, vec![0, 28, 10], None),
    ] {
        causal_attention_cases(rng, cases, shape, d, q_start, prefix);
    }
}

/// Causal attention on one shape, with a prefix of `prefix` rows or none: the forward, and the
/// backward on probabilities given as an input (see [`attention_cases`]). The prefix's keys and
/// values are the cases' last two inputs.
fn causal_attention_cases(
    rng: &mut Rng,
    cases: &mut Vec<Case>,
    shape: CausalShape,
    d: usize,
    q_start: Vec<u32>,
    prefix: Option<usize>,
) {
    let q_shape = [shape.batch * shape.q_len, shape.heads * d];
    let kv_width = shape.kv_heads * d;
    let (q, dout) = (randn(rng, &q_shape), randn(rng, &q_shape));
    let [k, v] = [(); 2].map(|_| randn(rng, &[shape.batch * shape.kv_len, kv_width]));
    let prefix_kv: Vec<Tensor> = match prefix {
        Some(rows) => [(); 2].map(|_| randn(rng, &[rows, kv_width])).into(),
        None => vec![],
    };
    fn with_prefix(t: &[Tensor]) -> Option<Prefix<'_>> {
        let [keys, values] = t else { return None };
        Some(Prefix { keys, values })
    }
    let (_, probs) = backend(Device::Cpu)
        .expect("the CPU backend is always there")
        .causal_attention(&q, &k, &v, with_prefix(&prefix_kv), shape, &q_start)
        .expect("a valid causal attention call");
    let label = format!(
        "b{}-q{}-kv{}-h{}/{}-d{d}{}",
        shape.batch,
        shape.q_len,
        shape.kv_len,
        shape.heads,
        shape.kv_heads,
        prefix.map_or(String::new(), |rows| format!("-p{rows}"))
    );
    let forward_q_start = q_start.clone();
    cases.push(Case::new(
        "causal_attention",
        label.clone(),
        [vec![q.clone(), k.clone(), v.clone()], prefix_kv.clone()].concat(),
        move |s, t| {
            let t = t.iter().map(|x| s.put(x)).collect::<Result<Vec<_>>>()?;
            let (out, probs) = s.backend.causal_attention(
                &t[0],
                &t[1],
                &t[2],
                with_prefix(&t[3..]),
                shape,
                &forward_q_start,
            )?;
            Ok(vec![("out", out.into()), ("probs", probs.into())])
        },
    ));
    cases.push(Case::new(
        "causal_attention_backward",
        label,
        [vec![q, k, v, dout, probs], prefix_kv].concat(),
        move |s, t| {
            let t = t.iter().map(|x| s.put(x)).collect::<Result<Vec<_>>>()?;
            let prefix = with_prefix(&t[5..]);
            let g = s.backend.causal_attention_backward(
                &t[3], &t[0], &t[1], &t[2], prefix, &t[4], shape, &q_start,
            )?;
            let mut outputs = vec![
                ("dq", g.dq.into()),
                ("dk", g.dk.into()),
                ("dv", g.dv.into()),
            ];
            if let Some((dpk, dpv)) = g.dprefix {
                outputs.push(("dprefix_k", dpk.into()));
                outputs.push(("dprefix_v", dpv.into()));
            }
            Ok(outputs)
        },
    ));
}

/// Rows of probabilities with some exact zeros (a teacher that rules classes out).
fn random_probs(rng: &mut Rng, rows: usize, classes: usize) -> Tensor {
    let mut p: Vec<f32> = (0..rows * classes)
        .map(|i| if i % 9 == 4 { 0.0 } else { rng.normal().exp() })
        .collect();
    for row in p.chunks_mut(classes) {
        let total: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= total);
    }
    Tensor::from_vec(p, &[rows, classes]).expect("length matches the shape")
}

/// The distillation losses: softmax-KL in both directions with per-row temperatures, teacher logits
/// or probabilities, the cross-entropy mixed in and ignored rows, short rows (a thread each), rows of
/// a few thousand (a warp each) and vocabulary-sized rows (a block each), in place too; RetriKT's
/// listwise loss.
fn distillation_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    for (rows, classes) in [(3 * 47, 31), (5, 4099), (257, 3)] {
        let taus: Vec<f32> = (0..rows).map(|r| 0.5 + (r % 5) as f32 * 0.6).collect();
        let labels: Vec<u32> = (0..rows)
            .map(|r| {
                if r % 7 == 3 {
                    IGNORE_INDEX
                } else {
                    (r * 13 % classes) as u32
                }
            })
            .collect();
        for direction in [KlDirection::TeacherStudent, KlDirection::StudentTeacher] {
            let (taus, labels) = (taus.clone(), labels.clone());
            let inputs = vec![randn(rng, &[rows, classes]), randn(rng, &[rows, classes])];
            let op = match direction {
                KlDirection::TeacherStudent => "softmax_kl(t‖s)",
                KlDirection::StudentTeacher => "softmax_kl(s‖t)",
            };
            cases.push(Case::new(
                op,
                dims(&[rows, classes]),
                inputs,
                move |s, t| {
                    let (student, teacher) = (s.put(&t[0])?, s.put(&t[1])?);
                    let spec = SoftmaxKl {
                        teacher: Teacher::Logits(&teacher),
                        terms: KlTerms {
                            temperature: PerRow::Each(&taus),
                            kl_weight: PerRow::Same(0.7),
                            direction,
                            labels: Some(&labels),
                            ce_weight: PerRow::Same(0.3),
                        },
                    };
                    let (loss, grad) = s.backend.softmax_kl(&student, &spec)?;
                    Ok(vec![("loss", loss.mean.into()), ("grad", grad.into())])
                },
            ));
        }
    }
    for (rows, classes) in [(3, 49157), (37, 2)] {
        let taus: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32 * 0.5).collect();
        let inputs = vec![
            randn(rng, &[rows, classes]),
            random_probs(rng, rows, classes),
        ];
        for direction in [KlDirection::TeacherStudent, KlDirection::StudentTeacher] {
            let taus = taus.clone();
            let op = match direction {
                KlDirection::TeacherStudent => "softmax_kl(p‖s)",
                KlDirection::StudentTeacher => "softmax_kl(s‖p)",
            };
            cases.push(Case::new(
                op,
                format!("{} in place", dims(&[rows, classes])),
                inputs.clone(),
                move |s, t| {
                    let (mut logits, teacher) = (s.put(&t[0])?, s.put(&t[1])?);
                    let spec = SoftmaxKl {
                        teacher: Teacher::Probs(&teacher),
                        terms: KlTerms {
                            temperature: PerRow::Each(&taus),
                            kl_weight: PerRow::Same(1.0),
                            direction,
                            labels: None,
                            ce_weight: PerRow::Same(0.0),
                        },
                    };
                    let loss = s.backend.softmax_kl_in_place(&mut logits, &spec)?;
                    Ok(vec![("loss", loss.mean.into()), ("grad", logits.into())])
                },
            ));
        }
    }
    let inputs = vec![randn(rng, &[47, 31]), randn(rng, &[47, 29])];
    cases.push(Case::new(
        "listwise_cos_kl",
        "47×31 vs 47×29",
        inputs,
        |s, t| {
            let (student, teacher) = (s.put(&t[0])?, s.put(&t[1])?);
            let (loss, grad) = s.backend.listwise_cos_kl(
                &student,
                &teacher,
                0.1,
                0.2,
                KlDirection::StudentTeacher,
            )?;
            Ok(vec![("loss", loss.into()), ("grad", grad.into())])
        },
    ));
}

/// Cosine top-k: k of 1, a few and above the GPU's device-side limit (1024); keys passed in two
/// calls with offsets; and enough queries × keys that the GPU goes through two chunks in one call.
/// Keys are unit rows, as a store holds them.
fn retrieval_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let cpu = backend(Device::Cpu).expect("the CPU backend exists");
    let unit = |rng: &mut Rng, rows: usize, d: usize| {
        cpu.l2_normalize(&randn(rng, &[rows, d]))
            .expect("f32 rows normalise")
    };
    let (q, n, d) = (7, 5003, 47);
    let (queries, keys) = (randn(rng, &[q, d]), unit(rng, n, d));
    for k in [1, 16, 1030] {
        cases.push(Case::new(
            "cosine_topk",
            format!("q{q}-n{n}-d{d} k{k}"),
            vec![queries.clone(), keys.clone()],
            move |s, t| Ok(vec![("top-k", top_k_lists(s, &t[0], &t[1..], k)?)]),
        ));
    }
    let split = 2500;
    let halves = [0..split, split..n].map(|rows| {
        let values = keys.to_vec_f32()[rows.start * d..rows.end * d].to_vec();
        Tensor::from_vec(values, &[rows.len(), d]).expect("length matches the shape")
    });
    cases.push(Case::new(
        "cosine_topk(2 calls)",
        format!("q{q}-n{split}+{}-d{d} k16", n - split),
        [vec![queries], halves.to_vec()].concat(),
        |s, t| Ok(vec![("top-k", top_k_lists(s, &t[0], &t[1..], 16)?)]),
    ));
    // 1100 queries: the GPU scores about 60K keys at a time.
    let (q, n, d) = (1100, 65_536, 16);
    cases.push(Case::new(
        "cosine_topk",
        format!("q{q}-n{n}-d{d} k16"),
        vec![randn(rng, &[q, d]), unit(rng, n, d)],
        |s, t| Ok(vec![("top-k", top_k_lists(s, &t[0], &t[1..], 16)?)]),
    ));
}

/// The top-k lists of `queries` against the keys of `chunks`, one update per chunk (the first key
/// of each following the last of the one before), with the first score left out of each list.
fn top_k_lists(s: &Side, queries: &Tensor, chunks: &[Tensor], k: usize) -> Result<Value> {
    let queries = s.put(queries)?;
    let chunks = chunks
        .iter()
        .map(|c| s.put(c))
        .collect::<Result<Vec<_>>>()?;
    let lists = |k: usize| -> Result<(Vec<u32>, Vec<f32>)> {
        let mut best = TopK::new(queries.rows_cols().0, k);
        let mut offset = 0;
        for keys in &chunks {
            s.backend
                .cosine_topk_update(keys, offset, &queries, &mut best)?;
            offset += keys.rows_cols().0;
        }
        Ok(best.into_sorted())
    };
    let (indices, scores) = lists(k)?;
    let keys: usize = chunks.iter().map(|c| c.rows_cols().0).sum();
    let listed = k.min(keys);
    let next = if k < keys {
        let (_, longer) = lists(k + 1)?;
        Some(longer.chunks(k + 1).map(|row| row[k]).collect())
    } else {
        None
    };
    Ok(Value::Ranked(Ranked {
        k: listed,
        indices,
        scores,
        next,
    }))
}

/// Sampling: greedy, and seeded draws through temperature, top-k and top-p, each alone and
/// together, over a large vocabulary and a small one (smaller than the top-k of 50). Logits are randn·3, whose
/// probabilities are far enough apart that the CPU's and the GPU's rounding pick the same tokens.
fn sampling_cases(rng: &mut Rng, cases: &mut Vec<Case>) {
    let settings = [
        ("greedy", 0.0, 0, 1.0),
        ("t0.8 k50 p0.9", 0.8, 50, 0.9),
        ("t1.3 p0.95", 1.3, 0, 0.95),
        ("t0.7 k20", 0.7, 20, 1.0),
    ];
    for vocab in [4099, 31] {
        let rows = 5;
        let logits = randn(rng, &[rows, vocab]);
        let logits = Tensor::from_vec(
            logits.to_vec_f32().iter().map(|v| 3.0 * v).collect(),
            &[rows, vocab],
        )
        .expect("same shape");
        for (label, temperature, top_k, top_p) in settings {
            let s = Sampling {
                temperature,
                top_k,
                top_p,
                seed: rng.next_u64(),
            };
            cases.push(Case::new(
                "sample",
                format!("{rows}×{vocab} {label}"),
                vec![logits.clone()],
                move |side, t| {
                    let logits = side.put(&t[0])?;
                    // Eight steps: eight independent draws per row.
                    let mut tokens = Vec::new();
                    for step in 0..8 {
                        tokens.extend(side.backend.sample(&logits, &s, step)?);
                    }
                    Ok(vec![("tokens", tokens.into())])
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{compare, compare_ranked, Ranked, Tolerance};

    #[test]
    fn compare_flags_nan_and_measures_shares() {
        let tol = Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        };
        let (abs, rel, used) = compare(&[1.0, -2.0], &[1.0 + 1e-6, -2.0], tol);
        assert!((abs - 1e-6).abs() < 1e-12 && (rel - 1e-6).abs() < 1e-12);
        assert!(used < 0.1);
        let (_, _, used) = compare(&[1.0, 2.0], &[1.0, f64::NAN], tol);
        assert!(used.is_infinite());
    }

    #[test]
    fn ranked_lists_may_swap_only_near_equal_scores() {
        let tol = Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        };
        let list = |indices: Vec<u32>, scores: Vec<f32>, next: f32| Ranked {
            k: 3,
            indices,
            scores,
            next: Some(vec![next]),
        };
        let want = list(vec![4, 7, 9], vec![0.9, 0.5, 0.5 - 1e-6], 0.1);
        // 7 and 9 score within the tolerance of each other: either order passes.
        let swapped = list(vec![4, 9, 7], vec![0.9, 0.5, 0.5 - 1e-6], 0.1);
        assert!(compare_ranked(&want, &swapped, tol).is_ok());
        // 4 is far ahead of the others: a different key there fails.
        let wrong = list(vec![5, 7, 9], vec![0.9, 0.5, 0.5 - 1e-6], 0.1);
        assert!(compare_ranked(&want, &wrong, tol).is_err());
        // The last rank is checked against the first key left out: close to it, either may come.
        let want = list(vec![4, 7, 9], vec![0.9, 0.5, 0.3], 0.3 - 1e-6);
        let other = list(vec![4, 7, 2], vec![0.9, 0.5, 0.3 - 1e-6], 0.3);
        assert!(compare_ranked(&want, &other, tol).is_ok());
        let want = list(vec![4, 7, 9], vec![0.9, 0.5, 0.3], 0.1);
        assert!(compare_ranked(&want, &other, tol).is_err());
    }
}
