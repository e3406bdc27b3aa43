//! Text → padded id batches with a Hugging Face `tokenizer.json` (the tokenizers crate).

use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use tokenizers::{Tokenizer, TruncationParams};

use super::bert::Batch;

pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad_id: u32,
    max_len: usize,
}

impl TextEncoder {
    /// Loads `dir/tokenizer.json`. Its own padding is switched off (batches are padded to their longest
    /// text here); texts are truncated to `max_len` tokens.
    pub fn from_file(path: &Path, pad_id: u32, max_len: usize) -> Result<TextEncoder> {
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("{}: cannot set truncation: {e}", path.display()))?;
        Ok(TextEncoder {
            tokenizer,
            pad_id,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of one text, with the special tokens the tokenizer adds ([CLS] … [SEP] for BERT).
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenise {text:?}: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// A batch of texts, right-padded to the longest.
    pub fn batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Batch> {
        let encoded = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        pad_batch(&encoded, self.pad_id)
    }
}

/// Right-pads (ids, type ids) pairs into a [`Batch`].
pub fn pad_batch(encoded: &[(Vec<u32>, Vec<u32>)], pad_id: u32) -> Result<Batch> {
    ensure!(!encoded.is_empty(), "cannot build an empty batch");
    let seq = encoded.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    ensure!(seq > 0, "every text tokenised to nothing");
    let mut batch = Batch {
        ids: Vec::new(),
        type_ids: Vec::new(),
        lengths: Vec::new(),
        seq,
    };
    for (ids, types) in encoded {
        ensure!(!ids.is_empty(), "a text tokenised to no tokens");
        batch.ids.extend(
            ids.iter()
                .copied()
                .chain(std::iter::repeat(pad_id))
                .take(seq),
        );
        batch
            .type_ids
            .extend(types.iter().copied().chain(std::iter::repeat(0)).take(seq));
        batch.lengths.push(ids.len() as u32);
    }
    Ok(batch)
}

/// `max_seq_length` from a sentence-transformers `sentence_bert_config.json`, if the folder has one.
pub fn sentence_transformers_max_len(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("sentence_bert_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(value
        .get("max_seq_length")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize))
}
