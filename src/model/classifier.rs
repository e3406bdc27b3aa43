//! Sequence classification on top of the encoder: a pooled vector, dropout, a linear head.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::bert::{Batch, BertEncoder, EncoderCache, Mode, HEAD_SITE};
use super::config::BertConfig;
use super::params::{Init, ParamId, ParamStore};
use crate::backend::{Backend, Pooling};
use crate::tensor::Tensor;

/// How the encoder's token vectors become the vector the classifier reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// Mean over real tokens (sentence-transformers' pooling; the best choice for MiniLM).
    Mean,
    /// The [CLS] vector as is.
    Cls,
    /// BERT's pooler: tanh(dense([CLS])), exactly what `BertForSequenceClassification` computes, so an
    /// exported model predicts the same in transformers.
    Pooler,
}

impl FromStr for Head {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Head::Mean),
            "cls" => Ok(Head::Cls),
            "pooler" => Ok(Head::Pooler),
            _ => bail!("unknown head '{s}': expected mean, cls or pooler"),
        }
    }
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Head::Mean => "mean",
            Head::Cls => "cls",
            Head::Pooler => "pooler",
        })
    }
}

#[derive(Clone, Debug)]
pub struct SequenceClassifier {
    pub encoder: BertEncoder,
    pub head: Head,
    pub num_labels: usize,
    pooler: Option<(ParamId, ParamId)>,
    classifier: (ParamId, ParamId),
}

/// What the classifier forward keeps for its backward.
pub struct ClassifierCache {
    encoder: EncoderCache,
    /// The pooled vector before the pooler dense layer (pooler head only).
    cls: Option<Tensor>,
    /// The vector entering dropout (after tanh for the pooler head).
    pooled: Tensor,
    /// The vector entering the linear head.
    dropped: Tensor,
}

impl SequenceClassifier {
    /// Registers the encoder, the pooler (`pooler.dense.*`, pooler head only) and a
    /// `classifier.weight`/`classifier.bias` head in `store`.
    pub fn register(
        config: &BertConfig,
        num_labels: usize,
        head: Head,
        store: &mut ParamStore,
    ) -> Self {
        let encoder = BertEncoder::register(config, store);
        let h = config.hidden_size;
        let normal = Init::Normal(config.initializer_range);
        let pooler = (head == Head::Pooler).then(|| {
            (
                store.add("pooler.dense.weight", &[h, h], normal),
                store.add("pooler.dense.bias", &[h], Init::Zeros),
            )
        });
        let classifier = (
            store.add("classifier.weight", &[num_labels, h], normal),
            store.add("classifier.bias", &[num_labels], Init::Zeros),
        );
        SequenceClassifier {
            encoder,
            head,
            num_labels,
            pooler,
            classifier,
        }
    }

    /// Logits `[batch, num_labels]` and what the backward needs.
    pub fn forward(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(Tensor, ClassifierCache)> {
        let (hidden, encoder) = self.encoder.forward(be, p, batch, mode)?;
        let pooling = if self.head == Head::Mean {
            Pooling::Mean
        } else {
            Pooling::Cls
        };
        let vector = be.pool(&hidden, batch.seq, &batch.lengths, pooling)?;
        let (cls, pooled) = match self.pooler {
            Some((w, b)) => {
                let pooled = be.tanh(&be.linear(&vector, &p[w], Some(&p[b]))?)?;
                (Some(vector), pooled)
            }
            None => (None, vector),
        };
        let dropped = be.dropout(pooled.clone(), self.head_dropout(mode))?;
        let logits = be.linear(&dropped, &p[self.classifier.0], Some(&p[self.classifier.1]))?;
        Ok((
            logits,
            ClassifierCache {
                encoder,
                cls,
                pooled,
                dropped,
            },
        ))
    }

    /// Accumulates every parameter's gradient into `grads`, given the gradient of the loss with respect
    /// to the logits.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &dyn Backend,
        p: &ParamStore,
        batch: &Batch,
        mode: Mode,
        cache: ClassifierCache,
        d_logits: &Tensor,
        grads: &mut ParamStore,
    ) -> Result<()> {
        let (w, b) = self.classifier;
        let (dw, db) = grads.pair_mut(w, b);
        let d_dropped = be.linear_backward(d_logits, &cache.dropped, &p[w], dw, Some(db))?;
        let mut d_vector = be.dropout(d_dropped, self.head_dropout(mode))?;
        if let (Some((w, b)), Some(cls)) = (self.pooler, &cache.cls) {
            let d_pre = be.tanh_backward(&cache.pooled, &d_vector)?;
            let (dw, db) = grads.pair_mut(w, b);
            d_vector = be.linear_backward(&d_pre, cls, &p[w], dw, Some(db))?;
        }
        let pooling = if self.head == Head::Mean {
            Pooling::Mean
        } else {
            Pooling::Cls
        };
        let d_hidden = be.pool_backward(&d_vector, batch.seq, &batch.lengths, pooling)?;
        self.encoder
            .backward(be, p, batch, mode, &cache.encoder, d_hidden, grads)
    }

    fn head_dropout(&self, mode: Mode) -> crate::backend::Dropout {
        mode.dropout(self.encoder.config.hidden_dropout_prob, HEAD_SITE)
    }

    /// Logits in evaluation mode.
    pub fn logits(&self, be: &dyn Backend, p: &ParamStore, batch: &Batch) -> Result<Tensor> {
        Ok(self.forward(be, p, batch, Mode::Eval)?.0)
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
        let (logits, cache) = self.forward(be, p, batch, mode)?;
        let (loss, d_logits) = be.cross_entropy(&logits, labels)?;
        self.backward(be, p, batch, mode, cache, &d_logits, grads)?;
        Ok(loss)
    }
}
