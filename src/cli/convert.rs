//! `kdx convert --gguf FILE --out DIR`

use std::path::PathBuf;

use anyhow::Result;

use crate::model::gguf_convert::{convert_gguf, OutDtype};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file to convert (llama architecture, byte-level BPE tokenizer; weights F32, F16, BF16,
    /// Q8_0, Q4_0, Q4_1, Q4_K or Q6_K)
    #[arg(long)]
    gguf: PathBuf,
    /// Folder to write the Hugging Face model into (config.json, model.safetensors, tokenizer.json, …)
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the dequantised weights: f32 or bf16
    #[arg(long, default_value = "f32")]
    dtype: OutDtype,
    /// Replace --out if it already holds files
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    convert_gguf(&args.gguf, &args.out, args.dtype, args.force)?;
    println!("{}", args.out.display());
    Ok(())
}
