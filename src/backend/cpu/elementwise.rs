//! Element-wise ops and column reductions: residual add, dropout, bias gradients.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::simd::{dot, simd, Real};
use super::{row_chunk, with_real};
use crate::backend::{check_same_shape, Dropout};
use crate::tensor::Tensor;

const CHUNK: usize = 16 * 1024;

pub fn add_assign(a: &mut Tensor, b: &Tensor) -> Result<()> {
    check_same_shape("add", a, b)?;
    with_real!(a.dtype(), T => {
        let bd = b.data::<T>()?;
        a.data_mut::<T>()?.par_chunks_mut(CHUNK).zip(bd.par_chunks(CHUNK)).for_each(|(ac, bc)| {
            simd!({
                for (x, &y) in ac.iter_mut().zip(bc) {
                    *x += y;
                }
            })
        });
    });
    Ok(())
}

/// Σ x², per fixed chunk in the element type and then added in order in f64 (reproducible).
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    with_real!(x.dtype(), T => {
        let partials: Vec<f64> = x.data::<T>()?.par_chunks(CHUNK).map(|c| simd!(dot(c, c).to_f64())).collect();
        Ok(partials.iter().sum())
    })
}

pub fn scale(x: &mut Tensor, factor: f32) -> Result<()> {
    with_real!(x.dtype(), T => {
        let f = T::from_f64(factor as f64);
        x.data_mut::<T>()?.par_chunks_mut(CHUNK).for_each(|c| simd!(c.iter_mut().for_each(|v| *v *= f)));
    });
    Ok(())
}

pub fn dropout(x: Tensor, d: Dropout) -> Result<Tensor> {
    let mut y = x;
    if !d.is_active() {
        return Ok(y);
    }
    with_real!(y.dtype(), T => {
        y.data_mut::<T>()?.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let base = (c * CHUNK) as u64;
            for (i, v) in chunk.iter_mut().enumerate() {
                *v *= T::from_f64(d.factor(base + i as u64));
            }
        });
    });
    Ok(y)
}

/// `out += Σ_rows x` for `x [rows, cols]`, `out [cols]`. Rows are summed in fixed chunks whose partial
/// sums are then added in order, so the result does not depend on the thread count.
pub fn column_sums_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    let (rows, cols) = x.rows_cols();
    ensure!(
        out.shape() == [cols],
        "column sum: output is {:?}, expected [{cols}]",
        out.shape()
    );
    with_real!(x.dtype(), T => {
        let xd = x.data::<T>()?;
        let partials = column_partials(rows, cols, #[inline(always)] |r0, r1, acc: &mut [T]| {
            for row in xd[r0 * cols..r1 * cols].chunks_exact(cols) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
        });
        add_partials(out.data_mut::<T>()?, &partials, cols);
    });
    Ok(())
}

/// Runs `accumulate(first_row, end_row, acc)` over fixed row chunks in parallel, each into its own
/// zeroed `[width]` accumulator (compiled for the best SIMD level), and returns the accumulators.
pub(crate) fn column_partials<T: Real>(
    rows: usize,
    width: usize,
    accumulate: impl Fn(usize, usize, &mut [T]) + Sync,
) -> Vec<Vec<T>> {
    let chunk = row_chunk(rows, width).max(rows.div_ceil(64));
    (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::ZERO; width];
            simd!(accumulate(c * chunk, ((c + 1) * chunk).min(rows), &mut acc));
            acc
        })
        .collect()
}

/// `out += Σ partials`, in order (deterministic).
pub(crate) fn add_partials<T: Real>(out: &mut [T], partials: &[Vec<T>], width: usize) {
    for p in partials {
        for (o, &v) in out[..width].iter_mut().zip(p) {
            *o += v;
        }
    }
}
