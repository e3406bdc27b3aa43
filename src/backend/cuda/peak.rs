//! The GPU's ceilings, measured on the spot, that `kdx bench` reports each entry's rate against:
//! memory bandwidth as a large device-to-device copy (bytes read plus written), and the matrix rate
//! of cuBLAS on 8192 × 8192 random matrices in bf16 (tensor cores, f32 accumulation) and in f32
//! (CUDA cores, no TF32). cuBLAS is loaded at run time: where the dynamic loader finds no
//! libcublas there is no FLOP/s ceiling, and the reason says so.

use anyhow::Result;

use super::cublas;
use super::runtime::Gpu;
use super::{input, output};
use crate::backend::{mix64, Transpose};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Debug)]
pub struct Ceilings {
    /// GB/s of a device-to-device copy, counting bytes read and written.
    pub copy_gbps: f64,
    /// GFLOP/s of cuBLAS matrix products, or why there are none.
    pub gemm: Result<GemmRates, String>,
}

#[derive(Clone, Copy, Debug)]
pub struct GemmRates {
    pub bf16_gflops: f64,
    pub f32_gflops: f64,
}

impl Ceilings {
    /// The matrix-product ceiling for `dtype`, when there is one.
    pub fn gflops(&self, dtype: DType) -> Option<f64> {
        let rates = self.gemm.as_ref().ok()?;
        match dtype {
            DType::BF16 => Some(rates.bf16_gflops),
            DType::F32 => Some(rates.f32_gflops),
            _ => None,
        }
    }
}

/// Bytes copied: far beyond any L2 cache.
const COPY_BYTES: usize = 1 << 30;
/// Square products of this size fill any current GPU.
const GEMM_SIZE: usize = 8192;
const WARMUP: usize = 3;
const RUNS: usize = 10;

pub fn measure(gpu: &'static Gpu) -> Result<Ceilings> {
    Ok(Ceilings {
        copy_gbps: copy_rate(gpu)?,
        gemm: gemm_rates(gpu).map_err(|e| format!("{e:#}")),
    })
}

/// The median device time of `f` over [`RUNS`] calls, after [`WARMUP`] calls.
fn median_seconds(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUP {
        gpu.time(&mut f)?;
    }
    let mut samples = (0..RUNS)
        .map(|_| gpu.time(&mut f))
        .collect::<Result<Vec<f64>>>()?;
    samples.sort_by(f64::total_cmp);
    Ok(samples[RUNS / 2])
}

fn copy_rate(gpu: &Gpu) -> Result<f64> {
    let src = gpu.alloc(COPY_BYTES)?;
    let mut dst = gpu.alloc(COPY_BYTES)?;
    let seconds = median_seconds(gpu, || gpu.copy(&src, &mut dst))?;
    Ok(2.0 * COPY_BYTES as f64 / seconds / 1e9)
}

fn gemm_rates(gpu: &'static Gpu) -> Result<GemmRates> {
    // Fails early, saying why, where there is no cuBLAS.
    gpu.blas()?;
    let n = GEMM_SIZE;
    // Random values: a product of zeros runs faster than one of real data.
    let values: Vec<f32> = (0..n * n)
        .map(|i| (mix64(i as u64) >> 40) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect();
    let host = Tensor::from_vec(values, &[n, n])?;
    let flops = 2.0 * (n as f64).powi(3);
    let rate = |dtype: DType| -> Result<f64> {
        let a = host.to_device(gpu.device())?.to_dtype(dtype)?;
        let mut c = Tensor::zeros_on(&[n, n], dtype, gpu.device())?;
        let a_ptr = input(gpu, "cuBLAS ceiling", "a", &a)?.ptr();
        let c_ptr = output(gpu, "cuBLAS ceiling", "c", &mut c)?.ptr_mut()?;
        let square = || {
            cublas::product(
                gpu,
                dtype,
                Transpose::NN,
                (n, n, n),
                1,
                0,
                (a_ptr, a_ptr, c_ptr),
                false,
            )
        };
        let seconds = median_seconds(gpu, square)?;
        Ok(flops / seconds / 1e9)
    };
    Ok(GemmRates {
        bf16_gflops: rate(DType::BF16)?,
        f32_gflops: rate(DType::F32)?,
    })
}
