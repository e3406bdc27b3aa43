//! Kernel arguments and launch shapes: every grid and block size is decided here.
//!
//! Arguments are plain values: numbers, and device buffers as their address ([`Ptr`]). A buffer is
//! freed with `cuMemFreeAsync` on the device's one stream, after every kernel queued before, so an
//! address passed to a launch stays valid for that kernel even if its buffer is dropped right after.
//! [`Gpu::launch`](super::runtime::Gpu::launch) checks the number and size of the arguments against
//! the kernel's own parameter list, which the driver reports, before every launch.

use std::ffi::c_void;
use std::marker::PhantomData;

use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// A device address, passed where a kernel takes a pointer.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub(crate) struct Ptr(pub(crate) u64);

impl Ptr {
    /// Where a kernel takes an optional buffer that this call does not have (and never reads).
    pub(crate) const NULL: Ptr = Ptr(0);

    /// The address `bytes` further on (a sub-array of a buffer).
    pub(crate) fn offset(self, bytes: usize) -> Ptr {
        Ptr(self.0 + bytes as u64)
    }
}

/// A value a kernel parameter can take.
///
/// # Safety
/// The type's bytes must be exactly what the kernel reads for a C parameter of the same size:
/// `usize`/`u64` for `size_t`/`uint64_t`, `f32` for `float`, `i32`/`u32` for `int`/`uint32_t`,
/// [`Ptr`] for any pointer.
pub(crate) unsafe trait Param: Copy {}

unsafe impl Param for Ptr {}
unsafe impl Param for usize {}
unsafe impl Param for u64 {}
unsafe impl Param for u32 {}
unsafe impl Param for i32 {}
unsafe impl Param for f32 {}

/// One argument of a launch: where its value lives and how many bytes it has.
pub(crate) struct Arg<'a> {
    pub(crate) value: *mut c_void,
    pub(crate) size: usize,
    borrowed: PhantomData<&'a ()>,
}

impl<'a, T: Param> From<&'a T> for Arg<'a> {
    fn from(value: &'a T) -> Arg<'a> {
        Arg {
            value: value as *const T as *mut c_void,
            size: std::mem::size_of::<T>(),
            borrowed: PhantomData,
        }
    }
}

/// Launches `kernel` (a `&'static str`, see [`kernel!`]) on a [`Gpu`](super::runtime::Gpu) with a
/// [`LaunchConfig`] and the arguments in the kernel's order; evaluates to `Result<()>`.
/// Unsafe to evaluate: the caller asserts that each argument has the C type the kernel declares and
/// that every buffer holds what the launch reads or writes (the argument sizes are checked).
macro_rules! launch {
    ($gpu:expr, $kernel:expr, $config:expr, [$($arg:expr),* $(,)?]) => {
        $gpu.launch($kernel, $config, &[$($crate::backend::cuda::launch::Arg::from(&$arg)),*])
    };
}
pub(crate) use launch;

/// The name of a kernel's instance for a dtype, `<base>_f32` or `<base>_bf16`, as a `&'static str`;
/// returns an error from the enclosing function for other dtypes. `kernel!(base, dtype, with_f16)`
/// also maps f16 to `<base>_f16`, for the few kernels that read f16 (key stores).
macro_rules! kernel {
    ($base:literal, $dtype:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => concat!($base, "_f32"),
            $crate::tensor::DType::BF16 => concat!($base, "_bf16"),
            other => anyhow::bail!(
                "{}: the CUDA kernels take f32 or bf16 tensors, not {other}: convert with to_dtype first",
                $base.trim_start_matches("kdx_")
            ),
        }
    };
    ($base:literal, $dtype:expr, with_f16) => {
        match $dtype {
            $crate::tensor::DType::F32 => concat!($base, "_f32"),
            $crate::tensor::DType::BF16 => concat!($base, "_bf16"),
            $crate::tensor::DType::F16 => concat!($base, "_f16"),
            other => anyhow::bail!(
                "{}: the CUDA kernels take f32, bf16 or f16 tensors, not {other}: convert with to_dtype first",
                $base.trim_start_matches("kdx_")
            ),
        }
    };
}
pub(crate) use kernel;

/// Threads per block of grid-stride kernels.
const STRIDE_BLOCK: u32 = 256;
/// Grid-stride launches stop growing here (about 30 blocks per SM on an H100, enough to fill any
/// current GPU). A function of the size only, never of the GPU, so per-block partial sums are the
/// same on every device.
const MAX_STRIDE_BLOCKS: usize = 4096;

/// A grid-stride loop over `n` elements (kernels that call `grid_stride`). Zero blocks for `n = 0`:
/// the launch is skipped.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(STRIDE_BLOCK as usize).min(MAX_STRIDE_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (STRIDE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `cols` elements, whole warps (block reductions need them), one thread per
/// element up to 1024 threads, which then stride over longer rows.
pub(crate) fn per_row(rows: usize, cols: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(rows)?, 1, 1),
        block_dim: (cols.next_multiple_of(32).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `lanes` consecutive threads (1 or 32: a warp's lanes are never split between blocks) per row,
/// in blocks of 256 threads.
pub(crate) fn lanes_per_row(rows: usize, lanes: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            grid_x((rows * lanes).div_ceil(STRIDE_BLOCK as usize))?,
            1,
            1,
        ),
        block_dim: (STRIDE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One thread per column, blocks of 256 columns along x and `chunks` along y.
pub(crate) fn per_column(cols: usize, chunks: usize) -> Result<LaunchConfig> {
    if chunks > 65_535 {
        bail!("a column launch over {chunks} row chunks exceeds the grid's y limit (65535)");
    }
    Ok(LaunchConfig {
        grid_dim: (grid_x(cols.div_ceil(256))?, chunks as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A single block, for the last stage of a reduction.
pub(crate) fn single_block() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (STRIDE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn grid_x(blocks: usize) -> Result<u32> {
    match u32::try_from(blocks) {
        Ok(b) if b <= i32::MAX as u32 => Ok(b),
        _ => bail!("{blocks} blocks exceed the grid's x limit (2^31 − 1)"),
    }
}

/// The GEMM kernels' tiling (kernels/gemm.cu): one block of 256 threads per 128 × 128 tile of each
/// product's output.
const GEMM_TILE: usize = 128;
const GEMM_THREADS: u32 = 256;
/// Dynamic shared memory of the bf16 (tensor-core) GEMM: its 4-stage pipeline, kernels/gemm.cu's
/// `TC_SMEM_BYTES`.
pub(crate) const GEMM_BF16_SHARED: u32 = 81_920;
/// At most this many products per GEMM launch: the grid's z limit.
pub(crate) const GEMM_MAX_BATCH: usize = 65_535;

/// The GEMM grid for `batch` products with `[m, n]` outputs: tiles of n along x, of m along y,
/// products along z.
pub(crate) fn gemm(
    m: usize,
    n: usize,
    batch: usize,
    shared_mem_bytes: u32,
) -> Result<LaunchConfig> {
    let row_tiles = m.div_ceil(GEMM_TILE);
    if row_tiles > 65_535 || batch > GEMM_MAX_BATCH {
        bail!(
            "a matrix product with {m} output rows in a batch of {batch} exceeds the grid's y or z \
             limit (65535 tiles of {GEMM_TILE} rows, 65535 products)"
        );
    }
    Ok(LaunchConfig {
        grid_dim: (
            grid_x(n.div_ceil(GEMM_TILE))?,
            row_tiles as u32,
            batch as u32,
        ),
        block_dim: (GEMM_THREADS, 1, 1),
        shared_mem_bytes,
    })
}

/// The attention kernels' tiling (kernels/attention.cuh): blocks of 128 threads own 16 rows of one
/// head of one sequence (query rows, or key columns for the key/value gradients) and stream the
/// other side through shared memory 32 rows at a time, each row `head_dim` floats at an odd stride.
const ATTENTION_THREADS: u32 = 128;
const ATTENTION_TILE: usize = 16;
const ATTENTION_CHUNK: usize = 32;
/// A lane accumulates up to 4 columns of a row.
const ATTENTION_MAX_HEAD_DIM: usize = 128;

/// An attention launch over `pairs` (sequence, head) pairs along x and the tiles of their `rows`
/// along y, with the dynamic shared memory of kernels/attention.cuh's `shared_floats(head_dim)`
/// (at most 47,680 bytes, for head_dim 128).
pub(crate) fn attention(
    op: &str,
    pairs: usize,
    rows: usize,
    head_dim: usize,
) -> Result<LaunchConfig> {
    if head_dim > ATTENTION_MAX_HEAD_DIM {
        bail!(
            "{op}: head_dim {head_dim} is over the CUDA attention kernels' limit of \
             {ATTENTION_MAX_HEAD_DIM}"
        );
    }
    let tiles = rows.div_ceil(ATTENTION_TILE);
    if tiles > 65_535 {
        bail!("{op}: {rows} rows exceed the grid's y limit (65535 tiles of {ATTENTION_TILE} rows)");
    }
    let (tile, chunk) = (ATTENTION_TILE, ATTENTION_CHUNK);
    let floats =
        (tile + 2 * chunk) * (head_dim | 1) + chunk * (tile + 1) + 2 * tile * chunk + chunk;
    Ok(LaunchConfig {
        grid_dim: (grid_x(pairs)?, tiles as u32, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: (floats * std::mem::size_of::<f32>()) as u32,
    })
}

/// Threads per block of the cosine-score kernels (kernels/topk.cu's `SCORE_THREADS`), and the keys
/// each block scores (`TILE_KEYS`).
const SCORE_THREADS: u32 = 256;
const SCORE_TILE_KEYS: usize = 128;
/// Queries per block of the `q64` and `q16` score kernels.
pub(crate) const SCORE_TILE_QUERIES_WIDE: usize = 64;
pub(crate) const SCORE_TILE_QUERIES_NARROW: usize = 16;

/// The cosine-score grid: tiles of 128 keys along x, of `tile_queries` queries along y.
pub(crate) fn cosine_scores(
    queries: usize,
    keys: usize,
    tile_queries: usize,
) -> Result<LaunchConfig> {
    let query_tiles = queries.div_ceil(tile_queries);
    if query_tiles > 65_535 {
        bail!(
            "top-k: {queries} queries in one call exceed the grid's y limit (65535 tiles of \
             {tile_queries}): pass fewer at a time"
        );
    }
    Ok(LaunchConfig {
        grid_dim: (
            grid_x(keys.div_ceil(SCORE_TILE_KEYS))?,
            query_tiles as u32,
            1,
        ),
        block_dim: (SCORE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Items per block of a top-k selection round (kernels/topk.cu's `SEGMENT`).
pub(crate) const TOPK_SEGMENT: usize = 4096;
/// Threads per block of a selection round (kernels/topk.cu's `SELECT_THREADS`).
const SELECT_THREADS: u32 = 512;

/// A top-k selection round: one block per segment of each query's list.
pub(crate) fn topk_select(queries: usize, segments: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(queries * segments)?, 1, 1),
        block_dim: (SELECT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}
