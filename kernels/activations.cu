// Activations and their backward, for f32 and bf16 tensors: GELU in its exact (erf) form, as BERT
// uses it, and tanh. Mirrors src/backend/cpu/activations.rs: values are computed in f32 and rounded
// once to the element type.
#include "common.cuh"

namespace kdx {
namespace activations {

constexpr float FRAC_1_SQRT_2 = 0.70710678118654752440f;
// 1/√(2π), the standard normal density's constant.
constexpr float INV_SQRT_2PI = 0.39894228040143267794f;

// An element-wise function and its derivative. The backward receives `saved`: the input for GELU,
// the output for tanh (whichever makes the derivative cheapest), as on the CPU.
struct Gelu {
  static __device__ __forceinline__ float value(float x) {
    return 0.5f * x * (1.0f + erff(x * FRAC_1_SQRT_2));
  }
  // d/dx [x·Φ(x)] = Φ(x) + x·φ(x).
  static __device__ __forceinline__ float derivative(float x) {
    const float cdf = 0.5f * (1.0f + erff(x * FRAC_1_SQRT_2));
    const float pdf = INV_SQRT_2PI * expf(-(x * x) * 0.5f);
    return cdf + x * pdf;
  }
};

struct Tanh {
  static __device__ __forceinline__ float value(float x) { return tanhf(x); }
  // From the output: 1 − y².
  static __device__ __forceinline__ float derivative(float y) { return 1.0f - y * y; }
};

template <typename F, typename T>
__device__ __forceinline__ void forward(const T* __restrict__ x, T* __restrict__ y, size_t n) {
  grid_stride(n, [&](size_t i) { y[i] = from_f32<T>(F::value(to_f32(x[i]))); });
}

template <typename F, typename T>
__device__ __forceinline__ void backward(const T* __restrict__ saved, const T* __restrict__ dy,
                                         T* __restrict__ dx, size_t n) {
  grid_stride(n, [&](size_t i) {
    dx[i] = from_f32<T>(to_f32(dy[i]) * F::derivative(to_f32(saved[i])));
  });
}

}  // namespace activations
}  // namespace kdx

// y = GELU(x); dx = dy·GELU'(x). Any launch shape; outputs must not overlap inputs.
extern "C" __global__ void kdx_gelu_f32(const float* x, float* y, size_t n) {
  kdx::activations::forward<kdx::activations::Gelu>(x, y, n);
}
extern "C" __global__ void kdx_gelu_bf16(const kdx::bf16* x, kdx::bf16* y, size_t n) {
  kdx::activations::forward<kdx::activations::Gelu>(x, y, n);
}
extern "C" __global__ void kdx_gelu_backward_f32(const float* x, const float* dy, float* dx,
                                                 size_t n) {
  kdx::activations::backward<kdx::activations::Gelu>(x, dy, dx, n);
}
extern "C" __global__ void kdx_gelu_backward_bf16(const kdx::bf16* x, const kdx::bf16* dy,
                                                  kdx::bf16* dx, size_t n) {
  kdx::activations::backward<kdx::activations::Gelu>(x, dy, dx, n);
}

// y = tanh(x); dx = dy·(1 − y²) from the forward's output y. Any launch shape.
extern "C" __global__ void kdx_tanh_f32(const float* x, float* y, size_t n) {
  kdx::activations::forward<kdx::activations::Tanh>(x, y, n);
}
extern "C" __global__ void kdx_tanh_bf16(const kdx::bf16* x, kdx::bf16* y, size_t n) {
  kdx::activations::forward<kdx::activations::Tanh>(x, y, n);
}
extern "C" __global__ void kdx_tanh_backward_f32(const float* y, const float* dy, float* dx,
                                                 size_t n) {
  kdx::activations::backward<kdx::activations::Tanh>(y, dy, dx, n);
}
extern "C" __global__ void kdx_tanh_backward_bf16(const kdx::bf16* y, const kdx::bf16* dy,
                                                  kdx::bf16* dx, size_t n) {
  kdx::activations::backward<kdx::activations::Tanh>(y, dy, dx, n);
}
