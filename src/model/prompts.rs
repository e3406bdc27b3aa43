//! Deep prompts (P-tuning v2, methods §2.3): per decoder layer, `k` trainable key and value vectors
//! (`[k, kv_heads * head_dim]` each, i.e. `[k, n_kv_heads, head_dim]`) prepended inside attention.
//! They live in a [`ParamStore`] so the optimizer and checkpoints treat them like any parameters.
//! Saved as safetensors with the layer count, `k`, the key/value width and the base model's name
//! in the metadata, all checked on load.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::llama::LlamaConfig;
use super::params::{Init, ParamId, ParamStore, Rng};
use crate::backend::{Backend, Prefix};
use crate::tensor::{Device, Tensor};
use crate::train::checkpoint::{to_safetensors, write_atomic};

#[derive(Clone, Debug)]
pub struct DeepPrompts {
    pub store: ParamStore,
    /// `(keys, values)` of each layer.
    ids: Vec<(ParamId, ParamId)>,
    /// Prefix length.
    pub k: usize,
    /// The model the prompts were trained for (its folder name), checked on load.
    pub base_model: String,
}

impl DeepPrompts {
    /// Prompts of length `k` for `config`, drawn from N(0, σ²) with a seed.
    pub fn random(
        config: &LlamaConfig,
        k: usize,
        sigma: f32,
        seed: u64,
        base_model: &str,
    ) -> Result<DeepPrompts> {
        if k == 0 {
            bail!("deep prompts need a length of at least 1");
        }
        let mut prompts = DeepPrompts::empty(config, k, base_model);
        let mut rng = Rng::new(seed);
        for (_, t) in prompts.store.iter_mut() {
            let n = t.numel();
            *t = Tensor::from_vec(
                (0..n).map(|_| rng.normal() * sigma).collect::<Vec<f32>>(),
                t.shape(),
            )?;
        }
        Ok(prompts)
    }

    fn empty(config: &LlamaConfig, k: usize, base_model: &str) -> DeepPrompts {
        let mut store = ParamStore::new();
        let width = config.kv_width();
        let ids = (0..config.num_hidden_layers)
            .map(|l| {
                (
                    store.add(format!("layers.{l}.prefix_keys"), &[k, width], Init::Zeros),
                    store.add(
                        format!("layers.{l}.prefix_values"),
                        &[k, width],
                        Init::Zeros,
                    ),
                )
            })
            .collect();
        DeepPrompts {
            store,
            ids,
            k,
            base_model: base_model.to_string(),
        }
    }

    /// Prompts from per-layer `(keys, values)` tensors (each `[k, kv_width]`).
    pub fn from_tensors(
        config: &LlamaConfig,
        layers: Vec<(Tensor, Tensor)>,
        base_model: &str,
    ) -> Result<DeepPrompts> {
        let k = layers.first().map_or(0, |(keys, _)| keys.rows_cols().0);
        let mut prompts = DeepPrompts::empty(config, k, base_model);
        if layers.len() != prompts.ids.len() {
            bail!(
                "deep prompts: {} layers given for a model of {}",
                layers.len(),
                prompts.ids.len()
            );
        }
        for (&(ki, vi), (keys, values)) in prompts.ids.clone().iter().zip(layers) {
            for (id, t) in [(ki, keys), (vi, values)] {
                if t.shape() != prompts.store[id].shape() {
                    bail!(
                        "deep prompts: {} is {:?}, expected {:?}",
                        prompts.store.name(id),
                        t.shape(),
                        prompts.store[id].shape()
                    );
                }
                prompts.store[id] = t;
            }
        }
        Ok(prompts)
    }

    /// The prompts on `device` (host or GPU memory), where the model runs.
    pub fn to_device(mut self, device: Device) -> Result<DeepPrompts> {
        self.store = self.store.to_device(device)?;
        Ok(self)
    }

    pub fn layers(&self) -> usize {
        self.ids.len()
    }

    /// Layer `l`'s prefix, as attention takes it.
    pub fn layer(&self, l: usize) -> Prefix<'_> {
        let (k, v) = self.ids[l];
        Prefix {
            keys: &self.store[k],
            values: &self.store[v],
        }
    }

    /// Adds per-layer `(dkeys, dvalues)` (as the Llama backward returns them) into a gradient store
    /// laid out like `self.store`.
    pub fn accumulate(
        &self,
        grads: &mut ParamStore,
        layer_grads: &[(Tensor, Tensor)],
        be: &dyn Backend,
    ) -> Result<()> {
        for (&(k, v), (dk, dv)) in self.ids.iter().zip(layer_grads) {
            be.add_assign(&mut grads[k], dk)?;
            be.add_assign(&mut grads[v], dv)?;
        }
        Ok(())
    }

    /// Checks that the prompts fit a model: layer count and key/value width.
    pub fn check_fits(&self, config: &LlamaConfig) -> Result<()> {
        let width = self.store[self.ids[0].0].rows_cols().1;
        if self.layers() != config.num_hidden_layers || width != config.kv_width() {
            bail!(
                "deep prompts for {} layers of width {width} do not fit a model of {} layers with key/value width {}",
                self.layers(),
                config.num_hidden_layers,
                config.kv_width()
            );
        }
        Ok(())
    }

    /// Writes the prompts atomically as safetensors, with their shape and base model in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = HashMap::from([
            ("format".to_string(), "kdx-deep-prompts".to_string()),
            ("layers".to_string(), self.layers().to_string()),
            ("prefix_length".to_string(), self.k.to_string()),
            ("base_model".to_string(), self.base_model.clone()),
        ]);
        let tensors = self.store.iter().map(|(n, t)| (n.to_string(), t));
        write_atomic(path, &to_safetensors(tensors, Some(metadata))?)
    }

    /// Reads prompts saved by [`DeepPrompts::save`] for the model `config` named `base_model`;
    /// another model's prompts (layers, width or name) are refused with the reason.
    pub fn load(path: &Path, config: &LlamaConfig, base_model: &str) -> Result<DeepPrompts> {
        let file = super::safetensors_io::SafetensorsFile::open(path)?;
        let meta = file.metadata()?;
        let field = |key: &str| {
            meta.get(key).cloned().with_context(|| {
                format!(
                    "{}: not a deep-prompts file (no '{key}' in its metadata)",
                    path.display()
                )
            })
        };
        if field("format")? != "kdx-deep-prompts" {
            bail!("{}: not a deep-prompts file", path.display());
        }
        let layers: usize = field("layers")?
            .parse()
            .with_context(|| format!("{}: bad 'layers'", path.display()))?;
        let k: usize = field("prefix_length")?
            .parse()
            .with_context(|| format!("{}: bad 'prefix_length'", path.display()))?;
        let trained_for = field("base_model")?;
        if trained_for != base_model {
            bail!(
                "{}: these prompts were trained for '{trained_for}', not '{base_model}'",
                path.display()
            );
        }
        if layers != config.num_hidden_layers {
            bail!(
                "{}: prompts for {layers} layers, but the model has {}",
                path.display(),
                config.num_hidden_layers
            );
        }
        let mut prompts = DeepPrompts::empty(config, k, base_model);
        file.load_prefixed_into(&mut prompts.store, "")
            .with_context(|| {
                format!(
                    "{}: prompts of length {k} do not match the model's key/value width {}",
                    path.display(),
                    config.kv_width()
                )
            })?;
        Ok(prompts)
    }
}
