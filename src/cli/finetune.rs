//! `kdx finetune`: train a classifier on a task from a pre-trained encoder.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::common::{
    backend_with, finish, paused, score_best, train_data, Report, TaskArgs, TrainArgs,
};
use crate::model::export::{init_classifier, save_classifier};
use crate::train::trainer::{train, Outcome, RunDir, Targets, TrainConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Pre-trained Hugging Face encoder folder (e.g. weights/minilm-l6)
    #[arg(long)]
    model: PathBuf,
    /// Keep only the embeddings and the bottom L layers (a small model fine-tuned on its own)
    #[arg(long)]
    layers: Option<usize>,
    #[command(flatten)]
    task: TaskArgs,
    /// Run folder: best/ (the best model, a Hugging Face folder), metrics.jsonl, checkpoint, report.json
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Serialize)]
struct Details<'a> {
    model: &'a std::path::Path,
    layers: Option<usize>,
    head: String,
    #[serde(flatten)]
    outcome: Outcome,
    config: TrainConfig,
}

pub fn run(args: Args) -> Result<()> {
    let be = backend_with(args.train.device, args.train.gemm)?;
    let task = args.task.load()?;
    let config = args.train.config();
    let (model, mut params, text) = init_classifier(
        &args.model,
        task.num_labels(),
        args.train.head,
        args.layers,
        args.train.max_len,
        config.seed,
    )?;
    let data = train_data(&text, &task, model.encoder.config.pad_token_id)?;
    let run = RunDir(args.out.clone());
    let save_best = |p: &_| save_classifier(&run.best(), &model, p, &task.label_names, &args.model);
    let outcome = train(
        be,
        &model,
        &mut params,
        &data,
        &Targets::Labels,
        &config,
        &run,
        args.train.resume,
        save_best,
    )?;
    if paused(&outcome) {
        return Ok(());
    }
    let (dev, test) = score_best(be, &run, &task, args.train.max_len)?;
    let details = Details {
        model: &args.model,
        layers: args.layers,
        head: args.train.head.to_string(),
        outcome,
        config,
    };
    finish(
        &run,
        &Report {
            task: &task.name,
            method: "finetune",
            dev,
            test,
            details,
        },
        task.metric.name(),
    )
}
