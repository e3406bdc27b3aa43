//! Files a run writes: atomic replacement, safetensors from parameter stores, the resumable
//! training checkpoint (parameters, AdamW moments and the loop's state in one file).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::params::ParamStore;
use crate::model::safetensors_io::SafetensorsFile;
use crate::tensor::Tensor;

#[cfg(not(target_endian = "little"))]
compile_error!("safetensors files are little-endian; kdx writes them from host memory");

/// The folder holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes a folder's entries (a rename is only durable once its folder is).
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", dir.display()))
}

/// Writes `path` so that a reader (or a crash) sees the old file or the new one, never a mix: the
/// bytes go to a temporary file in the same folder, which is flushed to disk and renamed over `path`.
/// The file is readable by everyone, like any file written with the default umask.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = shared_temp(false)
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    sync_dir(dir)
}

/// A temporary-file builder whose files (`0644`) and folders (`0755`) others can read, as files
/// written normally are: the `tempfile` default is owner-only.
pub fn shared_temp(dir_mode: bool) -> tempfile::Builder<'static, 'static> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(if dir_mode {
            0o755
        } else {
            0o644
        }));
    }
    builder
}

struct View<'a> {
    tensor: &'a Tensor,
}

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }
    /// f32 tensors are written straight from their memory; other dtypes are converted first.
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.tensor.data::<f32>() {
            Ok(values) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(values)),
            Err(_) => {
                std::borrow::Cow::Owned(bytemuck::cast_slice(&self.tensor.to_vec_f32()).to_vec())
            }
        }
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * 4
    }
}

/// Serialises named tensors (stored as f32) with string metadata.
pub fn to_safetensors<'a>(
    tensors: impl IntoIterator<Item = (String, &'a Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, View)> = tensors
        .into_iter()
        .map(|(n, tensor)| (n, View { tensor }))
        .collect();
    Ok(safetensors::serialize(views, metadata)?)
}

const STATE_KEY: &str = "kdx_train_state";

/// Saves parameters, both AdamW moment stores and `state` (JSON in the file's metadata) atomically.
pub fn save<S: Serialize>(
    path: &Path,
    params: &ParamStore,
    m: &ParamStore,
    v: &ParamStore,
    state: &S,
) -> Result<()> {
    let mut all: Vec<(String, &Tensor)> = Vec::new();
    for (prefix, store) in [("param/", params), ("adam_m/", m), ("adam_v/", v)] {
        all.extend(store.iter().map(|(n, t)| (format!("{prefix}{n}"), t)));
    }
    let metadata = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    write_atomic(path, &to_safetensors(all, Some(metadata))?)
}

/// Loads what [`save`] wrote into stores of the same layout; returns the saved state.
pub fn load<S: DeserializeOwned>(
    path: &Path,
    params: &mut ParamStore,
    m: &mut ParamStore,
    v: &mut ParamStore,
) -> Result<S> {
    let file = SafetensorsFile::open(path)?;
    for (prefix, store) in [("param/", params), ("adam_m/", m), ("adam_v/", v)] {
        file.load_prefixed_into(store, prefix)?;
    }
    let Some(state) = file.metadata()?.remove(STATE_KEY) else {
        bail!(
            "{}: not a kdx training checkpoint (no {STATE_KEY} metadata)",
            path.display()
        );
    };
    serde_json::from_str(&state)
        .with_context(|| format!("{}: unreadable training state", path.display()))
}
