// Cosine top-k retrieval: scores of unit queries against a chunk of unit keys (f32, bf16 or f16),
// then the k best of each query by repeated selection. Mirrors src/backend/cpu/similarity.rs
// (cosine_topk_update); src/backend/cuda/topk.rs drives the chunks and rounds and merges the result
// into the host's TopK.
//
// Lists of candidates are packed as uint64: order_key(score) << 32 | key index. The score comes back
// exactly from its key, and a candidate moves as one word.
#include "select.cuh"

namespace kdx {
namespace topk {

// Score tiles: 128 keys × 16·QT queries per block of 256 threads, 32 dimensions at a time. Thread
// (tx, ty) = (t % 16, t / 16) computes keys tx + 16j (j < 8) for queries ty + 16i (i < QT).
constexpr int SCORE_THREADS = 256;
constexpr int TILE_KEYS = 128;
constexpr int TILE_DIMS = 32;

// scores[q·num_keys + key] = queries[q] · keys[key], f32 products added in dimension order. Grid
// (⌈num_keys/128⌉, ⌈num_queries/(16·QT)⌉), blocks of SCORE_THREADS. Each block reads its keys once
// for all of its queries.
template <typename T, int QT>
__device__ __forceinline__ void cosine_scores(const float* __restrict__ queries,
                                              const T* __restrict__ keys,
                                              float* __restrict__ scores, size_t num_queries,
                                              size_t num_keys, size_t dim) {
  constexpr int TILE_QUERIES = 16 * QT;
  // Dimension-major tiles: one step reads one dimension of a thread's queries and keys. The +1
  // padding makes the tile stores (32 dimensions of one row per warp) free of bank conflicts.
  __shared__ float qs[TILE_DIMS][TILE_QUERIES + 1];
  __shared__ float ks[TILE_DIMS][TILE_KEYS + 1];
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const size_t q0 = (size_t)blockIdx.y * TILE_QUERIES;
  const size_t k0 = (size_t)blockIdx.x * TILE_KEYS;

  float acc[QT][8];
#pragma unroll
  for (int i = 0; i < QT; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }
  for (size_t d0 = 0; d0 < dim; d0 += TILE_DIMS) {
    // A warp loads 32 consecutive dimensions of one row; outside the matrices, zeros.
    for (int e = threadIdx.x; e < TILE_QUERIES * TILE_DIMS; e += SCORE_THREADS) {
      const int dd = e % TILE_DIMS;
      const int row = e / TILE_DIMS;
      const size_t q = q0 + row;
      const size_t c = d0 + dd;
      qs[dd][row] = q < num_queries && c < dim ? queries[q * dim + c] : 0.0f;
    }
    for (int e = threadIdx.x; e < TILE_KEYS * TILE_DIMS; e += SCORE_THREADS) {
      const int dd = e % TILE_DIMS;
      const int row = e / TILE_DIMS;
      const size_t key = k0 + row;
      const size_t c = d0 + dd;
      ks[dd][row] = key < num_keys && c < dim ? to_f32(keys[key * dim + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int dd = 0; dd < TILE_DIMS; ++dd) {
      float a[QT];
      float b[8];
#pragma unroll
      for (int i = 0; i < QT; ++i) a[i] = qs[dd][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = ks[dd][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < QT; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    // The next step overwrites the tiles.
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < QT; ++i) {
    const size_t q = q0 + ty + 16 * i;
    if (q >= num_queries) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const size_t key = k0 + tx + 16 * j;
      if (key < num_keys) scores[q * num_keys + key] = acc[i][j];
    }
  }
}

// Items a selection block holds: a segment of one query's list (its shared memory bounds it).
constexpr uint32_t SEGMENT = 4096;
constexpr int SELECT_THREADS = 512;

__device__ __forceinline__ uint64_t pack(uint32_t key, uint32_t index) {
  return (uint64_t)key << 32 | index;
}

// One round of the reduction. Query q's list has `len` items: first `head_len` items of
// head[q·k ..] (the best so far, in index order), then either raw scores[q·ld ..] (of keys
// index_base, index_base + 1, ...) or, when scores is null, packed items list[q·ld ..]. The list is
// in increasing key index, so position order is index order. It is cut into segments of SEGMENT
// items; block b handles segment b % segments of query b / segments and writes its best
// min(k, items) to out[q·out_ld + segment·k ..], in index order: every item whose score is above
// the k-th best, then items equal to it, lowest index first (the CPU's tie rule).
//
// A single-segment round may write over its own head (out == head): the block reads every item into
// shared memory before it writes, and no other block touches its query. Hence no __restrict__.
__device__ __forceinline__ void select_round(const uint64_t* head, uint32_t head_len,
                                             const float* scores, const uint64_t* list, size_t ld,
                                             uint32_t index_base, uint32_t len, uint32_t k,
                                             uint64_t* out, size_t out_ld) {
  __shared__ uint64_t items[SEGMENT];
  const uint32_t segments = (len + SEGMENT - 1) / SEGMENT;
  const size_t q = blockIdx.x / segments;
  const uint32_t segment = blockIdx.x % segments;
  const uint32_t start = segment * SEGMENT;
  const uint32_t count = min(SEGMENT, len - start);
  for (uint32_t p = threadIdx.x; p < count; p += blockDim.x) {
    const uint32_t at = start + p;
    uint64_t item;
    if (at < head_len) {
      item = head[q * k + at];
    } else if (scores != nullptr) {
      const uint32_t column = at - head_len;
      item = pack(select::order_key(scores[q * ld + column]), index_base + column);
    } else {
      item = list[q * ld + (at - head_len)];
    }
    items[p] = item;
  }
  __syncthreads();

  const uint32_t keep = min(k, count);
  // Everything ranks at or above this pivot: a segment of at most k items is kept whole.
  select::Pivot pivot = {0u, count - 1, 0};
  if (keep < count) {
    pivot = select::find_pivot<true>(count, keep, [&](uint32_t p) {
      return select::Item{true, (uint32_t)(items[p] >> 32), 1};
    });
  }

  // Ordered compaction of the items ranked at or above the pivot: exactly `keep` of them.
  uint64_t* dst = out + q * out_ld + (size_t)segment * k;
  select::u64 written = 0;
  for (uint32_t base = 0; base < count; base += blockDim.x) {
    const uint32_t p = base + threadIdx.x;
    bool kept = false;
    uint64_t item = 0;
    if (p < count) {
      item = items[p];
      kept = select::at_or_above((uint32_t)(item >> 32), p, pivot);
    }
    select::u64 tile;
    const select::u64 at = written + select::block_exclusive_scan(kept ? 1 : 0, tile);
    if (kept && at < keep) dst[at] = item;
    written += tile;
  }
}

}  // namespace topk
}  // namespace kdx

// Cosine scores of unit queries [num_queries, dim] (f32) against keys [num_keys, dim] into scores
// [num_queries, num_keys] (f32). Blocks of 256 threads; grid (⌈num_keys/128⌉, ⌈num_queries/64⌉) for
// the q64 kernels, (⌈num_keys/128⌉, ⌈num_queries/16⌉) for the q16 ones (few queries).
extern "C" __global__ void __launch_bounds__(kdx::topk::SCORE_THREADS, 2)
    kdx_cosine_scores_q64_f32(const float* queries, const float* keys, float* scores,
                              size_t num_queries, size_t num_keys, size_t dim) {
  kdx::topk::cosine_scores<float, 4>(queries, keys, scores, num_queries, num_keys, dim);
}
extern "C" __global__ void __launch_bounds__(kdx::topk::SCORE_THREADS, 2)
    kdx_cosine_scores_q64_bf16(const float* queries, const kdx::bf16* keys, float* scores,
                               size_t num_queries, size_t num_keys, size_t dim) {
  kdx::topk::cosine_scores<kdx::bf16, 4>(queries, keys, scores, num_queries, num_keys, dim);
}
extern "C" __global__ void __launch_bounds__(kdx::topk::SCORE_THREADS, 2)
    kdx_cosine_scores_q64_f16(const float* queries, const kdx::f16* keys, float* scores,
                              size_t num_queries, size_t num_keys, size_t dim) {
  kdx::topk::cosine_scores<kdx::f16, 4>(queries, keys, scores, num_queries, num_keys, dim);
}
extern "C" __global__ void __launch_bounds__(kdx::topk::SCORE_THREADS, 2)
    kdx_cosine_scores_q16_f32(const float* queries, const float* keys, float* scores,
                              size_t num_queries, size_t num_keys, size_t dim) {
  kdx::topk::cosine_scores<float, 1>(queries, keys, scores, num_queries, num_keys, dim);
}
extern "C" __global__ void __launch_bounds__(kdx::topk::SCORE_THREADS, 2)
    kdx_cosine_scores_q16_bf16(const float* queries, const kdx::bf16* keys, float* scores,
                               size_t num_queries, size_t num_keys, size_t dim) {
  kdx::topk::cosine_scores<kdx::bf16, 1>(queries, keys, scores, num_queries, num_keys, dim);
}
extern "C" __global__ void __launch_bounds__(kdx::topk::SCORE_THREADS, 2)
    kdx_cosine_scores_q16_f16(const float* queries, const kdx::f16* keys, float* scores,
                              size_t num_queries, size_t num_keys, size_t dim) {
  kdx::topk::cosine_scores<kdx::f16, 1>(queries, keys, scores, num_queries, num_keys, dim);
}

// One selection round (see select_round): grid of queries × ⌈len/4096⌉ blocks of 512 threads;
// head [queries, k], scores or list [queries, ld], out [queries, out_ld] with out_ld ≥ segments·k.
extern "C" __global__ void __launch_bounds__(kdx::topk::SELECT_THREADS, 2)
    kdx_topk_select(const uint64_t* head, uint32_t head_len, const float* scores,
                    const uint64_t* list, size_t ld, uint32_t index_base, uint32_t len,
                    uint32_t k, uint64_t* out, size_t out_ld) {
  kdx::topk::select_round(head, head_len, scores, list, ld, index_base, len, k, out, out_ld);
}
