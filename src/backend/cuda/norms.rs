//! Layer norm (forward, backward) and row L2 normalisation (kernels/norms.cu).
//!
//! Activations, γ, β and their gradients share one dtype (f32 or bf16); the per-row statistics the
//! forward keeps for the backward are always f32.

use anyhow::{ensure, Result};

use super::elementwise::{column_sums_add, row_chunks};
use super::launch::{kernel, launch, per_column, per_row};
use super::runtime::Gpu;
use super::{expect_dtype, input, output, tensor, CudaStorage};
use crate::backend::NormStats;
use crate::tensor::{DType, Tensor};

/// Checks that each named per-feature operand (γ, β or a gradient of theirs) is `[cols]` of `x`'s
/// dtype; returns `x`'s `(rows, cols)`.
fn check_params(op: &str, x: &Tensor, params: &[(&str, &Tensor)]) -> Result<(usize, usize)> {
    let (rows, cols) = x.rows_cols();
    for &(name, p) in params {
        ensure!(
            p.shape() == [cols],
            "{op}: input has {cols} features but {name} is {:?}",
            p.shape()
        );
        expect_dtype(op, name, p, x.dtype())?;
    }
    Ok((rows, cols))
}

pub(crate) fn layer_norm(
    gpu: &'static Gpu,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, NormStats)> {
    const OP: &str = "layer norm";
    let (rows, cols) = check_params(OP, x, &[("gamma", gamma), ("beta", beta)])?;
    let kernel = kernel!("kdx_layer_norm", x.dtype());
    let (x_s, g_s, b_s) = (
        input(gpu, OP, "x", x)?,
        input(gpu, OP, "gamma", gamma)?,
        input(gpu, OP, "beta", beta)?,
    );
    let mut y = CudaStorage::alloc(gpu, rows * cols, x.dtype())?;
    let mut mean = CudaStorage::alloc(gpu, rows, DType::F32)?;
    let mut rstd = CudaStorage::alloc(gpu, rows, DType::F32)?;
    // SAFETY: kdx_layer_norm_<T>(const T* x, const T* gamma, const T* beta, T* y, float* mean,
    // float* rstd, size_t cols, float eps): x and y [rows, cols], gamma and beta [cols], the
    // statistics [rows]; one block per row.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(rows, cols)?,
            [
                x_s.ptr(),
                g_s.ptr(),
                b_s.ptr(),
                y.ptr_mut()?,
                mean.ptr_mut()?,
                rstd.ptr_mut()?,
                cols,
                eps
            ]
        )
    }?;
    let stats = NormStats {
        mean: tensor(mean, &[rows])?,
        rstd: tensor(rstd, &[rows])?,
    };
    Ok((tensor(y, x.shape())?, stats))
}

/// Returns `dx`; adds `Σ_rows dy·x̂` to `dgamma` and `Σ_rows dy` to `dbeta` through per-chunk
/// partial sums added in chunk order (reproducible, no atomics).
pub(crate) fn layer_norm_backward(
    gpu: &'static Gpu,
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    stats: &NormStats,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<Tensor> {
    const OP: &str = "layer norm backward";
    let (rows, cols) = check_params(
        OP,
        x,
        &[("gamma", gamma), ("dgamma", dgamma), ("dbeta", dbeta)],
    )?;
    ensure!(
        dy.shape() == x.shape(),
        "{OP}: dy is {:?}, x is {:?}",
        dy.shape(),
        x.shape()
    );
    expect_dtype(OP, "dy", dy, x.dtype())?;
    for (name, stat) in [("mean", &stats.mean), ("rstd", &stats.rstd)] {
        ensure!(
            stat.shape() == [rows],
            "{OP}: the saved {name} is {:?}, expected [{rows}]",
            stat.shape()
        );
        expect_dtype(OP, name, stat, DType::F32)?;
    }
    let dx_kernel = kernel!("kdx_layer_norm_backward", x.dtype());
    let partials_kernel = kernel!("kdx_layer_norm_param_partials", x.dtype());
    let dy_ptr = input(gpu, OP, "dy", dy)?.ptr();
    let x_ptr = input(gpu, OP, "x", x)?.ptr();
    let g_ptr = input(gpu, OP, "gamma", gamma)?.ptr();
    let mean_ptr = input(gpu, OP, "the saved mean", &stats.mean)?.ptr();
    let rstd_ptr = input(gpu, OP, "the saved rstd", &stats.rstd)?.ptr();

    let mut dx = CudaStorage::alloc(gpu, rows * cols, x.dtype())?;
    // SAFETY: kdx_layer_norm_backward_<T>(const T* dy, const T* x, const T* gamma,
    // const float* mean, const float* rstd, T* dx, size_t cols); one block per row.
    unsafe {
        launch!(
            gpu,
            dx_kernel,
            per_row(rows, cols)?,
            [
                dy_ptr,
                x_ptr,
                g_ptr,
                mean_ptr,
                rstd_ptr,
                dx.ptr_mut()?,
                cols
            ]
        )
    }?;

    let (rows_per_chunk, chunks) = row_chunks(rows);
    let partials = gpu.alloc(chunks * 2 * cols * std::mem::size_of::<f32>())?;
    let partials_ptr = gpu.ptr(&partials);
    // SAFETY: kdx_layer_norm_param_partials_<T>(const T* dy, const T* x, const float* mean,
    // const float* rstd, size_t rows, size_t cols, size_t rows_per_chunk, float* partials):
    // grid (⌈cols/256⌉, chunks), partials holding chunks · 2·cols floats.
    unsafe {
        launch!(
            gpu,
            partials_kernel,
            per_column(cols, chunks)?,
            [
                dy_ptr,
                x_ptr,
                mean_ptr,
                rstd_ptr,
                rows,
                cols,
                rows_per_chunk,
                partials_ptr
            ]
        )
    }?;
    // Each partials row is [dγ cols | dβ cols].
    let dgamma_s = output(gpu, OP, "dgamma", dgamma)?;
    column_sums_add(gpu, partials_ptr, chunks, 2 * cols, dgamma_s)?;
    let dbeta_s = output(gpu, OP, "dbeta", dbeta)?;
    column_sums_add(
        gpu,
        partials_ptr.offset(cols * std::mem::size_of::<f32>()),
        chunks,
        2 * cols,
        dbeta_s,
    )?;
    tensor(dx, x.shape())
}

/// Rows scaled to unit L2 norm (a zero row stays zero).
pub(crate) fn l2_normalize(gpu: &'static Gpu, x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = x.rows_cols();
    let kernel = kernel!("kdx_l2_normalize", x.dtype());
    let x_ptr = input(gpu, "l2 normalize", "x", x)?.ptr();
    let mut y = CudaStorage::alloc(gpu, rows * cols, x.dtype())?;
    // SAFETY: kdx_l2_normalize_<T>(const T* x, T* y, size_t cols), x and y [rows, cols]; one block
    // per row.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(rows, cols)?,
            [x_ptr, y.ptr_mut()?, cols]
        )
    }?;
    tensor(y, x.shape())
}
