//! Training: optimizer state, the learning-rate schedule, checkpoints, and the training loop.

pub mod checkpoint;
pub mod prompt_tune;
pub mod schedule;
pub mod trainer;

use anyhow::{bail, Result};

use crate::backend::{AdamW, Backend};
use crate::model::params::ParamStore;

/// AdamW moments for every parameter of a store, and the step count.
pub struct AdamWState {
    pub hp: AdamW,
    m: ParamStore,
    v: ParamStore,
    step: u64,
}

impl AdamWState {
    pub fn new(params: &ParamStore, hp: AdamW) -> AdamWState {
        AdamWState {
            hp,
            m: params.zeros_like(),
            v: params.zeros_like(),
            step: 0,
        }
    }

    /// One update of every parameter from `grads`.
    pub fn update(
        &mut self,
        be: &dyn Backend,
        params: &mut ParamStore,
        grads: &ParamStore,
    ) -> Result<()> {
        if params.len() != grads.len() {
            bail!(
                "optimizer: {} parameters but {} gradients",
                params.len(),
                grads.len()
            );
        }
        self.step += 1;
        for id in params.ids() {
            be.adamw(
                &mut params[id],
                &grads[id],
                &mut self.m[id],
                &mut self.v[id],
                &self.hp,
                self.step,
            )?;
        }
        Ok(())
    }
}
