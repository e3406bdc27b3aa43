//! The CPU backend: every op, generic over f32/f64, SIMD through [`simd::dispatch`], threads through rayon.
//! One module per op family, mirroring `kernels/`.

pub mod activations;
pub mod attention;
pub mod causal_attention;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod losses;
pub mod norms;
pub mod optimizer;
pub mod pooling;
pub mod rope;
pub mod sampling;
pub mod simd;
pub mod similarity;

use std::sync::OnceLock;

use anyhow::Result;

use super::{
    AdamW, AttnShape, Backend, CausalGrads, CausalShape, Dropout, KlDirection, NormStats, Pooling,
    Prefix, RowLosses, Sampling, SoftmaxKl, TopK, Transpose,
};
use crate::tensor::{Device, Tensor};

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64); other dtypes are an error,
/// since the CPU computes in f32 (f64 for reference checks).
macro_rules! with_real {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $T = f64;
                $body
            }
            other => anyhow::bail!("the CPU backend computes in f32 (or f64), not {other}: convert with to_dtype first"),
        }
    };
}
pub(crate) use with_real;

pub struct CpuBackend;

impl CpuBackend {
    pub fn get() -> &'static CpuBackend {
        static CPU: OnceLock<CpuBackend> = OnceLock::new();
        CPU.get_or_init(|| CpuBackend)
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            simd::level().name(),
            rayon::current_num_threads()
        )
    }

    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        t: Transpose,
        out: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        gemm::matmul(a, b, t, out, accumulate)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        gemm::linear(x, w, bias)
    }

    fn linear_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        dw: &mut Tensor,
        dbias: Option<&mut Tensor>,
    ) -> Result<Tensor> {
        gemm::linear_backward(dy, x, w, dw, dbias)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut out = a.clone();
        elementwise::add_assign(&mut out, b)?;
        Ok(out)
    }

    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()> {
        elementwise::add_assign(a, b)
    }

    fn sum_squares(&self, x: &Tensor) -> Result<f64> {
        elementwise::sum_squares(x)
    }

    fn scale(&self, x: &mut Tensor, factor: f32) -> Result<()> {
        elementwise::scale(x, factor)
    }

    fn dropout(&self, x: Tensor, d: Dropout) -> Result<Tensor> {
        elementwise::dropout(x, d)
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        embedding::lookup(table, ids)
    }

    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], dtable: &mut Tensor) -> Result<()> {
        embedding::scatter_add(dy, ids, dtable)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, NormStats)> {
        norms::layer_norm(x, gamma, beta, eps)
    }

    fn layer_norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        gamma: &Tensor,
        stats: &NormStats,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Result<Tensor> {
        norms::layer_norm_backward(dy, x, gamma, stats, dgamma, dbeta)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, NormStats)> {
        norms::rms_norm(x, weight, eps)
    }

    fn rms_norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        stats: &NormStats,
        dweight: Option<&mut Tensor>,
    ) -> Result<Tensor> {
        norms::rms_norm_backward(dy, x, weight, stats, dweight)
    }

    fn rope(
        &self,
        x: &mut Tensor,
        heads: usize,
        positions: &[u32],
        table: &Tensor,
        inverse: bool,
    ) -> Result<()> {
        rope::rope(x, heads, positions, table, inverse)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        activations::swiglu(gate, up)
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        activations::swiglu_backward(gate, up, dy)
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        activations::gelu(x)
    }

    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        activations::gelu_backward(x, dy)
    }

    fn tanh(&self, x: &Tensor) -> Result<Tensor> {
        activations::tanh(x)
    }

    fn tanh_backward(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        activations::tanh_backward(y, dy)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttnShape,
        lengths: &[u32],
        dropout: Dropout,
    ) -> Result<(Tensor, Tensor)> {
        attention::forward(q, k, v, shape, lengths, dropout)
    }

    fn attention_backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        probs: &Tensor,
        shape: AttnShape,
        lengths: &[u32],
        dropout: Dropout,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        attention::backward(dout, q, k, v, probs, shape, lengths, dropout)
    }

    fn pool(&self, x: &Tensor, seq: usize, lengths: &[u32], pooling: Pooling) -> Result<Tensor> {
        pooling::pool(x, seq, lengths, pooling)
    }

    fn pool_backward(
        &self,
        dy: &Tensor,
        seq: usize,
        lengths: &[u32],
        pooling: Pooling,
    ) -> Result<Tensor> {
        pooling::pool_backward(dy, seq, lengths, pooling)
    }

    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prefix: Option<Prefix>,
        shape: CausalShape,
        q_start: &[u32],
    ) -> Result<(Tensor, Tensor)> {
        causal_attention::forward(q, k, v, prefix, shape, q_start)
    }

    fn causal_attention_backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prefix: Option<Prefix>,
        probs: &Tensor,
        shape: CausalShape,
        q_start: &[u32],
    ) -> Result<CausalGrads> {
        causal_attention::backward(dout, q, k, v, prefix, probs, shape, q_start)
    }

    fn cross_entropy(&self, logits: &Tensor, labels: &[u32]) -> Result<(f64, Tensor)> {
        losses::cross_entropy(logits, labels)
    }

    fn softmax_kl(&self, student: &Tensor, loss: &SoftmaxKl) -> Result<(RowLosses, Tensor)> {
        let mut grad = student.zeros_like();
        let losses = losses::softmax_kl_in_place(&mut grad, Some(student), loss)?;
        Ok((losses, grad))
    }

    fn softmax_kl_in_place(&self, logits: &mut Tensor, loss: &SoftmaxKl) -> Result<RowLosses> {
        losses::softmax_kl_in_place(logits, None, loss)
    }

    fn listwise_cos_kl(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        tau_student: f32,
        tau_teacher: f32,
        direction: KlDirection,
    ) -> Result<(f64, Tensor)> {
        similarity::listwise_cos_kl(student, teacher, tau_student, tau_teacher, direction)
    }

    fn cosine_topk_update(
        &self,
        keys: &Tensor,
        offset: usize,
        queries: &Tensor,
        best: &mut TopK,
    ) -> Result<()> {
        similarity::cosine_topk_update(keys, offset, queries, best)
    }

    fn sample(&self, logits: &Tensor, s: &Sampling, step: u64) -> Result<Vec<u32>> {
        sampling::sample(logits, s, step)
    }

    fn adamw(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        hp: &AdamW,
        step: u64,
    ) -> Result<()> {
        optimizer::adamw(param, grad, m, v, hp, step)
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        norms::l2_normalize(x)
    }
}

/// Splits `n` rows into contiguous chunks sized for rayon: big enough to amortise scheduling, and a
/// fixed function of `n` (not of the thread count) so reductions over chunks are reproducible.
pub(crate) fn row_chunk(n: usize, row_len: usize) -> usize {
    const TARGET_ELEMS: usize = 16 * 1024;
    (TARGET_ELEMS / row_len.max(1)).clamp(1, n.max(1))
}
