// Multi-head attention of the encoder with a key-padding mask and inverted dropout on the
// probabilities, forward and backward, for f32 and bf16 activations. Mirrors
// src/backend/cpu/attention.rs on the tiled kernels of attention.cuh.
#include "attention.cuh"

namespace kdx {
namespace attention {

// Every query row of sequence b, padded ones included (as on the CPU), sees the sequence's first
// lengths[b] keys. Probability (b, h, i, j) is dropped out by element (b·heads + h)·seq² + i·seq + j
// of the stream: its flat index.
struct KeyPadding {
  const uint32_t* lengths;
  uint64_t seed;
  uint64_t threshold;
  float keep_scale;

  __device__ size_t visible(const Layout&, size_t b, size_t) const { return lengths[b]; }
  __device__ size_t first_row(const Layout& L, size_t b, size_t j) const {
    return j < lengths[b] ? 0 : L.q_len;
  }
  __device__ float factor(size_t index) const {
    return dropout_factor(seed, index, threshold, keep_scale);
  }
};

// Queries, keys and values all [batch * seq, heads * head_dim]; no prefix.
__device__ __forceinline__ Layout encoder(size_t seq, size_t heads, size_t head_dim) {
  return Layout{heads, heads, head_dim, seq, seq, 0};
}

}  // namespace attention
}  // namespace kdx

// q, k, v, out and dout, dq, dk, dv [batch * seq, heads * head_dim]; probs [batch, heads, seq, seq]
// (before dropout); lengths [batch], each in 1..=seq; row_dot [batch, heads, seq] f32, written by
// the query gradient for the key/value gradients (launch that one first). scale = 1/√head_dim;
// dropout as dropout_factor (common.cuh) takes it. Blocks of kdx::attention::THREADS threads with
// shared_floats(head_dim) floats of dynamic shared memory, head_dim ≤ 128; grid
// (batch · heads, ⌈seq / TILE⌉): tiles of query rows (forward, dq) or of keys (dk, dv).
#define KDX_ATTENTION(T, DTYPE)                                                                   \
  extern "C" __global__ void __launch_bounds__(kdx::attention::THREADS)                           \
      kdx_attention_forward_##DTYPE(const T* q, const T* k, const T* v, const uint32_t* lengths, \
                                    T* out, T* probs, size_t seq, size_t heads, size_t head_dim,  \
                                    float scale, uint64_t seed, uint64_t threshold,               \
                                    float keep_scale) {                                           \
    using namespace kdx::attention;                                                               \
    forward<T>(q, k, v, nullptr, nullptr, out, probs, encoder(seq, heads, head_dim),              \
               KeyPadding{lengths, seed, threshold, keep_scale}, scale);                          \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kdx::attention::THREADS)                           \
      kdx_attention_backward_dq_##DTYPE(const T* dout, const T* k, const T* v, const T* probs,    \
                                        const uint32_t* lengths, T* dq, float* row_dot,           \
                                        size_t seq, size_t heads, size_t head_dim, float scale,   \
                                        uint64_t seed, uint64_t threshold, float keep_scale) {    \
    using namespace kdx::attention;                                                               \
    query_grad<T>(dout, k, v, nullptr, nullptr, probs, dq, row_dot,                               \
                  encoder(seq, heads, head_dim), KeyPadding{lengths, seed, threshold, keep_scale}, \
                  scale);                                                                         \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kdx::attention::THREADS)                           \
      kdx_attention_backward_dkv_##DTYPE(const T* dout, const T* q, const T* v, const T* probs,   \
                                         const float* row_dot, const uint32_t* lengths, T* dk,    \
                                         T* dv, size_t seq, size_t heads, size_t head_dim,        \
                                         float scale, uint64_t seed, uint64_t threshold,          \
                                         float keep_scale) {                                      \
    using namespace kdx::attention;                                                               \
    key_value_grads<T>(dout, q, v, nullptr, probs, row_dot, dk, dv, nullptr,                      \
                       encoder(seq, heads, head_dim),                                             \
                       KeyPadding{lengths, seed, threshold, keep_scale}, scale);                  \
  }
KDX_ATTENTION(float, f32)
KDX_ATTENTION(kdx::bf16, bf16)
#undef KDX_ATTENTION
