//! Matrix products on the CPU: the `gemm` crate's packed micro-kernels (AVX-512/AVX2/NEON, chosen at
//! run time) do the inner work, measured faster here than hand-rolled kernels; this file maps the
//! engine's layouts (transposes, batches, strided heads, fused bias) onto it.

use anyhow::{ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::elementwise::column_sums_into;
use super::simd::{dot, simd, Real, SendPtr};
use super::with_real;
use crate::backend::{check_linear_backward, MatmulDims, Transpose};
use crate::tensor::Tensor;

/// A strided matrix view: element (i, j) is at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> MatRef<T> {
    /// A row-major `[rows, cols]` matrix read as stored or transposed.
    pub fn dense(ptr: *const T, cols: usize, transposed: bool) -> MatRef<T> {
        if transposed {
            MatRef {
                ptr,
                rs: 1,
                cs: cols as isize,
            }
        } else {
            MatRef {
                ptr,
                rs: cols as isize,
                cs: 1,
            }
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with arbitrary strides; `dst` rows are `dst_rs` apart.
///
/// # Safety
/// The pointers must cover the strided ranges and `dst` must not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: isize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // gemm: dst := alpha·dst + beta·lhs·rhs, reading dst only when asked.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        parallelism,
    );
    if k == 0 && !accumulate {
        for i in 0..m {
            std::slice::from_raw_parts_mut(dst.offset(i as isize * dst_rs), n).fill(T::ZERO);
        }
    }
}

/// Problem size below which one matrix is not worth splitting across threads; batched calls of
/// such matrices run one matrix per thread instead.
const SMALL_GEMM_FLOPS: usize = 1 << 22;

pub fn matmul(
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
        a_cols: ac,
        b_cols: bc,
    } = MatmulDims::of(a, b, t, out)?;
    with_real!(a.dtype(), T => {
        let (ad, bd) = (a.data::<T>()?, b.data::<T>()?);
        let od = SendPtr(out.data_mut::<T>()?.as_mut_ptr());
        let b_stride = if b_batch == 1 { 0 } else { k * n };
        let one = |i: usize, threads: usize| unsafe {
            // SAFETY: batch entry i reads a[i], b[i] (or the shared b) and writes only out[i].
            gemm_strided::<T>(
                (m, n, k),
                od.get().add(i * m * n),
                n as isize,
                MatRef::dense(ad.as_ptr().add(i * m * k), ac, t.a),
                MatRef::dense(bd.as_ptr().add(i * b_stride), bc, t.b),
                accumulate,
                threads,
            )
        };
        let threads = rayon::current_num_threads();
        if batch > 1 && 2 * m * n * k < SMALL_GEMM_FLOPS {
            (0..batch).into_par_iter().for_each(|i| one(i, 1));
        } else {
            (0..batch).for_each(|i| one(i, threads));
        }
    });
    Ok(())
}

/// One row-major product `out[m, n] (+)= op(a)·op(b)` on slices, split across all threads.
/// `a_cols`/`b_cols` are the stored widths of `a` and `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_2d<T: Real>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    a_cols: usize,
    ta: bool,
    b: &[T],
    b_cols: usize,
    tb: bool,
    out: &mut [T],
    accumulate: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && out.len() >= m * n,
        "gemm_2d: operand too small"
    );
    // SAFETY: the lengths were checked above; `out` is a distinct &mut borrow.
    unsafe {
        gemm_strided(
            (m, n, k),
            out.as_mut_ptr(),
            n as isize,
            MatRef::dense(a.as_ptr(), a_cols, ta),
            MatRef::dense(b.as_ptr(), b_cols, tb),
            accumulate,
            rayon::current_num_threads(),
        )
    }
}

/// `y = x·wᵀ + bias`: the output is pre-filled with the bias and the product accumulated onto it,
/// which saves a pass over `y`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, inp) = x.rows_cols();
    ensure!(
        w.shape().len() == 2 && w.shape()[1] == inp,
        "linear: input has {inp} features but weight is {:?}",
        w.shape()
    );
    let outp = w.shape()[0];
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rows_cols checked a last dim") = outp;
    let mut y = Tensor::zeros(&shape, x.dtype());
    with_real!(x.dtype(), T => {
        let yd = y.data_mut::<T>()?;
        if let Some(b) = bias {
            ensure!(b.shape() == [outp], "linear: bias has shape {:?}, expected [{outp}]", b.shape());
            let bd = b.data::<T>()?;
            yd.par_chunks_mut(outp).for_each(|row| row.copy_from_slice(bd));
        }
        let (xd, wd) = (x.data::<T>()?, w.data::<T>()?);
        if rows <= FEW_ROWS {
            linear_few_rows(xd, wd, (rows, inp, outp), yd);
        } else {
            gemm_2d((rows, outp, inp), xd, inp, false, wd, inp, true, yd, bias.is_some());
        }
    });
    Ok(y)
}

/// Up to this many input rows, [`linear`] streams the weight once instead of packing it for the
/// gemm: decoding a token multiplies one row per sequence by every weight of the model, and
/// packing (a copy of each weight per call) costs more than the product.
const FEW_ROWS: usize = 16;

/// `y += x·wᵀ` for a few rows of `x`: each weight row is read once and dotted with every input row
/// (which stay in cache). Threads take blocks of output features.
fn linear_few_rows<T: Real>(
    x: &[T],
    w: &[T],
    (rows, inp, outp): (usize, usize, usize),
    y: &mut [T],
) {
    const BLOCK: usize = 64;
    // Feature-major partial results, transposed into `y` afterwards (rows × outp is small).
    let mut by_feature = vec![T::ZERO; outp * rows];
    by_feature
        .par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(blk, out)| {
            simd!({
                for (i, o) in out.chunks_exact_mut(rows).enumerate() {
                    let n = blk * BLOCK + i;
                    let wrow = &w[n * inp..(n + 1) * inp];
                    for (r, v) in o.iter_mut().enumerate() {
                        *v = dot(&x[r * inp..(r + 1) * inp], wrow);
                    }
                }
            })
        });
    for (n, col) in by_feature.chunks_exact(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * outp + n] += v;
        }
    }
}

pub fn linear_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    dw: &mut Tensor,
    dbias: Option<&mut Tensor>,
) -> Result<Tensor> {
    let (rows, inp, outp) = check_linear_backward(dy, x, w, dw)?;
    let mut dx = Tensor::zeros(x.shape(), x.dtype());
    with_real!(x.dtype(), T => {
        let (dyd, xd, wd) = (dy.data::<T>()?, x.data::<T>()?, w.data::<T>()?);
        gemm_2d((rows, inp, outp), dyd, outp, false, wd, inp, false, dx.data_mut::<T>()?, false);
        gemm_2d((outp, inp, rows), dyd, outp, true, xd, inp, false, dw.data_mut::<T>()?, true);
    });
    if let Some(db) = dbias {
        column_sums_into(dy, db)?;
    }
    Ok(dx)
}
