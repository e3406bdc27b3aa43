//! `kdx embed`: sentence embeddings as JSON, computed like sentence-transformers does.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::backend::{backend, Pooling};
use crate::model::bert::Mode;
use crate::model::EncoderModel;
use crate::tensor::Device;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long, default_value = "weights/minilm-l6")]
    model: PathBuf,
    /// How token vectors become one vector: mean over real tokens, or the [CLS] token
    #[arg(long, default_value = "mean")]
    pool: Pooling,
    /// Keep the raw pooled vectors instead of scaling them to unit length
    #[arg(long)]
    no_normalize: bool,
    /// Device to run on
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Texts per forward pass
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Texts to embed; prints one JSON array with one array of floats per text
    #[arg(required = true)]
    texts: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let be = backend(args.device)?;
    let model = EncoderModel::load(&args.model)?;
    let mut out: Vec<Vec<f32>> = Vec::with_capacity(args.texts.len());
    for texts in args.texts.chunks(args.batch_size) {
        let batch = model.text.batch(texts)?;
        let (hidden, _) = model
            .encoder
            .forward(be, &model.params, &batch, Mode::Eval)?;
        let mut pooled = be.pool(&hidden, batch.seq, &batch.lengths, args.pool)?;
        if !args.no_normalize {
            pooled = be.l2_normalize(&pooled)?;
        }
        let dim = model.encoder.config.hidden_size;
        out.extend(pooled.to_vec_f32().chunks(dim).map(<[f32]>::to_vec));
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
