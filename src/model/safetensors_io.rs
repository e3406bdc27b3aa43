//! Reading parameters from `.safetensors` files (memory-mapped), with errors that name the file and
//! the tensor.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::params::ParamStore;
use crate::tensor::Tensor;

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    mmap: Mmap,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed underneath while mapped is the user's error, the
        // same contract every safetensors reader has.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let st = SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
        };
        st.parse()?;
        Ok(st)
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file ({e}); it may be truncated or corrupt: fetch or save it again",
                self.path.display()
            )
        })
    }

    /// The file's string metadata (empty if it has none).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            anyhow::anyhow!(
                "{}: unreadable safetensors header: {e}",
                self.path.display()
            )
        })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Fills every parameter of `store` from tensors named exactly `prefix` + its name; all must exist.
    pub fn load_prefixed_into(&self, store: &mut ParamStore, prefix: &str) -> Result<()> {
        let st = self.parse()?;
        for (name, tensor) in store.iter_mut() {
            let stored = format!("{prefix}{name}");
            let view = st.tensor(&stored).map_err(|_| {
                anyhow::anyhow!(
                    "{}: tensor '{stored}' is missing (was it written for another model?)",
                    self.path.display()
                )
            })?;
            *tensor = decode(&view, &stored, tensor, &self.path)?;
        }
        Ok(())
    }

    /// Fills every parameter of `store` from the file. A stored name may carry `prefix` (e.g. `bert.`)
    /// and old checkpoints name layer-norm parameters `gamma`/`beta`. Parameters for which `optional`
    /// is true may be absent (they keep their values); any other absence is an error.
    pub fn load_into(
        &self,
        store: &mut ParamStore,
        optional: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let st = self.parse()?;
        let names: HashSet<&str> = st.names().into_iter().collect();
        let prefix = ["", "bert.", "model."]
            .into_iter()
            .find(|p| names.contains(format!("{p}embeddings.word_embeddings.weight").as_str()))
            .unwrap_or("");
        let mut loaded = Vec::new();
        for (name, tensor) in store.iter_mut() {
            let candidates = [
                format!("{prefix}{name}"),
                name.to_string(),
                format!("{prefix}{}", legacy_norm_name(name)),
            ];
            let Some(found) = candidates.iter().find(|c| names.contains(c.as_str())) else {
                if optional(name) {
                    continue;
                }
                bail!(
                    "{}: tensor '{prefix}{name}' is missing (the file has {} tensors; does config.json match these weights?)",
                    self.path.display(),
                    names.len()
                );
            };
            let view = st
                .tensor(found)
                .map_err(|e| anyhow::anyhow!("{}: tensor '{found}': {e}", self.path.display()))?;
            *tensor = decode(&view, found, tensor, &self.path)?;
            loaded.push(name.to_string());
        }
        Ok(loaded)
    }
}

/// A stored tensor as a parameter of `like`'s shape and dtype.
fn decode(view: &TensorView<'_>, stored: &str, like: &Tensor, path: &Path) -> Result<Tensor> {
    if view.shape() != like.shape() {
        bail!(
            "{}: tensor '{stored}' has shape {:?} but the model config expects {:?}",
            path.display(),
            view.shape(),
            like.shape()
        );
    }
    let values =
        view_to_f32(view).with_context(|| format!("{}: tensor '{stored}'", path.display()))?;
    Tensor::from_f32(&values, like.shape(), like.dtype())
}

/// `LayerNorm.weight` → `LayerNorm.gamma`, `LayerNorm.bias` → `LayerNorm.beta` (TF-era checkpoints).
fn legacy_norm_name(name: &str) -> String {
    if let Some(stem) = name.strip_suffix("LayerNorm.weight") {
        format!("{stem}LayerNorm.gamma")
    } else if let Some(stem) = name.strip_suffix("LayerNorm.bias") {
        format!("{stem}LayerNorm.beta")
    } else {
        name.to_string()
    }
}

/// Decodes a stored tensor to f32 (little-endian, any alignment).
fn view_to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32)
            .collect(),
        other => bail!("dtype {other:?} is not a floating-point parameter type kdx reads"),
    })
}
