//! Causal grouped-query attention for decoders, forward and backward, with an optional deep-prompt
//! prefix (P-tuning v2) and a per-sequence query offset, so one op serves prefill, prompt tuning and
//! KV-cache decoding (see [`CausalShape`]).
//!
//! As in the encoder's attention, Q/K/V stay in the projections' row-major layout and each
//! (sequence, head) is a strided view; products go through the packed gemm. Per (sequence, head) the
//! probability rows hold the `prefix` columns first, then the sequence's keys; keys past the last
//! query's position are never computed. The backward runs one task per (sequence, key/value head), so
//! the query heads sharing a key/value head add into its gradient in a fixed order, and the prefix
//! gradients (shared by the batch) are summed over sequences afterwards, in order: results do not
//! depend on the thread count.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::{gemm_strided, MatRef};
use super::simd::{dot, exp_shifted_sum, max, simd, Real, SendPtr};
use super::with_real;
use crate::backend::{CausalGrads, CausalShape, Prefix};
use crate::tensor::Tensor;

/// Sizes derived from a call, checked against the tensors.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    s: CausalShape,
    pub(crate) head_dim: usize,
    /// Prefix length (0 without one).
    pub(crate) prefix: usize,
    /// Width of a probability row: prefix + kv_len.
    pub(crate) row: usize,
}

impl Dims {
    fn q_width(&self) -> usize {
        self.s.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.s.kv_heads * self.head_dim
    }
    /// Key/value head read by query head `h`.
    fn group(&self, h: usize) -> usize {
        h / (self.s.heads / self.s.kv_heads)
    }
    /// Keys of sequence `b` any of its queries can see: up to the last query's position.
    fn live_keys(&self, q_start: &[u32], b: usize) -> usize {
        (q_start[b] as usize + self.s.q_len).min(self.s.kv_len)
    }
    /// Columns of probability row `i` of sequence `b` that are visible (prefix first).
    fn visible(&self, q_start: &[u32], b: usize, i: usize) -> usize {
        self.prefix + q_start[b] as usize + i + 1
    }
}

/// Checks a call's tensors against its shape. Shared with the CUDA backend, so both reject the same
/// calls with the same messages.
pub(crate) fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<Prefix>,
    s: CausalShape,
    q_start: &[u32],
) -> Result<Dims> {
    ensure!(
        s.heads > 0 && s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
        "causal attention: {} query heads cannot share {} key/value heads evenly",
        s.heads,
        s.kv_heads
    );
    let (q_rows, q_width) = q.rows_cols();
    ensure!(
        q_rows == s.batch * s.q_len && q_width % s.heads == 0,
        "causal attention: q is {:?}, expected [{}, heads({}) * head_dim]",
        q.shape(),
        s.batch * s.q_len,
        s.heads
    );
    let head_dim = q_width / s.heads;
    let kv_shape = [s.batch * s.kv_len, s.kv_heads * head_dim];
    ensure!(
        k.shape() == kv_shape && v.shape() == kv_shape,
        "causal attention: k is {:?} and v is {:?}, expected {kv_shape:?}",
        k.shape(),
        v.shape()
    );
    ensure!(
        q.dtype() == k.dtype() && q.dtype() == v.dtype(),
        "causal attention: q, k, v dtypes differ"
    );
    ensure!(
        q_start.len() == s.batch,
        "causal attention: {} query offsets for a batch of {}",
        q_start.len(),
        s.batch
    );
    if let Some((b, &start)) = q_start
        .iter()
        .enumerate()
        .find(|(_, &start)| start as usize + s.q_len > s.kv_len)
    {
        anyhow::bail!(
            "causal attention: sequence {b}'s queries reach position {} but only {} keys exist",
            start as usize + s.q_len - 1,
            s.kv_len
        );
    }
    let prefix_len = match prefix {
        None => 0,
        Some(p) => {
            let (rows, width) = p.keys.rows_cols();
            ensure!(
                width == s.kv_heads * head_dim && p.values.shape() == p.keys.shape(),
                "causal attention: prefix keys {:?} and values {:?} must both be [prefix, {}]",
                p.keys.shape(),
                p.values.shape(),
                s.kv_heads * head_dim
            );
            ensure!(
                p.keys.dtype() == q.dtype() && p.values.dtype() == q.dtype(),
                "causal attention: prefix dtype differs from q"
            );
            rows
        }
    };
    Ok(Dims {
        s,
        head_dim,
        prefix: prefix_len,
        row: prefix_len + s.kv_len,
    })
}

/// [`check`], and the backward's `dout` and `probs` against it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<Prefix>,
    probs: &Tensor,
    s: CausalShape,
    q_start: &[u32],
) -> Result<Dims> {
    let dims = check(q, k, v, prefix, s, q_start)?;
    ensure!(
        dout.shape() == q.shape(),
        "causal attention backward: dout is {:?}, q is {:?}",
        dout.shape(),
        q.shape()
    );
    let expected = [s.batch, s.heads, s.q_len, dims.row];
    ensure!(
        probs.shape() == expected,
        "causal attention backward: probs is {:?}, expected {expected:?}",
        probs.shape(),
    );
    Ok(dims)
}

/// A strided view of the prefix's columns for key/value head `g` (`[prefix, head_dim]`), or of its
/// transpose.
fn prefix_view<T: Real>(t: &[T], dims: Dims, g: usize, transposed: bool) -> MatRef<T> {
    let ptr = t[g * dims.head_dim..].as_ptr();
    let (rs, cs) = (dims.kv_width() as isize, 1);
    if transposed {
        MatRef {
            ptr,
            rs: cs,
            cs: rs,
        }
    } else {
        MatRef { ptr, rs, cs }
    }
}

/// Sequence `b`'s rows of a key/value tensor at head `g` (`[kv_len, head_dim]`), or transposed.
fn kv_view<T: Real>(t: &[T], dims: Dims, b: usize, g: usize, transposed: bool) -> MatRef<T> {
    let ptr = t[b * dims.s.kv_len * dims.kv_width() + g * dims.head_dim..].as_ptr();
    let (rs, cs) = (dims.kv_width() as isize, 1);
    if transposed {
        MatRef {
            ptr,
            rs: cs,
            cs: rs,
        }
    } else {
        MatRef { ptr, rs, cs }
    }
}

/// Offset of query head `h` of sequence `b`'s first row in a `[batch * q_len, heads * head_dim]` tensor.
fn q_offset(dims: Dims, b: usize, h: usize) -> usize {
    b * dims.s.q_len * dims.q_width() + h * dims.head_dim
}

pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<Prefix>,
    s: CausalShape,
    q_start: &[u32],
) -> Result<(Tensor, Tensor)> {
    let dims = check(q, k, v, prefix, s, q_start)?;
    let (d, row, np) = (dims.head_dim, dims.row, dims.prefix);
    let mut out = q.zeros_like();
    let mut probs = Tensor::zeros(&[s.batch, s.heads, s.q_len, row], q.dtype());
    with_real!(q.dtype(), T => {
        let (qd, kd, vd) = (q.data::<T>()?, k.data::<T>()?, v.data::<T>()?);
        let (pk, pv): (&[T], &[T]) = match prefix {
            Some(p) => (p.keys.data::<T>()?, p.values.data::<T>()?),
            None => (&[], &[]),
        };
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let outp = SendPtr(out.data_mut::<T>()?.as_mut_ptr());
        probs.data_mut::<T>()?.par_chunks_mut(s.q_len * row).enumerate().for_each(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let g = dims.group(h);
            let live = dims.live_keys(q_start, b);
            let off = q_offset(dims, b, h);
            let q_bh = MatRef { ptr: qd[off..].as_ptr(), rs: dims.q_width() as isize, cs: 1 };
            // SAFETY: the views cover this (b, h)'s rows (shapes checked); the writes go to this
            // (b, h)'s own probability block `p` and its own head columns of `out`.
            unsafe {
                if np > 0 {
                    gemm_strided((s.q_len, np, d), p.as_mut_ptr(), row as isize, q_bh, prefix_view(pk, dims, g, true), false, 1);
                }
                gemm_strided((s.q_len, live, d), p[np..].as_mut_ptr(), row as isize, q_bh, kv_view(kd, dims, b, g, true), false, 1);
            }
            simd!({
                for (i, r) in p.chunks_exact_mut(row).enumerate() {
                    let (seen, hidden) = r.split_at_mut(dims.visible(q_start, b, i));
                    hidden.iter_mut().for_each(|x| *x = T::ZERO);
                    seen.iter_mut().for_each(|x| *x *= scale);
                    let m = max(seen);
                    let inv = T::ONE / exp_shifted_sum(seen, m);
                    seen.iter_mut().for_each(|x| *x *= inv);
                }
            });
            let weights = |first: usize| MatRef { ptr: p[first..].as_ptr(), rs: row as isize, cs: 1 };
            unsafe {
                let dst = outp.get().add(off);
                if np > 0 {
                    gemm_strided((s.q_len, d, np), dst, dims.q_width() as isize, weights(0), prefix_view(pv, dims, g, false), false, 1);
                }
                gemm_strided((s.q_len, d, live), dst, dims.q_width() as isize, weights(np), kv_view(vd, dims, b, g, false), np > 0, 1);
            }
        });
    });
    Ok((out, probs))
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<Prefix>,
    probs: &Tensor,
    s: CausalShape,
    q_start: &[u32],
) -> Result<CausalGrads> {
    let dims = check_backward(dout, q, k, v, prefix, probs, s, q_start)?;
    let (d, row, np) = (dims.head_dim, dims.row, dims.prefix);
    let (mut dq, mut dk, mut dv) = (q.zeros_like(), k.zeros_like(), v.zeros_like());
    let per_group = s.heads / s.kv_heads;
    // Prefix gradients of each (sequence, key/value head), summed over sequences at the end.
    let mut partial = Tensor::zeros(&[s.batch * s.kv_heads, 2, np * d], q.dtype());
    with_real!(q.dtype(), T => {
        let (qd, kd, vd, dod, pd) = (q.data::<T>()?, k.data::<T>()?, v.data::<T>()?, dout.data::<T>()?, probs.data::<T>()?);
        let (pk, pv): (&[T], &[T]) = match prefix {
            Some(p) => (p.keys.data::<T>()?, p.values.data::<T>()?),
            None => (&[], &[]),
        };
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let (dqp, dkp, dvp) = (
            SendPtr(dq.data_mut::<T>()?.as_mut_ptr()),
            SendPtr(dk.data_mut::<T>()?.as_mut_ptr()),
            SendPtr(dv.data_mut::<T>()?.as_mut_ptr()),
        );
        let (qw, kvw) = (dims.q_width() as isize, dims.kv_width() as isize);
        let partial_p = SendPtr(partial.data_mut::<T>()?.as_mut_ptr());
        (0..s.batch * s.kv_heads).into_par_iter().for_each(|bg| {
            let (b, g) = (bg / s.kv_heads, bg % s.kv_heads);
            // SAFETY: `partial` holds 2·np·d values per (b, g); this task owns block `bg`.
            let dprefix = unsafe { std::slice::from_raw_parts_mut(partial_p.get().add(bg * 2 * np * d), 2 * np * d) };
            let live = dims.live_keys(q_start, b);
            let kv_off = b * s.kv_len * dims.kv_width() + g * d;
            let (dpk, dpv) = dprefix.split_at_mut(np * d);
            let mut ds = vec![T::ZERO; s.q_len * row];
            for h in g * per_group..(g + 1) * per_group {
                let first = h == g * per_group;
                let off = q_offset(dims, b, h);
                let p = &pd[(b * s.heads + h) * s.q_len * row..][..s.q_len * row];
                let q_bh = MatRef { ptr: qd[off..].as_ptr(), rs: qw, cs: 1 };
                let do_bh = MatRef { ptr: dod[off..].as_ptr(), rs: qw, cs: 1 };
                let cols_t = |m: &[T], first_col: usize| MatRef { ptr: m[first_col..].as_ptr(), rs: 1, cs: row as isize };
                // SAFETY: the read views cover this (b, h)'s rows; writes go to this (b, g)'s key/value
                // columns of dk/dv, this (b, h)'s head columns of dq, the task's own `dprefix` and `ds`.
                unsafe {
                    // dV = Pᵀ·dO (the sequence's keys), dV_prefix = P_prefixᵀ·dO
                    gemm_strided((live, d, s.q_len), dvp.get().add(kv_off), kvw, cols_t(p, np), do_bh, !first, 1);
                    if np > 0 {
                        gemm_strided((np, d, s.q_len), dpv.as_mut_ptr(), d as isize, cols_t(p, 0), do_bh, !first, 1);
                        gemm_strided((s.q_len, np, d), ds.as_mut_ptr(), row as isize, do_bh, prefix_view(pv, dims, g, true), false, 1);
                    }
                    // dP = dO·Vᵀ
                    gemm_strided((s.q_len, live, d), ds[np..].as_mut_ptr(), row as isize, do_bh, kv_view(vd, dims, b, g, true), false, 1);
                }
                simd!({
                    for (i, (drow, prow)) in ds.chunks_exact_mut(row).zip(p.chunks_exact(row)).enumerate() {
                        let n = dims.visible(q_start, b, i);
                        // Masked keys hold dO·v products here; their probabilities are zero.
                        drow[n..].iter_mut().for_each(|x| *x = T::ZERO);
                        let (drow, prow) = (&mut drow[..n], &prow[..n]);
                        // Softmax backward: dS = P ⊙ (dP − Σ_j dP·P), then the 1/√d of the forward.
                        let c = dot(drow, prow);
                        for (g_, &pv_) in drow.iter_mut().zip(prow) {
                            *g_ = pv_ * (*g_ - c) * scale;
                        }
                    }
                });
                let ds_rows = |first_col: usize| MatRef { ptr: ds[first_col..].as_ptr(), rs: row as isize, cs: 1 };
                unsafe {
                    // dQ = dS_prefix·K_prefix + dS·K
                    let dq_bh = dqp.get().add(off);
                    if np > 0 {
                        gemm_strided((s.q_len, d, np), dq_bh, qw, ds_rows(0), prefix_view(pk, dims, g, false), false, 1);
                        gemm_strided((np, d, s.q_len), dpk.as_mut_ptr(), d as isize, cols_t(&ds, 0), q_bh, !first, 1);
                    }
                    gemm_strided((s.q_len, d, live), dq_bh, qw, ds_rows(np), kv_view(kd, dims, b, g, false), np > 0, 1);
                    // dK = dSᵀ·Q
                    gemm_strided((live, d, s.q_len), dkp.get().add(kv_off), kvw, cols_t(&ds, np), q_bh, !first, 1);
                }
            }
        });
    });
    let dprefix = if prefix.is_some() {
        Some(sum_prefix_partials(&partial, dims)?)
    } else {
        None
    };
    Ok(CausalGrads {
        dq,
        dk,
        dv,
        dprefix,
    })
}

/// Sums the per-(sequence, key/value head) prefix gradients over sequences, in order, into
/// `[prefix, kv_heads * head_dim]` key and value gradients.
fn sum_prefix_partials(partial: &Tensor, dims: Dims) -> Result<(Tensor, Tensor)> {
    let (np, d, kv_heads) = (dims.prefix, dims.head_dim, dims.s.kv_heads);
    let shape = [np, dims.kv_width()];
    let (mut dk, mut dv) = (
        Tensor::zeros(&shape, partial.dtype()),
        Tensor::zeros(&shape, partial.dtype()),
    );
    with_real!(partial.dtype(), T => {
        let src = partial.data::<T>()?;
        for (which, out) in [dk.data_mut::<T>()?, dv.data_mut::<T>()?].into_iter().enumerate() {
            for b in 0..dims.s.batch {
                for g in 0..kv_heads {
                    let block = &src[((b * kv_heads + g) * 2 + which) * np * d..][..np * d];
                    for (j, r) in block.chunks_exact(d).enumerate() {
                        let dst = &mut out[j * dims.kv_width() + g * d..][..d];
                        dst.iter_mut().zip(r).for_each(|(o, &x)| *o += x);
                    }
                }
            }
        }
    });
    Ok((dk, dv))
}
