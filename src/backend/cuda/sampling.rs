//! Token sampling (kernels/sampling.cu): temperature, top-k, top-p and a seeded draw, one block per
//! row, the CPU's semantics and random numbers.

use anyhow::{ensure, Result};

use super::input;
use super::launch::{kernel, launch, per_row};
use super::runtime::Gpu;
use crate::backend::cpu::sampling::check;
use crate::backend::Sampling;
use crate::tensor::Tensor;

/// One token per row of `logits [rows, vocab]` (see `Backend::sample`).
pub(crate) fn sample(
    gpu: &'static Gpu,
    logits: &Tensor,
    s: &Sampling,
    step: u64,
) -> Result<Vec<u32>> {
    const OP: &str = "sampling";
    let (rows, vocab) = check(logits, s)?;
    ensure!(
        vocab <= i32::MAX as usize,
        "{OP}: a vocabulary of {vocab} exceeds the kernel's 2^31 − 1"
    );
    let kernel = kernel!("kdx_sample", logits.dtype());
    let logits_ptr = input(gpu, OP, "logits", logits)?.ptr();
    let tokens = gpu.alloc(rows * std::mem::size_of::<u32>())?;
    // 0 keeps every token, as does any k ≥ vocab.
    let top_k = s.top_k.min(vocab) as u32;
    // SAFETY: kdx_sample_<T>(const T* logits, uint32_t* tokens, uint32_t vocab, float temperature,
    // uint32_t top_k, float top_p, uint64_t seed, uint64_t step): logits [rows, vocab] with
    // vocab < 2^31, tokens [rows]; one block per row of at most 1024 threads (the kernel's bound).
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(rows, vocab)?,
            [
                logits_ptr,
                gpu.ptr(&tokens),
                vocab as u32,
                s.temperature,
                top_k,
                s.top_p,
                s.seed,
                step
            ]
        )
    }?;
    let mut out = vec![0u32; rows];
    gpu.download(&tokens, bytemuck::cast_slice_mut(&mut out))?;
    Ok(out)
}
