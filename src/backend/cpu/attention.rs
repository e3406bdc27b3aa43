//! Multi-head scaled-dot-product attention with a key-padding mask, forward and backward.
//!
//! Q, K, V stay in the `[batch * seq, heads * head_dim]` layout the projections produce: each
//! (sequence, head) pair is a strided view, so no transposes are materialised. One rayon task per pair;
//! inside it the products run through the packed gemm on strided pointers. Keys past a sequence's
//! length are skipped entirely (their probabilities are exactly zero).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::{gemm_strided, MatRef};
use super::simd::{dot, exp_shifted_sum, max, simd, Real, SendPtr};
use super::with_real;
use crate::backend::{AttnShape, Dropout};
use crate::tensor::Tensor;

/// Checks a call's tensors against its shape; returns head_dim. Shared with the CUDA backend, so both
/// reject the same calls with the same messages.
pub(crate) fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    lengths: &[u32],
) -> Result<usize> {
    let (rows, width) = q.rows_cols();
    ensure!(
        rows == s.batch * s.seq && width % s.heads == 0,
        "attention: q is {:?}, expected [{}, heads({}) * head_dim]",
        q.shape(),
        s.batch * s.seq,
        s.heads
    );
    ensure!(
        k.shape() == q.shape() && v.shape() == q.shape(),
        "attention: q, k, v shapes differ"
    );
    ensure!(
        lengths.len() == s.batch,
        "attention: {} lengths for a batch of {}",
        lengths.len(),
        s.batch
    );
    ensure!(
        lengths.iter().all(|&l| l >= 1 && l as usize <= s.seq),
        "attention: every length must be in 1..={}, got {lengths:?}",
        s.seq
    );
    Ok(width / s.heads)
}

/// [`check`], and the backward's `dout` and `probs` against it; returns head_dim.
pub(crate) fn check_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    s: AttnShape,
    lengths: &[u32],
) -> Result<usize> {
    let d = check(q, k, v, s, lengths)?;
    ensure!(
        dout.shape() == q.shape(),
        "attention backward: dout is {:?}, q is {:?}",
        dout.shape(),
        q.shape()
    );
    ensure!(
        probs.shape() == [s.batch, s.heads, s.seq, s.seq],
        "attention backward: probs is {:?}, expected [{}, {}, {}, {}]",
        probs.shape(),
        s.batch,
        s.heads,
        s.seq,
        s.seq
    );
    Ok(d)
}

/// Offset of head `h` of sequence `b`'s first row in a `[batch * seq, heads * head_dim]` tensor.
fn head_offset(s: AttnShape, d: usize, b: usize, h: usize) -> usize {
    b * s.seq * s.heads * d + h * d
}

/// Offset of the dropout stream of (b, h): element (i, j) of its probability matrix is `base + i*seq + j`.
fn mask_base(s: AttnShape, b: usize, h: usize) -> u64 {
    ((b * s.heads + h) * s.seq * s.seq) as u64
}

/// The attention weights the context product uses: `p` itself, or (dropout on) a copy in `buf` with
/// the first `len` columns of each row dropped out.
fn dropped_out<'a, T: Real>(
    p: &'a [T],
    buf: &'a mut Vec<T>,
    seq: usize,
    len: usize,
    d: Dropout,
    base: u64,
) -> &'a [T] {
    if !d.is_active() {
        return p;
    }
    buf.resize(seq * seq, T::ZERO);
    for i in 0..seq {
        for j in 0..len {
            buf[i * seq + j] = p[i * seq + j] * T::from_f64(d.factor(base + (i * seq + j) as u64));
        }
    }
    buf
}

pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    lengths: &[u32],
    dropout: Dropout,
) -> Result<(Tensor, Tensor)> {
    let d = check(q, k, v, s, lengths)?;
    let width = s.heads * d;
    let mut out = q.zeros_like();
    let mut probs = Tensor::zeros(&[s.batch, s.heads, s.seq, s.seq], q.dtype());
    with_real!(q.dtype(), T => {
        let (qd, kd, vd) = (q.data::<T>()?, k.data::<T>()?, v.data::<T>()?);
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let outp = SendPtr(out.data_mut::<T>()?.as_mut_ptr());
        let seq = s.seq;
        probs.data_mut::<T>()?.par_chunks_mut(seq * seq).enumerate().for_each(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let len = lengths[b] as usize;
            let off = head_offset(s, d, b, h);
            // SAFETY: q/k/v cover batch*seq rows of `width`; this (b, h) writes only its own probability
            // matrix `p` and its own head columns of `out`.
            unsafe {
                gemm_strided(
                    (seq, len, d),
                    p.as_mut_ptr(),
                    seq as isize,
                    MatRef { ptr: qd.as_ptr().add(off), rs: width as isize, cs: 1 },
                    MatRef { ptr: kd.as_ptr().add(off), rs: 1, cs: width as isize },
                    false,
                    1,
                );
            }
            simd!({
                for row in p.chunks_exact_mut(seq) {
                    let (live, _) = row.split_at_mut(len);
                    live.iter_mut().for_each(|x| *x *= scale);
                    let m = max(live);
                    let inv = T::ONE / exp_shifted_sum(live, m);
                    live.iter_mut().for_each(|x| *x *= inv);
                }
            });
            let mut buf = Vec::new();
            let weights = dropped_out(p, &mut buf, seq, len, dropout, mask_base(s, b, h));
            unsafe {
                gemm_strided(
                    (seq, d, len),
                    outp.get().add(off),
                    width as isize,
                    MatRef { ptr: weights.as_ptr(), rs: seq as isize, cs: 1 },
                    MatRef { ptr: vd.as_ptr().add(off), rs: width as isize, cs: 1 },
                    false,
                    1,
                );
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
    probs: &Tensor,
    s: AttnShape,
    lengths: &[u32],
    dropout: Dropout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = check_backward(dout, q, k, v, probs, s, lengths)?;
    let width = s.heads * d;
    let (mut dq, mut dk, mut dv) = (q.zeros_like(), q.zeros_like(), q.zeros_like());
    with_real!(q.dtype(), T => {
        let (qd, kd, vd, dod, pd) = (q.data::<T>()?, k.data::<T>()?, v.data::<T>()?, dout.data::<T>()?, probs.data::<T>()?);
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let (dqp, dkp, dvp) = (
            SendPtr(dq.data_mut::<T>()?.as_mut_ptr()),
            SendPtr(dk.data_mut::<T>()?.as_mut_ptr()),
            SendPtr(dv.data_mut::<T>()?.as_mut_ptr()),
        );
        let seq = s.seq;
        (0..s.batch * s.heads).into_par_iter().for_each(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let len = lengths[b] as usize;
            let off = head_offset(s, d, b, h);
            let p = &pd[bh * seq * seq..(bh + 1) * seq * seq];
            let mut buf = Vec::new();
            let weights = dropped_out(p, &mut buf, seq, len, dropout, mask_base(s, b, h));
            let mut ds = vec![T::ZERO; seq * seq];
            let (q_bh, k_bh, v_bh, do_bh) = (
                MatRef { ptr: unsafe { qd.as_ptr().add(off) }, rs: width as isize, cs: 1 },
                MatRef { ptr: unsafe { kd.as_ptr().add(off) }, rs: width as isize, cs: 1 },
                MatRef { ptr: unsafe { vd.as_ptr().add(off) }, rs: width as isize, cs: 1 },
                MatRef { ptr: unsafe { dod.as_ptr().add(off) }, rs: width as isize, cs: 1 },
            );
            let transposed = |m: MatRef<T>| MatRef { ptr: m.ptr, rs: m.cs, cs: m.rs };
            // SAFETY: every read view covers this (b, h)'s rows; writes go to this (b, h)'s own head
            // columns of dq/dk/dv and to the local `ds`.
            unsafe {
                // dV = P'ᵀ · dO  (only the first `len` key rows are non-zero)
                gemm_strided(
                    (len, d, seq),
                    dvp.get().add(off),
                    width as isize,
                    MatRef { ptr: weights.as_ptr(), rs: 1, cs: seq as isize },
                    do_bh,
                    false,
                    1,
                );
                // dP' = dO · Vᵀ
                gemm_strided((seq, len, d), ds.as_mut_ptr(), seq as isize, do_bh, transposed(v_bh), false, 1);
            }
            simd!({
                for i in 0..seq {
                    let prow = &p[i * seq..i * seq + len];
                    let drow = &mut ds[i * seq..i * seq + len];
                    if dropout.is_active() {
                        let base = mask_base(s, b, h) + (i * seq) as u64;
                        for (j, g) in drow.iter_mut().enumerate() {
                            *g *= T::from_f64(dropout.factor(base + j as u64));
                        }
                    }
                    // Softmax backward: dS = P ⊙ (dP − Σ_j dP·P), then the 1/√d of the forward.
                    let c = dot(drow, prow);
                    for (g, &pv) in drow.iter_mut().zip(prow) {
                        *g = pv * (*g - c) * scale;
                    }
                }
            });
            unsafe {
                // dQ = dS · K ;  dK = dSᵀ · Q
                gemm_strided(
                    (seq, d, len),
                    dqp.get().add(off),
                    width as isize,
                    MatRef { ptr: ds.as_ptr(), rs: seq as isize, cs: 1 },
                    k_bh,
                    false,
                    1,
                );
                gemm_strided(
                    (len, d, seq),
                    dkp.get().add(off),
                    width as isize,
                    MatRef { ptr: ds.as_ptr(), rs: 1, cs: seq as isize },
                    q_bh,
                    false,
                    1,
                );
            }
        });
    });
    Ok((dq, dk, dv))
}
