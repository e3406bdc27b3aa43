//! Layer norm (forward, backward) and row L2 normalisation.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::elementwise::{add_partials, column_partials};
use super::simd::{dot, simd, sum, Real, SendPtr};
use super::{row_chunk, with_real};
use crate::backend::NormStats;
use crate::tensor::Tensor;

fn check_affine(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = x.rows_cols();
    ensure!(
        gamma.shape() == [cols] && beta.shape() == [cols],
        "layer norm: input has {cols} features but gamma is {:?} and beta {:?}",
        gamma.shape(),
        beta.shape()
    );
    Ok((rows, cols))
}

pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, NormStats)> {
    let (rows, cols) = check_affine(x, gamma, beta)?;
    let mut y = x.zeros_like();
    let mut mean = Tensor::zeros(&[rows], x.dtype());
    let mut rstd = Tensor::zeros(&[rows], x.dtype());
    with_real!(x.dtype(), T => {
        let (xd, g, b) = (x.data::<T>()?, gamma.data::<T>()?, beta.data::<T>()?);
        let n = T::from_f64(cols as f64);
        let eps = T::from_f64(eps as f64);
        let chunk = row_chunk(rows, cols);
        y.data_mut::<T>()?
            .par_chunks_mut(chunk * cols)
            .zip(mean.data_mut::<T>()?.par_chunks_mut(chunk))
            .zip(rstd.data_mut::<T>()?.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, ((yc, mc), rc))| {
                simd!({
                    for (r, yr) in yc.chunks_exact_mut(cols).enumerate() {
                        let xr = &xd[(c * chunk + r) * cols..][..cols];
                        let mu = sum(xr) / n;
                        // Two passes (centre, then square) keep the variance exact for large means.
                        for (o, &v) in yr.iter_mut().zip(xr) {
                            *o = v - mu;
                        }
                        let rs = T::ONE / (dot(yr, yr) / n + eps).sqrt();
                        for ((o, &gi), &bi) in yr.iter_mut().zip(g).zip(b) {
                            *o = *o * rs * gi + bi;
                        }
                        mc[r] = mu;
                        rc[r] = rs;
                    }
                })
            });
    });
    Ok((y, NormStats { mean, rstd }))
}

pub fn layer_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    stats: &NormStats,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<Tensor> {
    let (rows, cols) = check_affine(x, gamma, dgamma)?;
    ensure!(
        dy.shape() == x.shape(),
        "layer norm backward: dy is {:?}, x is {:?}",
        dy.shape(),
        x.shape()
    );
    ensure!(
        dbeta.shape() == [cols],
        "layer norm backward: dbeta is {:?}, expected [{cols}]",
        dbeta.shape()
    );
    let mut dx = x.zeros_like();
    with_real!(x.dtype(), T => {
        let (dyd, xd, g) = (dy.data::<T>()?, x.data::<T>()?, gamma.data::<T>()?);
        let (mean, rstd) = (stats.mean.data::<T>()?, stats.rstd.data::<T>()?);
        let dxp = SendPtr(dx.data_mut::<T>()?.as_mut_ptr());
        let n = T::from_f64(cols as f64);
        // One pass per row: dx, and the row's share of dgamma (first half of acc) and dbeta (second half).
        let partials = column_partials(rows, 2 * cols, #[inline(always)] |r0, r1, acc: &mut [T]| {
            let mut xhat = vec![T::ZERO; cols];
            let mut dxhat = vec![T::ZERO; cols];
            for r in r0..r1 {
                let (xr, dyr) = (&xd[r * cols..][..cols], &dyd[r * cols..][..cols]);
                let (mu, rs) = (mean[r], rstd[r]);
                for (((xh, dxh), (&xv, &dyv)), &gv) in xhat.iter_mut().zip(dxhat.iter_mut()).zip(xr.iter().zip(dyr)).zip(g) {
                    *xh = (xv - mu) * rs;
                    *dxh = dyv * gv;
                }
                let c1 = dot(&dxhat, &xhat) / n;
                let c2 = sum(&dxhat) / n;
                // SAFETY: each row r is written by exactly one chunk.
                let dxr = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(r * cols), cols) };
                for ((d, &dxh), &xh) in dxr.iter_mut().zip(&dxhat).zip(&xhat) {
                    *d = rs * (dxh - c2 - xh * c1);
                }
                let (dg, db) = acc.split_at_mut(cols);
                for (((dgi, dbi), &dyv), &xh) in dg.iter_mut().zip(db.iter_mut()).zip(dyr).zip(&xhat) {
                    *dgi += dyv * xh;
                    *dbi += dyv;
                }
            }
        });
        let mut both = vec![T::ZERO; 2 * cols];
        add_partials(&mut both, &partials, 2 * cols);
        for (o, &v) in dgamma.data_mut::<T>()?.iter_mut().zip(&both[..cols]) {
            *o += v;
        }
        for (o, &v) in dbeta.data_mut::<T>()?.iter_mut().zip(&both[cols..]) {
            *o += v;
        }
    });
    Ok(dx)
}

pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let (_, cols) = x.rows_cols();
    let mut y = x.clone();
    with_real!(x.dtype(), T => {
        y.data_mut::<T>()?.par_chunks_mut(cols).for_each(|row| {
            // Same guard as torch.nn.functional.normalize: a zero row stays zero.
            let norm = dot(row, row).sqrt().max(T::from_f64(1e-12));
            for v in row.iter_mut() {
                *v /= norm;
            }
        });
    });
    Ok(y)
}
