//! Layer norm and RMSNorm (forward, backward) and row L2 normalisation (kernels/norms.cu).
//!
//! Activations, γ, β (RMSNorm's weight) and their gradients share one dtype (f32 or bf16); the
//! per-row statistics the forward keeps for the backward are always f32.

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use super::elementwise::{column_sums_add, row_chunks};
use super::launch::{kernel, launch, per_column, per_row, Ptr};
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

/// Checks the backward's `dy` against `x`, and each saved per-row statistic (named) against `rows`.
fn check_backward(
    op: &str,
    dy: &Tensor,
    x: &Tensor,
    rows: usize,
    stats: &[(&str, &Tensor)],
) -> Result<()> {
    ensure!(
        dy.shape() == x.shape(),
        "{op}: dy is {:?}, x is {:?}",
        dy.shape(),
        x.shape()
    );
    expect_dtype(op, "dy", dy, x.dtype())?;
    for &(name, stat) in stats {
        ensure!(
            stat.shape() == [rows],
            "{op}: the saved {name} is {:?}, expected [{rows}]",
            stat.shape()
        );
        expect_dtype(op, name, stat, DType::F32)?;
    }
    Ok(())
}

/// `outs[k] += Σ_rows` of the k-th per-element term of a parameter gradient, reproducibly and
/// without atomics. `first_stage(config, rows_per_chunk, partials)` launches a kernel over
/// `config` that writes each chunk's sums of the terms to `partials`, laid out
/// `[chunk][term k's cols]`; each term's chunks are then added in chunk order.
fn add_param_grads(
    gpu: &'static Gpu,
    op: &str,
    rows: usize,
    cols: usize,
    outs: &mut [(&str, &mut Tensor)],
    first_stage: impl FnOnce(LaunchConfig, usize, Ptr) -> Result<()>,
) -> Result<()> {
    let terms = outs.len();
    let (rows_per_chunk, chunks) = row_chunks(rows);
    let partials = gpu.alloc(chunks * terms * cols * std::mem::size_of::<f32>())?;
    let partials_ptr = gpu.ptr(&partials);
    first_stage(per_column(cols, chunks)?, rows_per_chunk, partials_ptr)?;
    for (k, (name, out)) in outs.iter_mut().enumerate() {
        let out_s = output(gpu, op, name, out)?;
        column_sums_add(
            gpu,
            partials_ptr.offset(k * cols * std::mem::size_of::<f32>()),
            chunks,
            terms * cols,
            out_s,
        )?;
    }
    Ok(())
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
    check_backward(
        OP,
        dy,
        x,
        rows,
        &[("mean", &stats.mean), ("rstd", &stats.rstd)],
    )?;
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

    add_param_grads(
        gpu,
        OP,
        rows,
        cols,
        &mut [("dgamma", dgamma), ("dbeta", dbeta)],
        |config, rows_per_chunk, partials| {
            // SAFETY: kdx_layer_norm_param_partials_<T>(const T* dy, const T* x,
            // const float* mean, const float* rstd, size_t rows, size_t cols,
            // size_t rows_per_chunk, float* partials): the launch and partials add_param_grads
            // sets up for two terms.
            unsafe {
                launch!(
                    gpu,
                    partials_kernel,
                    config,
                    [
                        dy_ptr,
                        x_ptr,
                        mean_ptr,
                        rstd_ptr,
                        rows,
                        cols,
                        rows_per_chunk,
                        partials
                    ]
                )
            }
        },
    )?;
    tensor(dx, x.shape())
}

/// Checks RMSNorm's operands as the CPU does (a weight of `x`'s dtype and `[cols]`, at least one
/// feature); returns `x`'s `(rows, cols)`.
fn check_rms(op: &str, x: &Tensor, weights: &[(&str, &Tensor)]) -> Result<(usize, usize)> {
    let (rows, cols) = check_params(op, x, weights)?;
    ensure!(
        !x.shape().is_empty() && cols > 0,
        "{op}: input {:?} has no features to normalise",
        x.shape()
    );
    Ok((rows, cols))
}

/// Returns `y` and each row's 1/rms (`stats.rstd`, f32); `stats.mean` is empty.
pub(crate) fn rms_norm(
    gpu: &'static Gpu,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, NormStats)> {
    const OP: &str = "RMSNorm";
    let (rows, cols) = check_rms(OP, x, &[("weight", weight)])?;
    let kernel = kernel!("kdx_rms_norm", x.dtype());
    let x_ptr = input(gpu, OP, "x", x)?.ptr();
    let w_ptr = input(gpu, OP, "weight", weight)?.ptr();
    let mut y = CudaStorage::alloc(gpu, rows * cols, x.dtype())?;
    let mut rstd = CudaStorage::alloc(gpu, rows, DType::F32)?;
    // SAFETY: kdx_rms_norm_<T>(const T* x, const T* weight, T* y, float* rstd, size_t cols,
    // float eps): x and y [rows, cols], weight [cols], rstd [rows]; one block per row.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(rows, cols)?,
            [x_ptr, w_ptr, y.ptr_mut()?, rstd.ptr_mut()?, cols, eps]
        )
    }?;
    let stats = NormStats {
        mean: tensor(CudaStorage::alloc(gpu, 0, DType::F32)?, &[0])?,
        rstd: tensor(rstd, &[rows])?,
    };
    Ok((tensor(y, x.shape())?, stats))
}

/// Returns `dx`; adds `Σ_rows dy·x·r` to `dweight` when given, like
/// [`layer_norm_backward`]'s parameter gradients.
pub(crate) fn rms_norm_backward(
    gpu: &'static Gpu,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    stats: &NormStats,
    dweight: Option<&mut Tensor>,
) -> Result<Tensor> {
    const OP: &str = "RMSNorm backward";
    let (rows, cols) = match dweight.as_deref() {
        Some(dw) => check_rms(OP, x, &[("weight", weight), ("dweight", dw)])?,
        None => check_rms(OP, x, &[("weight", weight)])?,
    };
    check_backward(OP, dy, x, rows, &[("1/rms", &stats.rstd)])?;
    let dx_kernel = kernel!("kdx_rms_norm_backward", x.dtype());
    let dy_ptr = input(gpu, OP, "dy", dy)?.ptr();
    let x_ptr = input(gpu, OP, "x", x)?.ptr();
    let w_ptr = input(gpu, OP, "weight", weight)?.ptr();
    let rstd_ptr = input(gpu, OP, "the saved 1/rms", &stats.rstd)?.ptr();
    let mut dx = CudaStorage::alloc(gpu, rows * cols, x.dtype())?;
    // SAFETY: kdx_rms_norm_backward_<T>(const T* dy, const T* x, const T* weight,
    // const float* rstd, T* dx, size_t cols): dy, x and dx [rows, cols], weight [cols], rstd
    // [rows]; one block per row.
    unsafe {
        launch!(
            gpu,
            dx_kernel,
            per_row(rows, cols)?,
            [dy_ptr, x_ptr, w_ptr, rstd_ptr, dx.ptr_mut()?, cols]
        )
    }?;
    if let Some(dweight) = dweight {
        let partials_kernel = kernel!("kdx_rms_norm_weight_partials", x.dtype());
        add_param_grads(
            gpu,
            OP,
            rows,
            cols,
            &mut [("dweight", dweight)],
            |config, rows_per_chunk, partials| {
                // SAFETY: kdx_rms_norm_weight_partials_<T>(const T* dy, const T* x,
                // const float* rstd, size_t rows, size_t cols, size_t rows_per_chunk,
                // float* partials): the launch and partials add_param_grads sets up for one term.
                unsafe {
                    launch!(
                        gpu,
                        partials_kernel,
                        config,
                        [
                            dy_ptr,
                            x_ptr,
                            rstd_ptr,
                            rows,
                            cols,
                            rows_per_chunk,
                            partials
                        ]
                    )
                }
            },
        )?;
    }
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
