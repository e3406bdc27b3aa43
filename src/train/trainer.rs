//! The training loop: seeded shuffling, gradient accumulation, clipping, AdamW with a linear
//! warm-up/decay schedule, evaluation every N steps, best-model saving, early stopping, JSON-lines
//! metrics, and checkpoints from which `--resume` continues exactly where a killed run stopped.
//!
//! Everything a step depends on is a function of (seed, step): the data order of an epoch, the dropout
//! masks, the learning rate. A checkpoint (written at every evaluation and when a run pauses) holds the
//! parameters, the AdamW moments and the loop's state, so a run resumed from it computes the same
//! numbers as one that never stopped; a killed run loses the updates since its last evaluation.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::schedule::LinearSchedule;
use super::AdamWState;
use crate::backend::{argmax, mix64, AdamW, Backend};
use crate::data::metrics::{all_metrics, Metric};
use crate::model::bert::Mode;
use crate::model::classifier::SequenceClassifier;
use crate::model::params::{ParamStore, Rng};
use crate::model::tokenizer::pad_batch;
use crate::tensor::Tensor;
use crate::trace;

/// Token ids and segment ids of one example.
pub type Encoded = (Vec<u32>, Vec<u32>);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub weight_decay: f32,
    /// Share of all updates spent warming up.
    pub warmup_ratio: f32,
    /// Clip the global gradient L2 norm to this (0 = no clipping).
    pub max_grad_norm: f32,
    /// Micro-batches per update (the update sees `batch_size · grad_accum` examples).
    pub grad_accum: usize,
    /// Also evaluate every this many updates (0 = at the end of each epoch only).
    pub eval_every: u64,
    /// Stop after this many evaluations without a better dev metric (0 = never).
    pub patience: usize,
    pub seed: u64,
    /// Pause once the run has made this many updates in all (the schedule still spans every epoch);
    /// `--resume` continues.
    pub stop_after: Option<u64>,
}

/// What the student learns from.
pub enum Targets<'a> {
    /// Cross-entropy with the gold labels.
    Labels,
    /// The Hinton loss against fixed teacher logits `[train examples, classes]`.
    Distill {
        teacher_logits: &'a [f32],
        alpha: f32,
        temperature: f32,
    },
}

/// The examples, already tokenised.
pub struct TrainData {
    pub train: Vec<Encoded>,
    pub train_labels: Vec<u32>,
    pub dev: Vec<Encoded>,
    pub dev_labels: Vec<u32>,
    pub num_labels: usize,
    pub metric: Metric,
    pub pad_id: u32,
}

/// What must not change between a run and its resumption: the settings and the training data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct RunIdentity {
    /// The training settings, `stop_after` excluded (pausing differently is allowed).
    config: Option<TrainConfig>,
    train_examples: usize,
    /// FNV-1a of every training example's ids and label.
    train_hash: u64,
}

impl RunIdentity {
    fn of(config: &TrainConfig, data: &TrainData) -> RunIdentity {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |v: u32| {
            for b in v.to_le_bytes() {
                hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for ((ids, types), &label) in data.train.iter().zip(&data.train_labels) {
            ids.iter().chain(types).for_each(|&v| eat(v));
            eat(u32::MAX);
            eat(label);
        }
        RunIdentity {
            config: Some(TrainConfig {
                stop_after: None,
                ..config.clone()
            }),
            train_examples: data.train.len(),
            train_hash: hash,
        }
    }
}

/// The loop's own state, saved in every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LoopState {
    identity: RunIdentity,
    step: u64,
    best_dev: Option<f64>,
    best_step: u64,
    evals_since_best: usize,
    stopped_early: bool,
    /// Sum and count of the update losses since the last evaluation (its `train_loss` is their mean).
    loss_since_eval: (f64, u64),
    train_seconds: f64,
}

/// How a run ended.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub steps: u64,
    pub total_steps: u64,
    pub best_step: u64,
    pub best_dev: Option<f64>,
    pub stopped_early: bool,
    /// True when `stop_after` paused the run before its last step.
    pub paused: bool,
    pub train_seconds: f64,
}

/// Paths inside a run folder.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.jsonl")
    }
    pub fn best(&self) -> PathBuf {
        self.0.join("best")
    }
    pub fn report(&self) -> PathBuf {
        self.0.join("report.json")
    }
}

/// Logits `[examples, classes]` in evaluation mode, in the examples' order; batches are formed
/// longest first so padding stays small.
pub fn predict(
    be: &dyn Backend,
    model: &SequenceClassifier,
    params: &ParamStore,
    examples: &[Encoded],
    pad_id: u32,
    batch_size: usize,
) -> Result<Tensor> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].0.len()));
    let classes = model.num_labels;
    let mut logits = vec![0.0f32; examples.len() * classes];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = pad_batch(
            &chunk
                .iter()
                .map(|&i| examples[i].clone())
                .collect::<Vec<_>>(),
            pad_id,
        )?;
        let out = model.logits(be, params, &batch)?.to_vec_f32();
        for (row, &i) in out.chunks(classes).zip(chunk) {
            logits[i * classes..(i + 1) * classes].copy_from_slice(row);
        }
    }
    Tensor::from_vec(logits, &[examples.len(), classes])
}

/// Every metric (and the mean loss, as `loss`) of `model` on labelled examples.
pub fn evaluate(
    be: &dyn Backend,
    model: &SequenceClassifier,
    params: &ParamStore,
    examples: &[Encoded],
    labels: &[u32],
    pad_id: u32,
) -> Result<BTreeMap<String, f64>> {
    if examples.is_empty() {
        bail!("cannot evaluate on an empty split (no labelled examples)");
    }
    let logits = predict(be, model, params, examples, pad_id, 64)?;
    let (loss, _) = be.cross_entropy(&logits, labels)?;
    let values = logits.to_vec_f32();
    let predicted: Vec<u32> = values.chunks(model.num_labels).map(argmax).collect();
    let mut metrics = all_metrics(labels, &predicted, model.num_labels)?;
    metrics.insert("loss".into(), loss);
    Ok(metrics)
}

/// The order of the training examples in `epoch`: a seeded Fisher–Yates shuffle.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = Rng::new(mix64(seed ^ mix64(epoch + 1)));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

/// Trains `params` in place. `save_best` is called with the parameters whenever the dev metric
/// improves. With `resume`, continues from the run folder's checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn train(
    be: &dyn Backend,
    model: &SequenceClassifier,
    params: &mut ParamStore,
    data: &TrainData,
    targets: &Targets,
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    mut save_best: impl FnMut(&ParamStore) -> Result<()>,
) -> Result<Outcome> {
    if data.train.is_empty() || data.dev.is_empty() {
        bail!("training needs examples in both the train and the dev split");
    }
    if config.batch_size == 0 || config.grad_accum == 0 || config.epochs == 0 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1");
    }
    // Micro-batch indices share 8 bits of the dropout seed with the step number.
    if config.grad_accum > 256 {
        bail!(
            "--grad-accum {} is above 256; use a larger --batch-size instead",
            config.grad_accum
        );
    }
    let per_update = config.batch_size * config.grad_accum;
    let updates_per_epoch = data.train.len().div_ceil(per_update) as u64;
    let total = updates_per_epoch * config.epochs as u64;
    let schedule = LinearSchedule::new(config.lr, config.warmup_ratio, total);
    let hp = AdamW {
        lr: config.lr,
        weight_decay: config.weight_decay,
        ..AdamW::default()
    };
    let mut opt = AdamWState::new(params, hp);
    let mut grads = params.zeros_like();
    std::fs::create_dir_all(&run.0)
        .with_context(|| format!("cannot create {}", run.0.display()))?;

    let identity = RunIdentity::of(config, data);
    let mut state = LoopState {
        identity: identity.clone(),
        ..LoopState::default()
    };
    if resume {
        if !run.checkpoint().exists() {
            bail!(
                "--resume: {} has no checkpoint to resume from",
                run.0.display()
            );
        }
        state = opt.load_checkpoint(&run.checkpoint(), params)?;
        if state.identity != identity {
            bail!(
                "--resume: {} was started with other settings or data ({:?} on {} examples) than now ({:?} on {}); \
                 resume with the original flags, or start a new run in another --out",
                run.0.display(),
                state.identity.config,
                state.identity.train_examples,
                identity.config,
                identity.train_examples
            );
        }
        truncate_metrics(&run.metrics(), state.step)?;
        eprintln!(
            "resuming {} at step {} of {total}",
            run.0.display(),
            state.step
        );
    } else if run.checkpoint().exists() || run.best().exists() {
        bail!(
            "{} already holds a run; pass --resume to continue it, or choose another --out",
            run.0.display()
        );
    } else if run.metrics().exists() {
        std::fs::remove_file(run.metrics())
            .with_context(|| format!("cannot remove {}", run.metrics().display()))?;
    }

    let bar = ProgressBar::new(total).with_position(state.step);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}",
        )
        .expect("valid progress template"),
    );
    let started = Instant::now();
    let seconds_before = state.train_seconds;
    let mut smoothed_loss: Option<f64> = None;
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    while state.step < total && !state.stopped_early {
        if config.stop_after.is_some_and(|s| state.step >= s) {
            break;
        }
        let (epoch, u) = (
            state.step / updates_per_epoch,
            state.step % updates_per_epoch,
        );
        if epoch != order_epoch {
            order = epoch_order(data.train.len(), config.seed, epoch);
            order_epoch = epoch;
        }
        let examples =
            &order[u as usize * per_update..((u as usize + 1) * per_update).min(order.len())];
        let t0 = Instant::now();
        let _step_range = trace::range(format_args!("train step {}", state.step + 1));
        grads.fill_zero();
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        for (j, micro) in examples.chunks(config.batch_size).enumerate() {
            let batch = pad_batch(
                &micro
                    .iter()
                    .map(|&i| data.train[i].clone())
                    .collect::<Vec<_>>(),
                data.pad_id,
            )?;
            tokens += batch.tokens();
            let labels: Vec<u32> = micro.iter().map(|&i| data.train_labels[i]).collect();
            let mode = Mode::Train {
                seed: mix64(config.seed ^ mix64(state.step << 8 | j as u64)),
            };
            let (logits, cache) = {
                let _range = trace::range("forward");
                model.forward(be, params, &batch, mode)?
            };
            let (loss, mut d_logits) = match targets {
                Targets::Labels => be.cross_entropy(&logits, &labels)?,
                Targets::Distill {
                    teacher_logits,
                    alpha,
                    temperature,
                } => {
                    let teacher = gather_rows(teacher_logits, micro, data.num_labels)?;
                    be.distill_loss(&logits, &teacher, &labels, *alpha, *temperature)?
                }
            };
            // Each micro-batch's loss is a mean over its rows; weight it by its share of the update.
            let share = micro.len() as f32 / examples.len() as f32;
            be.scale(&mut d_logits, share)?;
            {
                let _range = trace::range("backward");
                model.backward(be, params, &batch, mode, cache, &d_logits, &mut grads)?;
            }
            loss_sum += loss * micro.len() as f64;
        }
        let loss = loss_sum / examples.len() as f64;
        state.loss_since_eval.0 += loss;
        state.loss_since_eval.1 += 1;
        if !loss.is_finite() {
            bail!(
                "the training loss is {loss} at step {}: training diverged (try a lower --lr)",
                state.step + 1
            );
        }
        {
            let _range = trace::range("optimizer");
            clip_gradients(be, &mut grads, config.max_grad_norm)?;
            opt.hp.lr = schedule.lr(state.step + 1);
            opt.update(be, params, &grads)?;
        }
        state.step += 1;
        state.train_seconds = seconds_before + started.elapsed().as_secs_f64();
        let ema = smoothed_loss.map_or(loss, |s| 0.9 * s + 0.1 * loss);
        smoothed_loss = Some(ema);
        bar.set_position(state.step);
        bar.set_message(format!(
            "epoch {} loss {ema:.4} lr {:.2e} {:.0} tok/s",
            epoch + 1,
            opt.hp.lr,
            tokens as f64 / t0.elapsed().as_secs_f64()
        ));

        let epoch_end = state.step.is_multiple_of(updates_per_epoch);
        let periodic = config.eval_every > 0 && state.step.is_multiple_of(config.eval_every);
        if epoch_end || periodic {
            let dev = evaluate(be, model, params, &data.dev, &data.dev_labels, data.pad_id)?;
            let score = dev[data.metric.name()];
            let improved = state.best_dev.is_none_or(|b| score > b);
            if improved {
                state.best_dev = Some(score);
                state.best_step = state.step;
                state.evals_since_best = 0;
                save_best(params)?;
            } else {
                state.evals_since_best += 1;
                state.stopped_early =
                    config.patience > 0 && state.evals_since_best >= config.patience;
            }
            let train_loss = state.loss_since_eval.0 / state.loss_since_eval.1.max(1) as f64;
            state.loss_since_eval = (0.0, 0);
            append_metrics(
                &run.metrics(),
                state.step,
                epoch + 1,
                train_loss,
                opt.hp.lr,
                &dev,
            )?;
            let line = format!(
                "step {:>6}  epoch {}  train loss {train_loss:.4}  dev {} {score:.4}{}",
                state.step,
                epoch + 1,
                data.metric,
                if improved { "  (best)" } else { "" }
            );
            // A hidden bar (stderr not a terminal, as in logs) prints nothing itself.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
            opt.save_checkpoint(&run.checkpoint(), params, &state)?;
        }
    }
    let paused = state.step < total && !state.stopped_early;
    if paused {
        opt.save_checkpoint(&run.checkpoint(), params, &state)?;
    }
    bar.finish_and_clear();
    Ok(Outcome {
        steps: state.step,
        total_steps: total,
        best_step: state.best_step,
        best_dev: state.best_dev,
        stopped_early: state.stopped_early,
        paused,
        train_seconds: state.train_seconds,
    })
}

/// Rows `rows` of a `[n, classes]` array, as a tensor.
fn gather_rows(values: &[f32], rows: &[usize], classes: usize) -> Result<Tensor> {
    let mut out = Vec::with_capacity(rows.len() * classes);
    for &r in rows {
        let Some(row) = values.get(r * classes..(r + 1) * classes) else {
            bail!("teacher logits have no row {r}");
        };
        out.extend_from_slice(row);
    }
    Tensor::from_vec(out, &[rows.len(), classes])
}

/// torch.nn.utils.clip_grad_norm_: scale every gradient by `max/(‖g‖ + 1e-6)` when `‖g‖ > max`.
fn clip_gradients(be: &dyn Backend, grads: &mut ParamStore, max_norm: f32) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let mut total = 0.0;
    for (_, g) in grads.iter() {
        total += be.sum_squares(g)?;
    }
    let norm = total.sqrt();
    if norm > max_norm as f64 {
        let factor = (max_norm as f64 / (norm + 1e-6)) as f32;
        for (_, g) in grads.iter_mut() {
            be.scale(g, factor)?;
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct MetricsLine<'a> {
    step: u64,
    epoch: u64,
    /// Mean loss of the updates since the previous evaluation.
    train_loss: f64,
    lr: f32,
    dev: &'a BTreeMap<String, f64>,
}

fn append_metrics(
    path: &Path,
    step: u64,
    epoch: u64,
    train_loss: f64,
    lr: f32,
    dev: &BTreeMap<String, f64>,
) -> Result<()> {
    let line = serde_json::to_string(&MetricsLine {
        step,
        epoch,
        train_loss,
        lr,
        dev,
    })?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Drops metric lines past `step` (written after the checkpoint a resumed run starts from).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_atomic(path, kept.as_bytes())
}

impl AdamWState {
    /// The optimizer's step count is the loop's, so it is restored from the state.
    fn save_checkpoint(&self, path: &Path, params: &ParamStore, state: &LoopState) -> Result<()> {
        checkpoint::save(path, params, &self.m, &self.v, state)
    }

    fn load_checkpoint(&mut self, path: &Path, params: &mut ParamStore) -> Result<LoopState> {
        let state: LoopState = checkpoint::load(path, params, &mut self.m, &mut self.v)?;
        self.step = state.step;
        Ok(state)
    }
}
