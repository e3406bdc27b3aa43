// Element-wise ops and the sum of squares, for f32 and bf16 tensors. Mirrors
// src/backend/cpu/elementwise.rs: values are computed in f32 and rounded once to the element type.
#include "common.cuh"

namespace kdx {
namespace elementwise {

template <typename T>
__device__ __forceinline__ void add(const T* __restrict__ a, const T* __restrict__ b,
                                    T* __restrict__ out, size_t n) {
  grid_stride(n, [&](size_t i) { out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i])); });
}

template <typename T>
__device__ __forceinline__ void add_assign(T* __restrict__ a, const T* __restrict__ b, size_t n) {
  grid_stride(n, [&](size_t i) { a[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i])); });
}

template <typename T>
__device__ __forceinline__ void scale(T* __restrict__ x, size_t n, float factor) {
  grid_stride(n, [&](size_t i) { x[i] = from_f32<T>(to_f32(x[i]) * factor); });
}

// Each element is squared and accumulated in f64 (an f32 value's square is exact there), one
// partial sum per block: stage one of a two-stage reduction without atomics, so the result depends
// only on the launch shape, never on scheduling.
template <typename T>
__device__ __forceinline__ void sum_squares(const T* __restrict__ x, size_t n,
                                            double* __restrict__ partials) {
  double acc = 0.0;
  grid_stride(n, [&](size_t i) {
    const double xi = (double)to_f32(x[i]);
    acc += xi * xi;
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

}  // namespace elementwise
}  // namespace kdx

// out = a + b. `out` must not overlap `a` or `b` (use add_assign for in place). Any launch shape.
extern "C" __global__ void kdx_add_f32(const float* a, const float* b, float* out, size_t n) {
  kdx::elementwise::add(a, b, out, n);
}
extern "C" __global__ void kdx_add_bf16(const kdx::bf16* a, const kdx::bf16* b, kdx::bf16* out,
                                        size_t n) {
  kdx::elementwise::add(a, b, out, n);
}

// a += b. Any launch shape.
extern "C" __global__ void kdx_add_assign_f32(float* a, const float* b, size_t n) {
  kdx::elementwise::add_assign(a, b, n);
}
extern "C" __global__ void kdx_add_assign_bf16(kdx::bf16* a, const kdx::bf16* b, size_t n) {
  kdx::elementwise::add_assign(a, b, n);
}

// x *= factor. Any launch shape.
extern "C" __global__ void kdx_scale_f32(float* x, size_t n, float factor) {
  kdx::elementwise::scale(x, n, factor);
}
extern "C" __global__ void kdx_scale_bf16(kdx::bf16* x, size_t n, float factor) {
  kdx::elementwise::scale(x, n, factor);
}

// Σ x²: partials[blockIdx.x] = this block's share, so `partials` holds gridDim.x values; finish
// with kdx_sum_f64 over them. blockDim.x: a multiple of 32, at most 1024.
extern "C" __global__ void kdx_sum_squares_f32(const float* x, size_t n, double* partials) {
  kdx::elementwise::sum_squares(x, n, partials);
}
extern "C" __global__ void kdx_sum_squares_bf16(const kdx::bf16* x, size_t n, double* partials) {
  kdx::elementwise::sum_squares(x, n, partials);
}

// out[0] = Σ values[0..n), in a fixed order. Launch ONE block (blockDim.x: a multiple of 32, at most
// 1024).
extern "C" __global__ void kdx_sum_f64(const double* values, size_t n, double* out) {
  double acc = 0.0;
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) acc += values[i];
  acc = kdx::block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}
