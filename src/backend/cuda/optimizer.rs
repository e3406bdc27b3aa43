//! AdamW in place: f32 master parameters and moments, f32 or bf16 gradients (kernels/optimizer.cu).

use anyhow::{ensure, Result};

use super::launch::{elementwise, kernel, launch};
use super::runtime::Gpu;
use super::{expect_dtype, input, output};
use crate::backend::AdamW;
use crate::tensor::{DType, Tensor};

pub(crate) fn adamw(
    gpu: &Gpu,
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    const OP: &str = "adamw";
    for (name, t) in [("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)] {
        ensure!(
            t.shape() == param.shape(),
            "{OP}: {name} is {:?} but param is {:?}",
            t.shape(),
            param.shape()
        );
    }
    for (name, t) in [("param", &*param), ("m", &*m), ("v", &*v)] {
        expect_dtype(OP, name, t, DType::F32)?;
    }
    ensure!(step >= 1, "{OP}: step counts from 1");
    // The suffix names the gradient's dtype.
    let kernel = kernel!("kdx_adamw", grad.dtype());
    // The step's scalars exactly as the CPU computes them: in f64, rounded once to f32.
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    let decay = (1.0 - hp.lr as f64 * hp.weight_decay as f64) as f32;
    let step_size = (hp.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;

    let n = param.numel();
    let grad_ptr = input(gpu, OP, "grad", grad)?.ptr();
    let param_ptr = output(gpu, OP, "param", param)?.ptr_mut()?;
    let m_ptr = output(gpu, OP, "m", m)?.ptr_mut()?;
    let v_ptr = output(gpu, OP, "v", v)?.ptr_mut()?;
    // SAFETY: kdx_adamw_<G>(float* param, const G* grad, float* m, float* v, size_t n,
    // float beta1, float beta2, float eps, float decay, float step_size, float inv_sqrt_bc2),
    // each buffer holding n elements.
    unsafe {
        launch!(
            gpu,
            kernel,
            elementwise(n),
            [
                param_ptr,
                grad_ptr,
                m_ptr,
                v_ptr,
                n,
                hp.beta1,
                hp.beta2,
                hp.eps,
                decay,
                step_size,
                inv_sqrt_bc2
            ]
        )
    }
}
