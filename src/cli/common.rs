//! Pieces the training subcommands share: task and training flags, tokenising a split, reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::cuda::{CudaBackend, Gemm};
use crate::backend::{backend, Backend};
use crate::data::{self, Example, LoadOptions, Split, Task};
use crate::model::classifier::Head;
use crate::model::export::load_classifier;
use crate::model::fetch::default_weights_dir;
use crate::model::tokenizer::TextEncoder;
use crate::tensor::Device;
use crate::train::checkpoint::write_atomic;
use crate::train::trainer::{evaluate, Encoded, Outcome, RunDir, TrainConfig, TrainData};

#[derive(clap::Args, Clone, Debug)]
pub struct TaskArgs {
    /// Task: uci-sentiment and polarity (fetched automatically), GLUE (cola, sst2, mrpc, rte, qnli, qqp,
    /// mnli) and SuperGLUE (boolq, cb, copa, rte, wic) from --data, or custom (CSV/JSONL with text and
    /// label columns). GLUE/SuperGLUE test sets have no labels: kdx tests on the official dev/val file
    /// and splits its dev set off the train file (10%, stratified, fixed seed)
    #[arg(long)]
    pub task: String,
    /// The task's files: a GLUE/SuperGLUE folder, or a CSV/JSONL file (or folder) for `custom`
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Count and report malformed lines instead of stopping at the first
    #[arg(long)]
    pub skip_bad_lines: bool,
}

impl TaskArgs {
    pub fn load(&self) -> Result<Task> {
        let opts = LoadOptions {
            data: self.data.clone(),
            weights_dir: default_weights_dir(),
            skip_bad_lines: self.skip_bad_lines,
        };
        let task = data::load_task(&self.task, &opts)?;
        eprintln!(
            "task {}: {} train / {} dev / {} test examples, labels {:?}, metric {}",
            task.name,
            task.train.len(),
            task.dev.len(),
            task.test.len(),
            task.label_names,
            task.metric
        );
        Ok(task)
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Passes over the training split
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Peak learning rate (AdamW)
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f32,
    /// Examples per micro-batch
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Micro-batches per optimizer update
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Share of the updates spent warming the learning rate up (then it decays linearly to 0)
    #[arg(long, default_value_t = 0.1)]
    pub warmup: f32,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0 = off)
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Also evaluate on dev every N updates (0 = after each epoch only)
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Stop after this many evaluations without a better dev metric (0 = never)
    #[arg(long, default_value_t = 0)]
    pub patience: usize,
    /// Seed of initialisation, data order and dropout
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Longest input in tokens (longer texts are truncated)
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// What the classifier reads: mean over tokens, the [CLS] vector, or BERT's pooler. The saved best/
    /// folder loads in transformers as BertForSequenceClassification either way, but only `pooler`
    /// predicts identically there (transformers always pools with tanh(dense([CLS])))
    #[arg(long, default_value = "mean")]
    pub head: Head,
    /// Continue the run in --out from its last checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Pause once the run has made N updates in all (continue later with --resume)
    #[arg(long)]
    pub stop_after_steps: Option<u64>,
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Matrix products on the engine's kernels (kdx) or on cuBLAS (a baseline; --device cuda only)
    #[arg(long, default_value = "kdx")]
    pub gemm: Gemm,
}

impl TrainArgs {
    pub fn config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_ratio: self.warmup,
            max_grad_norm: self.max_grad_norm,
            grad_accum: self.grad_accum,
            eval_every: self.eval_every,
            patience: self.patience,
            seed: self.seed,
            stop_after: self.stop_after_steps,
        }
    }
}

/// The backend of `device`, its matrix products on `gemm`.
pub fn backend_with(device: Device, gemm: Gemm) -> Result<&'static dyn Backend> {
    match device {
        Device::Cuda(ordinal) => CudaBackend::get(ordinal)?.gpu().set_gemm(gemm)?,
        Device::Cpu if gemm == Gemm::Cublas => {
            bail!("--gemm cublas needs a GPU: add --device cuda")
        }
        Device::Cpu => {}
    }
    backend(device)
}

/// Token ids and labels of a split.
pub fn encode(text: &TextEncoder, examples: &[Example]) -> Result<(Vec<Encoded>, Vec<u32>)> {
    let encoded = examples
        .iter()
        .map(|e| text.encode(&e.text))
        .collect::<Result<Vec<_>>>()?;
    Ok((encoded, examples.iter().map(|e| e.label).collect()))
}

/// The tokenised train and dev splits of `task`.
pub fn train_data(text: &TextEncoder, task: &Task, pad_id: u32) -> Result<TrainData> {
    let (train, train_labels) = encode(text, &task.train)?;
    let (dev, dev_labels) = encode(text, &task.dev)?;
    Ok(TrainData {
        train,
        train_labels,
        dev,
        dev_labels,
        num_labels: task.num_labels(),
        metric: task.metric,
        pad_id,
    })
}

/// True (after saying so) when the run paused before its last update.
pub fn paused(outcome: &Outcome) -> bool {
    if outcome.paused {
        println!(
            "paused at step {} of {}; continue with --resume",
            outcome.steps, outcome.total_steps
        );
    }
    outcome.paused
}

/// Dev and test metrics of the run's best model, as saved in `RUN/best`.
pub fn score_best(
    be: &dyn Backend,
    run: &RunDir,
    task: &Task,
    max_len: usize,
) -> Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let best = load_classifier(&run.best(), max_len)?;
    let pad = best.model.encoder.config.pad_token_id;
    let score = |split: Split| {
        let (x, y) = encode(&best.text, task.split(split))?;
        evaluate(be, &best.model, &best.params, &x, &y, pad)
    };
    Ok((score(Split::Dev)?, score(Split::Test)?))
}

/// A run folder's exported model (`RUN/best`), or the folder itself when it is a model folder.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    let best = RunDir(path.to_path_buf()).best();
    if best.join("config.json").exists() {
        Ok(best)
    } else if path.join("config.json").exists() {
        Ok(path.to_path_buf())
    } else {
        bail!(
            "{} is neither a kdx run folder (with best/) nor a model folder (with config.json)",
            path.display()
        )
    }
}

/// The model's label names must be the task's, in the same order.
pub fn check_labels(model: &Path, model_labels: &[String], task: &Task) -> Result<()> {
    if model_labels != task.label_names {
        bail!(
            "{} was trained with labels {model_labels:?} but task {} has {:?}",
            model.display(),
            task.name,
            task.label_names
        );
    }
    Ok(())
}

/// What `report.json` holds.
#[derive(Serialize)]
pub struct Report<'a, X: Serialize> {
    pub task: &'a str,
    pub method: &'a str,
    pub dev: BTreeMap<String, f64>,
    pub test: BTreeMap<String, f64>,
    #[serde(flatten)]
    pub details: X,
}

/// Writes the report atomically and prints the headline numbers.
pub fn finish<X: Serialize>(run: &RunDir, report: &Report<X>, metric: &str) -> Result<()> {
    write_atomic(
        &run.report(),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    println!(
        "{} on {}: dev {metric} {:.4}, test {metric} {:.4}  (report: {})",
        report.method,
        report.task,
        report.dev[metric],
        report.test[metric],
        run.report().display()
    );
    Ok(())
}
