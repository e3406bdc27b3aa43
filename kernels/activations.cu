// Activations and their backward, for f32 and bf16 tensors: GELU in its exact (erf) form, as BERT
// uses it, tanh, and SwiGLU (Llama's MLP). Mirrors src/backend/cpu/activations.rs: values are
// computed in f32 and rounded once to the element type.
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

// ln of the smallest normal f32, where the CPU's f32 exp stops.
constexpr float LN_MIN_NORMAL_F32 = -87.33655f;

// σ(x) from e^{−|x|}, which never overflows: 1/(1 + e) for x ≥ 0, e/(1 + e) below, so neither tail
// loses its precision to a 1 − σ. e is flushed to 0 below LN_MIN_NORMAL_F32, as on the CPU, so that
// x·σ(x) is exactly 0 for a huge negative x.
__device__ __forceinline__ float sigmoid(float x) {
  const float neg_abs = x > 0.0f ? -x : x;
  const float e = neg_abs < LN_MIN_NORMAL_F32 ? 0.0f : expf(neg_abs);
  const float num = x < 0.0f ? e : 1.0f;
  return num / (1.0f + e);
}

template <typename T>
__device__ __forceinline__ void swiglu(const T* __restrict__ gate, const T* __restrict__ up,
                                       T* __restrict__ y, size_t n) {
  grid_stride(n, [&](size_t i) {
    const float g = to_f32(gate[i]);
    y[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
  });
}

// silu′(g) = σ(g)·(1 + g·(1 − σ(g))); dgate = dy·up·silu′(g), dup = dy·g·σ(g).
template <typename T>
__device__ __forceinline__ void swiglu_backward(const T* __restrict__ gate,
                                                const T* __restrict__ up,
                                                const T* __restrict__ dy, T* __restrict__ dgate,
                                                T* __restrict__ dup, size_t n) {
  grid_stride(n, [&](size_t i) {
    const float g = to_f32(gate[i]);
    const float d = to_f32(dy[i]);
    const float s = sigmoid(g);
    const float dsilu = s * (1.0f + g * (1.0f - s));
    dgate[i] = from_f32<T>(d * to_f32(up[i]) * dsilu);
    dup[i] = from_f32<T>(d * g * s);
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

// y = silu(gate)·up, with silu(g) = g·σ(g). Any launch shape; outputs must not overlap inputs.
extern "C" __global__ void kdx_swiglu_f32(const float* gate, const float* up, float* y, size_t n) {
  kdx::activations::swiglu(gate, up, y, n);
}
extern "C" __global__ void kdx_swiglu_bf16(const kdx::bf16* gate, const kdx::bf16* up,
                                           kdx::bf16* y, size_t n) {
  kdx::activations::swiglu(gate, up, y, n);
}

// (dgate, dup) of SwiGLU from its inputs and dy. Any launch shape; outputs must not overlap inputs.
extern "C" __global__ void kdx_swiglu_backward_f32(const float* gate, const float* up,
                                                   const float* dy, float* dgate, float* dup,
                                                   size_t n) {
  kdx::activations::swiglu_backward(gate, up, dy, dgate, dup, n);
}
extern "C" __global__ void kdx_swiglu_backward_bf16(const kdx::bf16* gate, const kdx::bf16* up,
                                                    const kdx::bf16* dy, kdx::bf16* dgate,
                                                    kdx::bf16* dup, size_t n) {
  kdx::activations::swiglu_backward(gate, up, dy, dgate, dup, n);
}
