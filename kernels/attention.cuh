// Tiled scaled-dot-product attention shared by the encoder's kernels (attention.cu: key padding,
// dropout) and the decoders' (causal_attention.cu: causal mask, grouped-query heads, a prefix):
// the forward, and the backward's query and key/value gradients, for any sequence length and
// head_dim up to 128, in f32 whatever the storage type. No atomics: every output element has one
// owner that adds its terms in a fixed order, so results are reproducible run to run.
//
// The probabilities of one (sequence b, query head h) form a [q_len, row] matrix, row = prefix +
// kv_len: column j < prefix is prefix key/value j (shared by the batch), column prefix + t is key t
// of the sequence. A Mask (a struct of the calling file) says what each row sees and how dropout
// scales it:
//   size_t visible(const Layout&, size_t b, size_t i)   row i sees columns [0, visible): at
//       least 1, non-decreasing in i;
//   size_t first_row(const Layout&, size_t b, size_t j) the first row that sees column j (q_len or
//       more when none does);
//   float factor(size_t index)                           the dropout multiplier of probability
//       `index`, its flat index in the [batch, heads, q_len, row] probabilities.
//
// Every kernel runs blocks of THREADS threads (4 warps); a block owns TILE rows of one head of one
// sequence (query rows in the forward and the query gradient, key columns in the key/value
// gradients), each warp PER_WARP of them, and streams the other side through shared memory CHUNK
// rows at a time, one row per lane for dot products. Products over a chunk reuse each
// shared-memory value PER_WARP times from registers.
#pragma once

#include "common.cuh"

namespace kdx {
namespace attention {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * WARP_SIZE;
constexpr int PER_WARP = 4;
constexpr int TILE = WARPS * PER_WARP;
constexpr int CHUNK = WARP_SIZE;
constexpr int MAX_HEAD_DIM = 128;
// A lane owns columns lane, lane + 32, ... of a head_dim-wide accumulator row.
constexpr int COLS_PER_LANE = MAX_HEAD_DIM / WARP_SIZE;

// Row stride of head_dim-wide rows in shared memory: odd, so 32 lanes reading one row each at the
// same column hit 32 distinct banks.
__host__ __device__ constexpr size_t row_stride(size_t d) { return d | 1; }

// Floats of dynamic shared memory every kernel here takes (carved by Shared below);
// src/backend/cuda/launch.rs's `attention` sizes launches by the same formula, and each kernel
// checks that it got at least this much.
__host__ __device__ constexpr size_t shared_floats(size_t d) {
  return (TILE + 2 * CHUNK) * row_stride(d) + CHUNK * (TILE + 1) + 2 * TILE * CHUNK + CHUNK;
}

struct Shared {
  float* tile;     // TILE rows of head_dim: the block's own rows (Q, dO, or V at its keys)
  float* chunk_a;  // CHUNK rows of head_dim streamed through
  float* chunk_b;  // CHUNK rows of head_dim streamed through
  float* probs;    // CHUNK query rows × the block's TILE keys (stride TILE + 1, odd)
  float* stage_a;  // TILE × CHUNK: per warp, its rows' weights of one chunk
  float* stage_b;  // TILE × CHUNK
  float* row_dot;  // CHUNK values, one per query row of a chunk

  __device__ explicit Shared(size_t d) {
    extern __shared__ float attention_shared[];
    const size_t stride = row_stride(d);
    tile = attention_shared;
    chunk_a = tile + TILE * stride;
    chunk_b = chunk_a + CHUNK * stride;
    probs = chunk_b + CHUNK * stride;
    stage_a = probs + CHUNK * (TILE + 1);
    stage_b = stage_a + TILE * CHUNK;
    row_dot = stage_b + TILE * CHUNK;
  }
};

// A launch that does not match the kernels' assumptions would read or write out of bounds: stop
// it with an error instead.
__device__ __forceinline__ void check_launch(size_t d) {
  unsigned shared_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(shared_bytes));
  if (d > MAX_HEAD_DIM || blockDim.x != THREADS || shared_bytes < shared_floats(d) * sizeof(float)) {
    __trap();
  }
}

// Sizes and addressing of one call. Queries (and the context, dO, dQ) are [batch * q_len,
// heads * head_dim]; keys and values [batch * kv_len, kv_heads * head_dim]; the prefix keys and
// values [prefix, kv_heads * head_dim]; query head h reads key/value head h / (heads / kv_heads).
struct Layout {
  size_t heads, kv_heads, head_dim, q_len, kv_len, prefix;

  __device__ size_t row() const { return prefix + kv_len; }
  __device__ size_t group(size_t h) const { return h / (heads / kv_heads); }
  // Query row i of sequence b at head h.
  __device__ size_t q_at(size_t b, size_t h, size_t i) const {
    return ((b * q_len + i) * heads + h) * head_dim;
  }
  // Probability row i of (b, h) in [batch, heads, q_len, row]; also its dropout stream's index.
  __device__ size_t p_at(size_t b, size_t h, size_t i) const {
    return ((b * heads + h) * q_len + i) * row();
  }
  // Per-row values of (b, h) in [batch, heads, q_len].
  __device__ size_t stat_at(size_t b, size_t h, size_t i) const {
    return (b * heads + h) * q_len + i;
  }
  // Key/value row t of sequence b at head g.
  __device__ size_t kv_at(size_t b, size_t g, size_t t) const {
    return ((b * kv_len + t) * kv_heads + g) * head_dim;
  }
  // The key (or value) row of column j of sequence b at head g: the prefix's first.
  template <typename T>
  __device__ const T* column(const T* seq, const T* prefix_rows, size_t b, size_t g,
                             size_t j) const {
    return j < prefix ? prefix_rows + (j * kv_heads + g) * head_dim : seq + kv_at(b, g, j - prefix);
  }
};

// Copies `count` rows of d values into shared memory (row_stride(d) apart), widened to f32: row r
// from src(r), zeros where src(r) is null. The whole block calls it.
template <typename T, typename Src>
__device__ __forceinline__ void load_rows(float* dst, size_t d, size_t count, Src src) {
  const size_t stride = row_stride(d);
  for (size_t e = threadIdx.x; e < count * d; e += blockDim.x) {
    const size_t r = e / d;
    const size_t c = e % d;
    const T* row = src(r);
    dst[r * stride + c] = row ? to_f32(row[c]) : 0.0f;
  }
}

// out[t] = rows[t] · mine over d columns, for the warp's PER_WARP rows `rows` (every lane reads
// the same address: a broadcast) and the lane's own row `mine` (one row per lane).
__device__ __forceinline__ void warp_dots(const float* rows, const float* mine, size_t d,
                                          float (&out)[PER_WARP]) {
  const size_t stride = row_stride(d);
#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) out[t] = 0.0f;
  for (size_t c = 0; c < d; ++c) {
    const float x = mine[c];
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) out[t] += rows[t * stride + c] * x;
  }
}

// acc[t] += Σ_{r < count} weights[t·CHUNK + r] · rows[r], r in order, for the warp's PER_WARP
// weight rows; each lane adds its own columns (lane + 32u) of the d-wide rows.
__device__ __forceinline__ void warp_accumulate(const float* weights, const float* rows,
                                                size_t count, size_t d,
                                                float (&acc)[PER_WARP][COLS_PER_LANE]) {
  const size_t stride = row_stride(d);
  const size_t lane = threadIdx.x % WARP_SIZE;
  for (size_t r = 0; r < count; ++r) {
#pragma unroll
    for (int u = 0; u < COLS_PER_LANE; ++u) {
      const size_t c = lane + (size_t)u * WARP_SIZE;
      if (c < d) {
        const float x = rows[r * stride + c];
#pragma unroll
        for (int t = 0; t < PER_WARP; ++t) acc[t][u] += weights[t * CHUNK + r] * x;
      }
    }
  }
}

// dst[c] = acc's value of column c, for the lane's columns of a d-wide row.
template <typename T>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[COLS_PER_LANE], size_t d) {
  const size_t lane = threadIdx.x % WARP_SIZE;
#pragma unroll
  for (int u = 0; u < COLS_PER_LANE; ++u) {
    const size_t c = lane + (size_t)u * WARP_SIZE;
    if (c < d) dst[c] = from_f32<T>(acc[u]);
  }
}

// The query rows a block owns in the forward and the query gradient: block (b·heads + h, y) owns
// rows y·TILE + [0, TILE) of (b, h), warp w rows w·PER_WARP + [0, PER_WARP) of those. Rows past
// the sequence's last repeat it (computed, never written), so every row's arithmetic is that of a
// real one. `cols`: the columns any row of the tile sees, those of its last row.
struct QueryTile {
  size_t b, h, g, first, last, cols;
  bool idle;  // none of the warp's rows is real
  size_t i[PER_WARP];
  bool real[PER_WARP];
  size_t visible[PER_WARP];
  size_t p_at[PER_WARP];

  template <typename Mask>
  __device__ QueryTile(const Layout& L, const Mask& mask) {
    b = blockIdx.x / L.heads;
    h = blockIdx.x % L.heads;
    g = L.group(h);
    first = (size_t)blockIdx.y * TILE;
    last = min(first + TILE, L.q_len) - 1;
    cols = mask.visible(L, b, last);
    const size_t mine = first + (threadIdx.x / WARP_SIZE) * PER_WARP;
    idle = mine >= L.q_len;
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
      real[t] = mine + t < L.q_len;
      i[t] = min(mine + t, last);
      visible[t] = mask.visible(L, b, i[t]);
      p_at[t] = L.p_at(b, h, i[t]);
    }
  }
};

// Context and probabilities. Per row: pass 1 streams the keys for the softmax's max m and sum l
// (online: l is rescaled when m grows); pass 2 recomputes each score s, writes
// p = exp(s − m) · (1/l), and adds the dropped-out p · V into the context.
template <typename T, typename Mask>
__device__ __forceinline__ void forward(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, const T* __restrict__ pk,
                                        const T* __restrict__ pv, T* __restrict__ out,
                                        T* __restrict__ probs, const Layout L, const Mask mask,
                                        float scale) {
  const size_t d = L.head_dim;
  check_launch(d);
  const Shared sh(d);
  const QueryTile tile(L, mask);
  const size_t stride = row_stride(d);
  const int warp = threadIdx.x / WARP_SIZE;
  const size_t lane = threadIdx.x % WARP_SIZE;
  const float* my_rows = sh.tile + warp * PER_WARP * stride;
  load_rows<T>(sh.tile, d, TILE,
               [&](size_t r) { return q + L.q_at(tile.b, tile.h, min(tile.first + r, tile.last)); });
  auto column = [&](const T* seq, const T* prefix_rows, size_t j) -> const T* {
    return j < tile.cols ? L.column(seq, prefix_rows, tile.b, tile.g, j) : nullptr;
  };

  float m[PER_WARP], l[PER_WARP];
#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) {
    m[t] = -INFINITY;
    l[t] = 0.0f;
  }
  for (size_t j0 = 0; j0 < tile.cols; j0 += CHUNK) {
    __syncthreads();  // the tile is loaded; the previous chunk is no longer read
    load_rows<T>(sh.chunk_a, d, CHUNK, [&](size_t r) { return column(k, pk, j0 + r); });
    __syncthreads();
    if (tile.idle) continue;
    float s[PER_WARP];
    warp_dots(my_rows, sh.chunk_a + lane * stride, d, s);
    const size_t j = j0 + lane;
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
      const float x = j < tile.visible[t] ? s[t] * scale : -INFINITY;
      // Column 0 is visible to every row, so m is finite from the first chunk on.
      const float m_new = fmaxf(m[t], warp_max(x));
      l[t] = l[t] * expf(m[t] - m_new) + warp_sum(expf(x - m_new));
      m[t] = m_new;
    }
  }

  float inv[PER_WARP];
  float acc[PER_WARP][COLS_PER_LANE] = {};
#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) inv[t] = 1.0f / l[t];
  float* weights = sh.stage_a + warp * PER_WARP * CHUNK;
  for (size_t j0 = 0; j0 < tile.cols; j0 += CHUNK) {
    __syncthreads();
    load_rows<T>(sh.chunk_a, d, CHUNK, [&](size_t r) { return column(k, pk, j0 + r); });
    load_rows<T>(sh.chunk_b, d, CHUNK, [&](size_t r) { return column(v, pv, j0 + r); });
    __syncthreads();
    if (tile.idle) continue;
    float s[PER_WARP];
    warp_dots(my_rows, sh.chunk_a + lane * stride, d, s);
    const size_t j = j0 + lane;
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
      const float p = j < tile.visible[t] ? expf(s[t] * scale - m[t]) * inv[t] : 0.0f;
      if (tile.real[t] && j < tile.cols) probs[tile.p_at[t] + j] = from_f32<T>(p);
      weights[t * CHUNK + lane] = p * mask.factor(tile.p_at[t] + j);
    }
    __syncwarp();
    warp_accumulate(weights, sh.chunk_b, min((size_t)CHUNK, tile.cols - j0), d, acc);
  }

  if (tile.idle) return;
#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) {
    if (!tile.real[t]) continue;
    // Columns no row of the tile sees.
    for (size_t j = tile.cols + lane; j < L.row(); j += WARP_SIZE) {
      probs[tile.p_at[t] + j] = from_f32<T>(0.0f);
    }
    store_row(out + L.q_at(tile.b, tile.h, tile.i[t]), acc[t], d);
  }
}

// dQ = dS·K with dS = P ⊙ (dP' − Σ_j P·dP')·scale and dP' = factor ⊙ (dO·Vᵀ), as the CPU computes
// it. Pass 1 streams the values for each row's Σ_j P·dP', which it also writes to
// row_dot[batch, heads, q_len] for the key/value gradients; pass 2 recomputes dP' for dS and adds
// dS·K.
template <typename T, typename Mask>
__device__ __forceinline__ void query_grad(const T* __restrict__ dout, const T* __restrict__ k,
                                           const T* __restrict__ v, const T* __restrict__ pk,
                                           const T* __restrict__ pv, const T* __restrict__ probs,
                                           T* __restrict__ dq, float* __restrict__ row_dot,
                                           const Layout L, const Mask mask, float scale) {
  const size_t d = L.head_dim;
  check_launch(d);
  const Shared sh(d);
  const QueryTile tile(L, mask);
  const size_t stride = row_stride(d);
  const int warp = threadIdx.x / WARP_SIZE;
  const size_t lane = threadIdx.x % WARP_SIZE;
  const float* my_rows = sh.tile + warp * PER_WARP * stride;
  load_rows<T>(sh.tile, d, TILE, [&](size_t r) {
    return dout + L.q_at(tile.b, tile.h, min(tile.first + r, tile.last));
  });
  auto column = [&](const T* seq, const T* prefix_rows, size_t j) -> const T* {
    return j < tile.cols ? L.column(seq, prefix_rows, tile.b, tile.g, j) : nullptr;
  };

  float partial[PER_WARP] = {};
  for (size_t j0 = 0; j0 < tile.cols; j0 += CHUNK) {
    __syncthreads();
    load_rows<T>(sh.chunk_b, d, CHUNK, [&](size_t r) { return column(v, pv, j0 + r); });
    __syncthreads();
    if (tile.idle) continue;
    float dp[PER_WARP];
    warp_dots(my_rows, sh.chunk_b + lane * stride, d, dp);
    const size_t j = j0 + lane;
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
      const size_t at = tile.p_at[t] + j;
      const float p = j < tile.visible[t] ? to_f32(probs[at]) : 0.0f;
      partial[t] += dp[t] * mask.factor(at) * p;
    }
  }
  float c[PER_WARP];
#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) {
    c[t] = warp_sum(partial[t]);
    if (tile.real[t] && lane == 0) row_dot[L.stat_at(tile.b, tile.h, tile.i[t])] = c[t];
  }

  float acc[PER_WARP][COLS_PER_LANE] = {};
  float* ds = sh.stage_a + warp * PER_WARP * CHUNK;
  for (size_t j0 = 0; j0 < tile.cols; j0 += CHUNK) {
    __syncthreads();
    load_rows<T>(sh.chunk_a, d, CHUNK, [&](size_t r) { return column(k, pk, j0 + r); });
    load_rows<T>(sh.chunk_b, d, CHUNK, [&](size_t r) { return column(v, pv, j0 + r); });
    __syncthreads();
    if (tile.idle) continue;
    float dp[PER_WARP];
    warp_dots(my_rows, sh.chunk_b + lane * stride, d, dp);
    const size_t j = j0 + lane;
#pragma unroll
    for (int t = 0; t < PER_WARP; ++t) {
      const size_t at = tile.p_at[t] + j;
      const float p = j < tile.visible[t] ? to_f32(probs[at]) : 0.0f;
      ds[t * CHUNK + lane] = p * (dp[t] * mask.factor(at) - c[t]) * scale;
    }
    __syncwarp();
    warp_accumulate(ds, sh.chunk_a, min((size_t)CHUNK, tile.cols - j0), d, acc);
  }

  if (tile.idle) return;
#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) {
    if (tile.real[t]) store_row(dq + L.q_at(tile.b, tile.h, tile.i[t]), acc[t], d);
  }
}

// dK = dSᵀ·Q and dV = P'ᵀ·dO (P' = factor ⊙ P) at the block's TILE key columns of (sequence b,
// key/value head g), block (b·kv_heads + g, y) owning columns y·TILE + [0, TILE) and warp w
// columns w·PER_WARP + [0, PER_WARP) of those. The query heads of g's group, in order, and within
// each the chunks of query rows that see any of the columns, in order, add into registers: no
// other block writes these columns. row_dot is query_grad's Σ_j P·dP' per row. Columns of the
// sequence go to dk/dv (zero where no row sees them); prefix columns, shared by the batch, go to
// this sequence's block of dprefix [batch, kv_heads, 2 (keys, values), prefix, head_dim] (f32),
// which the caller then sums over sequences.
template <typename T, typename Mask>
__device__ __forceinline__ void key_value_grads(
    const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ v,
    const T* __restrict__ pv, const T* __restrict__ probs, const float* __restrict__ row_dot,
    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dprefix, const Layout L,
    const Mask mask, float scale) {
  const size_t d = L.head_dim;
  check_launch(d);
  const Shared sh(d);
  const size_t stride = row_stride(d);
  const size_t b = blockIdx.x / L.kv_heads;
  const size_t g = blockIdx.x % L.kv_heads;
  const size_t first_col = (size_t)blockIdx.y * TILE;
  const size_t row = L.row();
  const int warp = threadIdx.x / WARP_SIZE;
  const size_t lane = threadIdx.x % WARP_SIZE;
  const float* my_values = sh.tile + warp * PER_WARP * stride;
  load_rows<T>(sh.tile, d, TILE, [&](size_t r) -> const T* {
    const size_t j = first_col + r;
    return j < row ? L.column(v, pv, b, g, j) : nullptr;
  });
  // Rows see columns from the left, so those before this one see none of the tile.
  const size_t first_row = min(mask.first_row(L, b, first_col), L.q_len);

  float acc_k[PER_WARP][COLS_PER_LANE] = {};
  float acc_v[PER_WARP][COLS_PER_LANE] = {};
  float* ds = sh.stage_a + warp * PER_WARP * CHUNK;
  float* weights = sh.stage_b + warp * PER_WARP * CHUNK;
  const size_t per_group = L.heads / L.kv_heads;
  for (size_t h = g * per_group; h < (g + 1) * per_group; ++h) {
    for (size_t i0 = first_row; i0 < L.q_len; i0 += CHUNK) {
      const size_t n = min((size_t)CHUNK, L.q_len - i0);
      __syncthreads();  // the tile is loaded; the previous chunk is no longer read
      load_rows<T>(sh.chunk_a, d, CHUNK,
                   [&](size_t r) { return r < n ? q + L.q_at(b, h, i0 + r) : nullptr; });
      load_rows<T>(sh.chunk_b, d, CHUNK,
                   [&](size_t r) { return r < n ? dout + L.q_at(b, h, i0 + r) : nullptr; });
      // The chunk's probabilities at the tile's columns, coalesced along the columns; zero where
      // masked (never read there, as on the CPU).
      for (size_t e = threadIdx.x; e < CHUNK * TILE; e += blockDim.x) {
        const size_t r = e / TILE;
        const size_t j = first_col + e % TILE;
        const bool seen = r < n && j < mask.visible(L, b, i0 + r);
        sh.probs[r * (TILE + 1) + e % TILE] = seen ? to_f32(probs[L.p_at(b, h, i0 + r) + j]) : 0.0f;
      }
      if (threadIdx.x < CHUNK) {
        sh.row_dot[threadIdx.x] =
            threadIdx.x < n ? row_dot[L.stat_at(b, h, i0 + threadIdx.x)] : 0.0f;
      }
      __syncthreads();
      // Lane r: query row i0 + r; dp[t] = dO_row · V at the warp's column t.
      float dp[PER_WARP];
      warp_dots(my_values, sh.chunk_b + lane * stride, d, dp);
#pragma unroll
      for (int t = 0; t < PER_WARP; ++t) {
        const size_t col = warp * PER_WARP + t;
        // p = 0 (so both terms are 0) where the column is masked or the row past the sequence.
        const float p = sh.probs[lane * (TILE + 1) + col];
        const float f = mask.factor(L.p_at(b, h, i0 + lane) + first_col + col);
        ds[t * CHUNK + lane] = p * (dp[t] * f - sh.row_dot[lane]) * scale;
        weights[t * CHUNK + lane] = p * f;
      }
      __syncwarp();
      warp_accumulate(ds, sh.chunk_a, n, d, acc_k);
      warp_accumulate(weights, sh.chunk_b, n, d, acc_v);
    }
  }

#pragma unroll
  for (int t = 0; t < PER_WARP; ++t) {
    const size_t j = first_col + warp * PER_WARP + t;
    if (j >= row) continue;
    if (j < L.prefix) {
      float* mine = dprefix + ((b * L.kv_heads + g) * 2 * L.prefix + j) * d;
      store_row(mine, acc_k[t], d);
      store_row(mine + L.prefix * d, acc_v[t], d);
    } else {
      const size_t at = L.kv_at(b, g, j - L.prefix);
      store_row(dk + at, acc_k[t], d);
      store_row(dv + at, acc_v[t], d);
    }
  }
}

}  // namespace attention
}  // namespace kdx
