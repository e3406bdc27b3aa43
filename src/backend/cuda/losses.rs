//! Losses fused with their gradient: cross-entropy against hard labels (kernels/losses.cu).

use anyhow::{bail, ensure, Result};

use super::launch::{kernel, launch, per_row};
use super::runtime::Gpu;
use super::{input, tensor, CudaStorage};
use crate::tensor::Tensor;

/// Mean over rows of `−log softmax(z)[label]` and its gradient `(softmax(z) − onehot) / rows`. The
/// kernel writes each row's loss; the host adds them in row order in f64, as the CPU does.
pub(crate) fn cross_entropy(
    gpu: &'static Gpu,
    logits: &Tensor,
    labels: &[u32],
) -> Result<(f64, Tensor)> {
    const OP: &str = "cross-entropy";
    let (rows, classes) = logits.rows_cols();
    ensure!(
        labels.len() == rows,
        "{OP}: {} labels for {rows} rows of logits",
        labels.len()
    );
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        bail!("{OP}: label {l} of row {i} is out of range for {classes} classes");
    }
    let kernel = kernel!("kdx_cross_entropy", logits.dtype());
    let logits_ptr = input(gpu, OP, "logits", logits)?.ptr();
    let labels_buf = gpu.upload(bytemuck::cast_slice(labels))?;
    let mut grad = CudaStorage::alloc(gpu, rows * classes, logits.dtype())?;
    let losses = gpu.alloc(rows * std::mem::size_of::<f64>())?;
    let inv_rows = (1.0 / rows as f64) as f32;
    // SAFETY: kdx_cross_entropy_<T>(const T* logits, const uint32_t* labels, T* grad,
    // double* losses, size_t classes, float inv_rows): logits and grad [rows, classes], labels and
    // losses [rows], every label below classes; one block per row.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(rows, classes)?,
            [
                logits_ptr,
                gpu.ptr(&labels_buf),
                grad.ptr_mut()?,
                gpu.ptr(&losses),
                classes,
                inv_rows
            ]
        )
    }?;
    let mut row_losses = vec![0f64; rows];
    gpu.download(&losses, bytemuck::cast_slice_mut(&mut row_losses))?;
    let mean = row_losses.iter().sum::<f64>() / rows as f64;
    Ok((mean, tensor(grad, logits.shape())?))
}
