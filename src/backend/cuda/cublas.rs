//! Matrix products on cuBLAS: the `--gemm cublas` baseline that the engine's own GEMM is compared
//! with end to end, and the matrix-rate ceiling `kdx bench` measures. f32 in exact f32 arithmetic
//! (compute type 32F: no TF32, like the engine's f32 kernel), bf16 on the tensor cores with f32
//! accumulation.

use std::ffi::c_void;

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::{result as blas, sys as blas_sys};

use super::launch::Ptr;
use super::runtime::Gpu;
use crate::backend::Transpose;
use crate::tensor::DType;

/// `batch` row-major products `c[z] (+)= op(a[z])·op(b[z])` of an m×k by a k×n matrix, consecutive
/// in memory (b `b_stride` elements apart, 0 when shared), queued on the device's stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    gpu: &Gpu,
    dtype: DType,
    t: Transpose,
    (m, n, k): (usize, usize, usize),
    batch: usize,
    b_stride: usize,
    (a, b, c): (Ptr, Ptr, Ptr),
    accumulate: bool,
) -> Result<()> {
    let data_type = match dtype {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        other => bail!("cuBLAS products take f32 or bf16 here, not {other}"),
    };
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| anyhow!("cuBLAS: a matrix dimension of {v} exceeds 2^31 − 1"))
    };
    let op = |transposed: bool| {
        if transposed {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    // cuBLAS is column-major: a row-major c is a column-major cᵀ = op(b)ᵀ·op(a)ᵀ, and a row-major
    // operand read as column-major is its own transpose. So b goes first, each operand with its own
    // transpose flag and its stored row width as the leading dimension.
    let (lda, ldb) = (if t.a { m } else { k }, if t.b { k } else { n });
    let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
    let handle = gpu.blas()?;
    // SAFETY: a, b and c hold `batch` products of m·k, k·n (b_stride apart) and m·n elements of
    // `dtype` on the device of the handle's stream; alpha and beta are host f32 values, as the
    // default pointer mode and compute type 32F read them.
    unsafe {
        blas::gemm_strided_batched_ex(
            *handle.handle(),
            op(t.b),
            op(t.a),
            int(n)?,
            int(m)?,
            int(k)?,
            (&alpha as *const f32).cast::<c_void>(),
            b.0 as *const c_void,
            data_type,
            int(ldb)?,
            b_stride as i64,
            a.0 as *const c_void,
            data_type,
            int(lda)?,
            (m * k) as i64,
            (&beta as *const f32).cast::<c_void>(),
            c.0 as *mut c_void,
            data_type,
            int(n)?,
            (m * n) as i64,
            int(batch)?,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| anyhow!("{}: cuBLAS GEMM: {e:?}", gpu.device()))
}
