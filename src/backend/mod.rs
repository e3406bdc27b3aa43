//! The op set every device implements. Layers call these; each forward op that training uses has its
//! backward here too (an op without a backward fails loudly rather than dropping gradients).
//!
//! Activations are laid out row-major as `[rows, features]`; a batch of sequences is
//! `[batch * seq, hidden]`, right-padded to the longest sequence, with the real length of each sequence
//! passed as `lengths` so padded positions never influence a real one.

pub mod cpu;
pub mod cuda;
pub mod head_kl;

pub use cpu::similarity::TopK;

use anyhow::{bail, Result};

use crate::tensor::{Device, Tensor};

/// Which operands of a matrix product are read transposed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transpose {
    pub a: bool,
    pub b: bool,
}

impl Transpose {
    pub const NN: Transpose = Transpose { a: false, b: false };
    pub const NT: Transpose = Transpose { a: false, b: true };
    pub const TN: Transpose = Transpose { a: true, b: false };
    pub const TT: Transpose = Transpose { a: true, b: true };
}

/// Inverted dropout with a counter-based mask: element `i` is kept iff `hash(seed, i) ≥ p·2^32`, so the
/// mask is reproducible on any device and thread count and the backward regenerates it from the seed
/// instead of storing it. `p = 0` is the identity (evaluation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout { p: 0.0, seed: 0 };

    /// A dropout site's own stream: mixes a site tag (layer, position in the layer) into the step seed.
    pub fn site(p: f32, step_seed: u64, tag: u64) -> Dropout {
        Dropout {
            p,
            seed: mix64(step_seed ^ mix64(tag.wrapping_add(0x9E37_79B9_7F4A_7C15))),
        }
    }

    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// The multiplier of element `index`: 0 if dropped, 1/(1−p) if kept.
    #[inline(always)]
    pub fn factor(&self, index: u64) -> f64 {
        let bits = (mix64(self.seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 32) as u32;
        if (bits as f64) < self.p as f64 * 4_294_967_296.0 {
            0.0
        } else {
            1.0 / (1.0 - self.p as f64)
        }
    }
}

/// How tokens are drawn from logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens holding at least this much probability (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0 as u32
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash (also usable in a CUDA kernel).
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the real (unpadded) tokens, as sentence-transformers does.
    Mean,
    /// The first token's vector.
    Cls,
}

impl std::str::FromStr for Pooling {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            _ => bail!("unknown pooling '{s}': expected 'mean' or 'cls'"),
        }
    }
}

/// Which way a KL divergence between a student and a teacher distribution is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KlDirection {
    /// `KL(student ‖ teacher)`: RetriKT's listwise loss as the paper prints it.
    #[default]
    StudentTeacher,
    /// `KL(teacher ‖ student)`: the usual distillation direction.
    TeacherStudent,
}

/// A loss setting (temperature, weight) shared by every row, or one value per row (DynSDPB).
#[derive(Clone, Copy, Debug)]
pub enum PerRow<'a> {
    Same(f32),
    Each(&'a [f32]),
}

impl PerRow<'_> {
    pub fn get(&self, row: usize) -> f32 {
        match self {
            PerRow::Same(v) => *v,
            PerRow::Each(v) => v[row],
        }
    }

    /// Checks the length and that every value is finite (and positive where `positive`).
    fn check(&self, what: &str, rows: usize, positive: bool) -> Result<()> {
        let values: &[f32] = match self {
            PerRow::Same(v) => std::slice::from_ref(v),
            PerRow::Each(v) => {
                if v.len() != rows {
                    bail!("softmax-KL: {} {what} values for {rows} rows", v.len());
                }
                v
            }
        };
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || (positive && **v <= 0.0))
        {
            let need = if positive {
                "positive and finite"
            } else {
                "finite"
            };
            bail!("softmax-KL: {what} {v} (row {i}) must be {need}");
        }
        Ok(())
    }
}

/// What a student's logits are matched against: the teacher's logits (softened by the temperature
/// like the student's), or a distribution given directly (e.g. a reward model's probabilities).
#[derive(Clone, Copy, Debug)]
pub enum Teacher<'a> {
    Logits(&'a Tensor),
    Probs(&'a Tensor),
}

/// A label that marks a row to leave out (padding): no loss, no gradient, not counted in the mean.
pub const IGNORE_INDEX: u32 = u32::MAX;

/// The general distillation loss of one row `i` of student logits `s`, with `τ = temperature[i]`:
/// `ce_weight[i]·CE(label_i, softmax(s)) + kl_weight[i]·τ²·KL` where the KL is between
/// `softmax(s/τ)` and the teacher's `softmax(t/τ)` (or its probabilities as given), in `direction`.
/// The loss is the mean over rows whose label is not [`IGNORE_INDEX`] (all rows without labels).
/// Hinton's KD is `ce_weight = 1 − α`, `kl_weight = α`; DynSDPB passes per-row weights and temperatures.
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxKl<'a> {
    pub teacher: Teacher<'a>,
    pub terms: KlTerms<'a>,
}

/// How each row's loss is made of its terms (see [`SoftmaxKl`]); apart from the teacher, so that
/// chunked callers ([`head_kl`]) can hand the same terms to every chunk of rows.
#[derive(Clone, Copy, Debug)]
pub struct KlTerms<'a> {
    pub temperature: PerRow<'a>,
    pub kl_weight: PerRow<'a>,
    pub direction: KlDirection,
    /// Hard labels for the cross-entropy term and for [`IGNORE_INDEX`] rows; `None` = no CE, every row counts.
    pub labels: Option<&'a [u32]>,
    pub ce_weight: PerRow<'a>,
}

impl<'a> KlTerms<'a> {
    /// Checks the settings against `rows × classes` logits; returns the number of rows counted.
    pub fn validate(&self, rows: usize, classes: usize) -> Result<usize> {
        self.temperature.check("temperature", rows, true)?;
        self.kl_weight.check("KL weight", rows, false)?;
        self.ce_weight.check("CE weight", rows, false)?;
        let Some(labels) = self.labels else {
            if (0..rows).any(|r| self.ce_weight.get(r) != 0.0) {
                bail!("softmax-KL: a cross-entropy weight needs labels");
            }
            return Ok(rows);
        };
        if labels.len() != rows {
            bail!(
                "softmax-KL: {} labels for {rows} rows of logits",
                labels.len()
            );
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l != IGNORE_INDEX && l as usize >= classes)
        {
            bail!("softmax-KL: label {l} of row {i} is out of range for {classes} classes");
        }
        Ok(labels.iter().filter(|&&l| l != IGNORE_INDEX).count())
    }

    /// The terms of rows `range` only (per-row values and labels sliced).
    pub fn rows(&self, range: std::ops::Range<usize>) -> KlTerms<'a> {
        let slice = |v: PerRow<'a>| match v {
            PerRow::Same(x) => PerRow::Same(x),
            PerRow::Each(x) => PerRow::Each(&x[range.clone()]),
        };
        KlTerms {
            temperature: slice(self.temperature),
            kl_weight: slice(self.kl_weight),
            direction: self.direction,
            labels: self.labels.map(|l| &l[range.clone()]),
            ce_weight: slice(self.ce_weight),
        }
    }
}

impl SoftmaxKl<'_> {
    /// Checks the settings against the student logits; returns the number of rows counted.
    pub fn validate(&self, student: &Tensor) -> Result<usize> {
        let teacher = match self.teacher {
            Teacher::Logits(t) | Teacher::Probs(t) => t,
        };
        check_same_shape("softmax-KL (student vs teacher)", student, teacher)?;
        let (rows, classes) = student.rows_cols();
        self.terms.validate(rows, classes)
    }
}

/// Per-row losses (0 for ignored rows) and their mean over the counted rows.
#[derive(Clone, Debug)]
pub struct RowLosses {
    pub mean: f64,
    pub rows: Vec<f64>,
}

/// Shape of a multi-head attention call over `[batch * seq, heads * head_dim]` activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
}

/// The error of an op a device has no kernel for yet, so that callers (the bench) can tell it from
/// a failure.
#[derive(Debug, thiserror::Error)]
#[error("{op} is not implemented on {device} yet: run it with --device cpu")]
pub struct NotImplemented {
    pub op: &'static str,
    pub device: Device,
}

/// Shape of a causal (decoder) attention call. Queries are `[batch * q_len, heads * head_dim]`, keys
/// and values `[batch * kv_len, kv_heads * head_dim]` (grouped-query attention: query head `h` reads
/// key/value head `h / (heads / kv_heads)`). Query row `i` of sequence `b` sits at position
/// `q_start[b] + i` and sees the keys at positions `0..=q_start[b] + i` (prefill: `q_start = 0`,
/// `kv_len = q_len`; one decoding step: `q_len = 1` against a cache), plus every prefix key. With
/// right padding, real queries never see padded keys, and padded query rows are ignored by callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CausalShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

/// Deep-prompt keys and values of one layer (P-tuning v2), `[prefix, kv_heads * head_dim]` each,
/// shared by every sequence of the batch and visible to every query; they carry no position.
#[derive(Clone, Copy, Debug)]
pub struct Prefix<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
}

/// Gradients of a causal attention call; the prefix ones when the call had a prefix.
#[derive(Debug)]
pub struct CausalGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub dprefix: Option<(Tensor, Tensor)>,
}

/// AdamW hyper-parameters, PyTorch's semantics (decoupled decay applied before the Adam update).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// What a layer-norm forward keeps for its backward: per-row mean and 1/σ.
pub struct NormStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

pub trait Backend: Send + Sync {
    fn device(&self) -> Device;

    /// A one-line description (device, instruction set, threads) for logs and bench headers.
    fn describe(&self) -> String;

    /// `out[i] = op(a[i])·op(b[i])`, plus the old `out[i]` when `accumulate`. Leading dimensions are
    /// batch dimensions; `b` may be a plain matrix shared by every batch entry.
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        t: Transpose,
        out: &mut Tensor,
        accumulate: bool,
    ) -> Result<()>;

    /// Gradients `(da, db)` of `c = op(a)·op(b)` given `dc`, each itself one product with transposes
    /// (for `c = x·y`: `dx = dc·yᵀ`, `dy = xᵀ·dc`). `a` and `b` must have the same batch dimensions.
    fn matmul_backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        t: Transpose,
        dc: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if a.shape().len() != b.shape().len()
            || a.shape()[..a.shape().len() - 2] != b.shape()[..b.shape().len() - 2]
        {
            bail!(
                "matmul backward: a {:?} and b {:?} must share their batch dimensions",
                a.shape(),
                b.shape()
            );
        }
        let (mut da, mut db) = (a.zeros_like(), b.zeros_like());
        match (t.a, t.b) {
            (false, false) => self.matmul(dc, b, Transpose::NT, &mut da, false)?,
            (false, true) => self.matmul(dc, b, Transpose::NN, &mut da, false)?,
            (true, false) => self.matmul(b, dc, Transpose::NT, &mut da, false)?,
            (true, true) => self.matmul(b, dc, Transpose::TT, &mut da, false)?,
        }
        match (t.a, t.b) {
            (false, false) => self.matmul(a, dc, Transpose::TN, &mut db, false)?,
            (true, false) => self.matmul(a, dc, Transpose::NN, &mut db, false)?,
            (false, true) => self.matmul(dc, a, Transpose::TN, &mut db, false)?,
            (true, true) => self.matmul(dc, a, Transpose::TT, &mut db, false)?,
        }
        Ok((da, db))
    }

    /// `y = x·wᵀ + bias` with `w` stored `[out, in]` (the Hugging Face convention).
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// Backward of [`Backend::linear`]: returns `dx = dy·w`; accumulates `dw += dyᵀ·x`, `dbias += Σ dy`.
    fn linear_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        dw: &mut Tensor,
        dbias: Option<&mut Tensor>,
    ) -> Result<Tensor>;

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()>;

    /// Σ x² over every element, accumulated in f64 (gradient norms).
    fn sum_squares(&self, x: &Tensor) -> Result<f64>;
    /// `x ← factor·x` in place.
    fn scale(&self, x: &mut Tensor, factor: f32) -> Result<()>;

    /// Inverted dropout (see [`Dropout`]) in place; being linear, it is also its own backward.
    /// Takes the tensor by value so that evaluation (`p = 0`) costs nothing.
    fn dropout(&self, x: Tensor, d: Dropout) -> Result<Tensor>;

    /// Rows of `table` picked by `ids`.
    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor>;
    /// Scatter-add of `dy` rows into `dtable` at `ids`.
    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], dtable: &mut Tensor) -> Result<()>;

    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, NormStats)>;
    /// Returns `dx`; accumulates into `dgamma` and `dbeta`.
    fn layer_norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        gamma: &Tensor,
        stats: &NormStats,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Result<Tensor>;

    /// RMSNorm (Llama): `y = x / sqrt(mean(x²) + eps) · weight` per row. Returns `y` and each row's
    /// `1 / rms` (`stats.rstd`; `stats.mean` is unused and empty), which the backward needs.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, NormStats)> {
        let _ = (x, weight, eps);
        Err(NotImplemented {
            op: "rms_norm",
            device: self.device(),
        }
        .into())
    }
    /// Returns `dx`; accumulates into `dweight` when given (frozen weights pass `None` and cost nothing).
    fn rms_norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        stats: &NormStats,
        dweight: Option<&mut Tensor>,
    ) -> Result<Tensor> {
        let _ = (dy, x, weight, stats, dweight);
        Err(NotImplemented {
            op: "rms_norm_backward",
            device: self.device(),
        }
        .into())
    }

    /// Rotary position embedding in place on `x [rows, heads * head_dim]`, Hugging Face's rotate-half
    /// layout: for `i < head_dim/2`, `(x_i, x_{i+half}) ← (x_i·cos − x_{i+half}·sin, x_{i+half}·cos + x_i·sin)`
    /// with the angle of row `r`'s position `positions[r]`. `table` is `[max_position, head_dim]`: the
    /// cosines in its first half, the sines in its second (see `backend::cpu::rope::rope_table`).
    /// `inverse` rotates back, which is the backward (a rotation's transpose is its inverse).
    fn rope(
        &self,
        x: &mut Tensor,
        heads: usize,
        positions: &[u32],
        table: &Tensor,
        inverse: bool,
    ) -> Result<()> {
        let _ = (x, heads, positions, table, inverse);
        Err(NotImplemented {
            op: "rope",
            device: self.device(),
        }
        .into())
    }

    /// SwiGLU: `silu(gate) ⊙ up`, `silu(x) = x·σ(x)`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let _ = (gate, up);
        Err(NotImplemented {
            op: "swiglu",
            device: self.device(),
        }
        .into())
    }
    /// Returns `(dgate, dup)`.
    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let _ = (gate, up, dy);
        Err(NotImplemented {
            op: "swiglu_backward",
            device: self.device(),
        }
        .into())
    }

    /// Causal grouped-query attention ([`CausalShape`]) with an optional deep-prompt prefix; scores are
    /// scaled by `1/sqrt(head_dim)`. Returns the context `[batch * q_len, heads * head_dim]` and the
    /// probabilities `[batch, heads, q_len, prefix + kv_len]` (zero where masked), which the backward needs.
    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prefix: Option<Prefix>,
        shape: CausalShape,
        q_start: &[u32],
    ) -> Result<(Tensor, Tensor)> {
        let _ = (q, k, v, prefix, shape, q_start);
        Err(NotImplemented {
            op: "causal_attention",
            device: self.device(),
        }
        .into())
    }
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prefix: Option<Prefix>,
        probs: &Tensor,
        shape: CausalShape,
        q_start: &[u32],
    ) -> Result<CausalGrads> {
        let _ = (dout, q, k, v, prefix, probs, shape, q_start);
        Err(NotImplemented {
            op: "causal_attention_backward",
            device: self.device(),
        }
        .into())
    }

    /// GELU, erf form (as BERT uses).
    fn gelu(&self, x: &Tensor) -> Result<Tensor>;
    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor>;

    fn tanh(&self, x: &Tensor) -> Result<Tensor>;
    /// Backward from the forward's output `y = tanh(x)`.
    fn tanh_backward(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor>;

    /// Scaled-dot-product attention, softmax over the first `lengths[b]` keys of each sequence, with
    /// dropout on the probabilities. Returns the context and the probabilities (before dropout), which
    /// the backward needs.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttnShape,
        lengths: &[u32],
        dropout: Dropout,
    ) -> Result<(Tensor, Tensor)>;
    /// Returns `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        probs: &Tensor,
        shape: AttnShape,
        lengths: &[u32],
        dropout: Dropout,
    ) -> Result<(Tensor, Tensor, Tensor)>;

    /// `[batch * seq, hidden]` → `[batch, hidden]`, over each sequence's real tokens.
    fn pool(&self, x: &Tensor, seq: usize, lengths: &[u32], pooling: Pooling) -> Result<Tensor>;
    fn pool_backward(
        &self,
        dy: &Tensor,
        seq: usize,
        lengths: &[u32],
        pooling: Pooling,
    ) -> Result<Tensor>;

    /// Mean cross-entropy of `logits [rows, classes]` against `labels`, and its gradient w.r.t. the logits.
    fn cross_entropy(&self, logits: &Tensor, labels: &[u32]) -> Result<(f64, Tensor)>;

    /// The fused softmax-KL loss ([`SoftmaxKl`]) of `student [rows, classes]` logits and its gradient
    /// with respect to them, in one pass over both logit arrays (teacher values are constants).
    fn softmax_kl(&self, student: &Tensor, loss: &SoftmaxKl) -> Result<(RowLosses, Tensor)>;

    /// [`Backend::softmax_kl`] writing the gradient over the student logits (no second buffer: for
    /// vocabulary-sized rows, and the chunks of the fused LM-head loss).
    fn softmax_kl_in_place(&self, logits: &mut Tensor, loss: &SoftmaxKl) -> Result<RowLosses>;

    /// The Hinton distillation loss, mean over rows: `(1−α)·CE(labels, s) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`,
    /// and its gradient with respect to the student logits `s` (teacher logits `t` are constants).
    fn distill_loss(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        labels: &[u32],
        alpha: f32,
        temperature: f32,
    ) -> Result<(f64, Tensor)> {
        if !(0.0..=1.0).contains(&alpha) {
            bail!("distillation loss: alpha {alpha} is not in [0, 1]");
        }
        let spec = SoftmaxKl {
            teacher: Teacher::Logits(teacher),
            terms: KlTerms {
                temperature: PerRow::Same(temperature),
                kl_weight: PerRow::Same(alpha),
                direction: KlDirection::TeacherStudent,
                labels: Some(labels),
                ce_weight: PerRow::Same(1.0 - alpha),
            },
        };
        let (loss, grad) = self.softmax_kl(student, &spec)?;
        Ok((loss.mean, grad))
    }

    /// RetriKT's listwise loss (methods §2.6): for each row i, the distributions
    /// `softmax_{j≠i}(cos(x_i, x_j)/τ)` of the student (τ = `tau_student`) and of the teacher
    /// (`tau_teacher`); returns `Σ_i KL` in `direction` and its gradient w.r.t. the student rows.
    fn listwise_cos_kl(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        tau_student: f32,
        tau_teacher: f32,
        direction: KlDirection,
    ) -> Result<(f64, Tensor)>;

    /// Merges the cosine scores of `queries` against a chunk of unit-length `keys` (f32, f16 or bf16;
    /// its first row is key number `offset`) into `best`. Chunks of a store too large for memory go
    /// through one at a time.
    fn cosine_topk_update(
        &self,
        keys: &Tensor,
        offset: usize,
        queries: &Tensor,
        best: &mut TopK,
    ) -> Result<()>;

    /// The `k` keys of highest cosine with each query: `[queries, k]` indices and scores, best first,
    /// equal scores ordered by the lower index.
    fn cosine_topk(
        &self,
        keys: &Tensor,
        queries: &Tensor,
        k: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let n = keys.rows_cols().0;
        if k == 0 || k > n {
            bail!("top-k: k = {k} must be between 1 and the number of keys ({n})");
        }
        let mut best = TopK::new(queries.rows_cols().0, k);
        self.cosine_topk_update(keys, 0, queries, &mut best)?;
        Ok(best.into_sorted())
    }

    /// One token per row of `logits [rows, vocab]`: temperature, then top-k, then the top-p nucleus,
    /// renormalised; draw `step` of a stream seeded by `s.seed` (each row and step gets its own number).
    fn sample(&self, logits: &Tensor, s: &Sampling, step: u64) -> Result<Vec<u32>>;

    /// One AdamW step in place; `step` counts from 1 (bias correction).
    fn adamw(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        hp: &AdamW,
        step: u64,
    ) -> Result<()>;

    /// Rows scaled to unit L2 norm (inference only).
    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor>;
}

/// The backend for a device. CPU always exists; other devices say how to enable them.
pub fn backend(device: Device) -> Result<&'static dyn Backend> {
    match device {
        Device::Cpu => Ok(cpu::CpuBackend::get()),
        Device::Cuda(ordinal) => Ok(cuda::CudaBackend::get(ordinal)?),
    }
}

/// The sizes of a `matmul` call (`out[i] = op(a[i])·op(b[i])`), checked against the operands'
/// shapes and dtypes: every backend validates through this one place.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatmulDims {
    /// Leading (batch) dimensions of `a`, and of `b` (1: one matrix shared by the batch).
    pub batch: usize,
    pub b_batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Stored widths (last dimensions) of `a` and `b`.
    pub a_cols: usize,
    pub b_cols: usize,
}

impl MatmulDims {
    pub fn of(a: &Tensor, b: &Tensor, t: Transpose, out: &Tensor) -> Result<MatmulDims> {
        let (ash, bsh) = (a.shape(), b.shape());
        if ash.len() < 2 || bsh.len() < 2 {
            bail!("matmul: operands must be at least 2-D, got {ash:?} and {bsh:?}");
        }
        let (ar, ac) = (ash[ash.len() - 2], ash[ash.len() - 1]);
        let (br, bc) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
        let (m, k) = if t.a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if t.b { (bc, br) } else { (br, bc) };
        let tr = |transposed: bool| if transposed { "ᵀ" } else { "" };
        if k != kb {
            bail!(
                "matmul: inner dimensions differ: {ash:?}{} · {bsh:?}{}",
                tr(t.a),
                tr(t.b)
            );
        }
        let batch: usize = ash[..ash.len() - 2].iter().product();
        let b_batch: usize = bsh[..bsh.len() - 2].iter().product();
        if b_batch != 1 && b_batch != batch {
            bail!("matmul: batch dimensions differ: {ash:?} vs {bsh:?} (b may also be a single matrix)");
        }
        let mut want = ash[..ash.len() - 2].to_vec();
        want.extend([m, n]);
        if out.shape() != want {
            bail!(
                "matmul: output has shape {:?}, expected {want:?}",
                out.shape()
            );
        }
        if a.dtype() != b.dtype() || a.dtype() != out.dtype() {
            bail!("matmul: dtypes differ");
        }
        Ok(MatmulDims {
            batch,
            b_batch,
            m,
            n,
            k,
            a_cols: ac,
            b_cols: bc,
        })
    }
}

/// Checks the operands of `linear_backward` against each other (every backend's); returns the
/// rows, input features and output features.
pub(crate) fn check_linear_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    dw: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (rows, inp) = x.rows_cols();
    if w.shape().len() != 2 || w.shape()[1] != inp {
        bail!(
            "linear backward: input has {inp} features but weight is {:?}",
            w.shape()
        );
    }
    let outp = w.shape()[0];
    if dy.rows_cols() != (rows, outp) {
        bail!(
            "linear backward: dy is {:?}, expected [{rows}, {outp}]",
            dy.shape()
        );
    }
    if dw.shape() != w.shape() {
        bail!(
            "linear backward: dw is {:?}, weight is {:?}",
            dw.shape(),
            w.shape()
        );
    }
    Ok((rows, inp, outp))
}

/// Checks that two shapes agree, naming the op and the operands.
pub(crate) fn check_same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    }
    if a.dtype() != b.dtype() {
        bail!("{op}: dtypes differ: {} vs {}", a.dtype(), b.dtype());
    }
    Ok(())
}
