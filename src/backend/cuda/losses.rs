//! Losses fused with their gradient: cross-entropy against hard labels and the general softmax-KL
//! distillation loss (kernels/losses.cu).

use anyhow::{bail, ensure, Result};

use cudarc::driver::LaunchConfig;

use super::launch::{kernel, lanes_per_row, launch, per_row};
use super::runtime::Gpu;
use super::{input, output, tensor, CudaStorage};
use crate::backend::{check_same_shape, KlDirection, RowLosses, SoftmaxKl, Teacher};
use crate::tensor::{DType, Tensor};

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

/// Who works on one row of the softmax-KL kernel, by row length: a thread for a handful of classes
/// (many rows of C = 2 or 3), a warp up to a few thousand, a whole block beyond (vocabularies).
/// Returns the kernel for `dtype` and its launch shape.
fn softmax_kl_kernel(
    rows: usize,
    classes: usize,
    dtype: DType,
) -> Result<(&'static str, LaunchConfig)> {
    Ok(if classes <= 16 {
        (
            kernel!("kdx_softmax_kl_thread", dtype),
            lanes_per_row(rows, 1)?,
        )
    } else if classes <= 4096 {
        (
            kernel!("kdx_softmax_kl_warp", dtype),
            lanes_per_row(rows, 32)?,
        )
    } else {
        (
            kernel!("kdx_softmax_kl_block", dtype),
            per_row(rows, classes.min(512))?,
        )
    })
}

/// The fused softmax-KL loss ([`SoftmaxKl`]) of `student` logits, its gradient written to `grad`
/// (which may be `student` itself: the in-place call passes the same buffer twice). Per-row settings
/// go to the device as one `[rows, 3]` array; the kernel writes each row's loss and the host takes
/// the mean in row order, as the CPU does.
pub(crate) fn softmax_kl(
    gpu: &'static Gpu,
    student: Option<&Tensor>,
    grad: &mut Tensor,
    spec: &SoftmaxKl,
) -> Result<RowLosses> {
    const OP: &str = "softmax-KL";
    let counted = spec.validate(student.unwrap_or(grad))?;
    if let Some(s) = student {
        check_same_shape("softmax-KL (student vs gradient)", s, grad)?;
    }
    let (rows, classes) = grad.rows_cols();
    if rows == 0 || classes == 0 {
        return Ok(RowLosses {
            mean: 0.0,
            rows: vec![0.0; rows],
        });
    }
    let (teacher, teacher_probs) = match spec.teacher {
        Teacher::Logits(t) => (t, 0u32),
        Teacher::Probs(t) => (t, 1u32),
    };
    let terms = &spec.terms;
    let settings: Vec<f32> = (0..rows)
        .flat_map(|r| {
            [
                terms.temperature.get(r),
                terms.kl_weight.get(r),
                terms.ce_weight.get(r),
            ]
        })
        .collect();
    // Without labels every row counts and (validated) no CE weight is set: label 0 is never read.
    let labels = terms
        .labels
        .map_or_else(|| vec![0u32; rows], <[u32]>::to_vec);
    let reverse = u32::from(terms.direction == KlDirection::StudentTeacher);
    let scale = if counted == 0 {
        0.0
    } else {
        1.0 / counted as f64
    };
    let (kernel, config) = softmax_kl_kernel(rows, classes, grad.dtype())?;
    let teacher_ptr = input(gpu, OP, "teacher", teacher)?.ptr();
    let settings_buf = gpu.upload(bytemuck::cast_slice(&settings))?;
    let labels_buf = gpu.upload(bytemuck::cast_slice(&labels))?;
    let losses = gpu.alloc(rows * std::mem::size_of::<f64>())?;
    let grad_ptr = output(gpu, OP, "gradient", grad)?.ptr_mut()?;
    let student_ptr = match student {
        Some(s) => input(gpu, OP, "student", s)?.ptr(),
        None => grad_ptr,
    };
    // SAFETY: kdx_softmax_kl_<shape>_<T>(const T* student, const T* teacher, T* grad,
    // const float* settings, const uint32_t* labels, double* losses, size_t rows, size_t classes,
    // float scale, uint32_t teacher_probs, uint32_t reverse): student, teacher and grad
    // [rows, classes] (grad may be student), settings [rows, 3], labels and losses [rows], every
    // label below classes or IGNORE_INDEX (validated); the shape matches the kernel's (see
    // softmax_kl_kernel).
    unsafe {
        launch!(
            gpu,
            kernel,
            config,
            [
                student_ptr,
                teacher_ptr,
                grad_ptr,
                gpu.ptr(&settings_buf),
                gpu.ptr(&labels_buf),
                gpu.ptr(&losses),
                rows,
                classes,
                scale as f32,
                teacher_probs,
                reverse
            ]
        )
    }?;
    let mut row_losses = vec![0f64; rows];
    gpu.download(&losses, bytemuck::cast_slice_mut(&mut row_losses))?;
    let mean = row_losses.iter().sum::<f64>() * scale;
    Ok(RowLosses {
        mean,
        rows: row_losses,
    })
}
