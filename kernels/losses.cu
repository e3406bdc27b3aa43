// Losses fused with their gradient, for f32 and bf16 logits. Mirrors src/backend/cpu/losses.rs.
// Labels are checked against the number of classes on the host before any launch.
#include "common.cuh"

namespace kdx {
namespace losses {

// One block per row: log-sum-exp with the row max subtracted (any logit magnitude is safe), the
// row's loss −log softmax(z)[label] = ln Σ e^{z−m} + m − z[label], and the gradient
// (softmax(z) − onehot(label)) / rows, in the CPU's order of operations.
template <typename T>
__device__ __forceinline__ void cross_entropy(const T* __restrict__ logits,
                                              const uint32_t* __restrict__ labels,
                                              T* __restrict__ grad, double* __restrict__ losses,
                                              size_t classes, float inv_rows) {
  const size_t row = blockIdx.x;
  const T* z = logits + row * classes;
  T* g = grad + row * classes;
  const size_t label = labels[row];

  float m = -INFINITY;
  for (size_t c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, to_f32(z[c]));
  m = block_max(m);

  float sum = 0.0f;
  for (size_t c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(to_f32(z[c]) - m);
  const float total = block_sum(sum);

  const float scale = inv_rows / total;
  for (size_t c = threadIdx.x; c < classes; c += blockDim.x) {
    float p = expf(to_f32(z[c]) - m) * scale;
    if (c == label) p -= inv_rows;
    g[c] = from_f32<T>(p);
  }
  if (threadIdx.x == 0) losses[row] = (double)(logf(total) + m - to_f32(z[label]));
}

}  // namespace losses
}  // namespace kdx

// Cross-entropy of logits [rows, classes] against labels [rows]: grad [rows, classes] and the
// per-row losses [rows] (f64; the host takes the mean, as the CPU does). One block per row.
extern "C" __global__ void kdx_cross_entropy_f32(const float* logits, const uint32_t* labels,
                                                 float* grad, double* losses, size_t classes,
                                                 float inv_rows) {
  kdx::losses::cross_entropy(logits, labels, grad, losses, classes, inv_rows);
}
extern "C" __global__ void kdx_cross_entropy_bf16(const kdx::bf16* logits, const uint32_t* labels,
                                                  kdx::bf16* grad, double* losses, size_t classes,
                                                  float inv_rows) {
  kdx::losses::cross_entropy(logits, labels, grad, losses, classes, inv_rows);
}
