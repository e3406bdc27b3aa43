//! Activations and their backward: GELU (erf form), tanh and SwiGLU (kernels/activations.cu).

use anyhow::Result;

use super::launch::{elementwise, kernel, launch};
use super::runtime::Gpu;
use super::{input, tensor, CudaStorage};
use crate::backend::check_same_shape;
use crate::tensor::Tensor;

/// `y = f(x)` element-wise by `kernel`, a `(const T* x, T* y, size_t n)` kernel.
fn forward(gpu: &'static Gpu, op: &str, kernel: &'static str, x: &Tensor) -> Result<Tensor> {
    let x_ptr = input(gpu, op, "x", x)?.ptr();
    let n = x.numel();
    let mut y = CudaStorage::alloc(gpu, n, x.dtype())?;
    // SAFETY: (const T* x, T* y, size_t n), both holding n elements of T.
    unsafe { launch!(gpu, kernel, elementwise(n), [x_ptr, y.ptr_mut()?, n]) }?;
    tensor(y, x.shape())
}

/// `dx = dy·f'(saved)` element-wise by `kernel`, a `(const T* saved, const T* dy, T* dx, size_t n)`
/// kernel; `saved` is the forward's input (GELU) or output (tanh).
fn backward(
    gpu: &'static Gpu,
    op: &str,
    kernel: &'static str,
    saved: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    check_same_shape(op, saved, dy)?;
    let saved_ptr = input(gpu, op, "the saved activation", saved)?.ptr();
    let dy_ptr = input(gpu, op, "dy", dy)?.ptr();
    let n = saved.numel();
    let mut dx = CudaStorage::alloc(gpu, n, saved.dtype())?;
    // SAFETY: (const T* saved, const T* dy, T* dx, size_t n), each holding n elements of T.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [saved_ptr, dy_ptr, dx.ptr_mut()?, n]
        )
    }?;
    tensor(dx, saved.shape())
}

pub(crate) fn gelu(gpu: &'static Gpu, x: &Tensor) -> Result<Tensor> {
    forward(gpu, "gelu", kernel!("kdx_gelu", x.dtype()), x)
}

pub(crate) fn gelu_backward(gpu: &'static Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let kernel = kernel!("kdx_gelu_backward", x.dtype());
    backward(gpu, "gelu backward", kernel, x, dy)
}

pub(crate) fn tanh(gpu: &'static Gpu, x: &Tensor) -> Result<Tensor> {
    forward(gpu, "tanh", kernel!("kdx_tanh", x.dtype()), x)
}

/// From the forward's output `y`: `dx = (1 − y²)·dy`.
pub(crate) fn tanh_backward(gpu: &'static Gpu, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let kernel = kernel!("kdx_tanh_backward", y.dtype());
    backward(gpu, "tanh backward", kernel, y, dy)
}

/// `silu(gate)·up`, `silu(x) = x·σ(x)`.
pub(crate) fn swiglu(gpu: &'static Gpu, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "SwiGLU";
    check_same_shape("SwiGLU (gate vs up)", gate, up)?;
    let kernel = kernel!("kdx_swiglu", gate.dtype());
    let gate_ptr = input(gpu, OP, "gate", gate)?.ptr();
    let up_ptr = input(gpu, OP, "up", up)?.ptr();
    let n = gate.numel();
    let mut y = CudaStorage::alloc(gpu, n, gate.dtype())?;
    // SAFETY: kdx_swiglu_<T>(const T* gate, const T* up, T* y, size_t n), each holding n elements
    // of T.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [gate_ptr, up_ptr, y.ptr_mut()?, n]
        )
    }?;
    tensor(y, gate.shape())
}

/// Returns `(dgate, dup)`.
pub(crate) fn swiglu_backward(
    gpu: &'static Gpu,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "SwiGLU backward";
    check_same_shape("SwiGLU backward (gate vs up)", gate, up)?;
    check_same_shape("SwiGLU backward (gate vs dy)", gate, dy)?;
    let kernel = kernel!("kdx_swiglu_backward", gate.dtype());
    let gate_ptr = input(gpu, OP, "gate", gate)?.ptr();
    let up_ptr = input(gpu, OP, "up", up)?.ptr();
    let dy_ptr = input(gpu, OP, "dy", dy)?.ptr();
    let n = gate.numel();
    let mut dgate = CudaStorage::alloc(gpu, n, gate.dtype())?;
    let mut dup = CudaStorage::alloc(gpu, n, gate.dtype())?;
    // SAFETY: kdx_swiglu_backward_<T>(const T* gate, const T* up, const T* dy, T* dgate, T* dup,
    // size_t n), each holding n elements of T.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [
                gate_ptr,
                up_ptr,
                dy_ptr,
                dgate.ptr_mut()?,
                dup.ptr_mut()?,
                n
            ]
        )
    }?;
    Ok((tensor(dgate, gate.shape())?, tensor(dup, gate.shape())?))
}
