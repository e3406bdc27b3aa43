//! Matrix products (kernels/gemm.cu): batched `matmul` with transposes and accumulation, `linear`
//! with its bias added in the kernel's epilogue, and `linear_backward`. bf16 runs on the tensor
//! cores with f32 accumulation; f32 runs exact f32 arithmetic on the CUDA cores (TF32 would miss
//! f32's tolerance). Shapes, checks and messages are the CPU's (src/backend/cpu/gemm.rs).

use anyhow::{ensure, Result};

use super::cublas;
use super::elementwise::column_sums_into;
use super::launch::{self, kernel, launch, Ptr, GEMM_BF16_SHARED, GEMM_MAX_BATCH};
use super::runtime::{Gemm, Gpu};
use super::{expect_dtype, input, output, tensor, CudaStorage};
use crate::backend::{check_linear_backward, MatmulDims, Transpose};
use crate::tensor::{DType, Tensor};

/// `batch` products `c[z] (+)= op(a[z])·op(b[z]) (+ bias)` of an m×k by a k×n matrix, row-major,
/// consecutive in memory.
struct Product {
    t: Transpose,
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    /// Elements from one product's b to the next: k·n, or 0 when every product shares one b.
    b_stride: usize,
}

impl Product {
    /// Queues the products; `bias` ([n]) is added to every row of every product.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        gpu: &Gpu,
        dtype: DType,
        a: Ptr,
        b: Ptr,
        bias: Option<Ptr>,
        c: Ptr,
        accumulate: bool,
    ) -> Result<()> {
        let Product {
            t,
            m,
            n,
            k,
            batch,
            b_stride,
        } = *self;
        // The kernels count k-tiles in 32-bit integers.
        ensure!(
            k <= i32::MAX as usize,
            "a matrix product over k = {k} exceeds the kernels' limit of 2^31 − 1"
        );
        if gpu.gemm() == Gemm::Cublas {
            cublas::product(
                gpu,
                dtype,
                t,
                (m, n, k),
                batch,
                b_stride,
                (a, b, c),
                accumulate,
            )?;
            return match bias {
                Some(bias) => add_rows(gpu, dtype, c, bias, batch * m, n),
                None => Ok(()),
            };
        }
        let kernel = match (t.a, t.b) {
            (false, false) => kernel!("kdx_gemm_nn", dtype),
            (false, true) => kernel!("kdx_gemm_nt", dtype),
            (true, false) => kernel!("kdx_gemm_tn", dtype),
            (true, true) => kernel!("kdx_gemm_tt", dtype),
        };
        let elem = dtype.size_in_bytes();
        // A null pointer tells the kernel there is no bias.
        let bias = bias.unwrap_or(Ptr(0));
        let accumulate = i32::from(accumulate);
        for first in (0..batch).step_by(GEMM_MAX_BATCH) {
            let count = (batch - first).min(GEMM_MAX_BATCH);
            let a = a.offset(first * m * k * elem);
            let b = b.offset(first * b_stride * elem);
            let c = c.offset(first * m * n * elem);
            if dtype == DType::BF16 {
                // The operands' contiguous dimensions: k unless a is transposed, n unless b is.
                let vec_a = i32::from(copies_16_bytes(a, if t.a { m } else { k }));
                let vec_b = i32::from(copies_16_bytes(b, if t.b { k } else { n }));
                // SAFETY: kdx_gemm_<tt>_bf16(const bf16* a, const bf16* b, const bf16* bias,
                // bf16* c, size_t m, size_t n, size_t k, size_t b_stride, int accumulate,
                // int vec_a, int vec_b): `count` products of a [m·k], b [k·n] (b_stride apart) and
                // c [m·n]; bias null or [n].
                unsafe {
                    launch!(
                        gpu,
                        kernel,
                        launch::gemm(m, n, count, GEMM_BF16_SHARED)?,
                        [a, b, bias, c, m, n, k, b_stride, accumulate, vec_a, vec_b]
                    )
                }?;
            } else {
                // SAFETY: kdx_gemm_<tt>_f32(const float* a, const float* b, const float* bias,
                // float* c, size_t m, size_t n, size_t k, size_t b_stride, int accumulate), buffers
                // as above.
                unsafe {
                    launch!(
                        gpu,
                        kernel,
                        launch::gemm(m, n, count, 0)?,
                        [a, b, bias, c, m, n, k, b_stride, accumulate]
                    )
                }?;
            }
        }
        Ok(())
    }
}

/// `c[r, :] += bias` over `rows` rows of `cols`: the bias of a product made on cuBLAS.
fn add_rows(gpu: &Gpu, dtype: DType, c: Ptr, bias: Ptr, rows: usize, cols: usize) -> Result<()> {
    let kernel = kernel!("kdx_add_rows", dtype);
    let n = rows * cols;
    // SAFETY: kdx_add_rows_<T>(T* x, const T* row, size_t n, size_t cols): c holds n elements of
    // T, bias cols.
    unsafe { launch!(gpu, kernel, launch::elementwise(n), [c, bias, n, cols]) }
}

/// Whether the bf16 kernel may copy an operand in 16-byte chunks: its contiguous dimension holds
/// whole chunks of 8 and it starts 16-byte aligned (then every row and every product does too).
fn copies_16_bytes(start: Ptr, contiguous: usize) -> bool {
    contiguous.is_multiple_of(8) && start.0.is_multiple_of(16)
}

pub(crate) fn matmul(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    t: Transpose,
    out: &mut Tensor,
    accumulate: bool,
) -> Result<()> {
    let MatmulDims {
        batch,
        b_batch,
        m,
        n,
        k,
        ..
    } = MatmulDims::of(a, b, t, out)?;
    // Read before `out` is written: a clone sharing its buffer keeps its values.
    let a_ptr = input(gpu, "matmul", "a", a)?.ptr();
    let b_ptr = input(gpu, "matmul", "b", b)?.ptr();
    let out_ptr = output(gpu, "matmul", "out", out)?.ptr_mut()?;
    let product = Product {
        t,
        m,
        n,
        k,
        batch,
        b_stride: if b_batch == 1 { 0 } else { k * n },
    };
    product.run(gpu, a.dtype(), a_ptr, b_ptr, None, out_ptr, accumulate)
}

/// `y = x·wᵀ + bias`, the bias added in the product's epilogue (no second pass over `y`).
pub(crate) fn linear(
    gpu: &'static Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    ensure!(!x.shape().is_empty(), "linear: the input is a scalar");
    let (rows, inp) = x.rows_cols();
    ensure!(
        w.shape().len() == 2 && w.shape()[1] == inp,
        "linear: input has {inp} features but weight is {:?}",
        w.shape()
    );
    let outp = w.shape()[0];
    expect_dtype("linear", "weight", w, x.dtype())?;
    let bias_ptr = match bias {
        Some(b) => {
            ensure!(
                b.shape() == [outp],
                "linear: bias has shape {:?}, expected [{outp}]",
                b.shape()
            );
            expect_dtype("linear", "bias", b, x.dtype())?;
            Some(input(gpu, "linear", "bias", b)?.ptr())
        }
        None => None,
    };
    let x_ptr = input(gpu, "linear", "x", x)?.ptr();
    let w_ptr = input(gpu, "linear", "weight", w)?.ptr();
    let mut y = CudaStorage::alloc(gpu, rows * outp, x.dtype())?;
    let product = Product {
        t: Transpose::NT,
        m: rows,
        n: outp,
        k: inp,
        batch: 1,
        b_stride: 0,
    };
    product.run(gpu, x.dtype(), x_ptr, w_ptr, bias_ptr, y.ptr_mut()?, false)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("checked not to be a scalar") = outp;
    tensor(y, &shape)
}

/// `dx = dy·w`; `dw += dyᵀ·x`; `dbias += Σ_rows dy`.
pub(crate) fn linear_backward(
    gpu: &'static Gpu,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    dw: &mut Tensor,
    dbias: Option<&mut Tensor>,
) -> Result<Tensor> {
    let (rows, inp, outp) = check_linear_backward(dy, x, w, dw)?;
    let dtype = x.dtype();
    for (name, t) in [("dy", dy), ("weight", w), ("dw", &*dw)] {
        expect_dtype("linear backward", name, t, dtype)?;
    }
    let dy_ptr = input(gpu, "linear backward", "dy", dy)?.ptr();
    let x_ptr = input(gpu, "linear backward", "x", x)?.ptr();
    let w_ptr = input(gpu, "linear backward", "weight", w)?.ptr();

    let mut dx = CudaStorage::alloc(gpu, rows * inp, dtype)?;
    // dx [rows, in] = dy [rows, out] · w [out, in].
    let data = Product {
        t: Transpose::NN,
        m: rows,
        n: inp,
        k: outp,
        batch: 1,
        b_stride: 0,
    };
    data.run(gpu, dtype, dy_ptr, w_ptr, None, dx.ptr_mut()?, false)?;
    // dw [out, in] += dyᵀ (dy stored [rows, out]) · x [rows, in].
    let weight = Product {
        t: Transpose::TN,
        m: outp,
        n: inp,
        k: rows,
        batch: 1,
        b_stride: 0,
    };
    let dw_ptr = output(gpu, "linear backward", "dw", dw)?.ptr_mut()?;
    weight.run(gpu, dtype, dy_ptr, x_ptr, None, dw_ptr, true)?;
    if let Some(db) = dbias {
        column_sums_into(gpu, dy, db)?;
    }
    tensor(dx, x.shape())
}
