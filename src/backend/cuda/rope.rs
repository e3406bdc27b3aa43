//! Rotary position embedding, rotate-half layout, in place (kernels/rope.cu).

use anyhow::Result;

use super::launch::{elementwise, kernel, launch};
use super::runtime::Gpu;
use super::{input, output};
use crate::backend::cpu::rope::check;
use crate::tensor::Tensor;

/// Rotates each head of each row of `x` by its row's position (see `Backend::rope`); `positions`
/// are copied to the device for the kernel.
pub(crate) fn rope(
    gpu: &'static Gpu,
    x: &mut Tensor,
    heads: usize,
    positions: &[u32],
    table: &Tensor,
    inverse: bool,
) -> Result<()> {
    const OP: &str = "RoPE";
    // Every position is checked against the table here: the kernel reads its rows unchecked.
    let (rows, head_dim) = check(x, heads, positions, table)?;
    let kernel = kernel!("kdx_rope", x.dtype());
    let half = head_dim / 2;
    let table_ptr = input(gpu, OP, "table", table)?.ptr();
    let positions_buf = gpu.upload(bytemuck::cast_slice(positions))?;
    let x_ptr = output(gpu, OP, "x", x)?.ptr_mut()?;
    // The inverse rotation is the same one by the negated angle: only the sines change sign.
    let sign: f32 = if inverse { -1.0 } else { 1.0 };
    // SAFETY: kdx_rope_<T>(T* x, const T* table, const uint32_t* positions, size_t rows,
    // size_t heads, size_t half, float sign): x [rows, heads·2·half], table [max_position, 2·half]
    // with every one of the rows positions below max_position; any launch shape.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(rows * heads * half),
            [
                x_ptr,
                table_ptr,
                gpu.ptr(&positions_buf),
                rows,
                heads,
                half,
                sign
            ]
        )
    }
}
