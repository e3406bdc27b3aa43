//! Classifiers as Hugging Face folders: `config.json` (BertForSequenceClassification, label names),
//! `model.safetensors` with the tensor names transformers expects, and the tokenizer files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::classifier::{Head, SequenceClassifier};
use super::config::BertConfig;
use super::params::ParamStore;
use super::safetensors_io::SafetensorsFile;
use super::tokenizer::TextEncoder;
use crate::train::checkpoint::{parent_dir, shared_temp, sync_dir, to_safetensors, write_atomic};

/// Tokenizer files copied alongside a saved model when the source folder has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// The stored name of a parameter in `BertForSequenceClassification`: encoder and pooler under `bert.`.
fn hf_name(name: &str) -> String {
    if name.starts_with("classifier.") {
        name.to_string()
    } else {
        format!("bert.{name}")
    }
}

/// Writes the classifier to `dir` (replacing an existing folder only once the new one is complete).
pub fn save_classifier(
    dir: &Path,
    model: &SequenceClassifier,
    params: &ParamStore,
    label_names: &[String],
    tokenizer_from: &Path,
) -> Result<()> {
    let parent = parent_dir(dir);
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = shared_temp(true).prefix(".saving-").tempdir_in(parent)?;

    let mut config = serde_json::to_value(&model.encoder.config)?;
    let extra = json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "position_embedding_type": "absolute",
        "problem_type": "single_label_classification",
        "torch_dtype": "float32",
        "id2label": label_names.iter().enumerate().map(|(i, n)| (i.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "label2id": label_names.iter().enumerate().map(|(i, n)| (n.clone(), json!(i))).collect::<serde_json::Map<_, _>>(),
        // transformers always pools with tanh(dense([CLS])); only the `pooler` head predicts the same there.
        "kdx_head": model.head.to_string(),
    });
    let (Value::Object(c), Value::Object(e)) = (&mut config, extra) else {
        unreachable!("both are JSON objects")
    };
    c.extend(e);
    write_atomic(
        &staging.path().join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let tensors = params.iter().map(|(n, t)| (hf_name(n), t));
    write_atomic(
        &staging.path().join("model.safetensors"),
        &to_safetensors(tensors, None)?,
    )?;
    for file in TOKENIZER_FILES {
        let src = tokenizer_from.join(file);
        if src.exists() {
            std::fs::copy(&src, staging.path().join(file))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    replace_dir(staging.keep(), dir)
}

/// Moves the finished folder `new` to `dir`. An existing `dir` is swapped with it in one atomic
/// rename where the system has one (Linux `renameat2(RENAME_EXCHANGE)`), so `dir` is never missing,
/// and the old contents are removed afterwards.
pub(crate) fn replace_dir(new: PathBuf, dir: &Path) -> Result<()> {
    if dir.exists() && exchange(&new, dir)? {
        std::fs::remove_dir_all(&new)
            .with_context(|| format!("cannot remove the old {}", new.display()))?;
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove the old {}", dir.display()))?;
        }
        std::fs::rename(&new, dir)
            .with_context(|| format!("cannot move the new model to {}", dir.display()))?;
    }
    sync_dir(parent_dir(dir))
}

/// Swaps two paths atomically; false where the system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).context("path with a NUL byte");
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD makes them relative to the working folder.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Not supported by this file system or kernel: fall back to remove + rename.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err).with_context(|| format!("cannot swap {} into {}", a.display(), b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> Result<bool> {
    Ok(false)
}

/// A classifier and everything needed to run it.
pub struct LoadedClassifier {
    pub model: SequenceClassifier,
    pub params: ParamStore,
    pub text: TextEncoder,
    pub label_names: Vec<String>,
    pub dir: PathBuf,
}

/// Loads a classifier saved by [`save_classifier`] (or any `BertForSequenceClassification` folder).
pub fn load_classifier(dir: &Path, max_len: usize) -> Result<LoadedClassifier> {
    let config_path = dir.join("config.json");
    let raw: Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    let Some(id2label) = raw.get("id2label").and_then(Value::as_object) else {
        bail!(
            "{}: no id2label: not a sequence classifier (fine-tune one with `kdx finetune`)",
            config_path.display()
        );
    };
    let mut label_names = vec![String::new(); id2label.len()];
    for (id, name) in id2label {
        let slot = id
            .parse::<usize>()
            .ok()
            .and_then(|i| label_names.get_mut(i));
        let Some(slot) = slot else {
            bail!("{}: id2label has a bad id '{id}'", config_path.display())
        };
        *slot = name.as_str().unwrap_or_default().to_string();
    }
    let head = match raw.get("kdx_head").and_then(Value::as_str) {
        Some(h) => h.parse()?,
        None => Head::Pooler,
    };
    let (model, params, text) = load_with_head(dir, label_names.len(), head, max_len, |_| false)?;
    Ok(LoadedClassifier {
        model,
        params,
        text,
        label_names,
        dir: dir.to_path_buf(),
    })
}

/// A classifier whose encoder (and pooler, if the folder has one) comes from the Hugging Face folder
/// `dir`, keeping only the embeddings and the bottom `layers` layers when given (students start this
/// way). The classifier head, and a pooler the folder lacks, start from random values drawn from `seed`.
pub fn init_classifier(
    dir: &Path,
    num_labels: usize,
    head: Head,
    layers: Option<usize>,
    max_len: usize,
    seed: u64,
) -> Result<(SequenceClassifier, ParamStore, TextEncoder)> {
    let mut config = BertConfig::from_file(&dir.join("config.json"))?;
    if let Some(l) = layers {
        if l == 0 || l > config.num_hidden_layers {
            bail!(
                "cannot keep {l} layers: {} has {}",
                dir.display(),
                config.num_hidden_layers
            );
        }
        config.num_hidden_layers = l;
    }
    let mut params = ParamStore::new();
    let model = SequenceClassifier::register(&config, num_labels, head, &mut params);
    params.initialise(seed)?;
    let fresh = |name: &str| name.starts_with("classifier.") || name.starts_with("pooler.");
    let weights = weights_file(dir)?;
    SafetensorsFile::open(&weights)?.load_into(&mut params, fresh)?;
    let text = text_encoder(dir, &config, max_len)?;
    Ok((model, params, text))
}

fn load_with_head(
    dir: &Path,
    num_labels: usize,
    head: Head,
    max_len: usize,
    optional: impl Fn(&str) -> bool,
) -> Result<(SequenceClassifier, ParamStore, TextEncoder)> {
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let mut params = ParamStore::new();
    let model = SequenceClassifier::register(&config, num_labels, head, &mut params);
    SafetensorsFile::open(&weights_file(dir)?)?.load_into(&mut params, optional)?;
    let text = text_encoder(dir, &config, max_len)?;
    Ok((model, params, text))
}

fn weights_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("model.safetensors");
    if !path.exists() {
        bail!(
            "{} has no model.safetensors (kdx reads safetensors weights only)",
            dir.display()
        );
    }
    Ok(path)
}

fn text_encoder(dir: &Path, config: &BertConfig, max_len: usize) -> Result<TextEncoder> {
    TextEncoder::from_file(
        &dir.join("tokenizer.json"),
        config.pad_token_id,
        max_len.min(config.max_position_embeddings),
    )
}
