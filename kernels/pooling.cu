// Sequence pooling and its backward, for f32 and bf16 activations: the mean over each sequence's
// real tokens, or its first token. Mirrors src/backend/cpu/pooling.rs. Lengths are checked on the
// host (1 ≤ length ≤ seq) before any launch.
#include "common.cuh"

namespace kdx {
namespace pooling {

// out [batch, hidden] from x [batch·seq, hidden]. Each output element sums its column over the
// sequence's tokens in order, then multiplies by 1/length, as the CPU does.
template <typename T>
__device__ __forceinline__ void pool(const T* __restrict__ x, const uint32_t* __restrict__ lengths,
                                     T* __restrict__ out, size_t batch, size_t seq, size_t hidden,
                                     int mean) {
  grid_stride(batch * hidden, [&](size_t i) {
    const size_t b = i / hidden;
    const size_t h = i % hidden;
    const T* first = x + b * seq * hidden + h;
    if (!mean) {
      out[i] = first[0];
      return;
    }
    const uint32_t len = lengths[b];
    float acc = 0.0f;
    for (uint32_t t = 0; t < len; ++t) acc += to_f32(first[(size_t)t * hidden]);
    out[i] = from_f32<T>(acc * (1.0f / (float)len));
  });
}

// dx [batch·seq, hidden] from dy [batch, hidden]: dy/length on each real token (dy on the first for
// CLS), zero on the others, so every element of dx is written.
template <typename T>
__device__ __forceinline__ void pool_backward(const T* __restrict__ dy,
                                              const uint32_t* __restrict__ lengths,
                                              T* __restrict__ dx, size_t batch, size_t seq,
                                              size_t hidden, int mean) {
  grid_stride(batch * seq * hidden, [&](size_t i) {
    const size_t h = i % hidden;
    const size_t token = i / hidden;
    const size_t b = token / seq;
    const size_t t = token % seq;
    const uint32_t len = lengths[b];
    const size_t used = mean ? len : 1;
    const float scale = mean ? 1.0f / (float)len : 1.0f;
    dx[i] = from_f32<T>(t < used ? to_f32(dy[b * hidden + h]) * scale : 0.0f);
  });
}

}  // namespace pooling
}  // namespace kdx

// `mean` = 1: mean over the first lengths[b] tokens; 0: the first token. Any launch shape.
extern "C" __global__ void kdx_pool_f32(const float* x, const uint32_t* lengths, float* out,
                                        size_t batch, size_t seq, size_t hidden, int mean) {
  kdx::pooling::pool(x, lengths, out, batch, seq, hidden, mean);
}
extern "C" __global__ void kdx_pool_bf16(const kdx::bf16* x, const uint32_t* lengths,
                                         kdx::bf16* out, size_t batch, size_t seq, size_t hidden,
                                         int mean) {
  kdx::pooling::pool(x, lengths, out, batch, seq, hidden, mean);
}

// Backward of kdx_pool_*. Any launch shape.
extern "C" __global__ void kdx_pool_backward_f32(const float* dy, const uint32_t* lengths,
                                                 float* dx, size_t batch, size_t seq,
                                                 size_t hidden, int mean) {
  kdx::pooling::pool_backward(dy, lengths, dx, batch, seq, hidden, mean);
}
extern "C" __global__ void kdx_pool_backward_bf16(const kdx::bf16* dy, const uint32_t* lengths,
                                                  kdx::bf16* dx, size_t batch, size_t seq,
                                                  size_t hidden, int mean) {
  kdx::pooling::pool_backward(dy, lengths, dx, batch, seq, hidden, mean);
}
