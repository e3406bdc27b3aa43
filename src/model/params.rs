//! A model's parameters as one ordered list of named tensors. Layers refer to them by [`ParamId`];
//! gradients and optimizer moments are stores of the same layout, so loading, saving and the optimizer
//! walk one list instead of every layer's fields.

use std::ops::{Index, IndexMut};

use anyhow::Result;

use crate::backend::mix64;
use crate::tensor::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(usize);

/// How a parameter is initialised when a model is built from scratch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, σ²), BERT's `initializer_range`.
    Normal(f32),
    Zeros,
    Ones,
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    names: Vec<String>,
    inits: Vec<Init>,
    tensors: Vec<Tensor>,
}

impl ParamStore {
    pub fn new() -> ParamStore {
        ParamStore::default()
    }

    /// Registers a parameter (zero-filled until loaded or initialised).
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> ParamId {
        self.names.push(name.into());
        self.inits.push(init);
        self.tensors.push(Tensor::zeros(shape, DType::F32));
        ParamId(self.tensors.len() - 1)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.tensors.len()).map(ParamId)
    }

    pub fn name(&self, id: ParamId) -> &str {
        &self.names[id.0]
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.tensors.iter_mut())
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(Tensor::numel).sum()
    }

    /// Fills every parameter per its [`Init`], from `seed` (each tensor has its own stream, so adding a
    /// parameter does not change the others).
    pub fn initialise(&mut self, seed: u64) -> Result<()> {
        for (i, (t, init)) in self.tensors.iter_mut().zip(&self.inits).enumerate() {
            let n = t.numel();
            let values: Vec<f32> = match *init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => {
                    let mut rng = Rng::new(seed ^ mix64(i as u64 + 1));
                    (0..n).map(|_| rng.normal() * std).collect()
                }
            };
            *t = Tensor::from_f32(&values, t.shape(), t.dtype())?;
        }
        Ok(())
    }

    /// Same names and shapes, all zeros, in `dtype`: gradient and moment buffers.
    pub fn zeros_like(&self) -> ParamStore {
        ParamStore {
            names: self.names.clone(),
            inits: self.inits.clone(),
            tensors: self.tensors.iter().map(Tensor::zeros_like).collect(),
        }
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<ParamStore> {
        self.map_tensors(|t| t.to_dtype(dtype))
    }

    /// Every tensor moved to `device` (host or GPU memory).
    pub fn to_device(&self, device: Device) -> Result<ParamStore> {
        self.map_tensors(|t| t.to_device(device))
    }

    /// The same names and initialisers over `f` of each tensor.
    fn map_tensors(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<ParamStore> {
        Ok(ParamStore {
            names: self.names.clone(),
            inits: self.inits.clone(),
            tensors: self.tensors.iter().map(f).collect::<Result<_>>()?,
        })
    }

    pub fn fill_zero(&mut self) {
        self.tensors.iter_mut().for_each(Tensor::fill_zero);
    }

    /// Two distinct parameters mutably at once (a weight's and a bias's gradient).
    pub fn pair_mut(&mut self, a: ParamId, b: ParamId) -> (&mut Tensor, &mut Tensor) {
        assert_ne!(a, b, "pair_mut needs two different parameters");
        if a.0 < b.0 {
            let (lo, hi) = self.tensors.split_at_mut(b.0);
            (&mut lo[a.0], &mut hi[0])
        } else {
            let (lo, hi) = self.tensors.split_at_mut(a.0);
            (&mut hi[0], &mut lo[b.0])
        }
    }
}

impl Index<ParamId> for ParamStore {
    type Output = Tensor;
    fn index(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.0]
    }
}

impl IndexMut<ParamId> for ParamStore {
    fn index_mut(&mut self, id: ParamId) -> &mut Tensor {
        &mut self.tensors[id.0]
    }
}

/// A small seeded generator (SplitMix64 stream) for initialisation and test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fisher–Yates, from the back: for `i` from `len − 1` down to 1, swap `v[i]` with
    /// `v[below(i + 1)]`. The data splits depend on this exact sequence of draws.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}
