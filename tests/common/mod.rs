//! Helpers shared by the integration tests: random tensors and central finite differences in f64.
#![allow(dead_code)] // each test binary uses a different subset

use kdx::model::params::Rng;
use kdx::{DType, Tensor};

/// Normal random values (never zeros or constants), in f64.
pub fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| rng.normal() as f64).collect::<Vec<f64>>(),
        shape,
    )
    .unwrap()
}

pub fn randn_f32(shape: &[usize], rng: &mut Rng) -> Tensor {
    randn(shape, rng).to_dtype(DType::F32).unwrap()
}

/// Σ w·y: turns an op's output into a scalar whose gradient with respect to y is `w`.
pub fn weighted_sum(y: &Tensor, w: &Tensor) -> f64 {
    y.to_vec_f64()
        .iter()
        .zip(w.to_vec_f64())
        .map(|(a, b)| a * b)
        .sum()
}

/// Checks `analytic` against the central difference of `f` at `x` for every element of `x`:
/// `|analytic − numeric| ≤ atol + rtol·|numeric|` element-wise, and the whole-tensor relative error
/// `‖analytic − numeric‖ / ‖numeric‖ ≤ rtol` (an absolute bound where the gradient vanishes).
pub fn check_gradient(
    what: &str,
    x: &Tensor,
    analytic: &Tensor,
    f: impl Fn(&Tensor) -> f64,
    rtol: f64,
    atol: f64,
) {
    assert_eq!(x.shape(), analytic.shape(), "{what}: gradient shape");
    let base = x.to_vec_f64();
    let got = analytic.to_vec_f64();
    let h = 1e-6;
    let (mut diff2, mut ref2) = (0.0, 0.0);
    for i in 0..base.len() {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            f(&Tensor::from_vec(v, x.shape()).unwrap())
        };
        let numeric = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (got[i] - numeric).abs() <= atol + rtol * numeric.abs(),
            "{what}: element {i}: analytic {} vs numeric {numeric}",
            got[i]
        );
        diff2 += (got[i] - numeric).powi(2);
        ref2 += numeric.powi(2);
    }
    let (diff, norm) = (diff2.sqrt(), ref2.sqrt());
    if norm > 1e-6 {
        assert!(
            diff / norm <= rtol,
            "{what}: relative error {:e} > {rtol:e}",
            diff / norm
        );
    } else {
        // A gradient that is zero in exact arithmetic: only an absolute bound means anything.
        assert!(
            diff <= 1e-8,
            "{what}: gradient should vanish, differs by {diff:e}"
        );
    }
}

/// Max |a − b| over two tensors of any dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.to_vec_f64()
        .iter()
        .zip(b.to_vec_f64())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
