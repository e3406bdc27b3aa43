//! Prompt tuning (P-tuning v2, methods §2.3): the LM's weights stay frozen and only the deep prompts
//! learn, by the shifted next-token loss on texts. No weight gradient is ever computed.

use anyhow::{bail, Result};

use super::AdamWState;
use crate::backend::{AdamW, Backend};
use crate::model::llama::{next_token_targets, Llama, TokenBatch};
use crate::model::params::{ParamStore, Rng};
use crate::model::prompts::DeepPrompts;

/// Settings of a prompt-tuning run.
#[derive(Clone, Debug)]
pub struct PromptTuning {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub seed: u64,
}

/// Mean LM loss of `sequences` (token ids, each ≥ 2 tokens) with the prompts, in batches.
pub fn mean_loss(
    be: &dyn Backend,
    model: &Llama,
    params: &ParamStore,
    prompts: &DeepPrompts,
    sequences: &[Vec<u32>],
    batch_size: usize,
) -> Result<f64> {
    let (mut total, mut tokens) = (0.0, 0usize);
    for chunk in sequences.chunks(batch_size.max(1)) {
        let batch = TokenBatch::from_sequences(chunk, 0)?;
        let targets = next_token_targets(&batch);
        let (hidden, _) = model.forward(be, params, &batch, Some(prompts))?;
        let (loss, _) = model.lm_loss(be, params, &hidden, &targets, None)?;
        let n = chunk.iter().map(|s| s.len() - 1).sum::<usize>();
        total += loss * n as f64;
        tokens += n;
    }
    Ok(total / tokens as f64)
}

/// Trains `prompts` on `sequences` for `settings.steps` AdamW updates (batches drawn by a seeded
/// shuffle, reshuffled each pass); `on_step(step, loss)` reports progress. Returns each step's loss.
pub fn tune(
    be: &dyn Backend,
    model: &Llama,
    params: &ParamStore,
    prompts: &mut DeepPrompts,
    sequences: &[Vec<u32>],
    settings: &PromptTuning,
    mut on_step: impl FnMut(usize, f64),
) -> Result<Vec<f64>> {
    if sequences.is_empty() {
        bail!("prompt tuning: no text of at least two tokens to learn from");
    }
    if let Some(s) = sequences.iter().find(|s| s.len() < 2) {
        bail!(
            "prompt tuning: a sequence of {} token(s) has nothing to predict",
            s.len()
        );
    }
    let hp = AdamW {
        lr: settings.lr,
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let mut opt = AdamWState::new(&prompts.store, hp);
    let mut rng = Rng::new(settings.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut losses = Vec::with_capacity(settings.steps);
    for step in 0..settings.steps {
        let _range = crate::trace::range(format_args!("prompt-tune step {}", step + 1));
        if order.len() < settings.batch_size {
            let mut pass: Vec<usize> = (0..sequences.len()).collect();
            rng.shuffle(&mut pass);
            order.extend(pass);
        }
        let picked: Vec<Vec<u32>> = order
            .drain(..settings.batch_size.min(order.len()))
            .map(|i| sequences[i].clone())
            .collect();
        let batch = TokenBatch::from_sequences(&picked, 0)?;
        let targets = next_token_targets(&batch);
        let (hidden, cache) = model.forward(be, params, &batch, Some(prompts))?;
        let (loss, d_hidden) = model.lm_loss(be, params, &hidden, &targets, None)?;
        if !loss.is_finite() {
            bail!("prompt tuning: the loss is {loss} at step {}", step + 1);
        }
        let layer_grads = model
            .backward(be, params, cache, &d_hidden, Some(prompts), None)?
            .expect("the forward had prompts");
        let mut grads = prompts.store.zeros_like();
        prompts.accumulate(&mut grads, &layer_grads, be)?;
        opt.update(be, &mut prompts.store, &grads)?;
        losses.push(loss);
        on_step(step + 1, loss);
    }
    Ok(losses)
}
