//! Cosine top-k retrieval (kernels/topk.cu): scores of the queries against the keys, reduced on the
//! device to each query's k best, merged into the host's [`TopK`] once per call.
//!
//! Keys go through in chunks, sized so that a chunk's scores and candidate lists take about
//! [`BUFFER_BYTES`]. Per chunk, one launch writes the `[queries, chunk]` scores; then selection
//! rounds cut each query's list into segments of [`TOPK_SEGMENT`] items and keep the k best of each
//! (equal scores: the lower key index), until a single segment is left, whose k best go to the
//! `best` buffer. Each chunk's first round reads `best` ahead of its scores, so the call's best stay
//! on the device across chunks, and lists stay in key order (which the tie rule relies on). One
//! download per call; the host's TopK merges the result with earlier calls.
//!
//! Above [`MAX_DEVICE_K`] (rounds then shrink lists slowly and the lists grow large), each chunk's
//! scores are downloaded and offered to the TopK as the CPU does: correct, slower.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::input;
use super::launch::{
    self, kernel, launch, Ptr, SCORE_TILE_QUERIES_NARROW, SCORE_TILE_QUERIES_WIDE, TOPK_SEGMENT,
};
use super::norms::l2_normalize;
use super::runtime::Gpu;
use crate::backend::cpu::similarity::check_topk;
use crate::backend::TopK;
use crate::tensor::{DType, Tensor};

const OP: &str = "top-k";

/// The largest k selected on the device: a quarter of a segment, so each round shrinks a list at
/// least fourfold.
const MAX_DEVICE_K: usize = TOPK_SEGMENT / 4;

/// About the device memory a call takes for scores and candidate lists.
const BUFFER_BYTES: usize = 256 << 20;

/// Bytes of a packed candidate: `order_key(score) << 32 | key index` (kernels/topk.cu).
const ITEM_BYTES: usize = 8;

/// Merges the cosine scores of `queries` (normalised here) against unit `keys` (f32, bf16 or f16,
/// on the device; the first is key number `offset`) into `best`.
pub(crate) fn cosine_topk_update(
    gpu: &'static Gpu,
    keys: &Tensor,
    offset: usize,
    queries: &Tensor,
    best: &mut TopK,
) -> Result<()> {
    let (n, d, q) = check_topk(keys, offset, queries, best)?;
    let k = best.k();
    let keys_ptr = input(gpu, OP, "keys", keys)?.ptr();
    let (score_kernel, tile_queries) = if q <= SCORE_TILE_QUERIES_NARROW {
        (
            kernel!("kdx_cosine_scores_q16", keys.dtype(), with_f16),
            SCORE_TILE_QUERIES_NARROW,
        )
    } else {
        (
            kernel!("kdx_cosine_scores_q64", keys.dtype(), with_f16),
            SCORE_TILE_QUERIES_WIDE,
        )
    };
    if n == 0 || q == 0 || k == 0 {
        return Ok(());
    }
    let unit = unit_queries(gpu, queries)?;
    let unit_ptr = input(gpu, OP, "queries", &unit)?.ptr();
    let on_device = k <= MAX_DEVICE_K;
    let chunk = chunk_keys(q, if on_device { k } else { 0 }).min(n);
    let scores = gpu.alloc(q * chunk * std::mem::size_of::<f32>())?;
    let scores_ptr = gpu.ptr(&scores);
    let mut reduction = if on_device {
        Some(Reduction::new(gpu, q, k, chunk)?)
    } else {
        None
    };
    let key_bytes = d * keys.dtype().size_in_bytes();
    for start in (0..n).step_by(chunk) {
        let cols = chunk.min(n - start);
        // SAFETY: kdx_cosine_scores_<q16|q64>_<T>(const float* queries, const T* keys,
        // float* scores, size_t num_queries, size_t num_keys, size_t dim): queries [q, d] f32,
        // keys from row `start` of [n, d] so [cols, d] are there, scores [q, cols] within the
        // q·chunk floats allocated; the grid's query tiles match the kernel's.
        unsafe {
            launch!(
                gpu,
                score_kernel,
                launch::cosine_scores(q, cols, tile_queries)?,
                [
                    unit_ptr,
                    keys_ptr.offset(start * key_bytes),
                    scores_ptr,
                    q,
                    cols,
                    d
                ]
            )
        }?;
        // Key indices fit in u32: check_topk bounds offset + n by 2^32.
        let first_index = (offset + start) as u32;
        match &mut reduction {
            Some(r) => r.add_chunk(gpu, scores_ptr, cols, first_index)?,
            None => {
                let mut host = vec![0f32; q * cols];
                gpu.download(&scores, bytemuck::cast_slice_mut(&mut host))?;
                best.offer_rows(&host, cols, first_index);
            }
        }
    }
    if let Some(r) = reduction {
        r.merge_into(gpu, best)?;
    }
    Ok(())
}

/// The queries as unit f32 rows on the device (the CPU normalises an f32 copy too).
fn unit_queries(gpu: &'static Gpu, queries: &Tensor) -> Result<Tensor> {
    input(gpu, OP, "queries", queries)?;
    if queries.dtype() == DType::F32 {
        l2_normalize(gpu, queries)
    } else {
        l2_normalize(gpu, &queries.to_dtype(DType::F32)?)
    }
}

/// Keys per chunk: per key, each query takes a score (4 bytes) and, in the first round's output,
/// k items per segment (8·k/SEGMENT bytes). At least one score tile's worth (a chunk need not align
/// with segments: round 1 cuts the best-so-far and the chunk's scores together).
fn chunk_keys(queries: usize, k: usize) -> usize {
    let per_segment = queries * (TOPK_SEGMENT * std::mem::size_of::<f32>() + ITEM_BYTES * k);
    (BUFFER_BYTES * TOPK_SEGMENT / per_segment).max(128)
}

/// The length of the list a round leaves from a list of `len` items: the best `min(k, items)` of
/// each segment.
fn kept(len: usize, k: usize) -> usize {
    let segments = len.div_ceil(TOPK_SEGMENT);
    (segments - 1) * k + k.min(len - (segments - 1) * TOPK_SEGMENT)
}

/// Where a round reads its items: the scores of a chunk (after the best so far), or candidates.
#[derive(Clone, Copy)]
enum Source {
    Scores {
        ptr: Ptr,
        cols: usize,
        first_index: u32,
    },
    Candidates(usize),
}

/// The device side of a call's reduction: the best so far and two candidate buffers that rounds
/// alternate between.
struct Reduction {
    queries: usize,
    k: usize,
    /// `[queries, k]` packed items; the first `head` of each row are the best so far, in key order.
    best: CudaSlice<u8>,
    head: usize,
    /// `[queries, capacity[i]]` packed items each: round 1's output fits the first (rounds 3, 5, …
    /// leave shorter lists), round 2's the second (and rounds 4, 6, …).
    candidates: [CudaSlice<u8>; 2],
    capacity: [usize; 2],
}

impl Reduction {
    fn new(gpu: &'static Gpu, queries: usize, k: usize, chunk: usize) -> Result<Reduction> {
        let first = kept(k + chunk, k);
        let capacity = [first, kept(first, k)];
        Ok(Reduction {
            queries,
            k,
            best: gpu.alloc(queries * k * ITEM_BYTES)?,
            head: 0,
            candidates: [
                gpu.alloc(queries * capacity[0] * ITEM_BYTES)?,
                gpu.alloc(queries * capacity[1] * ITEM_BYTES)?,
            ],
            capacity,
        })
    }

    /// Reduces the best so far and a chunk's `[queries, cols]` scores (keys `first_index..`) to the
    /// new best.
    fn add_chunk(&mut self, gpu: &Gpu, scores: Ptr, cols: usize, first_index: u32) -> Result<()> {
        let (q, k) = (self.queries, self.k);
        let best = gpu.ptr(&self.best);
        let mut source = Source::Scores {
            ptr: scores,
            cols,
            first_index,
        };
        let mut len = self.head + cols;
        let mut next = 0;
        loop {
            let segments = len.div_ceil(TOPK_SEGMENT);
            // The last round writes over the head it has read (the kernel allows it).
            let (out, out_ld) = if segments == 1 {
                (best, k)
            } else {
                (gpu.ptr(&self.candidates[next]), self.capacity[next])
            };
            let (head_len, scores, list, ld, index_base) = match source {
                Source::Scores {
                    ptr,
                    cols,
                    first_index,
                } => (self.head as u32, ptr, Ptr(0), cols, first_index),
                Source::Candidates(i) => {
                    (0, Ptr(0), gpu.ptr(&self.candidates[i]), self.capacity[i], 0)
                }
            };
            // SAFETY: kdx_topk_select(const uint64_t* head, uint32_t head_len,
            // const float* scores, const uint64_t* list, size_t ld, uint32_t index_base,
            // uint32_t len, uint32_t k, uint64_t* out, size_t out_ld): head is best [q, k] with
            // head_len ≤ k items per row; scores (null for candidates) [q, ld] f32 with
            // len − head_len ≤ ld columns, or list [q, ld] items with len ≤ ld; out [q, out_ld] with
            // out_ld ≥ kept(len, k) (the capacities bound every round's output, see Reduction).
            // len < 2^32: a chunk's keys plus k.
            unsafe {
                launch!(
                    gpu,
                    "kdx_topk_select",
                    launch::topk_select(q, segments)?,
                    [
                        best, head_len, scores, list, ld, index_base, len as u32, k as u32, out,
                        out_ld
                    ]
                )
            }?;
            len = kept(len, k);
            if segments == 1 {
                self.head = len;
                return Ok(());
            }
            source = Source::Candidates(next);
            next = 1 - next;
        }
    }

    /// Offers each query's best to `best` (the host's TopK merges them with earlier calls).
    fn merge_into(self, gpu: &Gpu, best: &mut TopK) -> Result<()> {
        let mut items = vec![0u64; self.queries * self.k];
        gpu.download(&self.best, bytemuck::cast_slice_mut(&mut items))?;
        for (query, row) in items.chunks(self.k).enumerate() {
            for &item in &row[..self.head] {
                best.offer(query, score_of((item >> 32) as u32), item as u32);
            }
        }
        Ok(())
    }
}

/// The score whose `order_key` (kernels/select.cuh) is `key`.
fn score_of(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_shrink_lists_and_fit_the_buffers() {
        for k in [1, 16, 1000, MAX_DEVICE_K] {
            let chunk = chunk_keys(1024, k);
            assert!(1024 * chunk * 4 <= BUFFER_BYTES);
            let first = kept(k + chunk, k);
            let capacity = [first, kept(first, k)];
            // Every list a chunk can start with, down to one segment.
            for start in [k + chunk, chunk, 1, TOPK_SEGMENT, TOPK_SEGMENT + 1] {
                let mut len = start;
                let mut round = 0;
                while len > TOPK_SEGMENT {
                    let out = kept(len, k);
                    assert!(out < len);
                    assert!(out <= capacity[round % 2], "k {k}, round {round}");
                    len = out;
                    round += 1;
                }
                assert_eq!(kept(len, k), k.min(len));
            }
        }
    }

    #[test]
    fn scores_come_back_from_their_keys() {
        // order_key as kernels/select.cuh computes it.
        let key = |f: f32| {
            let u = (if f == 0.0 { 0.0f32 } else { f }).to_bits();
            if u & 0x8000_0000 != 0 {
                !u
            } else {
                u | 0x8000_0000
            }
        };
        let values = [-1.0f32, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.999, 1.0];
        for w in values.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{w:?}");
        }
        for v in values {
            assert_eq!(score_of(key(v)), if v == 0.0 { 0.0 } else { v });
        }
    }
}
