//! Tensor storage in GPU memory.

use std::fmt;
use std::sync::Arc;

use anyhow::Result;
use bytemuck::Pod;
use cudarc::driver::CudaSlice;

use super::launch::Ptr;
use super::runtime::Gpu;
use crate::tensor::{DType, Device, Storage};

/// `len` elements of `dtype` on one GPU, as untyped bytes: kernels are picked by the dtype, so one
/// path serves every element type.
///
/// Cloning shares the buffer (an `Arc`), so tensors clone as cheaply as they move; the first write
/// through a shared clone copies the buffer on the device first (copy-on-write), so a clone never
/// sees another's writes, exactly as host tensors behave.
#[derive(Clone)]
pub struct CudaStorage {
    gpu: &'static Gpu,
    dtype: DType,
    len: usize,
    buf: Arc<CudaSlice<u8>>,
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaStorage({} × {} on {})",
            self.len,
            self.dtype,
            self.device()
        )
    }
}

impl CudaStorage {
    /// Storage for `len` elements that a kernel is about to write in full (see [`Gpu::alloc`]).
    pub(crate) fn alloc(gpu: &'static Gpu, len: usize, dtype: DType) -> Result<CudaStorage> {
        let buf = gpu.alloc(len * dtype.size_in_bytes())?;
        Ok(CudaStorage::wrap(gpu, dtype, len, buf))
    }

    pub(crate) fn zeros(gpu: &'static Gpu, len: usize, dtype: DType) -> Result<CudaStorage> {
        let buf = gpu.alloc_zeros(len * dtype.size_in_bytes())?;
        Ok(CudaStorage::wrap(gpu, dtype, len, buf))
    }

    /// A copy of `host` on `gpu`: storage already there is shared, storage on another GPU goes
    /// through the host.
    pub(crate) fn upload(gpu: &'static Gpu, host: &Storage) -> Result<CudaStorage> {
        let (dtype, bytes): (DType, &[u8]) = match host {
            Storage::F32(v) => (DType::F32, bytemuck::cast_slice(v)),
            Storage::F64(v) => (DType::F64, bytemuck::cast_slice(v)),
            Storage::BF16(v) => (DType::BF16, bytemuck::cast_slice(v)),
            Storage::F16(v) => (DType::F16, bytemuck::cast_slice(v)),
            Storage::Cuda(s) => return s.copy_to(gpu),
        };
        let len = bytes.len() / dtype.size_in_bytes();
        Ok(CudaStorage::wrap(gpu, dtype, len, gpu.upload(bytes)?))
    }

    /// A host copy, after everything queued on the device.
    pub(crate) fn download(&self) -> Result<Storage> {
        fn read<T: Pod>(s: &CudaStorage) -> Result<Vec<T>> {
            let mut host = vec![T::zeroed(); s.len];
            s.gpu
                .download(&s.buf, bytemuck::cast_slice_mut(&mut host))?;
            Ok(host)
        }
        Ok(match self.dtype {
            DType::F32 => Storage::F32(read(self)?),
            DType::F64 => Storage::F64(read(self)?),
            DType::BF16 => Storage::BF16(read(self)?),
            DType::F16 => Storage::F16(read(self)?),
        })
    }

    /// This storage on `gpu`: shared if it is already there, else copied through the host.
    fn copy_to(&self, gpu: &'static Gpu) -> Result<CudaStorage> {
        if std::ptr::eq(self.gpu, gpu) {
            return Ok(self.clone());
        }
        CudaStorage::upload(gpu, &self.download()?)
    }

    fn wrap(gpu: &'static Gpu, dtype: DType, len: usize, buf: CudaSlice<u8>) -> CudaStorage {
        CudaStorage {
            gpu,
            dtype,
            len,
            buf: Arc::new(buf),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> Device {
        self.gpu.device()
    }

    pub(crate) fn gpu(&self) -> &'static Gpu {
        self.gpu
    }

    /// The address of the elements, for a kernel that reads them.
    pub(crate) fn ptr(&self) -> Ptr {
        self.gpu.ptr(&self.buf)
    }

    /// The address of the elements, for a kernel that writes them: a buffer shared with a clone is
    /// copied first, so the clone keeps its values.
    pub(crate) fn ptr_mut(&mut self) -> Result<Ptr> {
        Ok(self.gpu.ptr(self.buf_mut()?))
    }

    /// Sets every element to zero (all-zero bytes are zero in every dtype).
    pub(crate) fn fill_zero(&mut self) -> Result<()> {
        match Arc::get_mut(&mut self.buf) {
            Some(buf) => self.gpu.memset_zeros(buf),
            // Shared: a fresh zeroed buffer rather than a copy of values about to be overwritten.
            None => {
                let bytes = self.len * self.dtype.size_in_bytes();
                self.buf = Arc::new(self.gpu.alloc_zeros(bytes)?);
                Ok(())
            }
        }
    }

    fn buf_mut(&mut self) -> Result<&mut CudaSlice<u8>> {
        if Arc::get_mut(&mut self.buf).is_none() {
            self.buf = Arc::new(self.gpu.duplicate(&self.buf)?);
        }
        Ok(Arc::get_mut(&mut self.buf).expect("a buffer just copied is not shared"))
    }
}
