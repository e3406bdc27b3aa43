// Token sampling from logits [rows, vocab] (f32 or bf16): temperature, then top-k, then the top-p
// nucleus, renormalised, and a seeded draw; greedy (argmax) at temperature 0. Mirrors
// src/backend/cpu/sampling.rs, driven by src/backend/cuda/sampling.rs.
//
// One block per row, for any vocabulary. The CPU sorts the row by probability (ties to the lower
// id); here each step that needs that order finds one pivot token with find_pivot (select.cuh), and
// the set it bounds is "the tokens ranked at or above the pivot":
//   top-k:   the k-th token by count;
//   nucleus: the token at which the kept mass reaches top_p of the kept total;
//   draw:    the token at which the nucleus mass first exceeds u·(nucleus mass), u the row's uniform
//            number; it is the sampled token.
// No token list is stored, so no vocabulary or nucleus is too large for the kernel and there is no
// fallback path. Probabilities are recomputed from the logits at every pass over the row (up to 17
// passes; the row stays in L2).
//
// Masses: where the CPU adds probabilities p ≤ 1 in f64, this adds them as 64-bit fixed-point
// integers p·2^s, s = 63 − (bit length of vocab), so that no sum of a row can overflow. Those are
// exact for p ≥ 2^(23−s) (2^-21 for vocabularies below 2^19) and within 2^-(s+1) of p below, so a
// row's masses are within vocab·2^-(s+1) < 2^-26 of exact (vocab < 2^19; the total is at least 1):
// below the ulp-level differences between the CPU's exp and expf. Integer sums are the same in any
// order, so shared-memory atomics may add them and every draw is reproducible.
#include "select.cuh"

namespace kdx {
namespace sampling {

// The CPU's `uniform(seed, step, row)`, bit for bit: a number in [0, 1) with 53 random bits.
__device__ __forceinline__ double uniform(uint64_t seed, uint64_t step, uint64_t row) {
  const uint64_t bits = mix64(seed ^ mix64((step + 0x9E3779B97F4A7C15ull) ^ mix64(row + 1)));
  return (double)(bits >> 11) / 9007199254740992.0;  // 2^53
}

// The index of the largest logit, the first one on ties (the CPU's `argmax`; 0 if no logit is
// above −∞). All threads of the block get it.
template <typename T>
__device__ __forceinline__ uint32_t argmax(const T* __restrict__ z, uint32_t vocab) {
  __shared__ float s_value[WARP_SIZE];
  __shared__ uint32_t s_index[WARP_SIZE];
  float best = -INFINITY;
  uint32_t index = vocab;  // none yet
  for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = to_f32(z[i]);
    if (v > best) {
      best = v;
      index = i;
    }
  }
  // (value, index) pairs combine by the larger value, then the lower index: the same winner in
  // any order.
  auto combine = [&](float other_value, uint32_t other_index) {
    if (other_value > best || (other_value == best && other_index < index)) {
      best = other_value;
      index = other_index;
    }
  };
#pragma unroll
  for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
    combine(__shfl_xor_sync(FULL_MASK, best, offset), __shfl_xor_sync(FULL_MASK, index, offset));
  }
  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  if (lane == 0) {
    s_value[warp] = best;
    s_index[warp] = index;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / WARP_SIZE;
    best = lane < warps ? s_value[lane] : -INFINITY;
    index = lane < warps ? s_index[lane] : vocab;
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
      combine(__shfl_xor_sync(FULL_MASK, best, offset), __shfl_xor_sync(FULL_MASK, index, offset));
    }
    if (lane == 0) s_index[0] = index < vocab ? index : 0;
  }
  __syncthreads();
  return s_index[0];
}

template <typename T>
__device__ __forceinline__ void sample(const T* __restrict__ logits, uint32_t* __restrict__ tokens,
                                       uint32_t vocab, float temperature, uint32_t top_k,
                                       float top_p, uint64_t seed, uint64_t step) {
  using select::Item;
  using select::Pivot;
  using select::u64;
  const size_t row = blockIdx.x;
  const T* z = logits + row * vocab;
  if (temperature == 0.0f) {
    const uint32_t token = argmax(z, vocab);
    if (threadIdx.x == 0) tokens[row] = token;
    return;
  }

  // The scaled logits as the CPU rounds them: a product, then the max subtracted (__fmul_rn keeps
  // the product from fusing into the subtraction).
  const float inv_t = 1.0f / temperature;
  float m = -INFINITY;
  for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    m = fmaxf(m, __fmul_rn(to_f32(z[i]), inv_t));
  }
  m = block_max(m);
  auto prob = [&](uint32_t i) { return expf(__fmul_rn(to_f32(z[i]), inv_t) - m); };
  const double scale = ldexp(1.0, __clzll((long long)vocab) - 1);  // 2^s, see the top
  auto mass = [&](float p) -> u64 { return p > 0.0f ? __double2ull_rn((double)p * scale) : 0; };

  // Top-k: the tokens ranked at or above the k-th (this pivot ranks every token at or above it).
  Pivot kept = {0u, vocab - 1, 0};
  if (top_k > 0 && top_k < vocab) {
    kept = select::find_pivot<true>(vocab, top_k, [&](uint32_t i) {
      return Item{true, select::order_key(prob(i)), 1};
    });
  }
  u64 local = 0;
  for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float p = prob(i);
    if (select::at_or_above(select::order_key(p), i, kept)) local += mass(p);
  }
  const u64 kept_mass = block_sum(local);

  // The nucleus: the kept tokens up to the one where their mass reaches top_p of the kept mass
  // (the CPU's `mass >= top_p · kept_mass`, in integers: mass ≥ ⌈top_p · kept_mass⌉). The kept
  // tokens are the top of the order, so the nucleus is every token at or above its pivot.
  Pivot nucleus = {kept.key, kept.index, kept_mass};
  if (top_p < 1.0f) {
    const u64 goal = min(max((u64)ceil((double)top_p * (double)kept_mass), (u64)1), kept_mass);
    nucleus = select::find_pivot<false>(vocab, goal, [&](uint32_t i) {
      const float p = prob(i);
      const uint32_t key = select::order_key(p);
      return Item{select::at_or_above(key, i, kept), key, mass(p)};
    });
  }

  // The draw: the first nucleus token whose running mass exceeds u·(nucleus mass), i.e. reaches
  // ⌊u·mass⌋ + 1 in integers (at most the nucleus mass, which rounding of u·mass could pass).
  const double u = uniform(seed, step, row);
  const u64 goal = min((u64)(u * (double)nucleus.reached) + 1, nucleus.reached);
  const Pivot drawn = select::find_pivot<false>(vocab, goal, [&](uint32_t i) {
    const float p = prob(i);
    const uint32_t key = select::order_key(p);
    return Item{select::at_or_above(key, i, nucleus), key, mass(p)};
  });
  // A row without a finite probability (NaN or infinite logits) finds no pivot and draws token 0.
  if (threadIdx.x == 0) tokens[row] = drawn.index;
}

}  // namespace sampling
}  // namespace kdx

// One token per row of logits [rows, vocab] into tokens [rows] (see `Backend::sample`): temperature
// 0 is greedy; top_k 0 keeps every token, top_p 1 the whole kept set. vocab < 2^31. One block per
// row, up to 1024 threads.
extern "C" __global__ void __launch_bounds__(1024, 1)
    kdx_sample_f32(const float* logits, uint32_t* tokens, uint32_t vocab, float temperature,
                   uint32_t top_k, float top_p, uint64_t seed, uint64_t step) {
  kdx::sampling::sample(logits, tokens, vocab, temperature, top_k, top_p, seed, step);
}
extern "C" __global__ void __launch_bounds__(1024, 1)
    kdx_sample_bf16(const kdx::bf16* logits, uint32_t* tokens, uint32_t vocab, float temperature,
                    uint32_t top_k, float top_p, uint64_t seed, uint64_t step) {
  kdx::sampling::sample(logits, tokens, vocab, temperature, top_k, top_p, seed, step);
}
