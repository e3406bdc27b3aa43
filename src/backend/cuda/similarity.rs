//! RetriKT's listwise loss over in-batch cosine similarities (kernels/similarity.cu): unit rows, the
//! two similarity products on the GEMM, one block per row for the two log-softmaxes, the loss and
//! `∂L/∂sim`, the gradient product `dÛ = (G + Gᵀ)·Û` as two GEMMs, and back through the norms.
//! All in f32 (cosines over small temperatures need it), the gradient stored in the inputs' dtype.

use anyhow::Result;

use super::gemm::matmul;
use super::launch::{kernel, launch, per_row};
use super::runtime::Gpu;
use super::{input, tensor, CudaStorage};
use crate::backend::cpu::similarity::check_listwise;
use crate::backend::{KlDirection, Transpose};
use crate::tensor::{DType, Tensor};

/// The rows of `x` at unit length (an f32 device tensor) and their norms.
fn unit_rows(gpu: &'static Gpu, x: &Tensor) -> Result<(Tensor, CudaStorage)> {
    let (rows, cols) = x.rows_cols();
    let kernel = kernel!("kdx_unit_rows", x.dtype());
    let x_ptr = input(gpu, "listwise KL", "embeddings", x)?.ptr();
    let mut unit = CudaStorage::alloc(gpu, rows * cols, DType::F32)?;
    let mut norms = CudaStorage::alloc(gpu, rows, DType::F32)?;
    // SAFETY: kdx_unit_rows_<T>(const T* x, float* unit, float* norms, size_t cols): x and unit
    // [rows, cols], norms [rows]; one block per row.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(rows, cols)?,
            [x_ptr, unit.ptr_mut()?, norms.ptr_mut()?, cols]
        )
    }?;
    Ok((tensor(unit, &[rows, cols])?, norms))
}

/// `Σ_i KL` of the student's and teacher's in-batch similarity distributions and the gradient with
/// respect to the student rows (see `Backend::listwise_cos_kl`).
pub(crate) fn listwise_cos_kl(
    gpu: &'static Gpu,
    student: &Tensor,
    teacher: &Tensor,
    tau_student: f32,
    tau_teacher: f32,
    direction: KlDirection,
) -> Result<(f64, Tensor)> {
    let (n, ds, _) = check_listwise(student, teacher, tau_student, tau_teacher)?;
    let grad_kernel = kernel!("kdx_unit_rows_backward", student.dtype());
    let (s_unit, s_norms) = unit_rows(gpu, student)?;
    let (t_unit, _) = unit_rows(gpu, teacher)?;
    let similarities = |unit: &Tensor| -> Result<Tensor> {
        let mut sim = tensor(CudaStorage::alloc(gpu, n * n, DType::F32)?, &[n, n])?;
        matmul(gpu, unit, unit, Transpose::NT, &mut sim, false)?;
        Ok(sim)
    };
    // The student's similarities become G = ∂L/∂sim in place.
    let mut g = similarities(&s_unit)?;
    let sim_t = similarities(&t_unit)?;
    let losses = gpu.alloc(n * std::mem::size_of::<f64>())?;
    let reverse = u32::from(direction == KlDirection::StudentTeacher);
    let g_ptr = super::output(gpu, "listwise KL", "similarities", &mut g)?.ptr_mut()?;
    // SAFETY: kdx_listwise_kl_rows(float* sim_s, const float* sim_t, double* losses, size_t n,
    // float inv_tau_s, float inv_tau_t, uint32_t reverse): sim_s and sim_t [n, n], losses [n]; one
    // block per row.
    unsafe {
        launch!(
            gpu,
            "kdx_listwise_kl_rows",
            per_row(n, n)?,
            [
                g_ptr,
                input(gpu, "listwise KL", "teacher similarities", &sim_t)?.ptr(),
                gpu.ptr(&losses),
                n,
                1.0 / tau_student,
                1.0 / tau_teacher,
                reverse
            ]
        )
    }?;
    // sim_S = Û Ûᵀ, so dÛ = (G + Gᵀ) Û.
    let mut d_unit = tensor(CudaStorage::alloc(gpu, n * ds, DType::F32)?, &[n, ds])?;
    matmul(gpu, &g, &s_unit, Transpose::NN, &mut d_unit, false)?;
    matmul(gpu, &g, &s_unit, Transpose::TN, &mut d_unit, true)?;
    let mut grad = CudaStorage::alloc(gpu, n * ds, student.dtype())?;
    // SAFETY: kdx_unit_rows_backward_<T>(const float* unit, const float* dunit,
    // const float* norms, T* dx, size_t cols): unit, dunit and dx [n, ds], norms [n]; one block
    // per row.
    unsafe {
        launch!(
            gpu,
            grad_kernel,
            per_row(n, ds)?,
            [
                input(gpu, "listwise KL", "unit rows", &s_unit)?.ptr(),
                input(gpu, "listwise KL", "unit gradient", &d_unit)?.ptr(),
                s_norms.ptr(),
                grad.ptr_mut()?,
                ds
            ]
        )
    }?;
    let mut row_losses = vec![0f64; n];
    gpu.download(&losses, bytemuck::cast_slice_mut(&mut row_losses))?;
    Ok((row_losses.iter().sum(), tensor(grad, student.shape())?))
}
