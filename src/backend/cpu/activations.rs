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

/// An element-wise function and its derivative. The backward receives `saved`: the input for GELU,
/// the output for tanh (whichever makes the derivative cheapest).
trait Pointwise {
    fn value<T: Real>(x: T) -> T;
    fn derivative<T: Real>(saved: T) -> T;
}

struct Gelu;

impl Pointwise for Gelu {
    #[inline(always)]
    fn value<T: Real>(x: T) -> T {
        T::from_f64(0.5) * x * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf())
    }

    /// d/dx [x·Φ(x)] = Φ(x) + x·φ(x).
    #[inline(always)]
    fn derivative<T: Real>(x: T) -> T {
        let cdf = T::from_f64(0.5) * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf());
        let pdf = T::from_f64(INV_SQRT_2PI) * (-(x * x) * T::from_f64(0.5)).exp();
        cdf + x * pdf
    }
}

struct Tanh;

impl Pointwise for Tanh {
    /// tanh(x) = 1 − 2/(e^{2x} + 1): one exp, vectorises, saturates cleanly at ±1.
    #[inline(always)]
    fn value<T: Real>(x: T) -> T {
        T::ONE - T::from_f64(2.0) / ((x + x).exp() + T::ONE)
    }

    /// From the output: 1 − y².
    #[inline(always)]
    fn derivative<T: Real>(y: T) -> T {
        T::ONE - y * y
    }
}

fn forward<F: Pointwise>(x: &Tensor) -> Result<Tensor> {
    let mut y = x.zeros_like();
    with_real!(x.dtype(), T => {
        y.data_mut::<T>()?.par_chunks_mut(CHUNK).zip(x.data::<T>()?.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            simd!({
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = F::value(v);
                }
            })
        });
    });
    Ok(y)
}

fn backward<F: Pointwise>(saved: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same_shape("activation backward", saved, dy)?;
    let mut dx = saved.zeros_like();
    with_real!(saved.dtype(), T => {
        dx.data_mut::<T>()?
            .par_chunks_mut(CHUNK)
            .zip(saved.data::<T>()?.par_chunks(CHUNK))
            .zip(dy.data::<T>()?.par_chunks(CHUNK))
            .for_each(|((o, sc), gc)| {
                simd!({
                    for ((o, &s), &g) in o.iter_mut().zip(sc).zip(gc) {
                        *o = g * F::derivative(s);
                    }
                })
            });
    });
    Ok(dx)
}

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    forward::<Gelu>(x)
}

pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    backward::<Gelu>(x, dy)
}

pub fn tanh(x: &Tensor) -> Result<Tensor> {
    forward::<Tanh>(x)
}

/// From the forward's output: d tanh = (1 − y²)·dy.
pub fn tanh_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    backward::<Tanh>(y, dy)
}
