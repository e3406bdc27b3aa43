//! Losses fused with their gradient: cross-entropy against hard labels, and the Hinton distillation
//! loss (soft targets at a temperature mixed with the hard-label cross-entropy).

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::simd::{exp_shifted_sum, max, simd, Real};
use super::with_real;
use crate::backend::check_same_shape;
use crate::tensor::Tensor;

/// Mean over rows of `−log softmax(z)[label]`; the gradient is `(softmax(z) − onehot) / rows`.
/// Log-sum-exp with the row max subtracted, so any logit magnitude is safe.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<(f64, Tensor)> {
    let (rows, classes) = logits.rows_cols();
    ensure!(
        labels.len() == rows,
        "cross-entropy: {} labels for {rows} rows of logits",
        labels.len()
    );
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        bail!("cross-entropy: label {l} of row {i} is out of range for {classes} classes");
    }
    let mut grad = logits.zeros_like();
    let losses: Vec<f64> = with_real!(logits.dtype(), T => {
        let zd = logits.data::<T>()?;
        let inv_rows = T::from_f64(1.0 / rows as f64);
        grad.data_mut::<T>()?
            .par_chunks_mut(classes)
            .enumerate()
            .map(|(r, g)| {
                simd!({
                    let z = &zd[r * classes..(r + 1) * classes];
                    g.copy_from_slice(z);
                    let m = max(z);
                    let total = exp_shifted_sum(g, m);
                    let label = labels[r] as usize;
                    let loss = (total.ln() + m - z[label]).to_f64();
                    let scale = inv_rows / total;
                    g.iter_mut().for_each(|p| *p *= scale);
                    g[label] -= inv_rows;
                    loss
                })
            })
            .collect()
    });
    let mean = losses.iter().sum::<f64>() / rows as f64;
    Ok((mean, grad))
}

/// `(1−α)·CE(y, softmax(s)) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`, averaged over rows, with its
/// gradient with respect to the student logits `s`:
/// `((1−α)(softmax(s) − onehot) + α·τ·(softmax(s/τ) − softmax(t/τ))) / rows`. One pass per row.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &[u32],
    alpha: f32,
    temperature: f32,
) -> Result<(f64, Tensor)> {
    check_same_shape("distillation loss", student, teacher)?;
    let (rows, classes) = student.rows_cols();
    ensure!(
        labels.len() == rows,
        "distillation loss: {} labels for {rows} rows of logits",
        labels.len()
    );
    ensure!(
        (0.0..=1.0).contains(&alpha),
        "distillation loss: alpha {alpha} is not in [0, 1]"
    );
    ensure!(
        temperature > 0.0,
        "distillation loss: temperature {temperature} must be positive"
    );
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        bail!("distillation loss: label {l} of row {i} is out of range for {classes} classes");
    }
    let mut grad = student.zeros_like();
    let losses: Vec<f64> = with_real!(student.dtype(), T => {
        let (sd, td) = (student.data::<T>()?, teacher.data::<T>()?);
        let (a, tau) = (T::from_f64(alpha as f64), T::from_f64(temperature as f64));
        let inv_tau = T::ONE / tau;
        let inv_rows = T::from_f64(1.0 / rows as f64);
        grad.data_mut::<T>()?
            .par_chunks_mut(classes)
            .enumerate()
            .map(|(r, g)| {
                let (s, t) = (&sd[r * classes..(r + 1) * classes], &td[r * classes..(r + 1) * classes]);
                let label = labels[r] as usize;
                let mut soft_s = vec![T::ZERO; classes];
                let mut soft_t = vec![T::ZERO; classes];
                simd!({
                    // Hard part: softmax(s) into g.
                    g.copy_from_slice(s);
                    let ms = max(s);
                    let zs = exp_shifted_sum(g, ms);
                    let ce = zs.ln() + ms - s[label];
                    let inv_zs = T::ONE / zs;
                    g.iter_mut().for_each(|p| *p *= inv_zs);
                    // Soft part: log-softmax of s/τ and t/τ.
                    for ((a_, b_), (&sv, &tv)) in soft_s.iter_mut().zip(soft_t.iter_mut()).zip(s.iter().zip(t)) {
                        *a_ = sv * inv_tau;
                        *b_ = tv * inv_tau;
                    }
                    let (ms_t, mt_t) = (max(&soft_s), max(&soft_t));
                    let (zs_t, zt_t) = (exp_shifted_sum(&mut soft_s, ms_t), exp_shifted_sum(&mut soft_t, mt_t));
                    let (log_zs_t, log_zt_t) = (zs_t.ln() + ms_t, zt_t.ln() + mt_t);
                    let (inv_s, inv_t) = (T::ONE / zs_t, T::ONE / zt_t);
                    // KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), log p = x/τ − log Z.
                    let mut kl = T::ZERO;
                    for c in 0..classes {
                        let (ps, pt) = (soft_s[c] * inv_s, soft_t[c] * inv_t);
                        if pt > T::ZERO {
                            kl += pt * ((t[c] - s[c]) * inv_tau - log_zt_t + log_zs_t);
                        }
                        g[c] = ((T::ONE - a) * g[c] + a * tau * (ps - pt)) * inv_rows;
                    }
                    g[label] -= (T::ONE - a) * inv_rows;
                    ((T::ONE - a) * ce + a * tau * tau * kl).to_f64()
                })
            })
            .collect()
    });
    Ok((losses.iter().sum::<f64>() / rows as f64, grad))
}
