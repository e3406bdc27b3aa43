//! `kdx prompt-tune`: trains deep prompts (P-tuning v2) on a text file with the model frozen, and
//! saves them for `kdx generate --prompts`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::generate::{load_tokenizer, model_name};
use crate::backend::backend;
use crate::model::llama::Llama;
use crate::model::prompts::DeepPrompts;
use crate::tensor::Device;
use crate::train::prompt_tune::{mean_loss, tune, PromptTuning};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face Llama folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long, default_value = "weights/smollm2-135m")]
    model: PathBuf,
    /// Training text: one example per line (blank lines are skipped)
    #[arg(long)]
    text: PathBuf,
    /// Where to write the prompts (safetensors)
    #[arg(long)]
    out: PathBuf,
    /// Prompt vectors per layer (the paper uses 8)
    #[arg(long, default_value_t = 8)]
    prefix_length: usize,
    /// AdamW updates
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Learning rate (the paper uses 1e-3)
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Lines per update
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens kept per line (longer lines are cut)
    #[arg(long, default_value_t = 64)]
    max_len: usize,
    /// Seed of the prompts' initialisation and of the batch order
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device to run on
    #[arg(long, default_value = "cpu")]
    device: Device,
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 || args.max_len < 2 || args.steps == 0 {
        bail!("--batch-size and --steps must be at least 1 and --max-len at least 2");
    }
    let be = backend(args.device)?;
    let (model, params) = Llama::load(&args.model)?;
    let (model, params) = (
        model.on_device(args.device)?,
        params.to_device(args.device)?,
    );
    let tokenizer = load_tokenizer(&args.model)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    let mut sequences = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let enc = tokenizer
            .encode(line, false)
            .map_err(|e| anyhow!("{} line {}: {e}", args.text.display(), n + 1))?;
        let ids = &enc.get_ids()[..enc.get_ids().len().min(args.max_len)];
        if ids.len() >= 2 {
            sequences.push(ids.to_vec());
        }
    }
    if sequences.is_empty() {
        bail!("{}: no line of at least two tokens", args.text.display());
    }
    let mut prompts = DeepPrompts::random(
        &model.config,
        args.prefix_length,
        0.02,
        args.seed,
        &model_name(&args.model),
    )?
    .to_device(args.device)?;
    let before = mean_loss(be, &model, &params, &prompts, &sequences, args.batch_size)?;
    eprintln!(
        "{} lines; mean loss with the initial prompts: {before:.4}",
        sequences.len()
    );
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("a valid template"),
    );
    let settings = PromptTuning {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
    };
    tune(
        be,
        &model,
        &params,
        &mut prompts,
        &sequences,
        &settings,
        |_, loss| {
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
        },
    )?;
    bar.finish();
    let after = mean_loss(be, &model, &params, &prompts, &sequences, args.batch_size)?;
    prompts.save(&args.out)?;
    eprintln!(
        "mean loss with the tuned prompts: {after:.4} (was {before:.4}); prompts written to {}",
        args.out.display()
    );
    Ok(())
}
