//! Activations: GELU in its exact (erf) form, as BERT uses it; tanh (BERT's pooler).

use anyhow::Result;
use rayon::prelude::*;

use super::simd::{simd, Real};
use super::with_real;
use crate::backend::check_same_shape;
use crate::tensor::Tensor;

const CHUNK: usize = 8 * 1024;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density's constant.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline(always)]
fn gelu_scalar<T: Real>(x: T) -> T {
    T::from_f64(0.5) * x * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf())
}

/// d/dx [x·Φ(x)] = Φ(x) + x·φ(x).
#[inline(always)]
fn gelu_grad_scalar<T: Real>(x: T) -> T {
    let cdf = T::from_f64(0.5) * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf());
    let pdf = T::from_f64(INV_SQRT_2PI) * (-(x * x) * T::from_f64(0.5)).exp();
    cdf + x * pdf
}

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let mut y = x.zeros_like();
    with_real!(x.dtype(), T => {
        y.data_mut::<T>()?.par_chunks_mut(CHUNK).zip(x.data::<T>()?.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            simd!({
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = gelu_scalar(v);
                }
            })
        });
    });
    Ok(y)
}

pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same_shape("gelu backward", x, dy)?;
    let mut dx = x.zeros_like();
    with_real!(x.dtype(), T => {
        let dyd = dy.data::<T>()?;
        dx.data_mut::<T>()?
            .par_chunks_mut(CHUNK)
            .zip(x.data::<T>()?.par_chunks(CHUNK))
            .zip(dyd.par_chunks(CHUNK))
            .for_each(|((o, xc), gc)| {
                simd!({
                    for ((o, &v), &g) in o.iter_mut().zip(xc).zip(gc) {
                        *o = g * gelu_grad_scalar(v);
                    }
                })
            });
    });
    Ok(dx)
}

/// tanh(x) = 1 − 2/(e^{2x} + 1): one exp, vectorises, saturates cleanly at ±1.
#[inline(always)]
fn tanh_scalar<T: Real>(x: T) -> T {
    T::ONE - T::from_f64(2.0) / ((x + x).exp() + T::ONE)
}

pub fn tanh(x: &Tensor) -> Result<Tensor> {
    let mut y = x.zeros_like();
    with_real!(x.dtype(), T => {
        y.data_mut::<T>()?.par_chunks_mut(CHUNK).zip(x.data::<T>()?.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            simd!({
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = tanh_scalar(v);
                }
            })
        });
    });
    Ok(y)
}

/// From the forward's output: d tanh = (1 − y²)·dy.
pub fn tanh_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same_shape("tanh backward", y, dy)?;
    let mut dx = y.zeros_like();
    with_real!(y.dtype(), T => {
        let dyd = dy.data::<T>()?;
        dx.data_mut::<T>()?
            .par_chunks_mut(CHUNK)
            .zip(y.data::<T>()?.par_chunks(CHUNK))
            .zip(dyd.par_chunks(CHUNK))
            .for_each(|((o, yc), gc)| {
                simd!({
                    for ((o, &v), &g) in o.iter_mut().zip(yc).zip(gc) {
                        *o = g * (T::ONE - v * v);
                    }
                })
            });
    });
    Ok(dx)
}
