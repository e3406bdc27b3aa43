// Matrix products C (+)= op(A)·op(B) (+ bias), batched, for f32 and bf16: the engine's matmul,
// linear and linear backward. Mirrors src/backend/cpu/gemm.rs.
//
// Layout: everything row-major. op(A) is m×k, stored [m][k] (not transposed: k contiguous) or
// [k][m] (transposed); op(B) is k×n, stored [k][n] or [n][k] (transposed); C is [m][n]. Product z
// of a batch reads A + z·m·k and B + z·b_stride (b_stride = 0: one B shared by the batch) and writes
// C + z·m·n; blockIdx.z is z. `bias` (null for none) is [n], added to every row. With
// `accumulate`, C's old value is added, else C is overwritten (k = 0 writes zeros).
//
// One block computes one 128×128 tile of C over the whole k, in a fixed order: no split-k and no
// atomics, so results are reproducible. Tiles past the edges of A, B and C are zero-filled on load
// and masked on store, so any m, n and k work.
//
// bf16: tensor cores (mma.sync m16n8k16, f32 accumulation, sm_80 and later), operand tiles staged
// through shared memory in a 4-stage cp.async pipeline, fragments read with ldmatrix. Each operand
// tile is kept in the operand's storage order, and ldmatrix's transposing form turns an m- or
// n-contiguous tile into the fragments the k-contiguous one gives directly, so all four transpose
// combinations run the same pipeline.
// f32: exact f32 FMAs on the CUDA cores. Tensor-core TF32 rounds operands to 10 mantissa bits,
// far outside f32's 1e-5 relative tolerance.
#include "common.cuh"

namespace kdx {
namespace gemm {

// C[row][col] = v (+ bias[col]) (+ C[row][col] if accumulate), rounded once to T; outside C, nothing.
template <typename T>
__device__ __forceinline__ void store(T* __restrict__ c, const T* __restrict__ bias, size_t m,
                                      size_t n, size_t row, size_t col, float v, bool accumulate) {
  if (row >= m || col >= n) return;
  if (bias != nullptr) v += to_f32(bias[col]);
  T* p = c + row * n + col;
  if (accumulate) v += to_f32(*p);
  *p = from_f32<T>(v);
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes from global to shared memory, asynchronously; the last 16 − src_bytes are zero-filled
// (src_bytes = 0 reads nothing).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
}

// One float, or a zero when `inside` is false (then nothing is read).
__device__ __forceinline__ void cp_async_4(float* dst, const float* src, bool inside) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(inside ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The k loop of both kernels: a shared-memory pipeline of STAGES stages, tile t of the k_tiles in
// stage t % STAGES. load(stage, t) issues tile t's asynchronous copies; compute(stage) multiplies
// a tile that has landed. One commit group per tile (empty past the end), so "all but the newest
// STAGES − 2 groups done" means the tile about to be read has landed.
template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int k_tiles, Load load, Compute compute) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load(s, s);
    cp_async_commit();
  }
  for (int t = 0; t < k_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    // Tile t is visible to every thread, and every warp is done with tile t − 1, whose stage the
    // next load overwrites.
    __syncthreads();
    const int ahead = t + STAGES - 1;
    if (ahead < k_tiles) load(ahead % STAGES, ahead);
    cp_async_commit();
    compute(t % STAGES);
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 on tensor cores.

constexpr int TC_TILE = 128;   // C tile per block: TC_TILE × TC_TILE
constexpr int TC_BK = 32;      // k per pipeline stage
constexpr int TC_STAGES = 4;
constexpr int TC_THREADS = 256;  // 8 warps, 2 along m × 4 along n
constexpr int TC_WARP_M = 64;    // each warp's tile of C: 64 × 32
constexpr int TC_WARP_N = 32;
constexpr int TC_MI = TC_WARP_M / 16;  // m16 fragments per warp
constexpr int TC_NI = TC_WARP_N / 8;   // n8 fragments per warp
// Each shared-memory row is padded by 16 bytes: the 8 rows one ldmatrix phase reads then start in
// 8 different 16-byte bank groups (row strides of 80 and 272 bytes), so reads are conflict-free.
constexpr int TC_PAD = 8;

// An operand tile in shared memory, in the operand's storage order: k-contiguous operands as
// [128 rows of m or n][32 k], the others as [32 rows of k][128 m or n].
template <bool K_CONTIG>
struct TcTile {
  static constexpr int ROWS = K_CONTIG ? TC_TILE : TC_BK;
  static constexpr int COLS = K_CONTIG ? TC_BK : TC_TILE;
  static constexpr int LD = COLS + TC_PAD;
  static constexpr int ELEMS = ROWS * LD;
};

// Every stage holds an A tile and a B tile, each in the larger of the two shapes.
constexpr int TC_TILE_ELEMS =
    TcTile<true>::ELEMS > TcTile<false>::ELEMS ? TcTile<true>::ELEMS : TcTile<false>::ELEMS;
// 81920 bytes of dynamic shared memory: src/backend/cuda/launch.rs launches with this size.
constexpr int TC_SMEM_BYTES = TC_STAGES * 2 * TC_TILE_ELEMS * (int)sizeof(bf16);
static_assert(TC_SMEM_BYTES == 81920, "update GEMM_BF16_SMEM in src/backend/cuda/launch.rs");

// Four 8×8 b16 matrices; lanes 8j..8j+7 give the addresses of matrix j's rows. TRANS delivers
// each matrix transposed. The memory clobber keeps it after the barrier that publishes the tile.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");
  }
}

// d += a·b for a 16×16 A fragment, a 16×8 B fragment and a 16×8 f32 accumulator.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copies the tile at (row0, col0) of a row-major rows × cols matrix `g` into shared memory `s`,
// zeros outside the matrix. `vec`: 16-byte asynchronous copies, for which cols % 8 == 0 and `g`
// must be 16-byte aligned (a chunk of 8 is then wholly inside or wholly outside); otherwise element
// by element, through registers.
template <bool K_CONTIG>
__device__ __forceinline__ void tc_load_tile(bf16* s, const bf16* __restrict__ g, size_t rows,
                                             size_t cols, size_t row0, size_t col0, bool vec) {
  using Tile = TcTile<K_CONTIG>;
  constexpr int CHUNKS_PER_ROW = Tile::COLS / 8;
  constexpr int CHUNKS = Tile::ROWS * CHUNKS_PER_ROW;
  static_assert(CHUNKS % TC_THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < CHUNKS / TC_THREADS; ++i) {
    const int chunk = threadIdx.x + i * TC_THREADS;
    const int r = chunk / CHUNKS_PER_ROW;
    const int c = (chunk % CHUNKS_PER_ROW) * 8;
    const size_t gr = row0 + r;
    const size_t gc = col0 + c;
    bf16* dst = s + r * Tile::LD + c;
    if (vec) {
      const bool inside = gr < rows && gc < cols;
      cp_async_16(dst, inside ? g + gr * cols + gc : g, inside ? 16 : 0);
    } else {
      const unsigned short* bits = reinterpret_cast<const unsigned short*>(g);
      uint32_t pairs[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const size_t c0 = gc + 2 * j;
        const uint32_t lo = gr < rows && c0 < cols ? bits[gr * cols + c0] : 0u;
        const uint32_t hi = gr < rows && c0 + 1 < cols ? bits[gr * cols + c0 + 1] : 0u;
        pairs[j] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    }
  }
}

// The A fragment of rows m..m+15, k kk..kk+15 of a stage's A tile: a0..a3 = (rows 0–7, k 0–7),
// (rows 8–15, k 0–7), (rows 0–7, k 8–15), (rows 8–15, k 8–15). An m-contiguous tile holds those
// blocks transposed, which ldmatrix's .trans undoes.
template <bool K_CONTIG>
__device__ __forceinline__ void tc_fragment_a(uint32_t (&a)[4], const bf16* s, int m, int kk,
                                              int lane) {
  constexpr int LD = TcTile<K_CONTIG>::LD;
  if constexpr (K_CONTIG) {
    ldmatrix_x4<false>(a, s + (m + lane % 16) * LD + kk + (lane / 16) * 8);
  } else {
    ldmatrix_x4<true>(a, s + (kk + (lane / 16) * 8 + lane % 8) * LD + m + (lane / 8 % 2) * 8);
  }
}

// The B fragments of columns n..n+7 and n+8..n+15, k kk..kk+15: b[0], b[1] for the first n8 tile
// (k 0–7, k 8–15), b[2], b[3] for the second.
template <bool K_CONTIG>
__device__ __forceinline__ void tc_fragment_b(uint32_t (&b)[4], const bf16* s, int n, int kk,
                                              int lane) {
  constexpr int LD = TcTile<K_CONTIG>::LD;
  if constexpr (K_CONTIG) {
    ldmatrix_x4<false>(b, s + (n + (lane / 16) * 8 + lane % 8) * LD + kk + (lane / 8 % 2) * 8);
  } else {
    ldmatrix_x4<true>(b, s + (kk + (lane / 8 % 2) * 8 + lane % 8) * LD + n + (lane / 16) * 8);
  }
}

template <bool TA, bool TB>
__device__ __forceinline__ void gemm_bf16(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                          const bf16* __restrict__ bias, bf16* __restrict__ c,
                                          size_t m, size_t n, size_t k, size_t b_stride,
                                          bool accumulate, bool vec_a, bool vec_b) {
  // A is k-contiguous unless transposed; B only when transposed.
  constexpr bool A_K = !TA;
  constexpr bool B_K = TB;
  extern __shared__ __align__(16) unsigned char gemm_smem[];
  bf16* s_a = reinterpret_cast<bf16*>(gemm_smem);
  bf16* s_b = s_a + TC_STAGES * TC_TILE_ELEMS;

  const size_t z = blockIdx.z;
  a += z * m * k;
  b += z * b_stride;
  c += z * m * n;
  const size_t m0 = (size_t)blockIdx.y * TC_TILE;
  const size_t n0 = (size_t)blockIdx.x * TC_TILE;
  // Each operand as stored: rows × cols, row-major.
  const size_t a_rows = A_K ? m : k, a_cols = A_K ? k : m;
  const size_t b_rows = B_K ? n : k, b_cols = B_K ? k : n;
  auto load = [&](int stage, int tile) {
    const size_t k0 = (size_t)tile * TC_BK;
    tc_load_tile<A_K>(s_a + stage * TC_TILE_ELEMS, a, a_rows, a_cols, A_K ? m0 : k0,
                      A_K ? k0 : m0, vec_a);
    tc_load_tile<B_K>(s_b + stage * TC_TILE_ELEMS, b, b_rows, b_cols, B_K ? n0 : k0,
                      B_K ? k0 : n0, vec_b);
  };

  const int lane = threadIdx.x % WARP_SIZE;
  const int warp = threadIdx.x / WARP_SIZE;
  const int warp_m = (warp / 4) * TC_WARP_M;
  const int warp_n = (warp % 4) * TC_WARP_N;
  float acc[TC_MI][TC_NI][4] = {};
  auto compute = [&](int stage) {
    const bf16* tile_a = s_a + stage * TC_TILE_ELEMS;
    const bf16* tile_b = s_b + stage * TC_TILE_ELEMS;
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      uint32_t frag_b[TC_NI / 2][4];
#pragma unroll
      for (int j = 0; j < TC_NI / 2; ++j) {
        tc_fragment_b<B_K>(frag_b[j], tile_b, warp_n + 16 * j, kk, lane);
      }
      // One A fragment at a time: the registers go to the accumulators.
#pragma unroll
      for (int i = 0; i < TC_MI; ++i) {
        uint32_t frag_a[4];
        tc_fragment_a<A_K>(frag_a, tile_a, warp_m + 16 * i, kk, lane);
#pragma unroll
        for (int j = 0; j < TC_NI; ++j) {
          mma_bf16(acc[i][j], frag_a, frag_b[j / 2][(j % 2) * 2], frag_b[j / 2][(j % 2) * 2 + 1]);
        }
      }
    }
  };
  pipeline<TC_STAGES>((int)ceil_div(k, TC_BK), load, compute);

  // Accumulator element e of fragment (i, j): row g (+8 for e ≥ 2), column 2·(lane % 4) (+1 for
  // odd e) of that 16×8 block, g = lane / 4.
  const int g = lane / 4;
  const int pair = (lane % 4) * 2;
#pragma unroll
  for (int i = 0; i < TC_MI; ++i) {
#pragma unroll
    for (int j = 0; j < TC_NI; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const size_t row = m0 + warp_m + 16 * i + g + (e / 2) * 8;
        const size_t col = n0 + warp_n + 8 * j + pair + e % 2;
        store(c, bias, m, n, row, col, acc[i][j][e], accumulate);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// f32 on the CUDA cores.

constexpr int F32_TILE = 128;  // C tile per block
constexpr int F32_BK = 8;      // k per pipeline stage
constexpr int F32_STAGES = 3;
constexpr int F32_THREADS = 256;
// Rows of the shared [k][m or n] tiles are padded by 4 floats: the transposing copies of
// k-contiguous operands then hit 32 distinct banks, and rows stay 16-byte aligned for float4 reads.
constexpr int F32_LD = F32_TILE + 4;
constexpr int F32_PER_THREAD = F32_TILE * F32_BK / F32_THREADS;  // elements each thread copies

// This thread's share of an operand's 128 × 8 (m or n by k) tiles, copied into shared [k][mn]
// tiles. Consecutive threads take consecutive elements of the operand's contiguous dimension, so
// global reads coalesce. Element i of thread t is e = t + 256·i of the tile: k-contiguous operands
// give it mn = e / 8 and k = e % 8 (the same k for every i), the others mn = e % 128 (the same mn
// for every i) and k = e / 128. Addresses are kept as one pointer and a stride, which leaves the
// registers to the accumulators.
template <bool K_CONTIG>
struct F32Operand {
  static constexpr int MN_STEP = K_CONTIG ? F32_THREADS / F32_BK : 0;  // per element i
  static constexpr int K_STEP = K_CONTIG ? 0 : F32_THREADS / F32_TILE;
  const float* first;  // element 0 at k0 = 0 (formed, but read only when inside)
  size_t ld;           // the stored row length: k_total if K_CONTIG, else mn_total
  int k_end;           // element i is inside iff k0 + K_STEP·i < k_end (and its mn is inside)
  int tile_mn, kk;     // element 0's place in the tile
  uint32_t mn_inside;  // bit i: element i's row (or column) is inside the operand

  __device__ __forceinline__ F32Operand(const float* g, size_t mn_total, size_t k_total,
                                        size_t mn0) {
    const int t = threadIdx.x;
    tile_mn = K_CONTIG ? t / F32_BK : t % F32_TILE;
    kk = K_CONTIG ? t % F32_BK : t / F32_TILE;
    const size_t mn = mn0 + tile_mn;
    ld = K_CONTIG ? k_total : mn_total;
    k_end = (int)k_total - kk;
    first = K_CONTIG ? g + mn * ld + kk : g + (size_t)kk * ld + mn;
    mn_inside = 0;
#pragma unroll
    for (int i = 0; i < F32_PER_THREAD; ++i) mn_inside |= (mn + MN_STEP * i < mn_total) << i;
  }

  // Issues the copies of this thread's elements of the tile starting at k0 into `s`.
  __device__ __forceinline__ void load(float (*s)[F32_LD], int k0) const {
    const float* p = first + (K_CONTIG ? (size_t)k0 : (size_t)k0 * ld);
#pragma unroll
    for (int i = 0; i < F32_PER_THREAD; ++i) {
      const bool inside = (mn_inside >> i & 1) && k0 + K_STEP * i < k_end;
      cp_async_4(&s[kk + K_STEP * i][tile_mn + MN_STEP * i],
                 inside ? p + (size_t)(MN_STEP + K_STEP) * i * ld : first, inside);
    }
  }
};

// Each thread owns 8 rows × 8 columns of C: rows 4·ty + {0..3} and 64 + 4·ty + {0..3}, columns
// likewise with tx. Its shared-memory reads are then float4s that a warp either broadcasts (A: two
// values of ty per warp) or spreads over all banks (B).
template <bool TA, bool TB>
__device__ __forceinline__ void gemm_f32(const float* __restrict__ a, const float* __restrict__ b,
                                         const float* __restrict__ bias, float* __restrict__ c,
                                         size_t m, size_t n, size_t k, size_t b_stride,
                                         bool accumulate) {
  __shared__ __align__(16) float s_a[F32_STAGES][F32_BK][F32_LD];
  __shared__ __align__(16) float s_b[F32_STAGES][F32_BK][F32_LD];

  const size_t z = blockIdx.z;
  a += z * m * k;
  b += z * b_stride;
  c += z * m * n;
  const size_t m0 = (size_t)blockIdx.y * F32_TILE;
  const size_t n0 = (size_t)blockIdx.x * F32_TILE;
  // A is k-contiguous unless transposed; B only when transposed.
  const F32Operand<!TA> op_a(a, m, k, m0);
  const F32Operand<TB> op_b(b, n, k, n0);
  auto load = [&](int stage, int tile) {
    op_a.load(s_a[stage], tile * F32_BK);
    op_b.load(s_b[stage], tile * F32_BK);
  };

  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  float acc[8][8] = {};
  auto compute = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < F32_BK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&s_a[stage][kk][4 * ty]);
      const float4 a1 = *reinterpret_cast<const float4*>(&s_a[stage][kk][64 + 4 * ty]);
      const float4 b0 = *reinterpret_cast<const float4*>(&s_b[stage][kk][4 * tx]);
      const float4 b1 = *reinterpret_cast<const float4*>(&s_b[stage][kk][64 + 4 * tx]);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
  };
  pipeline<F32_STAGES>((int)ceil_div(k, F32_BK), load, compute);

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const size_t row = m0 + (i / 4) * 64 + 4 * ty + i % 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const size_t col = n0 + (j / 4) * 64 + 4 * tx + j % 4;
      store(c, bias, m, n, row, col, acc[i][j], accumulate);
    }
  }
}

}  // namespace gemm
}  // namespace kdx

// One kernel per dtype and transpose combination (nn, nt, tn, tt: whether A, then B, is read
// transposed). Grid (⌈n/128⌉, ⌈m/128⌉, products), 256 threads.
//
// bf16: TC_SMEM_BYTES of dynamic shared memory. vec_a / vec_b: the operand's contiguous dimension
// is a multiple of 8 and its address 16-byte aligned (16-byte asynchronous copies); 0 otherwise.
#define KDX_GEMM_BF16(NAME, TA, TB)                                                             \
  extern "C" __global__ void __launch_bounds__(kdx::gemm::TC_THREADS, 2)                        \
      NAME(const kdx::bf16* a, const kdx::bf16* b, const kdx::bf16* bias, kdx::bf16* c,         \
           size_t m, size_t n, size_t k, size_t b_stride, int accumulate, int vec_a,           \
           int vec_b) {                                                                         \
    kdx::gemm::gemm_bf16<TA, TB>(a, b, bias, c, m, n, k, b_stride, accumulate != 0, vec_a != 0, \
                                 vec_b != 0);                                                   \
  }
KDX_GEMM_BF16(kdx_gemm_nn_bf16, false, false)
KDX_GEMM_BF16(kdx_gemm_nt_bf16, false, true)
KDX_GEMM_BF16(kdx_gemm_tn_bf16, true, false)
KDX_GEMM_BF16(kdx_gemm_tt_bf16, true, true)
#undef KDX_GEMM_BF16

// f32: static shared memory.
#define KDX_GEMM_F32(NAME, TA, TB)                                                             \
  extern "C" __global__ void __launch_bounds__(kdx::gemm::F32_THREADS, 2)                      \
      NAME(const float* a, const float* b, const float* bias, float* c, size_t m, size_t n,   \
           size_t k, size_t b_stride, int accumulate) {                                        \
    kdx::gemm::gemm_f32<TA, TB>(a, b, bias, c, m, n, k, b_stride, accumulate != 0);            \
  }
KDX_GEMM_F32(kdx_gemm_nn_f32, false, false)
KDX_GEMM_F32(kdx_gemm_nt_f32, false, true)
KDX_GEMM_F32(kdx_gemm_tn_f32, true, false)
KDX_GEMM_F32(kdx_gemm_tt_f32, true, true)
#undef KDX_GEMM_F32
