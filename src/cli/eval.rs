//! `kdx eval`: a trained classifier's metrics on a split of a task.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use super::common::{check_labels, encode, model_dir, TaskArgs};
use crate::backend::backend;
use crate::data::Split;
use crate::model::export::load_classifier;
use crate::tensor::Device;
use crate::train::checkpoint::write_atomic;
use crate::train::trainer::evaluate;

#[derive(clap::Args)]
pub struct Args {
    /// A run folder from `kdx finetune`/`kdx distill`, or a classifier's Hugging Face folder
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    task: TaskArgs,
    /// Which split: train, dev or test
    #[arg(long, default_value = "test")]
    split: Split,
    /// Longest input in tokens
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Also write the result to this JSON file
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn run(args: Args) -> Result<()> {
    let be = backend(args.device)?;
    let task = args.task.load()?;
    let dir = model_dir(&args.model)?;
    let loaded = load_classifier(&dir, args.max_len)?;
    check_labels(&dir, &loaded.label_names, &task)?;
    let (x, y) = encode(&loaded.text, task.split(args.split))?;
    let metrics = evaluate(
        be,
        &loaded.model,
        &loaded.params,
        &x,
        &y,
        loaded.model.encoder.config.pad_token_id,
    )?;
    let result = json!({"task": task.name, "split": args.split.name(), "model": dir, "metric": task.metric.name(), args.split.name(): metrics});
    if let Some(out) = &args.out {
        write_atomic(out, serde_json::to_string_pretty(&result)?.as_bytes())?;
    }
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
