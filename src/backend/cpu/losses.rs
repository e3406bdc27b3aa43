//! Losses fused with their gradient: cross-entropy against hard labels.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::simd::{exp_shifted_sum, max, simd, Real};
use super::with_real;
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
