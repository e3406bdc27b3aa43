//! The CUDA backend: the kernels build.rs compiles from `kernels/*.cu` into one embedded fatbin (SASS
//! for sm_80 and sm_90, PTX for compute_90), loaded once per device, behind the [`Backend`] trait.
//! One module per op family, mirroring `kernels/` and `src/backend/cpu/` file for file.
//!
//! Tensors live on the device ([`CudaStorage`]); ops take and return device tensors and check that
//! every operand is on their device. Activations are f32 or bf16, computed in f32 (retrieval keys
//! may also be f16); AdamW keeps f32 master weights and moments. Every op of the trait has a kernel
//! here; an op added to the trait later fails with a [`NotImplemented`] error naming it until it
//! has one.

mod activations;
mod attention;
mod causal_attention;
mod cublas;
mod elementwise;
mod embedding;
mod gemm;
pub(crate) mod launch;
mod losses;
mod norms;
mod optimizer;
pub mod peak;
mod pooling;
mod rope;
pub mod runtime;
mod sampling;
mod similarity;
pub mod storage;
mod topk;

use std::sync::{Mutex, PoisonError};

use anyhow::{anyhow, bail, Result};

pub(crate) use elementwise::convert;
pub use runtime::{Gemm, Gpu};
pub use storage::CudaStorage;

use super::{
    AdamW, AttnShape, Backend, CausalGrads, CausalShape, Dropout, KlDirection, NormStats, Pooling,
    Prefix, RowLosses, Sampling, SoftmaxKl, TopK, Transpose,
};
use crate::tensor::{DType, Device, Storage, Tensor};

/// The driver reads the fatbin's header as 8-byte words: keep the embedded bytes aligned for it.
#[cfg(kdx_kernels)]
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

#[cfg(kdx_kernels)]
const FATBIN_LEN: usize = include_bytes!(env!("KDX_FATBIN")).len();

/// In the section where nvcc itself puts device code, so `cuobjdump --list-elf target/release/kdx`
/// shows which kernels and architectures a binary carries.
#[cfg(kdx_kernels)]
#[cfg_attr(target_os = "linux", link_section = ".nv_fatbin")]
static FATBIN: Aligned<[u8; FATBIN_LEN]> = Aligned(*include_bytes!(env!("KDX_FATBIN")));

/// The embedded kernel image, ready for `cuModuleLoadData`; `None` when this build has no kernels
/// (no nvcc at build time: see `tools/setup-cuda.sh`).
pub(crate) fn fatbin() -> Option<&'static [u8]> {
    #[cfg(kdx_kernels)]
    {
        Some(&FATBIN.0)
    }
    #[cfg(not(kdx_kernels))]
    {
        None
    }
}

pub struct CudaBackend {
    gpu: &'static Gpu,
}

pub use crate::backend::NotImplemented;

impl CudaBackend {
    /// The backend of `cuda:ordinal`, opened on first use. The error says what is missing: the
    /// driver, the device, or kernels (in the build, or loadable by this driver and GPU).
    pub fn get(ordinal: usize) -> Result<&'static CudaBackend> {
        let backend = open(ordinal)?;
        if let Some(why) = backend.gpu.kernels_missing() {
            bail!("{}: {why}", backend.gpu.device());
        }
        Ok(backend)
    }

    pub fn gpu(&self) -> &'static Gpu {
        self.gpu
    }
}

/// The runtime of `cuda:ordinal` (context, stream, copies), opened on first use; copying tensors
/// needs a driver and a device but no kernels.
pub(crate) fn gpu(ordinal: usize) -> Result<&'static Gpu> {
    Ok(open(ordinal)?.gpu)
}

/// Each device is opened once and lives as long as the process (the backend is handed out as
/// `&'static dyn Backend`, and device tensors point at their runtime).
fn open(ordinal: usize) -> Result<&'static CudaBackend> {
    static OPENED: Mutex<Vec<&'static CudaBackend>> = Mutex::new(Vec::new());
    let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(backend) = opened
        .iter()
        .find(|b| b.gpu.device() == Device::Cuda(ordinal))
    {
        return Ok(backend);
    }
    let gpu: &'static Gpu = Box::leak(Box::new(Gpu::open(ordinal)?));
    let backend: &'static CudaBackend = Box::leak(Box::new(CudaBackend { gpu }));
    opened.push(backend);
    Ok(backend)
}

/// The device storage of operand `name` of `op`, which must be on `gpu`.
pub(crate) fn input<'t>(gpu: &Gpu, op: &str, name: &str, t: &'t Tensor) -> Result<&'t CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) if s.device() == gpu.device() => Ok(s),
        _ => Err(elsewhere(gpu, op, name, t.device())),
    }
}

/// [`input`] for an operand the op writes.
pub(crate) fn output<'t>(
    gpu: &Gpu,
    op: &str,
    name: &str,
    t: &'t mut Tensor,
) -> Result<&'t mut CudaStorage> {
    let device = t.device();
    match t.cuda_storage_mut() {
        Some(s) if device == gpu.device() => Ok(s),
        _ => Err(elsewhere(gpu, op, name, device)),
    }
}

fn elsewhere(gpu: &Gpu, op: &str, name: &str, found: Device) -> anyhow::Error {
    let want = gpu.device();
    anyhow!(
        "{op}: {name} is on {found}, not {want}: copy it there with to_device(Device::{want:?})"
    )
}

/// Fails unless operand `name` of `op` has `dtype`.
pub(crate) fn expect_dtype(op: &str, name: &str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        bail!("{op}: {name} is {} but must be {dtype}", t.dtype());
    }
    Ok(())
}

/// A tensor of `shape` over storage a kernel has just filled.
pub(crate) fn tensor(storage: CudaStorage, shape: &[usize]) -> Result<Tensor> {
    Tensor::new(Storage::Cuda(storage), shape)
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        self.gpu.device()
    }

    fn describe(&self) -> String {
        self.gpu.summary().to_string()
    }

    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        t: Transpose,
        out: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        gemm::matmul(self.gpu, a, b, t, out, accumulate)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        gemm::linear(self.gpu, x, w, bias)
    }

    fn linear_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        dw: &mut Tensor,
        dbias: Option<&mut Tensor>,
    ) -> Result<Tensor> {
        gemm::linear_backward(self.gpu, dy, x, w, dw, dbias)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::add(self.gpu, a, b)
    }

    fn add_assign(&self, a: &mut Tensor, b: &Tensor) -> Result<()> {
        elementwise::add_assign(self.gpu, a, b)
    }

    fn sum_squares(&self, x: &Tensor) -> Result<f64> {
        elementwise::sum_squares(self.gpu, x)
    }

    fn scale(&self, x: &mut Tensor, factor: f32) -> Result<()> {
        elementwise::scale(self.gpu, x, factor)
    }

    fn dropout(&self, x: Tensor, d: Dropout) -> Result<Tensor> {
        elementwise::dropout(self.gpu, x, d)
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        embedding::lookup(self.gpu, table, ids)
    }

    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], dtable: &mut Tensor) -> Result<()> {
        embedding::scatter_add(self.gpu, dy, ids, dtable)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, NormStats)> {
        norms::layer_norm(self.gpu, x, gamma, beta, eps)
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
        norms::layer_norm_backward(self.gpu, dy, x, gamma, stats, dgamma, dbeta)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, NormStats)> {
        norms::rms_norm(self.gpu, x, weight, eps)
    }

    fn rms_norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        stats: &NormStats,
        dweight: Option<&mut Tensor>,
    ) -> Result<Tensor> {
        norms::rms_norm_backward(self.gpu, dy, x, weight, stats, dweight)
    }

    fn rope(
        &self,
        x: &mut Tensor,
        heads: usize,
        positions: &[u32],
        table: &Tensor,
        inverse: bool,
    ) -> Result<()> {
        rope::rope(self.gpu, x, heads, positions, table, inverse)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        activations::swiglu(self.gpu, gate, up)
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        activations::swiglu_backward(self.gpu, gate, up, dy)
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
        causal_attention::causal_attention(self.gpu, q, k, v, prefix, shape, q_start)
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
        causal_attention::causal_attention_backward(
            self.gpu, dout, q, k, v, prefix, probs, shape, q_start,
        )
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        activations::gelu(self.gpu, x)
    }

    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        activations::gelu_backward(self.gpu, x, dy)
    }

    fn tanh(&self, x: &Tensor) -> Result<Tensor> {
        activations::tanh(self.gpu, x)
    }

    fn tanh_backward(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        activations::tanh_backward(self.gpu, y, dy)
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
        attention::attention(self.gpu, q, k, v, shape, lengths, dropout)
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
        attention::attention_backward(self.gpu, dout, q, k, v, probs, shape, lengths, dropout)
    }

    fn pool(&self, x: &Tensor, seq: usize, lengths: &[u32], pooling: Pooling) -> Result<Tensor> {
        pooling::pool(self.gpu, x, seq, lengths, pooling)
    }

    fn pool_backward(
        &self,
        dy: &Tensor,
        seq: usize,
        lengths: &[u32],
        pooling: Pooling,
    ) -> Result<Tensor> {
        pooling::pool_backward(self.gpu, dy, seq, lengths, pooling)
    }

    fn cross_entropy(&self, logits: &Tensor, labels: &[u32]) -> Result<(f64, Tensor)> {
        losses::cross_entropy(self.gpu, logits, labels)
    }

    fn softmax_kl(&self, student: &Tensor, loss: &SoftmaxKl) -> Result<(RowLosses, Tensor)> {
        // Uninitialised: the kernel writes every element (ignored rows as zeros).
        let storage = CudaStorage::alloc(self.gpu, student.numel(), student.dtype())?;
        let mut grad = tensor(storage, student.shape())?;
        let losses = losses::softmax_kl(self.gpu, Some(student), &mut grad, loss)?;
        Ok((losses, grad))
    }

    fn softmax_kl_in_place(&self, logits: &mut Tensor, loss: &SoftmaxKl) -> Result<RowLosses> {
        losses::softmax_kl(self.gpu, None, logits, loss)
    }

    fn listwise_cos_kl(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        tau_student: f32,
        tau_teacher: f32,
        direction: KlDirection,
    ) -> Result<(f64, Tensor)> {
        similarity::listwise_cos_kl(
            self.gpu,
            student,
            teacher,
            tau_student,
            tau_teacher,
            direction,
        )
    }

    fn cosine_topk_update(
        &self,
        keys: &Tensor,
        offset: usize,
        queries: &Tensor,
        best: &mut TopK,
    ) -> Result<()> {
        topk::cosine_topk_update(self.gpu, keys, offset, queries, best)
    }

    fn sample(&self, logits: &Tensor, s: &Sampling, step: u64) -> Result<Vec<u32>> {
        sampling::sample(self.gpu, logits, s, step)
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
        optimizer::adamw(self.gpu, param, grad, m, v, hp, step)
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        norms::l2_normalize(self.gpu, x)
    }
}
