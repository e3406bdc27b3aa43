//! `kdx generate`: text continuations from a Llama-family model, optionally steered by deep prompts.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::backend::{backend, Sampling};
use crate::model::llama::generate::GenerateOptions;
use crate::model::llama::{Llama, TokenBatch};
use crate::model::prompts::DeepPrompts;
use crate::tensor::Device;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face Llama folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long, default_value = "weights/smollm2-135m")]
    model: PathBuf,
    /// Deep prompts (from `kdx prompt-tune`) to prepend in every layer
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Tokens to generate at most per text (fewer when an end-of-sequence token comes)
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Nucleus sampling: keep the most likely tokens holding this much probability
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Softmax temperature
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Seed of the sampler (the same seed gives the same text)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Always take the most likely token (ignores the sampling settings)
    #[arg(long)]
    greedy: bool,
    /// Device to run on
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Texts to continue, generated together as one batch; prints one JSON object per text:
    /// {"text": …, "ids": [new token ids], "completion": the new tokens decoded}
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(Serialize)]
struct Output<'a> {
    text: &'a str,
    ids: &'a [u32],
    completion: String,
}

/// The model folder's name, which deep prompts record as their base model.
pub fn model_name(dir: &std::path::Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// The folder's tokenizer.json.
pub fn load_tokenizer(dir: &std::path::Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))
}

pub fn run(args: Args) -> Result<()> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if !args.greedy && args.temperature <= 0.0 {
        bail!("--temperature must be positive (or pass --greedy)");
    }
    let be = backend(args.device)?;
    let (model, params) = Llama::load(&args.model)?;
    let (model, params) = (
        model.on_device(args.device)?,
        params.to_device(args.device)?,
    );
    let tokenizer = load_tokenizer(&args.model)?;
    let prompts = args
        .prompts
        .as_deref()
        .map(|p| {
            DeepPrompts::load(p, &model.config, &model_name(&args.model))?.to_device(args.device)
        })
        .transpose()?;
    let sequences = args
        .texts
        .iter()
        .map(|t| {
            let enc = tokenizer
                .encode(t.as_str(), false)
                .map_err(|e| anyhow!("tokenising {t:?}: {e}"))?;
            if enc.get_ids().is_empty() {
                bail!("text {t:?} has no tokens");
            }
            Ok(enc.get_ids().to_vec())
        })
        .collect::<Result<Vec<_>>>()?;
    let batch = TokenBatch::from_sequences(
        &sequences,
        model.config.eos_ids().first().copied().unwrap_or(0),
    )?;
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: if args.greedy { 0.0 } else { args.temperature },
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_ids: model.config.eos_ids(),
    };
    let generated = model
        .generate(be, &params, &batch, prompts.as_ref(), &options)
        .context("generating")?;
    for (text, g) in args.texts.iter().zip(&generated) {
        let shown: Vec<u32> = g
            .tokens
            .iter()
            .copied()
            .filter(|t| !options.stop_ids.contains(t))
            .collect();
        let completion = tokenizer
            .decode(&shown, true)
            .map_err(|e| anyhow!("decoding: {e}"))?;
        println!(
            "{}",
            serde_json::to_string(&Output {
                text,
                ids: &g.tokens,
                completion
            })?
        );
    }
    Ok(())
}
