//! Layer norm and RMSNorm (forward, backward), and row L2 normalisation.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::elementwise::{add_partials, column_partials};
use super::simd::{dot, simd, sum, Real, SendPtr};
use super::{row_chunk, with_real};
use crate::backend::{check_same_shape, NormStats};
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

/// Checks an RMSNorm input against its weight; returns `(rows, cols)`.
fn check_rms(op: &str, x: &Tensor, weight: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = x.rows_cols();
    if x.shape().is_empty() || cols == 0 {
        bail!("{op}: input {:?} has no features to normalise", x.shape());
    }
    if weight.shape() != [cols] {
        bail!(
            "{op}: input has {cols} features but the weight is {:?} (expected [{cols}])",
            weight.shape()
        );
    }
    if weight.dtype() != x.dtype() {
        bail!(
            "{op}: the input is {} but the weight is {}",
            x.dtype(),
            weight.dtype()
        );
    }
    Ok((rows, cols))
}

/// Hugging Face's LlamaRMSNorm: `y = x · rsqrt(mean(x²) + eps) · weight`, in the tensor's precision.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, NormStats)> {
    let (rows, cols) = check_rms("RMSNorm", x, weight)?;
    let mut y = x.zeros_like();
    let mut rstd = Tensor::zeros(&[rows], x.dtype());
    with_real!(x.dtype(), T => {
        let (xd, w) = (x.data::<T>()?, weight.data::<T>()?);
        let eps = T::from_f64(eps as f64);
        let chunk = row_chunk(rows, cols);
        y.data_mut::<T>()?
            .par_chunks_mut(chunk * cols)
            .zip(rstd.data_mut::<T>()?.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, (yc, rc))| {
                simd!({
                    for (r, yr) in yc.chunks_exact_mut(cols).enumerate() {
                        let xr = &xd[(c * chunk + r) * cols..][..cols];
                        rc[r] = rms_row(xr, w, eps, yr);
                    }
                })
            });
    });
    let mean = Tensor::zeros(&[0], x.dtype());
    Ok((y, NormStats { mean, rstd }))
}

/// One row of [`rms_norm`]: writes `y` and returns 1/rms. `(x·r)·w` in that order, as transformers
/// multiplies, so f32 results round the same way.
#[inline(always)]
fn rms_row<T: Real>(x: &[T], w: &[T], eps: T, y: &mut [T]) -> T {
    let n = T::from_f64(x.len() as f64);
    let rs = T::ONE / (dot(x, x) / n + eps).sqrt();
    for ((o, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
        *o = xv * rs * wv;
    }
    rs
}

/// Backward of [`rms_norm`]. With `g = dy ⊙ w` and `r` = 1/rms: `dx = r·(g − x·r²·⟨g, x⟩/n)`;
/// `dweight += Σ_rows dy ⊙ x·r`, only when asked.
pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    stats: &NormStats,
    dweight: Option<&mut Tensor>,
) -> Result<Tensor> {
    let op = "RMSNorm backward";
    let (rows, cols) = check_rms(op, x, weight)?;
    check_same_shape(&format!("{op} (dy vs x)"), dy, x)?;
    if stats.rstd.shape() != [rows] || stats.rstd.dtype() != x.dtype() {
        bail!(
            "{op}: the saved 1/rms is {} {:?}, expected {} [{rows}] from the forward of this input",
            stats.rstd.dtype(),
            stats.rstd.shape(),
            x.dtype()
        );
    }
    if let Some(dw) = dweight.as_deref() {
        check_rms(&format!("{op} (dweight)"), x, dw)?;
    }
    let mut dx = x.zeros_like();
    with_real!(x.dtype(), T => {
        let (dyd, xd, w, rstd) = (dy.data::<T>()?, x.data::<T>()?, weight.data::<T>()?, stats.rstd.data::<T>()?);
        let width = if dweight.is_some() { cols } else { 0 };
        // At most 64 chunks of rows, each with its own dweight partial (empty when not asked), added
        // in order afterwards: the same sums whatever the thread count.
        let chunk = row_chunk(rows, cols).max(rows.div_ceil(64));
        let partials: Vec<Vec<T>> = dx
            .data_mut::<T>()?
            .par_chunks_mut(chunk * cols)
            .enumerate()
            .map(|(c, dxc)| {
                let mut acc = vec![T::ZERO; width];
                simd!({
                    for (r, dxr) in dxc.chunks_exact_mut(cols).enumerate() {
                        let row = c * chunk + r;
                        let (xr, dyr) = (&xd[row * cols..][..cols], &dyd[row * cols..][..cols]);
                        rms_row_backward(dyr, xr, w, rstd[row], dxr, &mut acc);
                    }
                });
                acc
            })
            .collect();
        if let Some(dw) = dweight {
            add_partials(dw.data_mut::<T>()?, &partials, cols);
        }
    });
    Ok(dx)
}

/// One row of [`rms_norm_backward`]: writes `dx`, and adds `dy ⊙ x·r` into `dw` unless it is empty.
#[inline(always)]
fn rms_row_backward<T: Real>(dy: &[T], x: &[T], w: &[T], rs: T, dx: &mut [T], dw: &mut [T]) {
    let n = T::from_f64(x.len() as f64);
    for ((d, &dyv), &wv) in dx.iter_mut().zip(dy).zip(w) {
        *d = dyv * wv;
    }
    let c = dot(dx, x) / n * rs * rs;
    for (d, &xv) in dx.iter_mut().zip(x) {
        *d = rs * (*d - xv * c);
    }
    for ((a, &dyv), &xv) in dw.iter_mut().zip(dy).zip(x) {
        *a += dyv * xv * rs;
    }
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
