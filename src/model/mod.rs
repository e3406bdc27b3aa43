//! Models: the BERT encoder and its classifier head, parameters, loading Hugging Face folders,
//! tokenisation, installing models from registry packages, and GGUF files (reading, dequantising,
//! converting to Hugging Face folders).

pub mod bert;
pub mod classifier;
pub mod config;
pub mod export;
pub mod fetch;
pub mod gguf;
pub mod gguf_convert;
pub mod llama;
pub mod params;
pub mod prompts;
pub mod safetensors_io;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use bert::BertEncoder;
use config::BertConfig;
use params::ParamStore;
use safetensors_io::SafetensorsFile;
use tokenizer::TextEncoder;

/// A BERT-family encoder loaded from a Hugging Face folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`).
pub struct EncoderModel {
    pub dir: PathBuf,
    pub encoder: BertEncoder,
    pub params: ParamStore,
    pub text: TextEncoder,
}

impl EncoderModel {
    pub fn load(dir: &Path) -> Result<EncoderModel> {
        if !dir.is_dir() {
            bail!(
                "model folder {} does not exist (install one with `kdx fetch minilm-l6`)",
                dir.display()
            );
        }
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            bail!(
                "{} has no model.safetensors (kdx reads safetensors weights only)",
                dir.display()
            );
        }
        let mut params = ParamStore::new();
        let encoder = BertEncoder::register(&config, &mut params);
        SafetensorsFile::open(&weights)?.load_into(&mut params, |_| false)?;
        let max_len = tokenizer::sentence_transformers_max_len(dir)?
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        let text =
            TextEncoder::from_file(&dir.join("tokenizer.json"), config.pad_token_id, max_len)?;
        Ok(EncoderModel {
            dir: dir.to_path_buf(),
            encoder,
            params,
            text,
        })
    }
}
