//! `Tensor` = storage + shape; the dtype lives in the storage variant so it cannot disagree with the data.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

use crate::backend::cpu::simd::Real;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// CPU only: the reference precision for gradient checks.
    F64,
    BF16,
    F16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal)),
                _ => bail!("unknown device '{s}': expected 'cpu', 'cuda' or 'cuda:N'"),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Host memory, one variant per dtype.
#[derive(Clone, Debug)]
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }

    fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
}

impl Tensor {
    pub fn new(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        ensure!(
            storage.len() == numel,
            "tensor data has {} elements but shape {:?} needs {numel}",
            storage.len(),
            shape
        );
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
        })
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F64 => Storage::F64(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        };
        Tensor {
            storage,
            shape: shape.to_vec(),
        }
    }

    pub fn from_vec<T: Real>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        Tensor::new(T::wrap(data), shape)
    }

    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::new(Storage::F32(data.to_vec()), shape)?.to_dtype(dtype)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn device(&self) -> Device {
        Device::Cpu
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Size of the last dimension and the number of rows before it.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.numel() / cols.max(1), cols)
    }

    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        ensure!(
            shape.iter().product::<usize>() == self.numel(),
            "cannot reshape {:?} into {:?}",
            self.shape,
            shape
        );
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The elements as a typed slice; an error if the tensor has another dtype.
    pub fn data<T: Real>(&self) -> Result<&[T]> {
        match T::view(&self.storage) {
            Some(s) => Ok(s),
            None => bail!(
                "expected a {} tensor, found {} {:?}",
                T::DTYPE,
                self.dtype(),
                self.shape
            ),
        }
    }

    pub fn data_mut<T: Real>(&mut self) -> Result<&mut [T]> {
        let (dtype, shape) = (self.dtype(), self.shape.clone());
        match T::view_mut(&mut self.storage) {
            Some(s) => Ok(s),
            None => bail!("expected a {} tensor, found {dtype} {shape:?}", T::DTYPE),
        }
    }

    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn to_vec_f64(&self) -> Vec<f64> {
        match &self.storage {
            Storage::F64(v) => v.clone(),
            _ => self.to_vec_f32().into_iter().map(f64::from).collect(),
        }
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = match (dtype, &self.storage) {
            (DType::F64, _) => Storage::F64(self.to_vec_f64()),
            (DType::F32, Storage::F64(v)) => Storage::F32(v.iter().map(|&x| x as f32).collect()),
            (DType::F32, _) => Storage::F32(self.to_vec_f32()),
            (DType::BF16, Storage::F64(v)) => {
                Storage::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect())
            }
            (DType::BF16, _) => {
                Storage::BF16(self.to_vec_f32().into_iter().map(bf16::from_f32).collect())
            }
            (DType::F16, Storage::F64(v)) => {
                Storage::F16(v.iter().map(|&x| f16::from_f64(x)).collect())
            }
            (DType::F16, _) => {
                Storage::F16(self.to_vec_f32().into_iter().map(f16::from_f32).collect())
            }
        };
        Tensor::new(storage, &self.shape)
    }

    pub fn zeros_like(&self) -> Tensor {
        Tensor::zeros(&self.shape, self.dtype())
    }

    /// Sets every element to zero, keeping the allocation (gradient buffers between steps).
    pub fn fill_zero(&mut self) {
        match &mut self.storage {
            Storage::F32(v) => v.fill(0.0),
            Storage::F64(v) => v.fill(0.0),
            Storage::BF16(v) => v.fill(bf16::ZERO),
            Storage::F16(v) => v.fill(f16::ZERO),
        }
    }
}
