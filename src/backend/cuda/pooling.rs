//! Sequence pooling and its backward: mean over real tokens, or the first token
//! (kernels/pooling.cu).

use anyhow::{ensure, Result};

use super::launch::{elementwise, kernel, launch};
use super::runtime::Gpu;
use super::{input, tensor, CudaStorage};
use crate::backend::Pooling;
use crate::tensor::Tensor;

fn check(x_rows: usize, seq: usize, lengths: &[u32]) -> Result<()> {
    ensure!(
        seq > 0 && x_rows == lengths.len() * seq,
        "pooling: {x_rows} rows do not hold {} sequences of {seq} positions",
        lengths.len()
    );
    ensure!(
        lengths.iter().all(|&l| l >= 1 && l as usize <= seq),
        "pooling: every length must be in 1..={seq}, got {lengths:?}"
    );
    Ok(())
}

/// The kernels' `mean` flag.
fn mean_flag(pooling: Pooling) -> i32 {
    match pooling {
        Pooling::Mean => 1,
        Pooling::Cls => 0,
    }
}

pub(crate) fn pool(
    gpu: &'static Gpu,
    x: &Tensor,
    seq: usize,
    lengths: &[u32],
    pooling: Pooling,
) -> Result<Tensor> {
    let (rows, hidden) = x.rows_cols();
    check(rows, seq, lengths)?;
    let kernel = kernel!("kdx_pool", x.dtype());
    let x_ptr = input(gpu, "pooling", "x", x)?.ptr();
    let lengths_buf = gpu.upload(bytemuck::cast_slice(lengths))?;
    let batch = lengths.len();
    let mut out = CudaStorage::alloc(gpu, batch * hidden, x.dtype())?;
    // SAFETY: kdx_pool_<T>(const T* x, const uint32_t* lengths, T* out, size_t batch, size_t seq,
    // size_t hidden, int mean): x [batch·seq, hidden], lengths [batch] in 1..=seq, out
    // [batch, hidden].
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(batch * hidden),
            [
                x_ptr,
                gpu.ptr(&lengths_buf),
                out.ptr_mut()?,
                batch,
                seq,
                hidden,
                mean_flag(pooling)
            ]
        )
    }?;
    tensor(out, &[batch, hidden])
}

pub(crate) fn pool_backward(
    gpu: &'static Gpu,
    dy: &Tensor,
    seq: usize,
    lengths: &[u32],
    pooling: Pooling,
) -> Result<Tensor> {
    let (batch, hidden) = dy.rows_cols();
    ensure!(
        batch == lengths.len(),
        "pooling backward: dy has {batch} rows for {} sequences",
        lengths.len()
    );
    check(batch * seq, seq, lengths)?;
    let kernel = kernel!("kdx_pool_backward", dy.dtype());
    let dy_ptr = input(gpu, "pooling backward", "dy", dy)?.ptr();
    let lengths_buf = gpu.upload(bytemuck::cast_slice(lengths))?;
    let n = batch * seq * hidden;
    let mut dx = CudaStorage::alloc(gpu, n, dy.dtype())?;
    // SAFETY: kdx_pool_backward_<T>(const T* dy, const uint32_t* lengths, T* dx, size_t batch,
    // size_t seq, size_t hidden, int mean): dy [batch, hidden], lengths [batch] in 1..=seq,
    // dx [batch·seq, hidden], every element written.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [
                dy_ptr,
                gpu.ptr(&lengths_buf),
                dx.ptr_mut()?,
                batch,
                seq,
                hidden,
                mean_flag(pooling)
            ]
        )
    }?;
    tensor(dx, &[batch * seq, hidden])
}
