//! AdamW, in place over a parameter, its gradient and both moment buffers.

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{simd, Real};
use super::with_real;
use crate::backend::{check_same_shape, AdamW};
use crate::tensor::Tensor;

const CHUNK: usize = 16 * 1024;

/// PyTorch's `torch.optim.AdamW` update: decoupled decay `p ← p·(1 − lr·wd)`, then
/// `p ← p − (lr/(1−β1^t)) · m / (√v/√(1−β2^t) + ε)`.
pub fn adamw(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    check_same_shape("adamw (grad)", param, grad)?;
    check_same_shape("adamw (m)", param, m)?;
    check_same_shape("adamw (v)", param, v)?;
    anyhow::ensure!(step >= 1, "adamw: step counts from 1");
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    with_real!(param.dtype(), T => {
        let decay = T::from_f64(1.0 - hp.lr as f64 * hp.weight_decay as f64);
        let (b1, b2) = (T::from_f64(hp.beta1 as f64), T::from_f64(hp.beta2 as f64));
        let step_size = T::from_f64(hp.lr as f64 / bc1);
        let inv_sqrt_bc2 = T::from_f64(1.0 / bc2.sqrt());
        let eps = T::from_f64(hp.eps as f64);
        param
            .data_mut::<T>()?
            .par_chunks_mut(CHUNK)
            .zip(grad.data::<T>()?.par_chunks(CHUNK))
            .zip(m.data_mut::<T>()?.par_chunks_mut(CHUNK))
            .zip(v.data_mut::<T>()?.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                simd!({
                    for i in 0..p.len() {
                        m[i] = b1 * m[i] + (T::ONE - b1) * g[i];
                        v[i] = b2 * v[i] + (T::ONE - b2) * g[i] * g[i];
                        p[i] = p[i] * decay - step_size * m[i] / (v[i].sqrt() * inv_sqrt_bc2 + eps);
                    }
                })
            });
    });
    Ok(())
}
