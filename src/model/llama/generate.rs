//! Batched generation: one prefill over the (right-padded) prompts fills a KV cache, then each step
//! decodes one token per sequence against it, every sequence at its own position. Sampling is the
//! backend's (temperature, top-k, top-p, seeded; greedy at temperature 0); a sequence stops at an
//! end-of-sequence id or after `max_new_tokens`.

use anyhow::{bail, Result};

use super::{Llama, TokenBatch};
use crate::backend::{Backend, CausalShape, Sampling};
use crate::model::params::ParamStore;
use crate::model::prompts::DeepPrompts;
use crate::tensor::Tensor;
use crate::trace;

/// Keys and values of every layer, `[batch * capacity, kv_width]` each, and how many positions of
/// each sequence are filled.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    capacity: usize,
    pub lengths: Vec<u32>,
}

impl KvCache {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What [`Llama::generate`] returns per sequence: the new tokens (the stop id included, if one
/// was produced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub stopped_at_eos: bool,
}

/// Generation settings.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Ids that end a sequence (the config's EOS by default).
    pub stop_ids: Vec<u32>,
}

impl Llama {
    /// Runs the prompts through the model, filling a cache with room for `capacity` positions per
    /// sequence; returns the logits `[batch, vocab]` at each sequence's last real token.
    pub fn prefill(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        batch: &TokenBatch,
        prompts: Option<&DeepPrompts>,
        capacity: usize,
    ) -> Result<(Tensor, KvCache)> {
        let _range = trace::range("prefill");
        self.check_prompts(prompts)?;
        if capacity < batch.seq || capacity > self.config.max_position_embeddings {
            bail!(
                "KV cache of {capacity} positions: needs at least the prompt length {} and at most the model's {} positions",
                batch.seq,
                self.config.max_position_embeddings
            );
        }
        let (hidden, cache) = self.forward(be, params, batch, prompts)?;
        let width = self.config.kv_width();
        // Real rows b*seq + t of the padded batch go to rows b*capacity + t of the cache; padded
        // positions stay zero, since decoding writes there by adding.
        let (real, rows): (Vec<u32>, Vec<u32>) = batch
            .lengths
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| {
                (0..len as usize)
                    .map(move |t| ((b * batch.seq + t) as u32, (b * capacity + t) as u32))
            })
            .unzip();
        let mut kv = KvCache {
            keys: Vec::with_capacity(cache.layers.len()),
            values: Vec::with_capacity(cache.layers.len()),
            capacity,
            lengths: batch.lengths.clone(),
        };
        for layer in &cache.layers {
            for (saved, store) in [(&layer.k, &mut kv.keys), (&layer.v, &mut kv.values)] {
                let shape = [batch.size() * capacity, width];
                let mut t = Tensor::zeros_on(&shape, saved.dtype(), saved.device())?;
                be.embedding_backward(&be.embedding(saved, &real)?, &rows, &mut t)?;
                store.push(t);
            }
        }
        let last: Vec<u32> = batch
            .lengths
            .iter()
            .enumerate()
            .map(|(b, &len)| (b * batch.seq + len as usize - 1) as u32)
            .collect();
        let logits = self.logits(be, params, &be.embedding(&hidden, &last)?)?;
        Ok((logits, kv))
    }

    /// One token per sequence at its next position; returns the logits `[batch, vocab]` after it.
    pub fn decode_step(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        cache: &mut KvCache,
        tokens: &[u32],
        prompts: Option<&DeepPrompts>,
    ) -> Result<Tensor> {
        let _range = trace::range("decode step");
        let c = &self.config;
        let batch = cache.lengths.len();
        if tokens.len() != batch {
            bail!(
                "decode step: {} tokens for a batch of {batch}",
                tokens.len()
            );
        }
        if let Some(b) = cache
            .lengths
            .iter()
            .position(|&l| l as usize >= cache.capacity)
        {
            bail!(
                "decode step: sequence {b} has filled its KV cache of {} positions",
                cache.capacity
            );
        }
        let positions = cache.lengths.clone();
        let rows: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(b, &p)| (b * cache.capacity) as u32 + p)
            .collect();
        let shape = CausalShape {
            batch,
            q_len: 1,
            kv_len: cache.capacity,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
        };
        let mut x = be.embedding(&params[self.embed], tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let _range = trace::range(format_args!("decoder layer {l}"));
            let (h1, _) = be.rms_norm(&x, &params[layer.attn_norm], c.rms_norm_eps)?;
            let mut q = be.linear(&h1, &params[layer.q], None)?;
            let mut k = be.linear(&h1, &params[layer.k], None)?;
            let v = be.linear(&h1, &params[layer.v], None)?;
            be.rope(&mut q, c.num_attention_heads, &positions, &self.rope, false)?;
            be.rope(&mut k, c.num_key_value_heads, &positions, &self.rope, false)?;
            // The cache rows at these positions are still zero: the scatter-add writes them.
            be.embedding_backward(&k, &rows, &mut cache.keys[l])?;
            be.embedding_backward(&v, &rows, &mut cache.values[l])?;
            let prefix = prompts.map(|p| p.layer(l));
            let (ctx, _) = be.causal_attention(
                &q,
                &cache.keys[l],
                &cache.values[l],
                prefix,
                shape,
                &positions,
            )?;
            let x2 = be.add(&x, &be.linear(&ctx, &params[layer.o], None)?)?;
            let (h2, _) = be.rms_norm(&x2, &params[layer.mlp_norm], c.rms_norm_eps)?;
            let act = be.swiglu(
                &be.linear(&h2, &params[layer.gate], None)?,
                &be.linear(&h2, &params[layer.up], None)?,
            )?;
            x = be.add(&x2, &be.linear(&act, &params[layer.down], None)?)?;
        }
        cache.lengths.iter_mut().for_each(|l| *l += 1);
        let (out, _) = be.rms_norm(&x, &params[self.norm], c.rms_norm_eps)?;
        self.logits(be, params, &out)
    }

    /// Generates continuations of every sequence of `batch` (prompts of different lengths are fine).
    pub fn generate(
        &self,
        be: &dyn Backend,
        params: &ParamStore,
        batch: &TokenBatch,
        prompts: Option<&DeepPrompts>,
        options: &GenerateOptions,
    ) -> Result<Vec<Generated>> {
        let longest = batch.lengths.iter().max().copied().unwrap_or(0) as usize;
        let capacity = (longest + options.max_new_tokens).max(batch.seq);
        let (mut logits, mut cache) = self.prefill(be, params, batch, prompts, capacity)?;
        let mut out = vec![
            Generated {
                tokens: Vec::new(),
                stopped_at_eos: false,
            };
            batch.size()
        ];
        for step in 0..options.max_new_tokens {
            let next = be.sample(&logits, &options.sampling, step as u64)?;
            for (g, &t) in out.iter_mut().zip(&next) {
                if !g.stopped_at_eos {
                    g.tokens.push(t);
                    g.stopped_at_eos = options.stop_ids.contains(&t);
                }
            }
            if step + 1 == options.max_new_tokens || out.iter().all(|g| g.stopped_at_eos) {
                break;
            }
            // Finished sequences keep decoding (their tokens are dropped): one batched step for all.
            logits = self.decode_step(be, params, &mut cache, &next, prompts)?;
        }
        Ok(out)
    }
}
