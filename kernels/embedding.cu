// Embedding lookup and its backward, for f32 and bf16 tables. Mirrors src/backend/cpu/embedding.rs.
// Ids are checked against the vocabulary on the host before any launch.
#include "common.cuh"

namespace kdx {
namespace embedding {

// One block per id: out[i, :] = table[ids[i], :].
template <typename T>
__device__ __forceinline__ void lookup(const T* __restrict__ table, const uint32_t* __restrict__ ids,
                                       T* __restrict__ out, size_t dim) {
  const size_t i = blockIdx.x;
  const T* src = table + (size_t)ids[i] * dim;
  T* dst = out + i * dim;
  for (size_t c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = src[c];
}

// The scatter-add dtable[ids[i]] += dy[i] without atomics. The host groups the positions by id
// (a stable sort, so each group stays in position order) into `index`:
//   index[0 .. n)                  positions, grouped
//   index[n .. n + s)              the id of each of the s groups
//   index[n + s .. n + 2s + 1)     group boundaries: group g is positions[offsets[g] .. offsets[g+1])
// One block owns one table row (one group) and adds its rows of dy in position order, in f32 from
// the row's current value, rounding once: every element has one writer and a fixed order of
// additions, so the result is reproducible (and, in f32, bit-identical to the CPU's row-order loop).
template <typename T>
__device__ __forceinline__ void scatter_add(const T* __restrict__ dy,
                                            const uint32_t* __restrict__ index, size_t n,
                                            size_t groups, size_t dim, T* __restrict__ dtable) {
  const size_t g = blockIdx.x;
  const uint32_t* positions = index;
  const uint32_t* group_ids = index + n;
  const uint32_t* offsets = index + n + groups;
  T* row = dtable + (size_t)group_ids[g] * dim;
  const uint32_t first = offsets[g];
  const uint32_t end = offsets[g + 1];
  for (size_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float acc = to_f32(row[c]);
    for (uint32_t k = first; k < end; ++k) acc += to_f32(dy[(size_t)positions[k] * dim + c]);
    row[c] = from_f32<T>(acc);
  }
}

}  // namespace embedding
}  // namespace kdx

// out [n, dim] = rows of table picked by ids [n]. One block per id (gridDim.x = n).
extern "C" __global__ void kdx_embedding_f32(const float* table, const uint32_t* ids, float* out,
                                             size_t dim) {
  kdx::embedding::lookup(table, ids, out, dim);
}
extern "C" __global__ void kdx_embedding_bf16(const kdx::bf16* table, const uint32_t* ids,
                                              kdx::bf16* out, size_t dim) {
  kdx::embedding::lookup(table, ids, out, dim);
}

// dtable[ids[i]] += dy[i] for dy [n, dim], with `index` as described at kdx::embedding::scatter_add.
// One block per distinct id (gridDim.x = groups).
extern "C" __global__ void kdx_embedding_backward_f32(const float* dy, const uint32_t* index,
                                                      size_t n, size_t groups, size_t dim,
                                                      float* dtable) {
  kdx::embedding::scatter_add(dy, index, n, groups, dim, dtable);
}
extern "C" __global__ void kdx_embedding_backward_bf16(const kdx::bf16* dy, const uint32_t* index,
                                                       size_t n, size_t groups, size_t dim,
                                                       kdx::bf16* dtable) {
  kdx::embedding::scatter_add(dy, index, n, groups, dim, dtable);
}
