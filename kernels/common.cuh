// Helpers shared by every kernel file.
//
// build.rs compiles all kernels/*.cu as ONE translation unit (each file #included in turn), so the
// runtime loads a single module. Consequences for kernel files:
// - entry points are `extern "C" __global__ void kdx_<op>_<dtype>(...)`, unique across all files;
//   their parameter lists are an ABI shared with src/backend/cuda/<family>.rs and must match it
//   type for type (`size_t` is u64/usize, `float` f32, `double` f64, pointers are device pointers);
// - everything else lives in `namespace kdx::<family>` (an anonymous namespace would be shared by
//   all files and its names would collide).
//
// Reductions require blockDim.x to be a multiple of 32 (whole warps), at most 1024.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

namespace kdx {

typedef __nv_bfloat16 bf16;
// Read only (key stores); no kernel writes f16.
typedef __half f16;

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP_SIZE = 32;

__host__ __device__ __forceinline__ constexpr size_t ceil_div(size_t a, size_t b) {
  return (a + b - 1) / b;
}

// Loads widen to f32 and stores round to the element type (round to nearest even, as the `half`
// crate's `bf16::from_f32` does), so every kernel computes in f32 whatever it reads and writes.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  return __float2bfloat16_rn(x);
}

// SplitMix64's finaliser, bit for bit the `mix64` of src/backend/mod.rs: counter-based random
// streams (dropout masks) give the same bits on the CPU and the GPU.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The multiplier of element `index` of the dropout stream `seed`, bit for bit `Dropout::factor`:
// 0 iff the high 32 bits of mix64(seed ^ index·K) are below p·2^32, which for integer bits is
// `bits < threshold` with the host's threshold = ⌈p·2^32⌉; otherwise `scale`, 1/(1−p) rounded to
// f32 (the CPU multiplies by the same f32). threshold = 0 (p = 0) keeps everything at scale 1
// without hashing.
__device__ __forceinline__ float dropout_factor(uint64_t seed, uint64_t index, uint64_t threshold,
                                                float scale) {
  if (threshold == 0) return scale;
  const uint64_t bits = mix64(seed ^ (index * 0xD6E8FEB86659FD93ull)) >> 32;
  return bits < threshold ? 0.0f : scale;
}

// Calls f(i) for every i < n that belongs to this thread: i = global thread index, then strided by
// the whole grid, so any launch shape covers any n (64-bit indices: tensors may pass 2^31 elements).
template <typename F>
__device__ __forceinline__ void grid_stride(size_t n, F f) {
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    f(i);
  }
}

// Sum / max over the 32 lanes of a warp; every lane gets the result. The butterfly order is fixed,
// so the result is reproducible.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(FULL_MASK, v, offset);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
    v = max(v, __shfl_xor_sync(FULL_MASK, v, offset));
  }
  return v;
}

// Sum over the whole block; every thread gets the result. All threads of the block must call it
// (it synchronises), with blockDim.x a multiple of 32. Warp sums first, then warp 0 adds the
// per-warp sums: a fixed order for a given block size. Safe to call several times in a row.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[WARP_SIZE];
  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  const int warps = blockDim.x / WARP_SIZE;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial[lane] : T(0);
    v = warp_sum(v);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  const T total = partial[0];
  // Nobody may overwrite `partial` in a following call before everyone has read the total.
  __syncthreads();
  return total;
}

template <typename T>
__device__ __forceinline__ T block_max(T v) {
  __shared__ T partial[WARP_SIZE];
  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  const int warps = blockDim.x / WARP_SIZE;
  v = warp_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial[lane] : partial[0];
    v = warp_max(v);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  const T total = partial[0];
  __syncthreads();
  return total;
}

// The L2 norm of one row, the whole block working on it, with torch.nn.functional.normalize's guard
// (at least 1e-12, so a zero row stays zero when divided by it); every thread gets the result.
template <typename T>
__device__ __forceinline__ float block_row_norm(const T* row, size_t cols) {
  float squares = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_f32(row[c]);
    squares += v * v;
  }
  return fmaxf(sqrtf(block_sum(squares)), 1e-12f);
}

}  // namespace kdx
