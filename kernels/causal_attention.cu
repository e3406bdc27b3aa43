// Causal grouped-query attention of the decoders with an optional deep-prompt prefix and a
// per-sequence query offset, forward and backward, for f32 and bf16 activations. Mirrors
// src/backend/cpu/causal_attention.rs on the tiled kernels of attention.cuh.
#include "attention.cuh"

namespace kdx {
namespace causal_attention {

using attention::Layout;

// Query row i of sequence b sits at position q_start[b] + i: it sees every prefix column and the
// keys at positions 0..=q_start[b] + i. No dropout.
struct Causal {
  const uint32_t* q_start;

  __device__ size_t visible(const Layout& L, size_t b, size_t i) const {
    return L.prefix + q_start[b] + i + 1;
  }
  __device__ size_t first_row(const Layout& L, size_t b, size_t j) const {
    const size_t seen_by_row_0 = L.prefix + q_start[b];
    return j > seen_by_row_0 ? j - seen_by_row_0 : 0;
  }
  __device__ float factor(size_t) const { return 1.0f; }
};

// dprefix_k and dprefix_v [prefix, kv_heads · head_dim]: the per-sequence blocks of partial
// [batch, kv_heads, 2, prefix, head_dim] that key_value_grads wrote, summed over sequences in
// order (the CPU's order).
template <typename T>
__device__ __forceinline__ void sum_prefix_grads(const float* __restrict__ partial,
                                                 T* __restrict__ dprefix_k,
                                                 T* __restrict__ dprefix_v, size_t batch,
                                                 size_t kv_heads, size_t prefix, size_t head_dim) {
  const size_t n = prefix * kv_heads * head_dim;
  grid_stride(2 * n, [&](size_t e) {
    const size_t which = e / n;  // 0: keys, 1: values
    const size_t x = e % n;
    const size_t j = x / (kv_heads * head_dim);
    const size_t g = x / head_dim % kv_heads;
    const size_t c = x % head_dim;
    float acc = 0.0f;
    for (size_t b = 0; b < batch; ++b) {
      acc += partial[(((b * kv_heads + g) * 2 + which) * prefix + j) * head_dim + c];
    }
    (which == 0 ? dprefix_k : dprefix_v)[x] = from_f32<T>(acc);
  });
}

}  // namespace causal_attention
}  // namespace kdx

// q, out, dout, dq [batch * q_len, heads * head_dim]; k, v, dk, dv [batch * kv_len,
// kv_heads * head_dim]; prefix_k, prefix_v [prefix, kv_heads * head_dim] (null when prefix = 0);
// probs [batch, heads, q_len, prefix + kv_len]; q_start [batch] with q_start[b] + q_len ≤ kv_len;
// row_dot [batch, heads, q_len] f32, written by the query gradient for the key/value gradients
// (launch that one first); dprefix_partial [batch, kv_heads, 2, prefix, head_dim] f32 (null when
// prefix = 0), summed by kdx_causal_attention_prefix_grads_*. scale = 1/√head_dim. Blocks of
// kdx::attention::THREADS threads with shared_floats(head_dim) floats of dynamic shared memory,
// head_dim ≤ 128; grid (batch · heads, ⌈q_len / TILE⌉) for the forward and dq, (batch · kv_heads,
// ⌈(prefix + kv_len) / TILE⌉) for dk, dv. The prefix sum takes any launch shape.
#define KDX_CAUSAL_ATTENTION(T, DTYPE)                                                            \
  extern "C" __global__ void __launch_bounds__(kdx::attention::THREADS)                           \
      kdx_causal_attention_forward_##DTYPE(                                                       \
          const T* q, const T* k, const T* v, const T* prefix_k, const T* prefix_v,               \
          const uint32_t* q_start, T* out, T* probs, size_t q_len, size_t kv_len, size_t heads,   \
          size_t kv_heads, size_t head_dim, size_t prefix, float scale) {                         \
    using namespace kdx::attention;                                                               \
    forward<T>(q, k, v, prefix_k, prefix_v, out, probs,                                           \
               Layout{heads, kv_heads, head_dim, q_len, kv_len, prefix},                          \
               kdx::causal_attention::Causal{q_start}, scale);                                    \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kdx::attention::THREADS)                           \
      kdx_causal_attention_backward_dq_##DTYPE(                                                   \
          const T* dout, const T* k, const T* v, const T* prefix_k, const T* prefix_v,            \
          const T* probs, const uint32_t* q_start, T* dq, float* row_dot, size_t q_len,           \
          size_t kv_len, size_t heads, size_t kv_heads, size_t head_dim, size_t prefix,           \
          float scale) {                                                                          \
    using namespace kdx::attention;                                                               \
    query_grad<T>(dout, k, v, prefix_k, prefix_v, probs, dq, row_dot,                             \
                  Layout{heads, kv_heads, head_dim, q_len, kv_len, prefix},                       \
                  kdx::causal_attention::Causal{q_start}, scale);                                 \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kdx::attention::THREADS)                           \
      kdx_causal_attention_backward_dkv_##DTYPE(                                                  \
          const T* dout, const T* q, const T* v, const T* prefix_v, const T* probs,               \
          const float* row_dot, const uint32_t* q_start, T* dk, T* dv, float* dprefix_partial,    \
          size_t q_len, size_t kv_len, size_t heads, size_t kv_heads, size_t head_dim,            \
          size_t prefix, float scale) {                                                           \
    using namespace kdx::attention;                                                               \
    key_value_grads<T>(dout, q, v, prefix_v, probs, row_dot, dk, dv, dprefix_partial,             \
                       Layout{heads, kv_heads, head_dim, q_len, kv_len, prefix},                  \
                       kdx::causal_attention::Causal{q_start}, scale);                            \
  }                                                                                               \
  extern "C" __global__ void kdx_causal_attention_prefix_grads_##DTYPE(                           \
      const float* partial, T* dprefix_k, T* dprefix_v, size_t batch, size_t kv_heads,            \
      size_t prefix, size_t head_dim) {                                                           \
    kdx::causal_attention::sum_prefix_grads(partial, dprefix_k, dprefix_v, batch, kv_heads,       \
                                            prefix, head_dim);                                    \
  }
KDX_CAUSAL_ATTENTION(float, f32)
KDX_CAUSAL_ATTENTION(kdx::bf16, bf16)
#undef KDX_CAUSAL_ATTENTION
