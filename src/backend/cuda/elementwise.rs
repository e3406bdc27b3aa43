//! Element-wise ops, the sum of squares, dropout, dtype conversion and column sums
//! (kernels/elementwise.cu).

use anyhow::{bail, ensure, Result};

use super::launch::{elementwise, kernel, launch, per_column, single_block, Ptr};
use super::runtime::Gpu;
use super::{expect_dtype, input, output, tensor, CudaStorage};
use crate::backend::{check_same_shape, Dropout};
use crate::tensor::{DType, Tensor};

pub(crate) fn add(gpu: &'static Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same_shape("add", a, b)?;
    let kernel = kernel!("kdx_add", a.dtype());
    let (a_s, b_s) = (input(gpu, "add", "a", a)?, input(gpu, "add", "b", b)?);
    let n = a.numel();
    let mut out = CudaStorage::alloc(gpu, n, a.dtype())?;
    // SAFETY: kdx_add_<T>(const T* a, const T* b, T* out, size_t n), each holding n elements of T.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [a_s.ptr(), b_s.ptr(), out.ptr_mut()?, n]
        )
    }?;
    tensor(out, a.shape())
}

pub(crate) fn add_assign(gpu: &Gpu, a: &mut Tensor, b: &Tensor) -> Result<()> {
    check_same_shape("add", a, b)?;
    let kernel = kernel!("kdx_add_assign", a.dtype());
    let n = a.numel();
    // Read before `a` is written: if the two share a buffer, `a` gets a copy and `b` keeps its own.
    let b_ptr = input(gpu, "add", "b", b)?.ptr();
    let a_ptr = output(gpu, "add", "a", a)?.ptr_mut()?;
    // SAFETY: kdx_add_assign_<T>(T* a, const T* b, size_t n), each holding n elements of T.
    unsafe { launch!(gpu, kernel, elementwise(n), [a_ptr, b_ptr, n]) }
}

pub(crate) fn scale(gpu: &Gpu, x: &mut Tensor, factor: f32) -> Result<()> {
    let kernel = kernel!("kdx_scale", x.dtype());
    let n = x.numel();
    let x_ptr = output(gpu, "scale", "x", x)?.ptr_mut()?;
    // SAFETY: kdx_scale_<T>(T* x, size_t n, float factor), x holding n elements of T.
    unsafe { launch!(gpu, kernel, elementwise(n), [x_ptr, n, factor]) }
}

/// Σ x² in f64: one partial sum per block, then one block adds them in order, so the result depends
/// only on the size (the grid is a function of it), never on scheduling.
pub(crate) fn sum_squares(gpu: &Gpu, x: &Tensor) -> Result<f64> {
    let kernel = kernel!("kdx_sum_squares", x.dtype());
    let x_ptr = input(gpu, "sum of squares", "x", x)?.ptr();
    let n = x.numel();
    let config = elementwise(n);
    let blocks = config.grid_dim.0 as usize;
    let partials = gpu.alloc(blocks * std::mem::size_of::<f64>())?;
    let total = gpu.alloc(std::mem::size_of::<f64>())?;
    let (partials_ptr, total_ptr) = (gpu.ptr(&partials), gpu.ptr(&total));
    // SAFETY: kdx_sum_squares_<T>(const T* x, size_t n, double* partials), one partial per block;
    // kdx_sum_f64(const double* values, size_t n, double* out) in one block.
    unsafe {
        launch!(gpu, kernel, config, [x_ptr, n, partials_ptr])?;
        launch!(
            gpu,
            "kdx_sum_f64",
            single_block(),
            [partials_ptr, blocks, total_ptr]
        )?;
    }
    let mut sum = [0f64];
    gpu.download(&total, bytemuck::cast_slice_mut(&mut sum))?;
    Ok(sum[0])
}

/// A [`Dropout`] as the kernels take it (`dropout_factor` in kernels/common.cuh), bit for bit
/// [`Dropout::factor`]: element `i` is dropped iff `hash(seed, i) < p·2^32`, which for the integer
/// hash is `hash < threshold = ⌈p·2^32⌉`; kept elements are multiplied by `scale = 1/(1−p)` rounded
/// to f32, as the CPU does. Off (p = 0): threshold 0 and scale 1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropoutArgs {
    pub(crate) seed: u64,
    pub(crate) threshold: u64,
    pub(crate) scale: f32,
}

impl DropoutArgs {
    pub(crate) fn of(d: Dropout) -> DropoutArgs {
        DropoutArgs {
            seed: d.seed,
            threshold: (d.p as f64 * 4_294_967_296.0).ceil() as u64,
            scale: (1.0 / (1.0 - d.p as f64)) as f32,
        }
    }
}

pub(crate) fn dropout(gpu: &Gpu, x: Tensor, d: Dropout) -> Result<Tensor> {
    let mut y = x;
    if !d.is_active() {
        return Ok(y);
    }
    let kernel = kernel!("kdx_dropout", y.dtype());
    let n = y.numel();
    let mask = DropoutArgs::of(d);
    let y_ptr = output(gpu, "dropout", "x", &mut y)?.ptr_mut()?;
    // SAFETY: kdx_dropout_<T>(T* x, size_t n, uint64_t seed, uint64_t threshold, float scale).
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [y_ptr, n, mask.seed, mask.threshold, mask.scale]
        )
    }?;
    Ok(y)
}

/// `x` converted to `dtype` on the device (f32 ↔ bf16, rounding to nearest even into bf16).
pub(crate) fn convert(x: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    let kernel = match (x.dtype(), dtype) {
        (DType::F32, DType::BF16) => "kdx_f32_to_bf16",
        (DType::BF16, DType::F32) => "kdx_bf16_to_f32",
        (from, to) => bail!(
            "converting {from} to {to} on {} is not supported (f32 ↔ bf16 only): convert on the \
             host, after to_device(Device::Cpu)",
            x.device()
        ),
    };
    let gpu = x.gpu();
    let n = x.len();
    let mut out = CudaStorage::alloc(gpu, n, dtype)?;
    // SAFETY: kdx_<from>_to_<to>(const From* x, To* y, size_t n), each holding n elements.
    unsafe { launch!(gpu, kernel, elementwise(n), [x.ptr(), out.ptr_mut()?, n]) }?;
    Ok(out)
}

/// At most this many chunks of rows in the first stage of a column sum (its partials take
/// `chunks · width` floats); a chunk has at least 32 rows.
const MAX_ROW_CHUNKS: usize = 1024;

/// How a column sum over `rows` splits them: `(rows_per_chunk, chunks)`. A function of the size
/// only, so sums are the same on every GPU.
pub(crate) fn row_chunks(rows: usize) -> (usize, usize) {
    let rows_per_chunk = rows.div_ceil(MAX_ROW_CHUNKS).max(32);
    (rows_per_chunk, rows.div_ceil(rows_per_chunk))
}

/// `out += Σ_rows x` for `x [rows, cols]` and `out [cols]` of the same dtype: per-chunk partial sums,
/// added in chunk order (reproducible, no atomics).
pub(crate) fn column_sums_into(gpu: &Gpu, x: &Tensor, out: &mut Tensor) -> Result<()> {
    let (rows, cols) = x.rows_cols();
    ensure!(
        out.shape() == [cols],
        "column sum: output is {:?}, expected [{cols}]",
        out.shape()
    );
    expect_dtype("column sum", "output", out, x.dtype())?;
    let kernel = kernel!("kdx_column_partials", x.dtype());
    let x_ptr = input(gpu, "column sum", "x", x)?.ptr();
    let (rows_per_chunk, chunks) = row_chunks(rows);
    let partials = gpu.alloc(chunks * cols * std::mem::size_of::<f32>())?;
    let partials_ptr = gpu.ptr(&partials);
    // SAFETY: kdx_column_partials_<T>(const T* x, size_t rows, size_t cols, size_t rows_per_chunk,
    // float* partials): grid (⌈cols/256⌉, chunks), partials holding chunks · cols floats.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_column(cols, chunks)?,
            [x_ptr, rows, cols, rows_per_chunk, partials_ptr]
        )
    }?;
    let out_s = output(gpu, "column sum", "output", out)?;
    column_sums_add(gpu, partials_ptr, chunks, cols, out_s)
}

/// `out[c] += Σ_k partials[k·stride + c]` for `c < out.len()`: the ordered second stage of a
/// column reduction whose first stage wrote `chunks` rows of f32 partial sums at `partials`.
pub(crate) fn column_sums_add(
    gpu: &Gpu,
    partials: Ptr,
    chunks: usize,
    stride: usize,
    out: &mut CudaStorage,
) -> Result<()> {
    let kernel = kernel!("kdx_column_sums_add", out.dtype());
    let width = out.len();
    let out_ptr = out.ptr_mut()?;
    // SAFETY: kdx_column_sums_add_<T>(const float* partials, size_t chunks, size_t stride,
    // size_t width, T* out); partials holds chunks rows of stride floats, width ≤ stride.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(width),
            [partials, chunks, stride, width, out_ptr]
        )
    }
}
