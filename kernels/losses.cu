// Losses fused with their gradient, for f32 and bf16 logits. Mirrors src/backend/cpu/losses.rs.
// Labels are checked against the number of classes on the host before any launch.
#include "common.cuh"

namespace kdx {
namespace losses {

// One block per row: log-sum-exp with the row max subtracted (any logit magnitude is safe), the
// row's loss −log softmax(z)[label] = ln Σ e^{z−m} + m − z[label], and the gradient
// (softmax(z) − onehot(label)) / rows, in the CPU's order of operations.
template <typename T>
__device__ __forceinline__ void cross_entropy(const T* __restrict__ logits,
                                              const uint32_t* __restrict__ labels,
                                              T* __restrict__ grad, double* __restrict__ losses,
                                              size_t classes, float inv_rows) {
  const size_t row = blockIdx.x;
  const T* z = logits + row * classes;
  T* g = grad + row * classes;
  const size_t label = labels[row];

  float m = -INFINITY;
  for (size_t c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, to_f32(z[c]));
  m = block_max(m);

  float sum = 0.0f;
  for (size_t c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(to_f32(z[c]) - m);
  const float total = block_sum(sum);

  const float scale = inv_rows / total;
  for (size_t c = threadIdx.x; c < classes; c += blockDim.x) {
    float p = expf(to_f32(z[c]) - m) * scale;
    if (c == label) p -= inv_rows;
    g[c] = from_f32<T>(p);
  }
  if (threadIdx.x == 0) losses[row] = (double)(logf(total) + m - to_f32(z[label]));
}

}  // namespace losses
}  // namespace kdx

// Cross-entropy of logits [rows, classes] against labels [rows]: grad [rows, classes] and the
// per-row losses [rows] (f64; the host takes the mean, as the CPU does). One block per row.
extern "C" __global__ void kdx_cross_entropy_f32(const float* logits, const uint32_t* labels,
                                                 float* grad, double* losses, size_t classes,
                                                 float inv_rows) {
  kdx::losses::cross_entropy(logits, labels, grad, losses, classes, inv_rows);
}
extern "C" __global__ void kdx_cross_entropy_bf16(const kdx::bf16* logits, const uint32_t* labels,
                                                  kdx::bf16* grad, double* losses, size_t classes,
                                                  float inv_rows) {
  kdx::losses::cross_entropy(logits, labels, grad, losses, classes, inv_rows);
}

// ---------------------------------------------------------------------------------------------
// The fused softmax-KL distillation loss (src/backend/mod.rs `SoftmaxKl`, CPU twin in
// src/backend/cpu/losses.rs). Per row r, with τ = settings[3r], student logits s, teacher t:
//   loss_r = kl_weight·τ²·KL + ce_weight·CE(label, softmax(s))
//   forward  (t‖s): ∂/∂s = kl_weight·τ·(p_s − p_t)          KL = Σ p_t (l_t − l_s)
//   reverse  (s‖t): ∂/∂s = kl_weight·τ·p_s·(l_s − l_t − KL)  KL = Σ p_s (l_s − l_t)
// plus ce_weight·(softmax(s) − onehot) for the cross-entropy, all times `scale` (1 / rows counted).
// Rows whose label is IGNORE get a zero gradient and a zero loss.
//
// Reads per row: one pass for the maxima and log-normalisers together (online softmax: sums
// rescaled when the max moves), a second for the reverse KL only, and the last one writes the
// gradient (and sums the forward KL). `grad` may alias `student` (in place): each element is read
// and then written by the same thread.
//
// Three launch shapes share the row code through a `Group` (who works on one row): a single thread
// (a handful of classes: thousands of rows of C = 2), a warp (up to a few thousand classes), or the
// whole block (vocabulary-sized rows).

namespace kdx {
namespace softmax_kl {

constexpr uint32_t IGNORE = 0xffffffffu;

// The smallest normal f32: log of a zero teacher probability reads as ln of it (≈ −87.3), as the
// CPU's `ln_fast` does.
constexpr float MIN_NORMAL = 1.17549435e-38f;

// `sum`, taken relative to the max `from`, re-expressed relative to `to` (≥ from); at the
// temperature's reciprocal `inv_tau`. An empty sum (from = −∞) stays 0 instead of NaN.
__device__ __forceinline__ float rescale(float sum, float from, float to, float inv_tau) {
  return sum == 0.0f ? 0.0f : sum * expf((from - to) * inv_tau);
}

// Running maxima and exponential sums of one row: the student's at τ and at 1 (for the
// cross-entropy), the teacher's at τ (teacher logits only).
struct Stats {
  float ms, ss, s1;
  float mt, st;

  __device__ __forceinline__ static Stats empty() { return {-INFINITY, 0.f, 0.f, -INFINITY, 0.f}; }

  // A −∞ logit (a masked class) adds nothing, and must not meet a −∞ max in exp(x − max).
  __device__ __forceinline__ void add_student(float x, float inv_tau) {
    if (x == -INFINITY) return;
    if (x > ms) {
      ss = rescale(ss, ms, x, inv_tau);
      s1 = rescale(s1, ms, x, 1.0f);
      ms = x;
    }
    ss += expf((x - ms) * inv_tau);
    s1 += expf(x - ms);
  }

  __device__ __forceinline__ void add_teacher(float y, float inv_tau) {
    if (y == -INFINITY) return;
    if (y > mt) {
      st = rescale(st, mt, y, inv_tau);
      mt = y;
    }
    st += expf((y - mt) * inv_tau);
  }

  __device__ __forceinline__ void merge(const Stats& o, float inv_tau) {
    const float m = fmaxf(ms, o.ms);
    ss = rescale(ss, ms, m, inv_tau) + rescale(o.ss, o.ms, m, inv_tau);
    s1 = rescale(s1, ms, m, 1.0f) + rescale(o.s1, o.ms, m, 1.0f);
    ms = m;
    const float n = fmaxf(mt, o.mt);
    st = rescale(st, mt, n, inv_tau) + rescale(o.st, o.mt, n, inv_tau);
    mt = n;
  }

  __device__ __forceinline__ Stats shuffled(int offset) const {
    return {__shfl_xor_sync(FULL_MASK, ms, offset), __shfl_xor_sync(FULL_MASK, ss, offset),
            __shfl_xor_sync(FULL_MASK, s1, offset), __shfl_xor_sync(FULL_MASK, mt, offset),
            __shfl_xor_sync(FULL_MASK, st, offset)};
  }
};

// LANES consecutive lanes of a warp (1 or 32) work on one row.
template <int LANES>
struct WarpGroup {
  __device__ __forceinline__ static size_t lane() { return threadIdx.x % LANES; }
  __device__ __forceinline__ static size_t size() { return LANES; }
  // Orders the group's memory accesses: what a lane read before, another may overwrite after.
  __device__ __forceinline__ static void sync() {
    if (LANES > 1) __syncwarp();
  }
  __device__ __forceinline__ static float sum(float v) {
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
  }
  __device__ __forceinline__ static Stats merge(Stats v, float inv_tau) {
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) v.merge(v.shuffled(offset), inv_tau);
    return v;
  }
};

// The whole block works on one row.
struct BlockGroup {
  __device__ __forceinline__ static size_t lane() { return threadIdx.x; }
  __device__ __forceinline__ static size_t size() { return blockDim.x; }
  __device__ __forceinline__ static void sync() { __syncthreads(); }
  __device__ __forceinline__ static float sum(float v) { return block_sum(v); }
  __device__ __forceinline__ static Stats merge(Stats v, float inv_tau) {
    __shared__ Stats partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    v = WarpGroup<WARP_SIZE>::merge(v, inv_tau);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    Stats total = partial[0];
    for (int w = 1; w < (int)(blockDim.x / WARP_SIZE); ++w) total.merge(partial[w], inv_tau);
    // Nobody may overwrite `partial` in a later call before everyone has read it.
    __syncthreads();
    return total;
  }
};

struct Row {
  float inv_tau, tau, kl_weight, ce_weight, scale;
  uint32_t label;
  bool hard, probs, reverse;
};

// p·d, read as 0 where p = 0 (0·log 0 = 0): a class that a side gives no probability (a −∞ logit,
// a zero teacher probability) adds nothing, where p·d would be 0·∞ = NaN.
__device__ __forceinline__ float weighted(float p, float d) { return p == 0.0f ? 0.0f : p * d; }

// The teacher's log-probability of value y: its softened logit, or the log of a given probability.
__device__ __forceinline__ float teacher_log_p(float y, const Row& r, float log_zt) {
  return r.probs ? logf(fmaxf(y, MIN_NORMAL)) : y * r.inv_tau - log_zt;
}

// One row: returns its loss (valid in every lane of the group) and writes its gradient.
template <typename T, class G>
__device__ __forceinline__ float row_loss(const T* s, const T* t, T* g, size_t classes,
                                          const Row& r) {
  Stats st = Stats::empty();
  for (size_t c = G::lane(); c < classes; c += G::size()) {
    st.add_student(to_f32(s[c]), r.inv_tau);
    if (!r.probs) st.add_teacher(to_f32(t[c]), r.inv_tau);
  }
  st = G::merge(st, r.inv_tau);
  const float log_zs = st.ms * r.inv_tau + logf(st.ss);
  const float log_z1 = st.ms + logf(st.s1);
  const float log_zt = r.probs ? 0.0f : st.mt * r.inv_tau + logf(st.st);

  float kl = 0.0f;
  if (r.reverse) {
    float part = 0.0f;
    for (size_t c = G::lane(); c < classes; c += G::size()) {
      const float ls = to_f32(s[c]) * r.inv_tau - log_zs;
      part += weighted(expf(ls), ls - teacher_log_p(to_f32(t[c]), r, log_zt));
    }
    kl = G::sum(part);
  }

  // Read before the gradient pass, which may overwrite the logits (in place): s[label] belongs to
  // one lane of the group, which may reach its gradient write before the others have read it.
  const float label_logit = r.hard ? to_f32(s[r.label]) : 0.0f;
  G::sync();
  const float soft = r.kl_weight * r.tau;
  float forward_part = 0.0f;
  for (size_t c = G::lane(); c < classes; c += G::size()) {
    const float x = to_f32(s[c]);
    const float ls = x * r.inv_tau - log_zs;
    const float lt = teacher_log_p(to_f32(t[c]), r, log_zt);
    const float ps = expf(ls);
    float d;
    if (r.reverse) {
      d = soft * weighted(ps, ls - lt - kl);
    } else {
      const float pt = r.probs ? to_f32(t[c]) : expf(lt);
      d = soft * (ps - pt);
      forward_part += weighted(pt, lt - ls);
    }
    if (r.hard) d += r.ce_weight * (expf(x - log_z1) - (c == r.label ? 1.0f : 0.0f));
    g[c] = from_f32<T>(d * r.scale);
  }
  if (!r.reverse) kl = G::sum(forward_part);

  // A zero KL weight leaves the KL out, even an infinite one (a −∞ student logit where the
  // teacher has mass, forward direction): 0·∞ would make the row's loss NaN.
  float loss = r.kl_weight == 0.0f ? 0.0f : r.kl_weight * r.tau * r.tau * kl;
  if (r.hard) loss += r.ce_weight * (log_z1 - label_logit);
  return loss;
}

// Row `row` of the call, resolved from the per-row arrays; false for an ignored row, whose gradient
// is zeroed here by the group.
template <typename T, class G>
__device__ __forceinline__ void run_row(const T* student, const T* teacher, T* grad,
                                        const float* settings, const uint32_t* labels,
                                        double* losses, size_t row, size_t classes, float scale,
                                        uint32_t teacher_probs, uint32_t reverse) {
  const size_t base = row * classes;
  const uint32_t label = labels[row];
  if (label == IGNORE) {
    for (size_t c = G::lane(); c < classes; c += G::size()) grad[base + c] = from_f32<T>(0.0f);
    if (G::lane() == 0) losses[row] = 0.0;
    return;
  }
  Row r;
  r.tau = settings[3 * row];
  r.inv_tau = 1.0f / r.tau;
  r.kl_weight = settings[3 * row + 1];
  r.ce_weight = settings[3 * row + 2];
  r.scale = scale;
  r.label = label;
  r.hard = r.ce_weight != 0.0f;
  r.probs = teacher_probs != 0;
  r.reverse = reverse != 0;
  const float loss = row_loss<T, G>(student + base, teacher + base, grad + base, classes, r);
  if (G::lane() == 0) losses[row] = (double)loss;
}

// Rows handed to groups of LANES lanes (1 or 32): a warp holds 32 / LANES rows. With 32 lanes a
// warp is one row, so a warp past the last row leaves whole and the shuffles stay complete.
template <typename T, int LANES>
__device__ __forceinline__ void rows_by_lanes(const T* student, const T* teacher, T* grad,
                                              const float* settings, const uint32_t* labels,
                                              double* losses, size_t rows, size_t classes,
                                              float scale, uint32_t teacher_probs,
                                              uint32_t reverse) {
  const size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / LANES;
  if (row >= rows) return;
  run_row<T, WarpGroup<LANES>>(student, teacher, grad, settings, labels, losses, row, classes,
                               scale, teacher_probs, reverse);
}

}  // namespace softmax_kl
}  // namespace kdx

// Softmax-KL of student logits [rows, classes] against teacher logits or probabilities (same
// shape): grad [rows, classes] (may be `student` itself) and per-row losses [rows] (f64; the host
// takes the mean). settings [rows, 3] = (temperature, KL weight, CE weight) per row; labels [rows]
// (0xffffffff: ignored row). `scale` = 1 / rows counted. Three shapes (see above): `_thread` one
// row per thread, `_warp` one row per warp (any block of whole warps), `_block` one row per block.
#define KDX_SOFTMAX_KL(NAME, T, CALL)                                                             \
  extern "C" __global__ void NAME(const T* student, const T* teacher, T* grad,                    \
                                  const float* settings, const uint32_t* labels, double* losses, \
                                  size_t rows, size_t classes, float scale,                      \
                                  uint32_t teacher_probs, uint32_t reverse) {                    \
    CALL;                                                                                          \
  }
#define KDX_SOFTMAX_KL_ARGS \
  student, teacher, grad, settings, labels, losses, rows, classes, scale, teacher_probs, reverse
#define KDX_SOFTMAX_KL_DTYPE(T, SUFFIX)                                                         \
  KDX_SOFTMAX_KL(kdx_softmax_kl_thread_##SUFFIX, T,                                            \
                 (kdx::softmax_kl::rows_by_lanes<T, 1>(KDX_SOFTMAX_KL_ARGS)))                  \
  KDX_SOFTMAX_KL(kdx_softmax_kl_warp_##SUFFIX, T,                                              \
                 (kdx::softmax_kl::rows_by_lanes<T, kdx::WARP_SIZE>(KDX_SOFTMAX_KL_ARGS)))     \
  KDX_SOFTMAX_KL(kdx_softmax_kl_block_##SUFFIX, T,                                             \
                 (kdx::softmax_kl::run_row<T, kdx::softmax_kl::BlockGroup>(                     \
                     student, teacher, grad, settings, labels, losses, blockIdx.x, classes,    \
                     scale, teacher_probs, reverse)))
KDX_SOFTMAX_KL_DTYPE(float, f32)
KDX_SOFTMAX_KL_DTYPE(kdx::bf16, bf16)
#undef KDX_SOFTMAX_KL_DTYPE
#undef KDX_SOFTMAX_KL_ARGS
#undef KDX_SOFTMAX_KL
