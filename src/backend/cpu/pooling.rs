//! Sequence pooling: mean over real tokens, or the first token.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::simd::{simd, Real};
use super::with_real;
use crate::backend::Pooling;
use crate::tensor::Tensor;

fn check(x_rows: usize, seq: usize, lengths: &[u32]) -> Result<()> {
    ensure!(
        seq > 0 && x_rows == lengths.len() * seq,
        "pooling: {x_rows} rows do not hold {} sequences of {seq} positions",
        lengths.len()
    );
    ensure!(
        lengths.iter().all(|&l| l >= 1 && l as usize <= seq),
        "pooling: every length must be in 1..={seq}, got {lengths:?}"
    );
    Ok(())
}

pub fn pool(x: &Tensor, seq: usize, lengths: &[u32], pooling: Pooling) -> Result<Tensor> {
    let (rows, hidden) = x.rows_cols();
    check(rows, seq, lengths)?;
    let mut out = Tensor::zeros(&[lengths.len(), hidden], x.dtype());
    with_real!(x.dtype(), T => {
        let xd = x.data::<T>()?;
        out.data_mut::<T>()?.par_chunks_mut(hidden).enumerate().for_each(|(b, o)| {
            let first = &xd[b * seq * hidden..];
            match pooling {
                Pooling::Cls => o.copy_from_slice(&first[..hidden]),
                Pooling::Mean => simd!({
                    let len = lengths[b] as usize;
                    for row in first[..len * hidden].chunks_exact(hidden) {
                        for (a, &v) in o.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    let inv = T::ONE / T::from_f64(len as f64);
                    o.iter_mut().for_each(|a| *a *= inv);
                }),
            }
        });
    });
    Ok(out)
}

pub fn pool_backward(dy: &Tensor, seq: usize, lengths: &[u32], pooling: Pooling) -> Result<Tensor> {
    let (batch, hidden) = dy.rows_cols();
    ensure!(
        batch == lengths.len(),
        "pooling backward: dy has {batch} rows for {} sequences",
        lengths.len()
    );
    check(batch * seq, seq, lengths)?;
    let mut dx = Tensor::zeros(&[batch * seq, hidden], dy.dtype());
    with_real!(dy.dtype(), T => {
        let dyd = dy.data::<T>()?;
        dx.data_mut::<T>()?.par_chunks_mut(seq * hidden).enumerate().for_each(|(b, block)| {
            let g = &dyd[b * hidden..(b + 1) * hidden];
            let (used, scale) = match pooling {
                Pooling::Cls => (1, T::ONE),
                Pooling::Mean => (lengths[b] as usize, T::ONE / T::from_f64(lengths[b] as f64)),
            };
            // Padded positions keep a zero gradient.
            for row in block[..used * hidden].chunks_exact_mut(hidden) {
                for (d, &v) in row.iter_mut().zip(g) {
                    *d = v * scale;
                }
            }
        });
    });
    Ok(dx)
}
