// RetriKT's listwise loss over in-batch cosine similarities (methods §2.6), the parts around the
// two similarity products and the gradient product, which run on the GEMM. Mirrors
// src/backend/cpu/similarity.rs; everything in f32 (cosines divided by small temperatures leave no
// room for bf16), whatever the embeddings' storage.
#include "common.cuh"

namespace kdx {
namespace similarity {

// Row `blockIdx.x` of x scaled to unit length (written as f32) and its norm.
template <typename T>
__device__ __forceinline__ void unit_rows(const T* __restrict__ x, float* __restrict__ unit,
                                          float* __restrict__ norms, size_t cols) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const float norm = block_row_norm(xr, cols);
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) unit[row * cols + c] = to_f32(xr[c]) / norm;
  if (threadIdx.x == 0) norms[row] = norm;
}

// The log-normaliser of row i's similarities at 1/τ over the columns j ≠ i.
__device__ __forceinline__ float log_normaliser_off_diagonal(const float* row, size_t n, size_t i,
                                                             float inv_tau) {
  float m = -INFINITY;
  for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (j != i) m = fmaxf(m, row[j] * inv_tau);
  }
  m = block_max(m);
  float sum = 0.0f;
  for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (j != i) sum += expf(row[j] * inv_tau - m);
  }
  return m + logf(block_sum(sum));
}

// Row i of the loss. On entry `sim_s` holds the student's cosines; on return, row i holds
// g_ij = ∂L_i/∂sim_S(i, j) (0 on the diagonal); its loss goes to losses[i].
//   KL(p‖q) (reverse = 1): L_i = Σ_j p (log p − log q),  ∂/∂z_j = p (log p − log q − L_i)
//   KL(q‖p):               L_i = Σ_j q (log q − log p),  ∂/∂z_j = p − q
// with z = sim/τ_s, so g = ∂/∂z · 1/τ_s.
__device__ __forceinline__ void listwise_row(float* __restrict__ sim_s,
                                             const float* __restrict__ sim_t,
                                             double* __restrict__ losses, size_t n, float inv_tau_s,
                                             float inv_tau_t, uint32_t reverse) {
  const size_t i = blockIdx.x;
  float* s = sim_s + i * n;
  const float* t = sim_t + i * n;
  const float log_zs = log_normaliser_off_diagonal(s, n, i, inv_tau_s);
  const float log_zt = log_normaliser_off_diagonal(t, n, i, inv_tau_t);
  float part = 0.0f;
  for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (j == i) continue;
    const float lp = s[j] * inv_tau_s - log_zs, lq = t[j] * inv_tau_t - log_zt;
    part += reverse ? expf(lp) * (lp - lq) : expf(lq) * (lq - lp);
  }
  const float loss = block_sum(part);
  for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
    float g = 0.0f;
    if (j != i) {
      const float lp = s[j] * inv_tau_s - log_zs, lq = t[j] * inv_tau_t - log_zt;
      const float p = expf(lp);
      g = (reverse ? p * (lp - lq - loss) : p - expf(lq)) * inv_tau_s;
    }
    s[j] = g;
  }
  if (threadIdx.x == 0) losses[i] = (double)loss;
}

// Back through the normalisation: dx_i = (dû_i − û_i (û_i · dû_i)) / ‖x_i‖.
template <typename T>
__device__ __forceinline__ void unit_rows_backward(const float* __restrict__ unit,
                                                   const float* __restrict__ dunit,
                                                   const float* __restrict__ norms,
                                                   T* __restrict__ dx, size_t cols) {
  const size_t row = blockIdx.x;
  const float* u = unit + row * cols;
  const float* du = dunit + row * cols;
  float dot = 0.0f;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) dot += u[c] * du[c];
  const float along = block_sum(dot);
  const float inv_norm = 1.0f / norms[row];
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    dx[row * cols + c] = from_f32<T>((du[c] - u[c] * along) * inv_norm);
  }
}

}  // namespace similarity
}  // namespace kdx

// Rows of x [rows, cols] at unit length, as f32 unit [rows, cols], and their norms [rows]. One
// block per row.
extern "C" __global__ void kdx_unit_rows_f32(const float* x, float* unit, float* norms,
                                             size_t cols) {
  kdx::similarity::unit_rows(x, unit, norms, cols);
}
extern "C" __global__ void kdx_unit_rows_bf16(const kdx::bf16* x, float* unit, float* norms,
                                              size_t cols) {
  kdx::similarity::unit_rows(x, unit, norms, cols);
}

// The listwise KL of n rows: sim_s [n, n] (student cosines in, ∂L/∂sim out), sim_t [n, n] (teacher
// cosines), losses [n] (f64, per row). One block per row.
extern "C" __global__ void kdx_listwise_kl_rows(float* sim_s, const float* sim_t, double* losses,
                                                size_t n, float inv_tau_s, float inv_tau_t,
                                                uint32_t reverse) {
  kdx::similarity::listwise_row(sim_s, sim_t, losses, n, inv_tau_s, inv_tau_t, reverse);
}

// dx [rows, cols] from the unit rows, their gradient dunit (both f32) and the norms. One block per row.
extern "C" __global__ void kdx_unit_rows_backward_f32(const float* unit, const float* dunit,
                                                      const float* norms, float* dx, size_t cols) {
  kdx::similarity::unit_rows_backward(unit, dunit, norms, dx, cols);
}
extern "C" __global__ void kdx_unit_rows_backward_bf16(const float* unit, const float* dunit,
                                                       const float* norms, kdx::bf16* dx,
                                                       size_t cols) {
  kdx::similarity::unit_rows_backward(unit, dunit, norms, dx, cols);
}
