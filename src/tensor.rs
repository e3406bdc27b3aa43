//! `Tensor` = storage + shape; the dtype lives in the storage variant so it cannot disagree with the data.
//!
//! Storage is host memory (one variant per dtype) or GPU memory ([`CudaStorage`]). Host code reads
//! and writes the elements through [`Tensor::data`] / [`Tensor::data_mut`], which refuse device
//! tensors with an error saying how to copy them ([`Tensor::to_device`]); the backend of a device
//! works on its tensors in place.

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, ensure, Result};
use half::{bf16, f16};

use crate::backend::cpu::simd::Real;
use crate::backend::cuda::{self, CudaStorage};

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

/// Host memory, one variant per dtype, or GPU memory.
#[derive(Clone, Debug)]
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// On a GPU; clones share the buffer until one of them is written (see [`CudaStorage`]).
    Cuda(CudaStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            Storage::Cuda(s) => s.dtype(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::Cuda(s) => s.len(),
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

    /// Zeros on `device` (the host, or GPU memory there).
    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(Tensor::zeros(shape, dtype)),
            Device::Cuda(ordinal) => {
                let storage =
                    CudaStorage::zeros(cuda::gpu(ordinal)?, shape.iter().product(), dtype)?;
                Tensor::new(Storage::Cuda(storage), shape)
            }
        }
    }

    /// Zeros in host memory.
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
        match &self.storage {
            Storage::Cuda(s) => s.device(),
            _ => Device::Cpu,
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The GPU storage of a device tensor, for the backend that writes it.
    pub(crate) fn cuda_storage_mut(&mut self) -> Option<&mut CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }

    /// This tensor on `device`: a copy between the host and a GPU (or between GPUs, through the
    /// host), or a clone where it already is (cheap on a GPU, where clones share the buffer). A copy
    /// to the host waits for the GPU work that produces the tensor.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let storage = match device {
            Device::Cpu => match &self.storage {
                Storage::Cuda(s) => s.download()?,
                _ => return Ok(self.clone()),
            },
            Device::Cuda(ordinal) => {
                Storage::Cuda(CudaStorage::upload(cuda::gpu(ordinal)?, &self.storage)?)
            }
        };
        Tensor::new(storage, &self.shape)
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

    /// The elements of a host tensor as a typed slice; an error if the tensor has another dtype or
    /// is on a GPU.
    pub fn data<T: Real>(&self) -> Result<&[T]> {
        match T::view(&self.storage) {
            Some(s) => Ok(s),
            None => Err(not_host_data(
                T::DTYPE,
                self.dtype(),
                self.device(),
                &self.shape,
            )),
        }
    }

    pub fn data_mut<T: Real>(&mut self) -> Result<&mut [T]> {
        let (dtype, device) = (self.dtype(), self.device());
        match T::view_mut(&mut self.storage) {
            Some(s) => Ok(s),
            None => Err(not_host_data(T::DTYPE, dtype, device, &self.shape)),
        }
    }

    /// The elements widened to f32. A GPU tensor is copied to the host first, which waits for the
    /// device; if the device fails (an earlier kernel's error, a lost GPU) this panics: use
    /// [`Tensor::to_device`] to handle that as an error.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::Cuda(_) => self.on_host().to_vec_f32(),
        }
    }

    /// The elements widened to f64; a GPU tensor is copied to the host first (see
    /// [`Tensor::to_vec_f32`]).
    pub fn to_vec_f64(&self) -> Vec<f64> {
        match &self.storage {
            Storage::F64(v) => v.clone(),
            Storage::Cuda(_) => self.on_host().to_vec_f64(),
            _ => self.to_vec_f32().into_iter().map(f64::from).collect(),
        }
    }

    /// A host copy of a GPU tensor, for the methods that cannot return an error.
    fn on_host(&self) -> Tensor {
        self.to_device(Device::Cpu)
            .unwrap_or_else(|e| panic!("copying a tensor to the host: {e:#}"))
    }

    /// The elements converted to `dtype`. On a GPU, f32 ↔ bf16 converts there; other conversions
    /// take the host path (copy with `to_device(Device::Cpu)` first).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = match (dtype, &self.storage) {
            (_, Storage::Cuda(s)) => Storage::Cuda(cuda::convert(s, dtype)?),
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

    /// Zeros of the same shape and dtype on the same device. Running out of GPU memory (or any
    /// other device failure) panics here, as running out of host memory does: use
    /// [`Tensor::zeros_on`] to handle it.
    pub fn zeros_like(&self) -> Tensor {
        match self.device() {
            Device::Cpu => Tensor::zeros(&self.shape, self.dtype()),
            device => Tensor::zeros_on(&self.shape, self.dtype(), device)
                .unwrap_or_else(|e| panic!("zeros_like: {e:#}")),
        }
    }

    /// Sets every element to zero, keeping the allocation (gradient buffers between steps). On a
    /// GPU the zeroing is queued on the device; if the device fails this panics, as
    /// [`Tensor::zeros_like`] does.
    pub fn fill_zero(&mut self) {
        match &mut self.storage {
            Storage::F32(v) => v.fill(0.0),
            Storage::F64(v) => v.fill(0.0),
            Storage::BF16(v) => v.fill(bf16::ZERO),
            Storage::F16(v) => v.fill(f16::ZERO),
            Storage::Cuda(s) => s.fill_zero().unwrap_or_else(|e| panic!("fill_zero: {e:#}")),
        }
    }
}

/// Why a tensor's elements cannot be viewed as host `want` data.
#[cold]
fn not_host_data(want: DType, dtype: DType, device: Device, shape: &[usize]) -> anyhow::Error {
    match device {
        Device::Cpu => anyhow!("expected a {want} tensor, found {dtype} {shape:?}"),
        Device::Cuda(_) => anyhow!(
            "expected {want} data in host memory, but this {dtype} {shape:?} tensor is on {device}: \
             copy it to the CPU with to_device(Device::Cpu)"
        ),
    }
}
