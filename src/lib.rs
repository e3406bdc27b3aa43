//! kdx: a knowledge-distillation and compression engine.
//!
//! Layout: [`tensor`] (storage, shape, dtype, device), [`backend`] (the op set; CPU SIMD implementation),
//! [`model`] (BERT encoder, loading Hugging Face folders, tokenizer, `kdx fetch`), [`train`] (optimizer
//! state and the training step), [`cli`] (one module per subcommand).

pub mod backend;
pub mod cli;
pub mod tensor;

pub use tensor::{DType, Device, Tensor};
pub mod model;
pub mod train;
