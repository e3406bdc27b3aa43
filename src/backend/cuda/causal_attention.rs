//! Causal grouped-query attention with an optional deep-prompt prefix and per-sequence query
//! offsets, forward and backward (kernels/causal_attention.cu, on the tiled kernels of
//! kernels/attention.cuh).

use anyhow::Result;

use super::attention::{expect_dtype_of_q, softmax_scale};
use super::launch::{self, elementwise, kernel, launch, Ptr};
use super::runtime::Gpu;
use super::{input, tensor, CudaStorage};
use crate::backend::cpu::causal_attention::{check, check_backward};
use crate::backend::{CausalGrads, CausalShape, Prefix};
use crate::tensor::Tensor;

/// The prefix's key and value addresses, or null pointers without a prefix (the kernels then
/// see zero prefix columns and never read them).
fn prefix_ptrs(gpu: &Gpu, op: &str, prefix: Option<Prefix>) -> Result<(Ptr, Ptr)> {
    Ok(match prefix {
        Some(p) => (
            input(gpu, op, "prefix keys", p.keys)?.ptr(),
            input(gpu, op, "prefix values", p.values)?.ptr(),
        ),
        None => (Ptr::NULL, Ptr::NULL),
    })
}

/// Returns the context `[batch * q_len, heads * head_dim]` and the probabilities
/// `[batch, heads, q_len, prefix + kv_len]` (zero where masked).
pub(crate) fn causal_attention(
    gpu: &'static Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<Prefix>,
    s: CausalShape,
    q_start: &[u32],
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "causal attention";
    // Checks the dtypes of k, v and the prefix too.
    let dims = check(q, k, v, prefix, s, q_start)?;
    let d = dims.head_dim;
    let kernel = kernel!("kdx_causal_attention_forward", q.dtype());
    let config = launch::attention(OP, s.batch * s.heads, s.q_len, d)?;
    let (q_s, k_s, v_s) = (
        input(gpu, OP, "q", q)?,
        input(gpu, OP, "k", k)?,
        input(gpu, OP, "v", v)?,
    );
    let (pk, pv) = prefix_ptrs(gpu, OP, prefix)?;
    let q_start_buf = gpu.upload(bytemuck::cast_slice(q_start))?;
    let probs_shape = [s.batch, s.heads, s.q_len, dims.row];
    let mut out = CudaStorage::alloc(gpu, q.numel(), q.dtype())?;
    let mut probs = CudaStorage::alloc(gpu, probs_shape.iter().product(), q.dtype())?;
    // SAFETY: kdx_causal_attention_forward_<T>(const T* q, const T* k, const T* v,
    // const T* prefix_k, const T* prefix_v, const uint32_t* q_start, T* out, T* probs,
    // size_t q_len, size_t kv_len, size_t heads, size_t kv_heads, size_t head_dim, size_t prefix,
    // float scale): q and out [batch·q_len, heads·head_dim], k and v [batch·kv_len,
    // kv_heads·head_dim], the prefix [prefix, kv_heads·head_dim] (null when absent, prefix 0),
    // probs [batch, heads, q_len, prefix + kv_len], q_start [batch] with q_start + q_len ≤ kv_len
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
                pk,
                pv,
                gpu.ptr(&q_start_buf),
                out.ptr_mut()?,
                probs.ptr_mut()?,
                s.q_len,
                s.kv_len,
                s.heads,
                s.kv_heads,
                d,
                dims.prefix,
                softmax_scale(d)
            ]
        )
    }?;
    Ok((tensor(out, q.shape())?, tensor(probs, &probs_shape)?))
}

/// dq comes first and leaves each query row's `Σ_j P·dP` for the key/value kernel, whose blocks
/// each own some keys of one (sequence, key/value head) and add the group's query heads in order.
/// Prefix gradients, shared by the batch, are written per sequence and then summed over the
/// sequences in order: no atomics anywhere.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attention_backward(
    gpu: &'static Gpu,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<Prefix>,
    probs: &Tensor,
    s: CausalShape,
    q_start: &[u32],
) -> Result<CausalGrads> {
    const OP: &str = "causal attention backward";
    let dims = check_backward(dout, q, k, v, prefix, probs, s, q_start)?;
    expect_dtype_of_q(OP, q, &[("dout", dout), ("probs", probs)])?;
    let (d, np) = (dims.head_dim, dims.prefix);
    let dq_kernel = kernel!("kdx_causal_attention_backward_dq", q.dtype());
    let dkv_kernel = kernel!("kdx_causal_attention_backward_dkv", q.dtype());
    let sum_kernel = kernel!("kdx_causal_attention_prefix_grads", q.dtype());
    let dq_config = launch::attention(OP, s.batch * s.heads, s.q_len, d)?;
    let dkv_config = launch::attention(OP, s.batch * s.kv_heads, dims.row, d)?;
    let (dout_s, q_s, k_s, v_s, probs_s) = (
        input(gpu, OP, "dout", dout)?,
        input(gpu, OP, "q", q)?,
        input(gpu, OP, "k", k)?,
        input(gpu, OP, "v", v)?,
        input(gpu, OP, "probs", probs)?,
    );
    let (pk, pv) = prefix_ptrs(gpu, OP, prefix)?;
    let q_start_buf = gpu.upload(bytemuck::cast_slice(q_start))?;
    let f32_bytes = std::mem::size_of::<f32>();
    let row_dot = gpu.alloc(s.batch * s.heads * s.q_len * f32_bytes)?;
    // Per (sequence, key/value head): the prefix's key then value gradients.
    let partial = prefix
        .map(|_| gpu.alloc(s.batch * s.kv_heads * 2 * np * d * f32_bytes))
        .transpose()?;
    let partial_ptr = partial.as_ref().map_or(Ptr::NULL, |p| gpu.ptr(p));
    let mut dq = CudaStorage::alloc(gpu, q.numel(), q.dtype())?;
    let mut dk = CudaStorage::alloc(gpu, k.numel(), q.dtype())?;
    let mut dv = CudaStorage::alloc(gpu, k.numel(), q.dtype())?;
    let scale = softmax_scale(d);
    // SAFETY: kdx_causal_attention_backward_dq_<T>(const T* dout, const T* k, const T* v,
    // const T* prefix_k, const T* prefix_v, const T* probs, const uint32_t* q_start, T* dq,
    // float* row_dot, size_t q_len, size_t kv_len, size_t heads, size_t kv_heads,
    // size_t head_dim, size_t prefix, float scale) and
    // kdx_causal_attention_backward_dkv_<T>(const T* dout, const T* q, const T* v,
    // const T* prefix_v, const T* probs, const float* row_dot, const uint32_t* q_start, T* dk,
    // T* dv, float* dprefix_partial, size_t q_len, size_t kv_len, size_t heads, size_t kv_heads,
    // size_t head_dim, size_t prefix, float scale): shapes as in the forward, dout and dq as q,
    // dk and dv as k, probs [batch, heads, q_len, prefix + kv_len] (checked), row_dot
    // [batch, heads, q_len] f32 written by the first kernel before the second reads it (same
    // stream), dprefix_partial [batch, kv_heads, 2, prefix, head_dim] f32 (null without a
    // prefix).
    unsafe {
        launch!(
            gpu,
            dq_kernel,
            dq_config,
            [
                dout_s.ptr(),
                k_s.ptr(),
                v_s.ptr(),
                pk,
                pv,
                probs_s.ptr(),
                gpu.ptr(&q_start_buf),
                dq.ptr_mut()?,
                gpu.ptr(&row_dot),
                s.q_len,
                s.kv_len,
                s.heads,
                s.kv_heads,
                d,
                np,
                scale
            ]
        )?;
        launch!(
            gpu,
            dkv_kernel,
            dkv_config,
            [
                dout_s.ptr(),
                q_s.ptr(),
                v_s.ptr(),
                pv,
                probs_s.ptr(),
                gpu.ptr(&row_dot),
                gpu.ptr(&q_start_buf),
                dk.ptr_mut()?,
                dv.ptr_mut()?,
                partial_ptr,
                s.q_len,
                s.kv_len,
                s.heads,
                s.kv_heads,
                d,
                np,
                scale
            ]
        )?;
    }
    let dprefix = match prefix {
        None => None,
        Some(p) => {
            let n = p.keys.numel();
            let mut dpk = CudaStorage::alloc(gpu, n, q.dtype())?;
            let mut dpv = CudaStorage::alloc(gpu, n, q.dtype())?;
            // SAFETY: kdx_causal_attention_prefix_grads_<T>(const float* partial, T* dprefix_k,
            // T* dprefix_v, size_t batch, size_t kv_heads, size_t prefix, size_t head_dim):
            // partial as the key/value kernel wrote it, dprefix_k and dprefix_v
            // [prefix, kv_heads·head_dim]; any launch shape.
            unsafe {
                launch!(
                    gpu,
                    sum_kernel,
                    elementwise(2 * n),
                    [
                        partial_ptr,
                        dpk.ptr_mut()?,
                        dpv.ptr_mut()?,
                        s.batch,
                        s.kv_heads,
                        np,
                        d
                    ]
                )
            }?;
            Some((tensor(dpk, p.keys.shape())?, tensor(dpv, p.keys.shape())?))
        }
    };
    Ok(CausalGrads {
        dq: tensor(dq, q.shape())?,
        dk: tensor(dk, k.shape())?,
        dv: tensor(dv, k.shape())?,
        dprefix,
    })
}
