// AdamW, in place: f32 master parameters and moments, f32 or bf16 gradients.
// Mirrors src/backend/cpu/optimizer.rs; see there for the formula (PyTorch's torch.optim.AdamW).
#include "common.cuh"

namespace kdx {
namespace optimizer {

// The scalars depend only on the hyper-parameters and the step, so the host computes them once per
// step exactly as the CPU backend does (in f64, then rounded to f32):
//   decay        = 1 − lr·weight_decay
//   step_size    = lr / (1 − β1^t)
//   inv_sqrt_bc2 = 1 / √(1 − β2^t)
// Each operation is an explicitly rounded intrinsic in the CPU's order: nvcc would otherwise fuse
// multiply-adds, and the GPU would not reproduce the CPU's bits.
template <typename G>
__device__ __forceinline__ void adamw(float* __restrict__ param, const G* __restrict__ grad,
                                      float* __restrict__ m, float* __restrict__ v, size_t n,
                                      float beta1, float beta2, float eps, float decay,
                                      float step_size, float inv_sqrt_bc2) {
  const float one_minus_beta1 = __fsub_rn(1.0f, beta1);
  const float one_minus_beta2 = __fsub_rn(1.0f, beta2);
  grid_stride(n, [&](size_t i) {
    const float g = to_f32(grad[i]);
    // m ← β1·m + (1−β1)·g
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_beta1, g));
    // v ← β2·v + (1−β2)·g·g
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
    // p ← p·decay − step_size·m / (√v·inv_sqrt_bc2 + ε)
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_sqrt_bc2), eps);
    const float update = __fdiv_rn(__fmul_rn(step_size, mi), denom);
    param[i] = __fsub_rn(__fmul_rn(param[i], decay), update);
    m[i] = mi;
    v[i] = vi;
  });
}

}  // namespace optimizer
}  // namespace kdx

// One AdamW step over n elements. The suffix names the gradient's dtype: parameters and both
// moments are always f32. Any launch shape (grid-stride loop).
extern "C" __global__ void kdx_adamw_f32(float* param, const float* grad, float* m, float* v,
                                         size_t n, float beta1, float beta2, float eps, float decay,
                                         float step_size, float inv_sqrt_bc2) {
  kdx::optimizer::adamw(param, grad, m, v, n, beta1, beta2, eps, decay, step_size, inv_sqrt_bc2);
}

extern "C" __global__ void kdx_adamw_bf16(float* param, const kdx::bf16* grad, float* m, float* v,
                                          size_t n, float beta1, float beta2, float eps, float decay,
                                          float step_size, float inv_sqrt_bc2) {
  kdx::optimizer::adamw(param, grad, m, v, n, beta1, beta2, eps, decay, step_size, inv_sqrt_bc2);
}
