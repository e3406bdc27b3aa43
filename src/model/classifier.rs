//! Sequence classification on top of the encoder: pool, dropout, linear head, cross-entropy.

use anyhow::Result;

use super::bert::{Batch, BertEncoder, Mode, HEAD_SITE};
use super::config::BertConfig;
use super::params::{Init, ParamId, ParamStore};
use crate::backend::{Backend, Pooling};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct SequenceClassifier {
    pub encoder: BertEncoder,
    pub pooling: Pooling,
    pub num_labels: usize,
    head: (ParamId, ParamId),
}

impl SequenceClassifier {
    /// Registers the encoder and a `classifier.weight`/`classifier.bias` head in `store`.
    pub fn register(
        config: &BertConfig,
        num_labels: usize,
        pooling: Pooling,
        store: &mut ParamStore,
    ) -> Self {
        let encoder = BertEncoder::register(config, store);
        let head = (
            store.add(
                "classifier.weight",
                &[num_labels, config.hidden_size],
                Init::Normal(config.initializer_range),
            ),
            store.add("classifier.bias", &[num_labels], Init::Zeros),
        );
        SequenceClassifier {
            encoder,
            pooling,
            num_labels,
            head,
        }
    }

    /// Logits `[batch, num_labels]`.
    pub fn logits(&self, be: &dyn Backend, p: &ParamStore, batch: &Batch) -> Result<Tensor> {
        let (hidden, _) = self.encoder.forward(be, p, batch, Mode::Eval)?;
        let pooled = be.pool(&hidden, batch.seq, &batch.lengths, self.pooling)?;
        be.linear(&pooled, &p[self.head.0], Some(&p[self.head.1]))
    }

    /// Forward and backward of the mean cross-entropy on `labels`: accumulates every parameter's
    /// gradient into `grads` and returns the loss.
    pub fn loss_and_grads(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        batch: &Batch,
        labels: &[u32],
        mode: Mode,
        grads: &mut ParamStore,
    ) -> Result<f64> {
        let (hidden, cache) = self.encoder.forward(be, p, batch, mode)?;
        let pooled = be.pool(&hidden, batch.seq, &batch.lengths, self.pooling)?;
        let head_dropout = mode.dropout(self.encoder.config.hidden_dropout_prob, HEAD_SITE);
        let dropped = be.dropout(pooled, head_dropout)?;
        let logits = be.linear(&dropped, &p[self.head.0], Some(&p[self.head.1]))?;
        let (loss, d_logits) = be.cross_entropy(&logits, labels)?;

        let (dw, db) = grads.pair_mut(self.head.0, self.head.1);
        let d_dropped = be.linear_backward(&d_logits, &dropped, &p[self.head.0], dw, Some(db))?;
        let d_pooled = be.dropout(d_dropped, head_dropout)?;
        let d_hidden = be.pool_backward(&d_pooled, batch.seq, &batch.lengths, self.pooling)?;
        self.encoder
            .backward(be, p, batch, mode, &cache, d_hidden, grads)?;
        Ok(loss)
    }
}
