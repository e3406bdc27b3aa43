// Rotary position embedding in Hugging Face's rotate-half layout, in place, for f32 and bf16
// activations and tables. Mirrors src/backend/cpu/rope.rs.
#include "common.cuh"

namespace kdx {
namespace rope {

// Thread i owns one rotated pair: (row, head) = i / half, and element j = i % half of that head's
// first half with its partner j + half. The pair's two new values depend only on its old ones, so
// rotating in place needs no synchronisation.
template <typename T>
__device__ __forceinline__ void rope(T* __restrict__ x, const T* __restrict__ table,
                                     const uint32_t* __restrict__ positions, size_t rows,
                                     size_t heads, size_t half, float sign) {
  const size_t head_dim = 2 * half;
  grid_stride(rows * heads * half, [&](size_t i) {
    const size_t j = i % half;
    const size_t head = i / half;
    const size_t row = head / heads;
    const T* angle = table + (size_t)positions[row] * head_dim;
    const float c = to_f32(angle[j]);
    const float s = to_f32(angle[half + j]) * sign;
    T* h = x + head * head_dim;
    const float a = to_f32(h[j]);
    const float b = to_f32(h[half + j]);
    h[j] = from_f32<T>(a * c - b * s);
    h[half + j] = from_f32<T>(b * c + a * s);
  });
}

}  // namespace rope
}  // namespace kdx

// x [rows, heads·2·half] rotated in place: each head's pairs (j, j + half) by the angle of its
// row's position, read from table [max_position, 2·half] (cosines, then sines). sign = −1 rotates
// back (the inverse, which is the backward). Every position must be below max_position. Any
// launch shape.
extern "C" __global__ void kdx_rope_f32(float* x, const float* table, const uint32_t* positions,
                                        size_t rows, size_t heads, size_t half, float sign) {
  kdx::rope::rope(x, table, positions, rows, heads, half, sign);
}
extern "C" __global__ void kdx_rope_bf16(kdx::bf16* x, const kdx::bf16* table,
                                         const uint32_t* positions, size_t rows, size_t heads,
                                         size_t half, float sign) {
  kdx::rope::rope(x, table, positions, rows, heads, half, sign);
}
