// Selection by rank within a block, shared by kernels/topk.cu and kernels/sampling.cu.
//
// Items are ranked by a uint32 key, descending, then by position, ascending: on equal keys the
// lower index ranks first, as the CPU's top-k and sampling order them. `find_pivot` finds the item at
// which the running weight, summed in that order, first reaches a goal: with unit weights the k-th
// item (top-k); with probability masses the token that closes a nucleus, or that a draw lands on.
// The set "ranked at or above the pivot" is then the answer, so nothing is ever sorted and no item
// list is stored: any number of items works with a fixed amount of shared memory.
//
// The search: a radix search over the key's four 8-bit digits, most significant first, fixes the
// pivot's key (a 256-bin histogram of the weight per digit), then one scan in index order over the
// items of that key fixes its position. Each item is visited once per digit and once in the scan.
// Weights are integers (counts, or fixed-point masses), so shared-memory atomics add them exactly in
// any order: results do not depend on scheduling.
//
// Every function here synchronises: all threads of the block must call it, with blockDim.x a
// multiple of 32 (at most 1024).
#pragma once

#include "common.cuh"

namespace kdx {
namespace select {

// Shared-memory atomics and shuffles take unsigned long long (uint64_t may be unsigned long).
typedef unsigned long long u64;

// Order-preserving map of floats to uint32: a > b ⇔ order_key(a) > order_key(b) for non-NaN floats,
// with −0 and +0 equal, as float comparison has them.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float whose order_key is `key`.
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Exclusive prefix sum of `v` over the block in thread order; `total` receives the block's sum.
__device__ __forceinline__ u64 block_exclusive_scan(u64 v, u64& total) {
  __shared__ u64 warp_totals[WARP_SIZE];
  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  const int warps = blockDim.x / WARP_SIZE;
  u64 inclusive = v;
#pragma unroll
  for (int offset = 1; offset < WARP_SIZE; offset *= 2) {
    const u64 other = __shfl_up_sync(FULL_MASK, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == WARP_SIZE - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    u64 t = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < WARP_SIZE; offset *= 2) {
      const u64 other = __shfl_up_sync(FULL_MASK, t, offset);
      if (lane >= offset) t += other;
    }
    warp_totals[lane] = t;  // now the inclusive sum over warps 0..lane
  }
  __syncthreads();
  total = warp_totals[warps - 1];
  const u64 before = (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - v;
  // Nobody may overwrite warp_totals in a following call before everyone has read it.
  __syncthreads();
  return before;
}

// What find_pivot reads of an item: whether it takes part, its key, its weight.
struct Item {
  bool member;
  uint32_t key;
  u64 weight;
};

struct Pivot {
  uint32_t key;
  uint32_t index;
  // The weight of the members ranked at or above the pivot.
  u64 reached;
};

// Whether the item (key, index) ranks at or above `p`.
__device__ __forceinline__ bool at_or_above(uint32_t key, uint32_t index, const Pivot& p) {
  return key > p.key || (key == p.key && index <= p.index);
}

// The pivot of items 0..n−1 that are members, ranked by key descending then index ascending: the
// first item at which the running total of weights reaches `goal`. Needs 1 ≤ goal ≤ the members'
// total weight (otherwise the pivot found has index 0 and reached 0). An item of weight 0 is never
// the pivot. `item(i)` is called for i < n only, several times per item, and must give the same
// answer every time. UNIT: every member weighs 1 (Item::weight is not read), and the lanes of a warp
// that fall in the same bin add their count with one atomic (hot bins would serialise otherwise).
template <bool UNIT, typename ItemAt>
__device__ __forceinline__ Pivot find_pivot(uint32_t n, u64 goal, ItemAt item) {
  constexpr int BINS = 256;
  __shared__ u64 hist[BINS];
  __shared__ uint32_t s_digit;
  __shared__ u64 s_higher;
  __shared__ uint32_t s_index;
  __shared__ u64 s_reached;
  const int lane = threadIdx.x % WARP_SIZE;

  // The digits fixed so far, and the weight of the members whose key is above every key with them.
  uint32_t prefix = 0;
  uint32_t fixed_mask = 0;
  u64 above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    // The loop bound is the same for the whole block, so whole warps reach __match_any_sync.
    for (uint32_t base = 0; base < n; base += blockDim.x) {
      const uint32_t i = base + threadIdx.x;
      bool hit = false;
      uint32_t digit = 0;
      u64 weight = 0;
      if (i < n) {
        const Item it = item(i);
        hit = it.member && (it.key & fixed_mask) == prefix;
        digit = (it.key >> shift) & (BINS - 1);
        weight = UNIT ? 1 : it.weight;
      }
      if (UNIT) {
        const unsigned peers = __match_any_sync(FULL_MASK, hit ? digit : (uint32_t)BINS);
        if (hit && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (u64)__popc(peers));
      } else if (hit && weight > 0) {
        atomicAdd(&hist[digit], weight);
      }
    }
    __syncthreads();
    if (threadIdx.x < WARP_SIZE) {
      // Warp 0: lane l holds bins 8l..8l+7. The pivot's digit is the highest bin b where the weight
      // of bins ≥ b reaches what the goal still needs; exactly one bin crosses it.
      const u64 need = goal - above;
      u64 bins[8];
      u64 own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bins[j] = hist[lane * 8 + j];
        own += bins[j];
      }
      u64 suffix = own;  // the bins of lanes ≥ this one
#pragma unroll
      for (int offset = 1; offset < WARP_SIZE; offset *= 2) {
        const u64 other = __shfl_down_sync(FULL_MASK, suffix, offset);
        if (lane + offset < WARP_SIZE) suffix += other;
      }
      u64 higher = suffix - own;  // the bins of higher lanes
      int found = -1;
      u64 found_higher = 0;
#pragma unroll
      for (int j = 7; j >= 0; --j) {
        if (higher < need && higher + bins[j] >= need) {
          found = lane * 8 + j;
          found_higher = higher;
        }
        higher += bins[j];
      }
      const unsigned finders = __ballot_sync(FULL_MASK, found >= 0);
      const int source = finders != 0 ? __ffs(finders) - 1 : 0;
      found = __shfl_sync(FULL_MASK, found, source);
      found_higher = __shfl_sync(FULL_MASK, found_higher, source);
      if (lane == 0) {
        s_digit = found >= 0 ? (uint32_t)found : 0;
        s_higher = found >= 0 ? found_higher : 0;
      }
    }
    __syncthreads();
    prefix |= s_digit << shift;
    fixed_mask |= (uint32_t)(BINS - 1) << shift;
    above += s_higher;
  }

  // The pivot's key is `prefix`. Among the members of that key, in index order, the pivot is the
  // one at which their running weight reaches goal − above.
  const u64 need = goal - above;
  if (threadIdx.x == 0) {
    s_index = 0;
    s_reached = 0;
  }
  u64 carry = 0;
  for (uint32_t base = 0; base < n; base += blockDim.x) {
    const uint32_t i = base + threadIdx.x;
    u64 weight = 0;
    if (i < n) {
      const Item it = item(i);
      if (it.member && it.key == prefix) weight = UNIT ? 1 : it.weight;
    }
    u64 tile;
    const u64 before = carry + block_exclusive_scan(weight, tile);
    if (weight > 0 && before < need && before + weight >= need) {
      s_index = i;
      s_reached = above + before + weight;
    }
    carry += tile;
    if (carry >= need) break;  // carry is the same in every thread: the whole block leaves
  }
  __syncthreads();
  const Pivot pivot = {prefix, s_index, s_reached};
  // The next call may overwrite the shared results: everyone reads them first.
  __syncthreads();
  return pivot;
}

}  // namespace select
}  // namespace kdx
