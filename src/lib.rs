//! kdx: a knowledge-distillation and compression engine.
//!
//! Layout: [`tensor`] (storage, shape, dtype, device), [`backend`] (the op set; CPU SIMD implementation),
//! [`model`] (BERT encoder, loading Hugging Face folders, tokenizer, `kdx fetch`), [`train`] (optimizer
//! state and the training step), [`cli`] (one module per subcommand).
//!
//! Ops run through a [`backend::Backend`]; every op that training uses has its backward:
//!
//! ```
//! use kdx::backend::backend;
//! use kdx::{Device, Tensor};
//!
//! let cpu = backend(Device::Cpu)?;
//! let x = Tensor::from_vec(vec![-1.0f32, 0.0, 2.0], &[1, 3])?;
//! let y = cpu.gelu(&x)?.to_vec_f32();
//! // GELU(x) = x·Φ(x): Φ(2) = 0.97725
//! assert!((y[2] - 1.954_5).abs() < 1e-4 && y[1] == 0.0);
//! let dx = cpu.gelu_backward(&x, &Tensor::from_vec(vec![1.0f32; 3], &[1, 3])?)?;
//! assert!((dx.to_vec_f32()[1] - 0.5).abs() < 1e-6); // GELU'(0) = Φ(0) = 1/2
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod backend;
pub mod cli;
pub mod data;
pub mod tensor;
pub mod trace;

pub use tensor::{DType, Device, Tensor};
pub mod model;
pub mod train;
