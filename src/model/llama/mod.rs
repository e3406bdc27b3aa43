//! The Llama-family decoder (SmolLM2, Llama 2/3 shapes): token embedding, pre-norm layers of
//! RMSNorm → grouped-query causal attention with RoPE → residual, RMSNorm → SwiGLU MLP → residual, a
//! final RMSNorm and a tied or separate LM head. Explicit forward (keeping what the backward needs)
//! and backward, as in the BERT encoder.
//!
//! The backward always returns gradients with respect to the activations and the deep-prompt prefix
//! (P-tuning v2 trains only those); weight gradients are computed only when a gradient store is
//! passed, so prompt tuning and PPO spend nothing on the frozen model's weights.
//!
//! Batches are right-padded `[batch * seq]` rows; causal masking keeps real tokens from seeing the
//! padding, and callers leave padded rows out of their losses.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::params::{Init, ParamId, ParamStore};
use super::prompts::DeepPrompts;

pub mod generate;
use crate::backend::cpu::rope::rope_table;
use crate::backend::{Backend, CausalShape, NormStats, Transpose};
use crate::tensor::{DType, Device, Tensor};
use crate::trace;

/// The fields of a Hugging Face `LlamaForCausalLM` config.json the engine uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// One id or several (Llama 3 lists more than one).
    #[serde(default)]
    pub eos_token_id: Option<EosIds>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

fn default_rope_theta() -> f64 {
    10000.0
}

fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: LlamaConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Llama config.json", path.display()))?;
        config
            .validate()
            .with_context(|| format!("{}: unsupported config", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let h = self.num_attention_heads;
        if h == 0 || self.num_key_value_heads == 0 || !h.is_multiple_of(self.num_key_value_heads) {
            bail!(
                "{h} attention heads cannot share {} key/value heads evenly",
                self.num_key_value_heads
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            bail!(
                "hidden_size {} is not a multiple of {h} heads",
                self.hidden_size
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim());
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("hidden_act '{act}': only silu (SwiGLU) is supported");
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("rope_scaling is not supported");
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => vec![],
            Some(EosIds::One(id)) => vec![*id],
            Some(EosIds::Many(ids)) => ids.clone(),
        }
    }
}

/// One decoder layer's parameters.
#[derive(Clone, Debug)]
struct Layer {
    attn_norm: ParamId,
    q: ParamId,
    k: ParamId,
    v: ParamId,
    o: ParamId,
    mlp_norm: ParamId,
    gate: ParamId,
    up: ParamId,
    down: ParamId,
}

/// A Llama model: its config, parameter handles into a [`ParamStore`], and the RoPE table.
#[derive(Clone, Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    embed: ParamId,
    layers: Vec<Layer>,
    norm: ParamId,
    /// `None` when tied to the token embedding.
    lm_head: Option<ParamId>,
    rope: Tensor,
}

/// What one layer's forward keeps for its backward.
struct LayerCache {
    x: Tensor,
    h1: Tensor,
    stats1: NormStats,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    ctx: Tensor,
    x2: Tensor,
    h2: Tensor,
    stats2: NormStats,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// A forward pass's saved activations; [`Llama::backward`] consumes it.
pub struct LlamaCache {
    ids: Vec<u32>,
    positions: Vec<u32>,
    shape: CausalShape,
    layers: Vec<LayerCache>,
    last: Tensor,
    final_stats: NormStats,
}

/// A right-padded batch of token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    /// `[batch * seq]` ids; padded positions hold any valid id.
    pub ids: Vec<u32>,
    /// Real tokens per sequence (each ≥ 1).
    pub lengths: Vec<u32>,
    pub seq: usize,
}

impl TokenBatch {
    /// Right-pads sequences of ids with `pad`.
    pub fn from_sequences(sequences: &[Vec<u32>], pad: u32) -> Result<TokenBatch> {
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        if seq == 0 || sequences.iter().any(Vec::is_empty) {
            bail!("every sequence needs at least one token");
        }
        let mut ids = Vec::with_capacity(sequences.len() * seq);
        for s in sequences {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad, seq - s.len()));
        }
        Ok(TokenBatch {
            ids,
            lengths: sequences.iter().map(|s| s.len() as u32).collect(),
            seq,
        })
    }

    pub fn size(&self) -> usize {
        self.lengths.len()
    }
}

impl Llama {
    /// Registers the parameters under their Hugging Face names (`model.…`, and `lm_head.weight`
    /// when untied) and builds the RoPE table.
    pub fn register(config: &LlamaConfig, store: &mut ParamStore) -> Result<Llama> {
        config.validate()?;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let init = Init::Normal(0.02);
        let embed = store.add("model.embed_tokens.weight", &[config.vocab_size, h], init);
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let name = |s: &str| format!("model.layers.{l}.{s}");
                Layer {
                    attn_norm: store.add(name("input_layernorm.weight"), &[h], Init::Ones),
                    q: store.add(
                        name("self_attn.q_proj.weight"),
                        &[config.q_width(), h],
                        init,
                    ),
                    k: store.add(
                        name("self_attn.k_proj.weight"),
                        &[config.kv_width(), h],
                        init,
                    ),
                    v: store.add(
                        name("self_attn.v_proj.weight"),
                        &[config.kv_width(), h],
                        init,
                    ),
                    o: store.add(
                        name("self_attn.o_proj.weight"),
                        &[h, config.q_width()],
                        init,
                    ),
                    mlp_norm: store.add(name("post_attention_layernorm.weight"), &[h], Init::Ones),
                    gate: store.add(name("mlp.gate_proj.weight"), &[i, h], init),
                    up: store.add(name("mlp.up_proj.weight"), &[i, h], init),
                    down: store.add(name("mlp.down_proj.weight"), &[h, i], init),
                }
            })
            .collect();
        let norm = store.add("model.norm.weight", &[h], Init::Ones);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| store.add("lm_head.weight", &[config.vocab_size, h], init));
        let rope = rope_table(
            config.max_position_embeddings,
            config.head_dim(),
            config.rope_theta,
            DType::F32,
        );
        Ok(Llama {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Loads a Hugging Face Llama folder (config.json, model.safetensors) in f32.
    pub fn load(dir: &Path) -> Result<(Llama, ParamStore)> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut store = ParamStore::new();
        let model = Llama::register(&config, &mut store)?;
        let path = dir.join("model.safetensors");
        let file = crate::model::safetensors_io::SafetensorsFile::open(&path)?;
        file.load_prefixed_into(&mut store, "")
            .with_context(|| format!("loading the Llama weights of {}", dir.display()))?;
        Ok((model, store))
    }

    /// The parameters in the dtype the model computes in (the RoPE table follows `dtype`).
    pub fn with_dtype(mut self, dtype: DType) -> Result<Llama> {
        self.rope = self.rope.to_dtype(dtype)?;
        Ok(self)
    }

    /// The model's own tensors (the RoPE table) on `device`, where its parameters must be too.
    pub fn on_device(mut self, device: Device) -> Result<Llama> {
        self.rope = self.rope.to_device(device)?;
        Ok(self)
    }

    fn head(&self) -> ParamId {
        self.lm_head.unwrap_or(self.embed)
    }

    fn check_prompts(&self, prompts: Option<&DeepPrompts>) -> Result<()> {
        if let Some(p) = prompts {
            p.check_fits(&self.config)?;
        }
        Ok(())
    }

    /// The final hidden states `[batch * seq, hidden]` (after the last norm) and what the backward
    /// needs. Positions start at 0 in every sequence; the prefix (if any) has none.
    pub fn forward(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        batch: &TokenBatch,
        prompts: Option<&DeepPrompts>,
    ) -> Result<(Tensor, LlamaCache)> {
        self.check_prompts(prompts)?;
        let c = &self.config;
        let shape = CausalShape {
            batch: batch.size(),
            q_len: batch.seq,
            kv_len: batch.seq,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
        };
        let positions: Vec<u32> = (0..batch.ids.len())
            .map(|i| (i % batch.seq) as u32)
            .collect();
        let q_start = vec![0u32; batch.size()];
        let mut x = be.embedding(&params[self.embed], &batch.ids)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let _range = trace::range(format_args!("decoder layer {l}"));
            let (h1, stats1) = be.rms_norm(&x, &params[layer.attn_norm], c.rms_norm_eps)?;
            let mut q = be.linear(&h1, &params[layer.q], None)?;
            let mut k = be.linear(&h1, &params[layer.k], None)?;
            let v = be.linear(&h1, &params[layer.v], None)?;
            be.rope(&mut q, c.num_attention_heads, &positions, &self.rope, false)?;
            be.rope(&mut k, c.num_key_value_heads, &positions, &self.rope, false)?;
            let prefix = prompts.map(|p| p.layer(l));
            let (ctx, probs) = be.causal_attention(&q, &k, &v, prefix, shape, &q_start)?;
            let x2 = be.add(&x, &be.linear(&ctx, &params[layer.o], None)?)?;
            let (h2, stats2) = be.rms_norm(&x2, &params[layer.mlp_norm], c.rms_norm_eps)?;
            let gate = be.linear(&h2, &params[layer.gate], None)?;
            let up = be.linear(&h2, &params[layer.up], None)?;
            let act = be.swiglu(&gate, &up)?;
            let next = be.add(&x2, &be.linear(&act, &params[layer.down], None)?)?;
            layers.push(LayerCache {
                x: std::mem::replace(&mut x, next),
                h1,
                stats1,
                q,
                k,
                v,
                probs,
                ctx,
                x2,
                h2,
                stats2,
                gate,
                up,
                act,
            });
        }
        let (out, final_stats) = be.rms_norm(&x, &params[self.norm], c.rms_norm_eps)?;
        let cache = LlamaCache {
            ids: batch.ids.clone(),
            positions,
            shape,
            layers,
            last: x,
            final_stats,
        };
        Ok((out, cache))
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, be: &dyn Backend, params: &ParamStore, hidden: &Tensor) -> Result<Tensor> {
        be.linear(hidden, &params[self.head()], None)
    }

    /// Mean next-token cross-entropy over the real tokens after the first of each sequence (the
    /// standard shifted LM loss; `targets[r] = IGNORE_INDEX` leaves row `r` out), with its gradient
    /// with respect to the final hidden states. Logits exist only for the rows that count.
    pub fn lm_loss(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        hidden: &Tensor,
        targets: &[u32],
        d_head: Option<&mut Tensor>,
    ) -> Result<(f64, Tensor)> {
        let rows: Vec<u32> = (0..targets.len() as u32)
            .filter(|&r| targets[r as usize] != crate::backend::IGNORE_INDEX)
            .collect();
        if rows.is_empty() {
            bail!("LM loss: no target tokens (every sequence has a single token?)");
        }
        let labels: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
        let picked = be.embedding(hidden, &rows)?;
        let head = &params[self.head()];
        let logits = be.linear(&picked, head, None)?;
        let (loss, d_logits) = be.cross_entropy(&logits, &labels)?;
        let mut d_picked = picked.zeros_like();
        be.matmul(&d_logits, head, Transpose::NN, &mut d_picked, false)?;
        if let Some(dw) = d_head {
            be.matmul(&d_logits, &picked, Transpose::TN, dw, true)?;
        }
        let mut d_hidden = hidden.zeros_like();
        be.embedding_backward(&d_picked, &rows, &mut d_hidden)?;
        Ok((loss, d_hidden))
    }

    /// Backward from `d_out` (the gradient of the final hidden states). Returns the prompts'
    /// gradients (`[prefix, kv_width]` keys and values per layer) when the forward had prompts.
    /// Weight gradients are accumulated into `grads` only when it is given.
    pub fn backward(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        cache: LlamaCache,
        d_out: &Tensor,
        prompts: Option<&DeepPrompts>,
        mut grads: Option<&mut ParamStore>,
    ) -> Result<Option<Vec<(Tensor, Tensor)>>> {
        let c = &self.config;
        let q_start = vec![0u32; cache.shape.batch];
        let mut dx = be.rms_norm_backward(
            d_out,
            &cache.last,
            &params[self.norm],
            &cache.final_stats,
            grads.as_deref_mut().map(|g| &mut g[self.norm]),
        )?;
        let mut prompt_grads = prompts.map(|p| Vec::with_capacity(p.layers()));
        for (l, (layer, saved)) in self.layers.iter().zip(cache.layers).enumerate().rev() {
            let _range = trace::range(format_args!("decoder layer {l} backward"));
            // MLP branch: next = x2 + down(swiglu(gate(h2), up(h2))).
            let d_act = self.linear_back(be, params, &mut grads, layer.down, &dx, &saved.act)?;
            let (d_gate, d_up) = be.swiglu_backward(&saved.gate, &saved.up, &d_act)?;
            let mut d_h2 =
                self.linear_back(be, params, &mut grads, layer.gate, &d_gate, &saved.h2)?;
            be.add_assign(
                &mut d_h2,
                &self.linear_back(be, params, &mut grads, layer.up, &d_up, &saved.h2)?,
            )?;
            let d_x2 = be.rms_norm_backward(
                &d_h2,
                &saved.x2,
                &params[layer.mlp_norm],
                &saved.stats2,
                grads.as_deref_mut().map(|g| &mut g[layer.mlp_norm]),
            )?;
            be.add_assign(&mut dx, &d_x2)?;
            // Attention branch: x2 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))).
            let d_ctx = self.linear_back(be, params, &mut grads, layer.o, &dx, &saved.ctx)?;
            let prefix = prompts.map(|p| p.layer(l));
            let mut g = be.causal_attention_backward(
                &d_ctx,
                &saved.q,
                &saved.k,
                &saved.v,
                prefix,
                &saved.probs,
                cache.shape,
                &q_start,
            )?;
            be.rope(
                &mut g.dq,
                c.num_attention_heads,
                &cache.positions,
                &self.rope,
                true,
            )?;
            be.rope(
                &mut g.dk,
                c.num_key_value_heads,
                &cache.positions,
                &self.rope,
                true,
            )?;
            let mut d_h1 = self.linear_back(be, params, &mut grads, layer.q, &g.dq, &saved.h1)?;
            be.add_assign(
                &mut d_h1,
                &self.linear_back(be, params, &mut grads, layer.k, &g.dk, &saved.h1)?,
            )?;
            be.add_assign(
                &mut d_h1,
                &self.linear_back(be, params, &mut grads, layer.v, &g.dv, &saved.h1)?,
            )?;
            let d_x = be.rms_norm_backward(
                &d_h1,
                &saved.x,
                &params[layer.attn_norm],
                &saved.stats1,
                grads.as_deref_mut().map(|g| &mut g[layer.attn_norm]),
            )?;
            be.add_assign(&mut dx, &d_x)?;
            if let (Some(pg), Some(dp)) = (prompt_grads.as_mut(), g.dprefix) {
                pg.push(dp);
            }
        }
        if let Some(g) = grads {
            be.embedding_backward(&dx, &cache.ids, &mut g[self.embed])?;
        }
        Ok(prompt_grads.map(|mut pg| {
            pg.reverse();
            pg
        }))
    }

    /// Backward of `y = x·wᵀ` (no bias): returns `dx`, and adds `dyᵀ·x` into the weight's gradient
    /// only when weight gradients are wanted.
    fn linear_back(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        grads: &mut Option<&mut ParamStore>,
        weight: ParamId,
        dy: &Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let w = &params[weight];
        let mut dx = x.zeros_like();
        be.matmul(dy, w, Transpose::NN, &mut dx, false)?;
        if let Some(g) = grads.as_deref_mut() {
            be.matmul(dy, x, Transpose::TN, &mut g[weight], true)?;
        }
        Ok(dx)
    }
}

/// Shifted next-token targets for a batch: row `b*seq + t` predicts `ids[b*seq + t + 1]` while
/// `t + 1` is a real token; every other row is [`IGNORE_INDEX`](crate::backend::IGNORE_INDEX).
pub fn next_token_targets(batch: &TokenBatch) -> Vec<u32> {
    let mut targets = vec![crate::backend::IGNORE_INDEX; batch.ids.len()];
    for (b, &len) in batch.lengths.iter().enumerate() {
        for t in 0..(len as usize).saturating_sub(1) {
            targets[b * batch.seq + t] = batch.ids[b * batch.seq + t + 1];
        }
    }
    targets
}
