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

// Every row of x [n / cols, cols] plus `row` (a bias after a product that did not add it).
template <typename T>
__device__ __forceinline__ void add_rows(T* __restrict__ x, const T* __restrict__ row, size_t n,
                                         size_t cols) {
  grid_stride(n, [&](size_t i) { x[i] = from_f32<T>(to_f32(x[i]) + to_f32(row[i % cols])); });
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

// Inverted dropout in place, the counter-based mask of `Dropout::factor` (src/backend/mod.rs):
// element i's multiplier is dropout_factor(seed, i, ...) (common.cuh).
template <typename T>
__device__ __forceinline__ void dropout(T* __restrict__ x, size_t n, uint64_t seed,
                                        uint64_t threshold, float scale) {
  grid_stride(n, [&](size_t i) {
    x[i] = from_f32<T>(to_f32(x[i]) * dropout_factor(seed, i, threshold, scale));
  });
}

template <typename From, typename To>
__device__ __forceinline__ void convert(const From* __restrict__ x, To* __restrict__ y, size_t n) {
  grid_stride(n, [&](size_t i) { y[i] = from_f32<To>(to_f32(x[i])); });
}

// First stage of a column sum of x [rows, cols]: block (blockIdx.x, blockIdx.y) sums its columns
// over chunk blockIdx.y of `rows_per_chunk` rows into row blockIdx.y of partials [chunks][cols].
template <typename T>
__device__ __forceinline__ void column_partials(const T* __restrict__ x, size_t rows, size_t cols,
                                                size_t rows_per_chunk,
                                                float* __restrict__ partials) {
  const size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const size_t first = blockIdx.y * rows_per_chunk;
  const size_t end = min(rows, first + rows_per_chunk);
  float acc = 0.0f;
  for (size_t r = first; r < end; ++r) acc += to_f32(x[r * cols + c]);
  partials[blockIdx.y * cols + c] = acc;
}

// out[c] += Σ_k partials[k·stride + c] for c < width, k in order: the second stage of a column
// reduction whose first stage wrote one f32 row of partial sums per chunk of rows (no atomics, so
// the sums are reproducible).
template <typename T>
__device__ __forceinline__ void column_sums_add(const float* __restrict__ partials, size_t chunks,
                                                size_t stride, size_t width, T* __restrict__ out) {
  grid_stride(width, [&](size_t c) {
    float acc = 0.0f;
    for (size_t k = 0; k < chunks; ++k) acc += partials[k * stride + c];
    out[c] = from_f32<T>(to_f32(out[c]) + acc);
  });
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

// x[r, c] += row[c] over the n elements of x [n / cols, cols]. Any launch shape.
extern "C" __global__ void kdx_add_rows_f32(float* x, const float* row, size_t n, size_t cols) {
  kdx::elementwise::add_rows(x, row, n, cols);
}
extern "C" __global__ void kdx_add_rows_bf16(kdx::bf16* x, const kdx::bf16* row, size_t n,
                                             size_t cols) {
  kdx::elementwise::add_rows(x, row, n, cols);
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

// Dropout in place (see kdx::elementwise::dropout). Any launch shape.
extern "C" __global__ void kdx_dropout_f32(float* x, size_t n, uint64_t seed, uint64_t threshold,
                                           float scale) {
  kdx::elementwise::dropout(x, n, seed, threshold, scale);
}
extern "C" __global__ void kdx_dropout_bf16(kdx::bf16* x, size_t n, uint64_t seed,
                                            uint64_t threshold, float scale) {
  kdx::elementwise::dropout(x, n, seed, threshold, scale);
}

// dtype conversions (round to nearest even into bf16, exact into f32). Any launch shape.
extern "C" __global__ void kdx_f32_to_bf16(const float* x, kdx::bf16* y, size_t n) {
  kdx::elementwise::convert(x, y, n);
}
extern "C" __global__ void kdx_bf16_to_f32(const kdx::bf16* x, float* y, size_t n) {
  kdx::elementwise::convert(x, y, n);
}

// Partial column sums per chunk of rows: grid (⌈cols/blockDim.x⌉, ⌈rows/rows_per_chunk⌉), partials
// holding gridDim.y · cols floats; finish with kdx_column_sums_add_*.
extern "C" __global__ void kdx_column_partials_f32(const float* x, size_t rows, size_t cols,
                                                   size_t rows_per_chunk, float* partials) {
  kdx::elementwise::column_partials(x, rows, cols, rows_per_chunk, partials);
}
extern "C" __global__ void kdx_column_partials_bf16(const kdx::bf16* x, size_t rows, size_t cols,
                                                    size_t rows_per_chunk, float* partials) {
  kdx::elementwise::column_partials(x, rows, cols, rows_per_chunk, partials);
}

// out[c] += Σ_k partials[k·stride + c] (see kdx::elementwise::column_sums_add). Any launch shape.
extern "C" __global__ void kdx_column_sums_add_f32(const float* partials, size_t chunks,
                                                   size_t stride, size_t width, float* out) {
  kdx::elementwise::column_sums_add(partials, chunks, stride, width, out);
}
extern "C" __global__ void kdx_column_sums_add_bf16(const float* partials, size_t chunks,
                                                    size_t stride, size_t width, kdx::bf16* out) {
  kdx::elementwise::column_sums_add(partials, chunks, stride, width, out);
}
