//! The BERT encoder: embeddings (word + position + token type, layer norm, dropout) and post-norm
//! transformer layers, each with an explicit forward that keeps what its backward needs.
//!
//! Batches arrive right-padded (`[batch * seq]` ids), but inside the encoder every per-token op
//! (embeddings, projections, layer norms, GELU, residuals) runs on the real tokens only, packed
//! `[tokens, hidden]`: with sentences of mixed lengths that skips most of the work (uci-sentiment's
//! batches are ~60% padding). Only attention sees the padded layout, where its key mask applies; rows
//! move between the two with a row gather and its scatter (the embedding ops).

use anyhow::Result;

use super::config::BertConfig;
use super::params::{Init, ParamId, ParamStore};
use crate::backend::{AttnShape, Backend, Dropout, NormStats};
use crate::tensor::Tensor;
use crate::trace;

/// A tokenised batch, right-padded to its longest sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[batch * seq]` token ids (padding = the pad id).
    pub ids: Vec<u32>,
    /// `[batch * seq]` segment ids.
    pub type_ids: Vec<u32>,
    /// Real tokens per sequence (each ≥ 1).
    pub lengths: Vec<u32>,
    pub seq: usize,
}

impl Batch {
    pub fn size(&self) -> usize {
        self.lengths.len()
    }

    /// Position ids: 0, 1, … within each sequence.
    pub fn positions(&self) -> Vec<u32> {
        (0..self.ids.len()).map(|i| (i % self.seq) as u32).collect()
    }

    /// The padded row of each real token, in order: packed row `i` is padded row `real_rows()[i]`.
    pub fn real_rows(&self) -> Vec<u32> {
        let seq = self.seq as u32;
        self.lengths
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| (0..len).map(move |t| b as u32 * seq + t))
            .collect()
    }

    /// Number of real (unpadded) tokens.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().map(|&l| l as usize).sum()
    }
}

/// Training (dropout on, drawn from `seed`) or evaluation (dropout off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

impl Mode {
    /// The dropout of one site (its tag is unique within the model).
    pub fn dropout(self, p: f32, tag: u64) -> Dropout {
        match self {
            Mode::Eval => Dropout::OFF,
            Mode::Train { seed } => Dropout::site(p, seed, tag),
        }
    }
}

/// Dropout site tags: per layer 3 sites; the embeddings and heads use tags past every layer's.
const SITES_PER_LAYER: u64 = 3;
pub(crate) const EMBEDDING_SITE: u64 = 1 << 32;
pub(crate) const HEAD_SITE: u64 = (1 << 32) + 1;

#[derive(Clone, Debug)]
struct EmbeddingIds {
    word: ParamId,
    position: ParamId,
    token_type: ParamId,
    ln_gamma: ParamId,
    ln_beta: ParamId,
}

#[derive(Clone, Debug)]
struct LayerIds {
    query: (ParamId, ParamId),
    key: (ParamId, ParamId),
    value: (ParamId, ParamId),
    attn_out: (ParamId, ParamId),
    attn_ln: (ParamId, ParamId),
    intermediate: (ParamId, ParamId),
    output: (ParamId, ParamId),
    output_ln: (ParamId, ParamId),
}

/// Where the encoder's parameters live in a [`ParamStore`], registered under Hugging Face names.
#[derive(Clone, Debug)]
pub struct BertEncoder {
    pub config: BertConfig,
    embeddings: EmbeddingIds,
    layers: Vec<LayerIds>,
}

/// What the encoder forward keeps for its backward.
pub struct EncoderCache {
    /// Padded row of each packed row.
    rows: Vec<u32>,
    emb_sum: Tensor,
    emb_stats: NormStats,
    layers: Vec<LayerCache>,
}

/// Per layer; `q`, `k`, `v` and `probs` are in the padded layout attention uses, the rest packed.
struct LayerCache {
    input: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    context: Tensor,
    attn_residual: Tensor,
    attn_stats: NormStats,
    attn_normed: Tensor,
    inter_pre: Tensor,
    inter: Tensor,
    out_residual: Tensor,
    out_stats: NormStats,
}

impl BertEncoder {
    /// Registers every encoder parameter in `store` (names without a `bert.` prefix, as
    /// sentence-transformers saves them).
    pub fn register(config: &BertConfig, store: &mut ParamStore) -> BertEncoder {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let normal = Init::Normal(config.initializer_range);
        let linear = |store: &mut ParamStore, name: &str, out: usize, inp: usize| {
            (
                store.add(format!("{name}.weight"), &[out, inp], normal),
                store.add(format!("{name}.bias"), &[out], Init::Zeros),
            )
        };
        let norm = |store: &mut ParamStore, name: &str| {
            (
                store.add(format!("{name}.weight"), &[h], Init::Ones),
                store.add(format!("{name}.bias"), &[h], Init::Zeros),
            )
        };
        let embeddings = EmbeddingIds {
            word: store.add(
                "embeddings.word_embeddings.weight",
                &[config.vocab_size, h],
                normal,
            ),
            position: store.add(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
                normal,
            ),
            token_type: store.add(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
                normal,
            ),
            ln_gamma: store.add("embeddings.LayerNorm.weight", &[h], Init::Ones),
            ln_beta: store.add("embeddings.LayerNorm.bias", &[h], Init::Zeros),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                LayerIds {
                    query: linear(store, &format!("{p}.attention.self.query"), h, h),
                    key: linear(store, &format!("{p}.attention.self.key"), h, h),
                    value: linear(store, &format!("{p}.attention.self.value"), h, h),
                    attn_out: linear(store, &format!("{p}.attention.output.dense"), h, h),
                    attn_ln: norm(store, &format!("{p}.attention.output.LayerNorm")),
                    intermediate: linear(store, &format!("{p}.intermediate.dense"), i, h),
                    output: linear(store, &format!("{p}.output.dense"), h, i),
                    output_ln: norm(store, &format!("{p}.output.LayerNorm")),
                }
            })
            .collect();
        BertEncoder {
            config: config.clone(),
            embeddings,
            layers,
        }
    }

    fn attn_shape(&self, batch: &Batch) -> AttnShape {
        AttnShape {
            batch: batch.size(),
            seq: batch.seq,
            heads: self.config.num_attention_heads,
        }
    }

    /// Last hidden state `[batch * seq, hidden]` (rows of padded positions hold unused values).
    pub fn forward(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(Tensor, EncoderCache)> {
        let c = &self.config;
        anyhow::ensure!(
            batch.seq <= c.max_position_embeddings,
            "a sequence of {} tokens is longer than the model's {} positions",
            batch.seq,
            c.max_position_embeddings
        );
        let e = &self.embeddings;
        let rows = batch.real_rows();
        let pick = |v: &[u32]| rows.iter().map(|&r| v[r as usize]).collect::<Vec<u32>>();
        let mut emb_sum = be.embedding(&p[e.word], &pick(&batch.ids))?;
        be.add_assign(
            &mut emb_sum,
            &be.embedding(&p[e.position], &pick(&batch.positions()))?,
        )?;
        be.add_assign(
            &mut emb_sum,
            &be.embedding(&p[e.token_type], &pick(&batch.type_ids))?,
        )?;
        let (normed, emb_stats) =
            be.layer_norm(&emb_sum, &p[e.ln_gamma], &p[e.ln_beta], c.layer_norm_eps)?;
        let mut x = be.dropout(normed, mode.dropout(c.hidden_dropout_prob, EMBEDDING_SITE))?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, ids) in self.layers.iter().enumerate() {
            let _range = trace::range(format_args!("encoder layer {l}"));
            let (y, cache) = self.layer_forward(be, p, ids, l, x, batch, &rows, mode)?;
            layers.push(cache);
            x = y;
        }
        let hidden = to_padded(be, x, &rows, batch.ids.len())?;
        Ok((
            hidden,
            EncoderCache {
                rows,
                emb_sum,
                emb_stats,
                layers,
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        ids: &LayerIds,
        l: usize,
        input: Tensor,
        batch: &Batch,
        rows: &[u32],
        mode: Mode,
    ) -> Result<(Tensor, LayerCache)> {
        let c = &self.config;
        let [attn_site, attn_out_site, out_site] = sites(l);
        let lin = |x: &Tensor, (w, b): (ParamId, ParamId)| be.linear(x, &p[w], Some(&p[b]));
        // Attention works on the padded layout (its mask skips padded keys).
        let padded = |ids| to_padded(be, lin(&input, ids)?, rows, batch.ids.len());
        let (q, k, v) = (padded(ids.query)?, padded(ids.key)?, padded(ids.value)?);
        let attn_dropout = mode.dropout(c.attention_probs_dropout_prob, attn_site);
        let (context, probs) = be.attention(
            &q,
            &k,
            &v,
            self.attn_shape(batch),
            &batch.lengths,
            attn_dropout,
        )?;
        let context = to_packed(be, context, rows)?;
        let mut attn_residual = be.dropout(
            lin(&context, ids.attn_out)?,
            mode.dropout(c.hidden_dropout_prob, attn_out_site),
        )?;
        be.add_assign(&mut attn_residual, &input)?;
        let (attn_normed, attn_stats) = be.layer_norm(
            &attn_residual,
            &p[ids.attn_ln.0],
            &p[ids.attn_ln.1],
            c.layer_norm_eps,
        )?;
        let inter_pre = lin(&attn_normed, ids.intermediate)?;
        let inter = be.gelu(&inter_pre)?;
        let mut out_residual = be.dropout(
            lin(&inter, ids.output)?,
            mode.dropout(c.hidden_dropout_prob, out_site),
        )?;
        be.add_assign(&mut out_residual, &attn_normed)?;
        let (y, out_stats) = be.layer_norm(
            &out_residual,
            &p[ids.output_ln.0],
            &p[ids.output_ln.1],
            c.layer_norm_eps,
        )?;
        let cache = LayerCache {
            input,
            q,
            k,
            v,
            probs,
            context,
            attn_residual,
            attn_stats,
            attn_normed,
            inter_pre,
            inter,
            out_residual,
            out_stats,
        };
        Ok((y, cache))
    }

    /// Accumulates every encoder parameter's gradient into `grads`, given `d_hidden`, the gradient of the
    /// loss with respect to the last hidden state.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        batch: &Batch,
        mode: Mode,
        cache: &EncoderCache,
        d_hidden: Tensor,
        grads: &mut ParamStore,
    ) -> Result<()> {
        let c = &self.config;
        let rows = &cache.rows;
        // Gradients of padded positions are dropped: nothing real depends on them.
        let mut dx = to_packed(be, d_hidden, rows)?;
        for (l, (ids, lc)) in self.layers.iter().zip(&cache.layers).enumerate().rev() {
            let _range = trace::range(format_args!("encoder layer {l} backward"));
            dx = self.layer_backward(be, p, ids, l, lc, dx, batch, rows, mode, grads)?;
        }
        let e = &self.embeddings;
        let d_normed = be.dropout(dx, mode.dropout(c.hidden_dropout_prob, EMBEDDING_SITE))?;
        let (dg, db) = grads.pair_mut(e.ln_gamma, e.ln_beta);
        let d_sum = be.layer_norm_backward(
            &d_normed,
            &cache.emb_sum,
            &p[e.ln_gamma],
            &cache.emb_stats,
            dg,
            db,
        )?;
        let pick = |v: &[u32]| rows.iter().map(|&r| v[r as usize]).collect::<Vec<u32>>();
        be.embedding_backward(&d_sum, &pick(&batch.ids), &mut grads[e.word])?;
        be.embedding_backward(&d_sum, &pick(&batch.positions()), &mut grads[e.position])?;
        be.embedding_backward(&d_sum, &pick(&batch.type_ids), &mut grads[e.token_type])?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        ids: &LayerIds,
        l: usize,
        lc: &LayerCache,
        dy: Tensor,
        batch: &Batch,
        rows: &[u32],
        mode: Mode,
        grads: &mut ParamStore,
    ) -> Result<Tensor> {
        let c = &self.config;
        let [attn_site, attn_out_site, out_site] = sites(l);
        let lin_back =
            |grads: &mut ParamStore, dy: &Tensor, x: &Tensor, (w, b): (ParamId, ParamId)| {
                let (dw, db) = grads.pair_mut(w, b);
                be.linear_backward(dy, x, &p[w], dw, Some(db))
            };
        let norm_back = |grads: &mut ParamStore,
                         dy: &Tensor,
                         x: &Tensor,
                         stats: &NormStats,
                         (g, b): (ParamId, ParamId)| {
            let (dg, db) = grads.pair_mut(g, b);
            be.layer_norm_backward(dy, x, &p[g], stats, dg, db)
        };

        let d_out_residual = norm_back(grads, &dy, &lc.out_residual, &lc.out_stats, ids.output_ln)?;
        let d_out = be.dropout(
            d_out_residual.clone(),
            mode.dropout(c.hidden_dropout_prob, out_site),
        )?;
        let d_inter = lin_back(grads, &d_out, &lc.inter, ids.output)?;
        let d_inter_pre = be.gelu_backward(&lc.inter_pre, &d_inter)?;
        let mut d_attn_normed = lin_back(grads, &d_inter_pre, &lc.attn_normed, ids.intermediate)?;
        be.add_assign(&mut d_attn_normed, &d_out_residual)?;

        let d_attn_residual = norm_back(
            grads,
            &d_attn_normed,
            &lc.attn_residual,
            &lc.attn_stats,
            ids.attn_ln,
        )?;
        let d_attn_out = be.dropout(
            d_attn_residual.clone(),
            mode.dropout(c.hidden_dropout_prob, attn_out_site),
        )?;
        let d_context = lin_back(grads, &d_attn_out, &lc.context, ids.attn_out)?;
        let attn_dropout = mode.dropout(c.attention_probs_dropout_prob, attn_site);
        let d_context = to_padded(be, d_context, rows, batch.ids.len())?;
        let (dq, dk, dv) = be.attention_backward(
            &d_context,
            &lc.q,
            &lc.k,
            &lc.v,
            &lc.probs,
            self.attn_shape(batch),
            &batch.lengths,
            attn_dropout,
        )?;
        let (dq, dk, dv) = (
            to_packed(be, dq, rows)?,
            to_packed(be, dk, rows)?,
            to_packed(be, dv, rows)?,
        );
        let mut dx = lin_back(grads, &dq, &lc.input, ids.query)?;
        be.add_assign(&mut dx, &lin_back(grads, &dk, &lc.input, ids.key)?)?;
        be.add_assign(&mut dx, &lin_back(grads, &dv, &lc.input, ids.value)?)?;
        be.add_assign(&mut dx, &d_attn_residual)?;
        Ok(dx)
    }
}

/// Packed rows `[tokens, width]` placed at their padded rows of a zeroed `[padded_rows, width]` (the
/// backward of the row gather `Backend::embedding` performs). A batch without padding passes through.
fn to_padded(be: &dyn Backend, packed: Tensor, rows: &[u32], padded_rows: usize) -> Result<Tensor> {
    if rows.len() == padded_rows {
        return Ok(packed);
    }
    let (_, width) = packed.rows_cols();
    let mut out = Tensor::zeros_on(&[padded_rows, width], packed.dtype(), packed.device())?;
    be.embedding_backward(&packed, rows, &mut out)?;
    Ok(out)
}

/// The real rows of a padded tensor, packed; a batch without padding passes through.
fn to_packed(be: &dyn Backend, padded: Tensor, rows: &[u32]) -> Result<Tensor> {
    if rows.len() == padded.rows_cols().0 {
        return Ok(padded);
    }
    be.embedding(&padded, rows)
}

fn sites(layer: usize) -> [u64; 3] {
    let base = layer as u64 * SITES_PER_LAYER;
    [base, base + 1, base + 2]
}
