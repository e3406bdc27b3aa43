//! Encoder attention with a key-padding mask and dropout on the probabilities, forward and backward
//! (kernels/attention.cu, on the tiled kernels of kernels/attention.cuh).

use anyhow::Result;

use super::elementwise::DropoutArgs;
use super::launch::{self, kernel, launch};
use super::runtime::Gpu;
use super::{expect_dtype, input, tensor, CudaStorage};
use crate::backend::cpu::attention::{check, check_backward};
use crate::backend::{AttnShape, Dropout};
use crate::tensor::Tensor;

/// The scores' scale 1/√head_dim, rounded to f32 as the CPU rounds it.
pub(super) fn softmax_scale(head_dim: usize) -> f32 {
    (1.0 / (head_dim as f64).sqrt()) as f32
}

/// Fails unless every named operand has `q`'s dtype.
pub(super) fn expect_dtype_of_q(op: &str, q: &Tensor, others: &[(&str, &Tensor)]) -> Result<()> {
    others
        .iter()
        .try_for_each(|&(name, t)| expect_dtype(op, name, t, q.dtype()))
}

/// Returns the context `[batch * seq, heads * head_dim]` and the probabilities
/// `[batch, heads, seq, seq]` before dropout (zero past each sequence's length).
pub(crate) fn attention(
    gpu: &'static Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    lengths: &[u32],
    dropout: Dropout,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention";
    let d = check(q, k, v, s, lengths)?;
    expect_dtype_of_q(OP, q, &[("k", k), ("v", v)])?;
    let kernel = kernel!("kdx_attention_forward", q.dtype());
    let config = launch::attention(OP, s.batch * s.heads, s.seq, d)?;
    let (q_s, k_s, v_s) = (
        input(gpu, OP, "q", q)?,
        input(gpu, OP, "k", k)?,
        input(gpu, OP, "v", v)?,
    );
    let lengths_buf = gpu.upload(bytemuck::cast_slice(lengths))?;
    let probs_shape = [s.batch, s.heads, s.seq, s.seq];
    let mut out = CudaStorage::alloc(gpu, q.numel(), q.dtype())?;
    let mut probs = CudaStorage::alloc(gpu, probs_shape.iter().product(), q.dtype())?;
    let mask = DropoutArgs::of(dropout);
    // SAFETY: kdx_attention_forward_<T>(const T* q, const T* k, const T* v,
    // const uint32_t* lengths, T* out, T* probs, size_t seq, size_t heads, size_t head_dim,
    // float scale, uint64_t seed, uint64_t threshold, float keep_scale): q, k, v and out
    // [batch·seq, heads·head_dim], probs [batch, heads, seq, seq], lengths [batch] each in 1..=seq
    // (checked); grid (batch·heads, query tiles) with the kernels' shared memory.
    unsafe {
        launch!(
            gpu,
            kernel,
            config,
            [
                q_s.ptr(),
                k_s.ptr(),
                v_s.ptr(),
                gpu.ptr(&lengths_buf),
                out.ptr_mut()?,
                probs.ptr_mut()?,
                s.seq,
                s.heads,
                d,
                softmax_scale(d),
                mask.seed,
                mask.threshold,
                mask.scale
            ]
        )
    }?;
    Ok((tensor(out, q.shape())?, tensor(probs, &probs_shape)?))
}

/// Returns `(dq, dk, dv)`: one kernel for dq, which also leaves each query row's `Σ_j P·dP'` for
/// the second, which gives each block its own keys' dk and dv rows (no atomics).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    gpu: &'static Gpu,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    s: AttnShape,
    lengths: &[u32],
    dropout: Dropout,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention backward";
    let d = check_backward(dout, q, k, v, probs, s, lengths)?;
    expect_dtype_of_q(
        OP,
        q,
        &[("k", k), ("v", v), ("dout", dout), ("probs", probs)],
    )?;
    let dq_kernel = kernel!("kdx_attention_backward_dq", q.dtype());
    let dkv_kernel = kernel!("kdx_attention_backward_dkv", q.dtype());
    // Query tiles for dq, key tiles for dk and dv: the same grid, since keys and queries both
    // number seq per sequence and head.
    let config = launch::attention(OP, s.batch * s.heads, s.seq, d)?;
    let (dout_s, q_s, k_s, v_s, probs_s) = (
        input(gpu, OP, "dout", dout)?,
        input(gpu, OP, "q", q)?,
        input(gpu, OP, "k", k)?,
        input(gpu, OP, "v", v)?,
        input(gpu, OP, "probs", probs)?,
    );
    let lengths_buf = gpu.upload(bytemuck::cast_slice(lengths))?;
    let row_dot = gpu.alloc(s.batch * s.heads * s.seq * std::mem::size_of::<f32>())?;
    let mut dq = CudaStorage::alloc(gpu, q.numel(), q.dtype())?;
    let mut dk = CudaStorage::alloc(gpu, q.numel(), q.dtype())?;
    let mut dv = CudaStorage::alloc(gpu, q.numel(), q.dtype())?;
    let mask = DropoutArgs::of(dropout);
    let scale = softmax_scale(d);
    // SAFETY: kdx_attention_backward_dq_<T>(const T* dout, const T* k, const T* v,
    // const T* probs, const uint32_t* lengths, T* dq, float* row_dot, size_t seq, size_t heads,
    // size_t head_dim, float scale, uint64_t seed, uint64_t threshold, float keep_scale) and
    // kdx_attention_backward_dkv_<T>(const T* dout, const T* q, const T* v, const T* probs,
    // const float* row_dot, const uint32_t* lengths, T* dk, T* dv, size_t seq, size_t heads,
    // size_t head_dim, float scale, uint64_t seed, uint64_t threshold, float keep_scale):
    // dout, q, k, v, dq, dk, dv [batch·seq, heads·head_dim], probs [batch, heads, seq, seq],
    // lengths [batch] each in 1..=seq (checked), row_dot [batch, heads, seq] f32, written by the
    // first kernel before the second reads it (same stream).
    unsafe {
        launch!(
            gpu,
            dq_kernel,
            config,
            [
                dout_s.ptr(),
                k_s.ptr(),
                v_s.ptr(),
                probs_s.ptr(),
                gpu.ptr(&lengths_buf),
                dq.ptr_mut()?,
                gpu.ptr(&row_dot),
                s.seq,
                s.heads,
                d,
                scale,
                mask.seed,
                mask.threshold,
                mask.scale
            ]
        )?;
        launch!(
            gpu,
            dkv_kernel,
            config,
            [
                dout_s.ptr(),
                q_s.ptr(),
                v_s.ptr(),
                probs_s.ptr(),
                gpu.ptr(&row_dot),
                gpu.ptr(&lengths_buf),
                dk.ptr_mut()?,
                dv.ptr_mut()?,
                s.seq,
                s.heads,
                d,
                scale,
                mask.seed,
                mask.threshold,
                mask.scale
            ]
        )?;
    }
    Ok((
        tensor(dq, q.shape())?,
        tensor(dk, q.shape())?,
        tensor(dv, q.shape())?,
    ))
}
