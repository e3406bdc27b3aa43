//! Rotary position embedding (Hugging Face's rotate-half layout) and its cos/sin table.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::simd::{simd, Real};
use super::{row_chunk, with_real};
use crate::tensor::{DType, Tensor};

/// The `[max_position, head_dim]` table [`rope`] reads: row `p` holds `cos(p·θ_i)` for `i < head_dim/2`,
/// then `sin(p·θ_i)`, with `θ_i = theta^(−2i/head_dim)`.
///
/// Tables of f32 (and of the storage dtypes, rounded from f32) are computed step by step as
/// transformers' LlamaRotaryEmbedding does: `inv_freq = 1/theta^(2i/head_dim)` in f32, then the angle
/// `p·inv_freq` rounded to f32, then its cos and sin. At large positions that rounding moves the angle by
/// up to half an f32 ulp of `p` (about 2.4e-4 near p = 8192), so a more exact table would drift away
/// from the model's own outputs. An f64 table is computed in f64 throughout.
///
/// # Panics
/// If `head_dim` is zero or odd: the rotation pairs the two halves of each head.
pub fn rope_table(max_position: usize, head_dim: usize, theta: f64, dtype: DType) -> Tensor {
    assert!(
        head_dim > 0 && head_dim.is_multiple_of(2),
        "RoPE table: head_dim {head_dim} must be even and positive (the rotation pairs its two halves)"
    );
    let half = head_dim / 2;
    macro_rules! table {
        ($T:ty) => {{
            let theta = theta as $T;
            let inv_freq: Vec<$T> = (0..half)
                .map(|i| 1.0 / theta.powf((2 * i) as $T / head_dim as $T))
                .collect();
            let mut data: Vec<$T> = vec![0.0; max_position * head_dim];
            for (p, row) in data.chunks_exact_mut(head_dim).enumerate() {
                let (cos, sin) = row.split_at_mut(half);
                for ((c, s), &f) in cos.iter_mut().zip(sin).zip(&inv_freq) {
                    let angle = p as $T * f;
                    (*c, *s) = (angle.cos(), angle.sin());
                }
            }
            Tensor::from_vec(data, &[max_position, head_dim]).expect("the data fills the shape")
        }};
    }
    match dtype {
        DType::F64 => table!(f64),
        _ => table!(f32)
            .to_dtype(dtype)
            .expect("every dtype converts from f32"),
    }
}

/// Checks the operands of [`rope`] (shared with the CUDA backend, which takes the same ones);
/// returns `(rows, head_dim)`.
pub(crate) fn check(
    x: &Tensor,
    heads: usize,
    positions: &[u32],
    table: &Tensor,
) -> Result<(usize, usize)> {
    let (rows, width) = x.rows_cols();
    if heads == 0
        || width == 0
        || !width.is_multiple_of(heads)
        || !(width / heads).is_multiple_of(2)
    {
        bail!(
            "RoPE: {width} features do not split into {heads} heads of an even, non-zero size \
             (the rotation pairs the two halves of each head)"
        );
    }
    let head_dim = width / heads;
    if positions.len() != rows {
        bail!("RoPE: {} positions for {rows} rows", positions.len());
    }
    if table.shape().len() != 2 || table.shape()[1] != head_dim {
        bail!(
            "RoPE: the table is {:?}, expected [max_position, {head_dim}] for {heads} heads of {head_dim}",
            table.shape()
        );
    }
    if table.dtype() != x.dtype() {
        bail!(
            "RoPE: the input is {} but the table is {}: build the table in the input's dtype",
            x.dtype(),
            table.dtype()
        );
    }
    let max_position = table.shape()[0];
    if let Some((r, p)) = positions
        .iter()
        .enumerate()
        .find(|(_, &p)| p as usize >= max_position)
    {
        bail!(
            "RoPE: row {r} is at position {p}, beyond the table's {max_position} positions \
             (a longer sequence needs a larger table)"
        );
    }
    Ok((rows, head_dim))
}

/// Rotates each head of each row of `x` in place by its row's position (see `Backend::rope`).
pub fn rope(
    x: &mut Tensor,
    heads: usize,
    positions: &[u32],
    table: &Tensor,
    inverse: bool,
) -> Result<()> {
    let (rows, head_dim) = check(x, heads, positions, table)?;
    let width = heads * head_dim;
    with_real!(x.dtype(), T => {
        let tab = table.data::<T>()?;
        // The inverse rotation is the same one by the negated angle: only the sines change sign.
        let sign = if inverse { -T::ONE } else { T::ONE };
        let chunk = row_chunk(rows, width);
        x.data_mut::<T>()?.par_chunks_mut(chunk * width).enumerate().for_each(|(c, xc)| {
            simd!({
                for (xr, &p) in xc.chunks_exact_mut(width).zip(&positions[c * chunk..]) {
                    let (cos, sin) = tab[p as usize * head_dim..][..head_dim].split_at(head_dim / 2);
                    for head in xr.chunks_exact_mut(head_dim) {
                        rotate(head, cos, sin, sign);
                    }
                }
            })
        });
    });
    Ok(())
}

/// `(x1, x2) ← (x1·cos − x2·sin, x2·cos + x1·sin)` over the two halves of one head, sines times `sign`.
#[inline(always)]
fn rotate<T: Real>(head: &mut [T], cos: &[T], sin: &[T], sign: T) {
    let (x1, x2) = head.split_at_mut(cos.len());
    for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
        let s = s * sign;
        (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
    }
}
