//! Helpers shared by the criterion benches.
#![allow(dead_code)] // each bench binary uses a different subset

use kdx::backend::{backend, Backend};
use kdx::model::params::Rng;
use kdx::{Device, Tensor};

pub fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

/// Normal random values (never zeros or constants) from a fixed seed.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f32>>(), shape).unwrap()
}
