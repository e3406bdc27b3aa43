// Layer norm and RMSNorm (forward, backward) and row L2 normalisation, for f32 and bf16
// activations with f32 statistics. Mirrors src/backend/cpu/norms.rs.
//
// Row kernels run one block per row (gridDim.x = rows; blockDim.x a multiple of 32, at most 1024):
// each thread strides over the row's columns, and block_sum combines in a fixed order.
#include "common.cuh"

namespace kdx {
namespace norms {

// Two passes over the row (mean, then the centred sum of squares) keep the variance exact for
// rows with a large mean, as on the CPU.
template <typename T>
__device__ __forceinline__ void layer_norm(const T* __restrict__ x, const T* __restrict__ gamma,
                                           const T* __restrict__ beta, T* __restrict__ y,
                                           float* __restrict__ mean, float* __restrict__ rstd,
                                           size_t cols, float eps) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const float n = (float)cols;

  float sum = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) sum += to_f32(xr[c]);
  const float mu = block_sum(sum) / n;

  float squares = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = to_f32(xr[c]) - mu;
    squares += d * d;
  }
  const float rs = 1.0f / sqrtf(block_sum(squares) / n + eps);

  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    yr[c] = from_f32<T>((to_f32(xr[c]) - mu) * rs * to_f32(gamma[c]) + to_f32(beta[c]));
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with x̂ = (x − μ)·rstd and dx̂ = dy·γ.
template <typename T>
__device__ __forceinline__ void layer_norm_backward(const T* __restrict__ dy,
                                                    const T* __restrict__ x,
                                                    const T* __restrict__ gamma,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd,
                                                    T* __restrict__ dx, size_t cols) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const float mu = mean[row];
  const float rs = rstd[row];
  const float n = (float)cols;

  float dot = 0.0f;
  float sum = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float xhat = (to_f32(xr[c]) - mu) * rs;
    const float dxhat = to_f32(dyr[c]) * to_f32(gamma[c]);
    dot += dxhat * xhat;
    sum += dxhat;
  }
  const float c1 = block_sum(dot) / n;
  const float c2 = block_sum(sum) / n;

  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float xhat = (to_f32(xr[c]) - mu) * rs;
    const float dxhat = to_f32(dyr[c]) * to_f32(gamma[c]);
    dxr[c] = from_f32<T>(rs * (dxhat - c2 - xhat * c1));
  }
}

// First stage of a reproducible column sum of K per-element terms (parameter gradients): block
// (blockIdx.x, blockIdx.y) adds, for each of its columns c, the terms of rows r of chunk blockIdx.y
// (`rows_per_chunk` rows), `terms(r, c, acc)` adding into acc[0..K]; term k's sum goes to
// partials[(chunk·K + k)·cols + c]. kdx_column_sums_add_* then adds each term's chunks in order.
template <int K, typename F>
__device__ __forceinline__ void param_partials(size_t rows, size_t cols, size_t rows_per_chunk,
                                               float* __restrict__ partials, F terms) {
  const size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const size_t chunk = blockIdx.y;
  const size_t first = chunk * rows_per_chunk;
  const size_t end = min(rows, first + rows_per_chunk);
  float acc[K] = {};
  for (size_t r = first; r < end; ++r) terms(r, c, acc);
#pragma unroll
  for (int k = 0; k < K; ++k) partials[(chunk * K + k) * cols + c] = acc[k];
}

// dγ = Σ_rows dy·x̂ and dβ = Σ_rows dy, partials laid out [chunk][dγ cols | dβ cols].
template <typename T>
__device__ __forceinline__ void layer_norm_param_partials(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ rstd, size_t rows, size_t cols, size_t rows_per_chunk,
    float* __restrict__ partials) {
  param_partials<2>(rows, cols, rows_per_chunk, partials, [&](size_t r, size_t c, float* acc) {
    const float g = to_f32(dy[r * cols + c]);
    acc[0] += g * ((to_f32(x[r * cols + c]) - mean[r]) * rstd[r]);
    acc[1] += g;
  });
}

// y = (x·r)·w with r = 1/√(mean(x²) + ε), multiplied in that order as on the CPU (and in
// transformers), so f32 results round the same way.
template <typename T>
__device__ __forceinline__ void rms_norm(const T* __restrict__ x, const T* __restrict__ weight,
                                         T* __restrict__ y, float* __restrict__ rstd, size_t cols,
                                         float eps) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float squares = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_f32(xr[c]);
    squares += v * v;
  }
  const float rs = 1.0f / sqrtf(block_sum(squares) / (float)cols + eps);
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    yr[c] = from_f32<T>(to_f32(xr[c]) * rs * to_f32(weight[c]));
  }
  if (threadIdx.x == 0) rstd[row] = rs;
}

// dx = r·(g − x·r²·⟨g, x⟩/n) with g = dy·w and r the forward's 1/rms.
template <typename T>
__device__ __forceinline__ void rms_norm_backward(const T* __restrict__ dy,
                                                  const T* __restrict__ x,
                                                  const T* __restrict__ weight,
                                                  const float* __restrict__ rstd,
                                                  T* __restrict__ dx, size_t cols) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const float rs = rstd[row];
  float dot = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    dot += to_f32(dyr[c]) * to_f32(weight[c]) * to_f32(xr[c]);
  }
  const float k = block_sum(dot) / (float)cols * rs * rs;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = to_f32(dyr[c]) * to_f32(weight[c]);
    dxr[c] = from_f32<T>(rs * (g - to_f32(xr[c]) * k));
  }
}

// dw = Σ_rows dy·x·r, partials laid out [chunk][cols].
template <typename T>
__device__ __forceinline__ void rms_norm_weight_partials(const T* __restrict__ dy,
                                                         const T* __restrict__ x,
                                                         const float* __restrict__ rstd,
                                                         size_t rows, size_t cols,
                                                         size_t rows_per_chunk,
                                                         float* __restrict__ partials) {
  param_partials<1>(rows, cols, rows_per_chunk, partials, [&](size_t r, size_t c, float* acc) {
    acc[0] += to_f32(dy[r * cols + c]) * to_f32(x[r * cols + c]) * rstd[r];
  });
}

template <typename T>
__device__ __forceinline__ void l2_normalize(const T* __restrict__ x, T* __restrict__ y,
                                             size_t cols) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const float norm = block_row_norm(xr, cols);
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = from_f32<T>(to_f32(xr[c]) / norm);
}

}  // namespace norms
}  // namespace kdx

// Layer norm of each row of x [rows, cols]: y = (x − μ)·rstd·γ + β, with μ and rstd = 1/√(σ² + ε)
// written per row (f32, for the backward). One block per row.
extern "C" __global__ void kdx_layer_norm_f32(const float* x, const float* gamma,
                                              const float* beta, float* y, float* mean,
                                              float* rstd, size_t cols, float eps) {
  kdx::norms::layer_norm(x, gamma, beta, y, mean, rstd, cols, eps);
}
extern "C" __global__ void kdx_layer_norm_bf16(const kdx::bf16* x, const kdx::bf16* gamma,
                                               const kdx::bf16* beta, kdx::bf16* y, float* mean,
                                               float* rstd, size_t cols, float eps) {
  kdx::norms::layer_norm(x, gamma, beta, y, mean, rstd, cols, eps);
}

// dx of the layer norm, from the forward's μ and rstd. One block per row.
extern "C" __global__ void kdx_layer_norm_backward_f32(const float* dy, const float* x,
                                                       const float* gamma, const float* mean,
                                                       const float* rstd, float* dx, size_t cols) {
  kdx::norms::layer_norm_backward(dy, x, gamma, mean, rstd, dx, cols);
}
extern "C" __global__ void kdx_layer_norm_backward_bf16(const kdx::bf16* dy, const kdx::bf16* x,
                                                        const kdx::bf16* gamma, const float* mean,
                                                        const float* rstd, kdx::bf16* dx,
                                                        size_t cols) {
  kdx::norms::layer_norm_backward(dy, x, gamma, mean, rstd, dx, cols);
}

// Partial sums of dγ and dβ per chunk of rows: grid (⌈cols/blockDim.x⌉, ⌈rows/rows_per_chunk⌉),
// partials holding gridDim.y · 2·cols floats.
extern "C" __global__ void kdx_layer_norm_param_partials_f32(const float* dy, const float* x,
                                                             const float* mean, const float* rstd,
                                                             size_t rows, size_t cols,
                                                             size_t rows_per_chunk,
                                                             float* partials) {
  kdx::norms::layer_norm_param_partials(dy, x, mean, rstd, rows, cols, rows_per_chunk, partials);
}
extern "C" __global__ void kdx_layer_norm_param_partials_bf16(const kdx::bf16* dy,
                                                              const kdx::bf16* x,
                                                              const float* mean, const float* rstd,
                                                              size_t rows, size_t cols,
                                                              size_t rows_per_chunk,
                                                              float* partials) {
  kdx::norms::layer_norm_param_partials(dy, x, mean, rstd, rows, cols, rows_per_chunk, partials);
}

// RMSNorm of each row of x [rows, cols]: y = x·r·w with r = 1/√(mean(x²) + ε) written per row
// (f32, for the backward). One block per row.
extern "C" __global__ void kdx_rms_norm_f32(const float* x, const float* weight, float* y,
                                            float* rstd, size_t cols, float eps) {
  kdx::norms::rms_norm(x, weight, y, rstd, cols, eps);
}
extern "C" __global__ void kdx_rms_norm_bf16(const kdx::bf16* x, const kdx::bf16* weight,
                                             kdx::bf16* y, float* rstd, size_t cols, float eps) {
  kdx::norms::rms_norm(x, weight, y, rstd, cols, eps);
}

// dx of RMSNorm, from the forward's 1/rms. One block per row.
extern "C" __global__ void kdx_rms_norm_backward_f32(const float* dy, const float* x,
                                                     const float* weight, const float* rstd,
                                                     float* dx, size_t cols) {
  kdx::norms::rms_norm_backward(dy, x, weight, rstd, dx, cols);
}
extern "C" __global__ void kdx_rms_norm_backward_bf16(const kdx::bf16* dy, const kdx::bf16* x,
                                                      const kdx::bf16* weight, const float* rstd,
                                                      kdx::bf16* dx, size_t cols) {
  kdx::norms::rms_norm_backward(dy, x, weight, rstd, dx, cols);
}

// Partial sums of dw per chunk of rows: grid (⌈cols/blockDim.x⌉, ⌈rows/rows_per_chunk⌉), partials
// holding gridDim.y · cols floats.
extern "C" __global__ void kdx_rms_norm_weight_partials_f32(const float* dy, const float* x,
                                                            const float* rstd, size_t rows,
                                                            size_t cols, size_t rows_per_chunk,
                                                            float* partials) {
  kdx::norms::rms_norm_weight_partials(dy, x, rstd, rows, cols, rows_per_chunk, partials);
}
extern "C" __global__ void kdx_rms_norm_weight_partials_bf16(const kdx::bf16* dy,
                                                             const kdx::bf16* x,
                                                             const float* rstd, size_t rows,
                                                             size_t cols, size_t rows_per_chunk,
                                                             float* partials) {
  kdx::norms::rms_norm_weight_partials(dy, x, rstd, rows, cols, rows_per_chunk, partials);
}

// Each row of x [rows, cols] divided by its L2 norm (at least 1e-12). One block per row.
extern "C" __global__ void kdx_l2_normalize_f32(const float* x, float* y, size_t cols) {
  kdx::norms::l2_normalize(x, y, cols);
}
extern "C" __global__ void kdx_l2_normalize_bf16(const kdx::bf16* x, kdx::bf16* y, size_t cols) {
  kdx::norms::l2_normalize(x, y, cols);
}
