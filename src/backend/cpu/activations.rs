//! Activations: GELU in its exact (erf) form, as BERT uses it; tanh (BERT's pooler); SwiGLU (Llama's MLP).

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

/// ln of the smallest normal f32, where the f32 `exp` stops (it clamps rather than reaching 0).
const LN_MIN_NORMAL_F32: f64 = -87.336_55;

/// σ(x) from `e^{−|x|}`, which never overflows: `1/(1 + e)` for x ≥ 0, `e/(1 + e)` below, so neither
/// tail loses its precision to a `1 − σ`. `e` is flushed to 0 below [`LN_MIN_NORMAL_F32`] in either
/// precision (an error under 1.2e-38), so that `x·σ(x)` is 0 rather than `x·1.2e-38` for huge negative x.
#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    let neg_abs = if x > T::ZERO { -x } else { x };
    let e = if neg_abs < T::from_f64(LN_MIN_NORMAL_F32) {
        T::ZERO
    } else {
        neg_abs.exp()
    };
    let num = if x < T::ZERO { e } else { T::ONE };
    num / (T::ONE + e)
}

/// `silu(gate)·up`.
#[inline(always)]
fn swiglu_value<T: Real>(gate: T, up: T) -> T {
    gate * sigmoid(gate) * up
}

/// `(dgate, dup)` of [`swiglu_value`]: silu′(g) = σ(g)·(1 + g·(1 − σ(g))).
#[inline(always)]
fn swiglu_grads<T: Real>(gate: T, up: T, dy: T) -> (T, T) {
    let s = sigmoid(gate);
    let dsilu = s * (T::ONE + gate * (T::ONE - s));
    (dy * up * dsilu, dy * gate * s)
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_same_shape("SwiGLU (gate vs up)", gate, up)?;
    let mut y = gate.zeros_like();
    with_real!(gate.dtype(), T => {
        y.data_mut::<T>()?
            .par_chunks_mut(CHUNK)
            .zip(gate.data::<T>()?.par_chunks(CHUNK))
            .zip(up.data::<T>()?.par_chunks(CHUNK))
            .for_each(|((yc, gc), uc)| {
                simd!({
                    for ((o, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                        *o = swiglu_value(g, u);
                    }
                })
            });
    });
    Ok(y)
}

pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    check_same_shape("SwiGLU backward (gate vs up)", gate, up)?;
    check_same_shape("SwiGLU backward (gate vs dy)", gate, dy)?;
    let (mut dgate, mut dup) = (gate.zeros_like(), up.zeros_like());
    with_real!(gate.dtype(), T => {
        dgate
            .data_mut::<T>()?
            .par_chunks_mut(CHUNK)
            .zip(dup.data_mut::<T>()?.par_chunks_mut(CHUNK))
            .zip(gate.data::<T>()?.par_chunks(CHUNK))
            .zip(up.data::<T>()?.par_chunks(CHUNK))
            .zip(dy.data::<T>()?.par_chunks(CHUNK))
            .for_each(|((((dgc, duc), gc), uc), yc)| {
                simd!({
                    for ((((dg, du), &g), &u), &d) in dgc.iter_mut().zip(duc.iter_mut()).zip(gc).zip(uc).zip(yc) {
                        (*dg, *du) = swiglu_grads(g, u, d);
                    }
                })
            });
    });
    Ok((dgate, dup))
}
