//! One device's CUDA runtime: its context and stream, the kernel module, memory, copies and launches.
//!
//! Everything a device does is queued on one stream, in program order, so no operation needs an
//! event or a synchronisation to see the results of the previous ones; the host waits only where it
//! reads a result (a copy to the host, a loss value).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DriverError, LaunchConfig,
};
use cudarc::nvrtc::Ptx;
use sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;

use super::launch::{Arg, Ptr};
use crate::tensor::Device;

/// The CUDA version the kernels are compiled with (tools/setup-cuda.sh): a driver must support it.
const KERNELS_CUDA: (i32, i32) = (13, 0);

/// Which implementation runs matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Gemm {
    /// The engine's own kernels (kernels/gemm.cu).
    #[default]
    Kdx,
    /// NVIDIA's cuBLAS: a baseline to compare the engine's kernels with, end to end.
    Cublas,
}

impl std::str::FromStr for Gemm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Gemm> {
        match s {
            "kdx" => Ok(Gemm::Kdx),
            "cublas" => Ok(Gemm::Cublas),
            _ => bail!("unknown GEMM '{s}': expected 'kdx' or 'cublas'"),
        }
    }
}

/// Dynamic shared memory a kernel may take without raising its limit first.
const DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;

pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Why there are no kernels, when there are none (a CPU-only build, a driver too old for them).
    kernels: Result<Kernels, String>,
    summary: String,
    l2_bytes: usize,
    checked: AtomicBool,
    /// Matrix products on cuBLAS instead of the engine's kernels (`--gemm cublas`, a baseline).
    cublas_gemm: AtomicBool,
    /// The cuBLAS handle on this device's stream, made on first use; or why there is none.
    blas: OnceLock<Result<CudaBlas, String>>,
}

struct Kernels {
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<&'static str, Arc<Function>>>,
}

/// A kernel and the byte size of each of its parameters, as the driver reports them (`None` where
/// it cannot tell).
struct Function {
    function: CudaFunction,
    params: Option<Vec<usize>>,
    /// The most dynamic shared memory launches may ask for so far (raised on demand).
    shared_limit: AtomicU32,
}

impl Gpu {
    /// Creates the device's context and stream and loads the kernels. Fails, saying what is missing,
    /// when there is no driver or no such device; a build or driver without usable kernels still
    /// opens (tensors can be copied), and [`Gpu::kernels_missing`] says why.
    pub(crate) fn open(ordinal: usize) -> Result<Gpu> {
        let device = Device::Cuda(ordinal);
        // SAFETY: only tries to dlopen the driver library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "{device}: no NVIDIA driver on this machine (the dynamic loader finds no libcuda.so): \
                 install the driver, or use --device cpu"
            );
        }
        result::init().map_err(|e| {
            anyhow!(
                "{device}: the NVIDIA driver does not initialise ({}): check that this machine has a \
                 GPU and that this process may use it (nvidia-smi), or use --device cpu",
                error_text(e)
            )
        })?;
        let count =
            result::device::get_count().map_err(|e| failed(device, "counting the GPUs", e))?;
        if ordinal >= count as usize {
            bail!("{device}: this machine has {count} CUDA device(s), numbered from cuda:0");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| failed(device, "creating a context", e))?;
        // cudarc can record a read and a write event on every buffer at every use, so that buffers
        // shared between streams wait for each other. With one stream per device, order is already
        // guaranteed: the events would cost two cuEventRecord per buffer per launch and crowd nsys
        // timelines with event calls between the kernels.
        // SAFETY: no buffer exists in this context yet, and no second stream is ever created in it.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own rather than the legacy default stream, which synchronises with every
        // other stream of the context and cannot be captured into a CUDA graph.
        let stream = ctx
            .new_stream()
            .map_err(|e| failed(device, "creating a stream", e))?;
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx)
                .map_err(|e| failed(device, "configuring the memory pool", e))?;
        }

        let mut driver = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(|e| failed(device, "reading the driver version", e))?;
        let driver = (driver / 1000, driver % 1000 / 10);
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(0);
        let l2_bytes = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .unwrap_or(0)
            .max(0) as usize;
        let summary = format!(
            "{device} ({name}, sm_{major}{minor}, {sms} SMs, driver CUDA {}.{})",
            driver.0, driver.1
        );
        let kernels = load_kernels(&ctx, driver);
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            kernels,
            summary,
            l2_bytes,
            checked: AtomicBool::new(checks_from_env()),
            cublas_gemm: AtomicBool::new(false),
            blas: OnceLock::new(),
        })
    }

    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// The device, its GPU, compute capability, SM count and driver version.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The size of the GPU's L2 cache (0 if the driver does not say).
    pub fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }

    /// Seconds of device time that the work `f` queues takes: CUDA events recorded on the stream
    /// before and after it, then waited for. Work that `f` itself waits for counts too, as do the
    /// gaps between kernels while the host queues the next.
    pub fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream
            .record_event(timing)
            .map_err(|e| self.error("recording a timing event", e))?;
        f()?;
        let end = self
            .stream
            .record_event(timing)
            .map_err(|e| self.error("recording a timing event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| self.error("waiting for timed work", e))?;
        Ok(ms as f64 * 1e-3)
    }

    /// Why this device cannot run kernels, if it cannot.
    pub fn kernels_missing(&self) -> Option<&str> {
        self.kernels.as_ref().err().map(String::as_str)
    }

    /// Checked mode (also `KDX_CUDA_CHECK=1`): waits for every kernel to finish, so an error names
    /// the kernel that caused it rather than a later call, and fills every freshly allocated output
    /// with NaN, so an element a kernel forgets to write shows. For tests and debugging: it
    /// serialises the host with the GPU.
    pub fn set_checked(&self, on: bool) {
        self.checked.store(on, Ordering::Relaxed);
    }

    fn checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }

    /// Which GEMM matrix products run on from now on.
    pub fn set_gemm(&self, gemm: Gemm) -> Result<()> {
        if gemm == Gemm::Cublas {
            self.blas()?;
        }
        self.cublas_gemm
            .store(gemm == Gemm::Cublas, Ordering::Relaxed);
        Ok(())
    }

    pub fn gemm(&self) -> Gemm {
        if self.cublas_gemm.load(Ordering::Relaxed) {
            Gemm::Cublas
        } else {
            Gemm::Kdx
        }
    }

    /// cuBLAS on this device's stream, loaded at run time on first use; fails (saying how to fix
    /// it) where the dynamic loader finds no libcublas.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        let made = self.blas.get_or_init(|| {
            // SAFETY: only tries to dlopen libcublas under its usual names.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(
                    "the dynamic loader finds no libcublas (libcublas.so.13 and its \
                            libcublasLt): add their folder to LD_LIBRARY_PATH"
                        .to_string(),
                );
            }
            CudaBlas::new(self.stream.clone())
                .map_err(|e| format!("creating a cuBLAS handle: {e:?}"))
        });
        made.as_ref()
            .map_err(|why| anyhow!("{}: {why}", self.device()))
    }

    /// `bytes` of device memory with unspecified contents (NaN bytes in checked mode), for a kernel
    /// to write in full. Never empty: a zero-byte request gets one byte, so every buffer has an
    /// address.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: device memory of any content is valid bytes; every caller's kernel writes what
        // is read later.
        let buf = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(|e| self.error(&format!("allocating {bytes} bytes"), e))?;
        if self.checked() {
            // 0xFF bytes read as NaN in f32, bf16, f16 and f64.
            let (ptr, _) = buf.device_ptr(&self.stream);
            // SAFETY: `ptr` is the start of `buf`, which holds `bytes.max(1)` bytes on this stream.
            unsafe { result::memset_d8_async(ptr, 0xFF, bytes.max(1), self.stream.cu_stream()) }
                .map_err(|e| self.error("filling a new buffer with NaN", e))?;
        }
        Ok(buf)
    }

    /// `bytes` of zeroed device memory.
    pub(crate) fn alloc_zeros(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        let mut buf = self.alloc(bytes)?;
        self.memset_zeros(&mut buf)?;
        Ok(buf)
    }

    pub(crate) fn memset_zeros(&self, buf: &mut CudaSlice<u8>) -> Result<()> {
        self.stream
            .memset_zeros(buf)
            .map_err(|e| self.error("zeroing a buffer", e))
    }

    /// A new device buffer holding `bytes`. Returns once the host memory may be reused (the driver
    /// stages pageable memory before returning).
    pub(crate) fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        let mut buf = self.alloc(bytes.len())?;
        if !bytes.is_empty() {
            self.stream
                .memcpy_htod(bytes, &mut buf)
                .map_err(|e| self.error(&format!("copying {} bytes to the GPU", bytes.len()), e))?;
        }
        Ok(buf)
    }

    /// Copies the first `out.len()` bytes of `buf` to the host, after everything queued before.
    pub(crate) fn download(&self, buf: &CudaSlice<u8>, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let what = format!("copying {} bytes from the GPU", out.len());
        self.stream
            .memcpy_dtoh(&buf.slice(..out.len()), out)
            .map_err(|e| self.error(&what, e))?;
        // A copy into pageable memory has finished when the call returns; the synchronisation
        // reports an error of any kernel before it here rather than at some later call.
        self.synchronize(&what)
    }

    /// A device-side copy of `buf` (copy-on-write of shared tensor storage).
    pub(crate) fn duplicate(&self, buf: &CudaSlice<u8>) -> Result<CudaSlice<u8>> {
        let mut copy = self.alloc(buf.len())?;
        self.copy(buf, &mut copy)?;
        Ok(copy)
    }

    /// Copies `src` into the start of `dst` on the device.
    pub(crate) fn copy(&self, src: &CudaSlice<u8>, dst: &mut CudaSlice<u8>) -> Result<()> {
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(|e| self.error("copying a buffer on the GPU", e))
    }

    /// The address of `buf` for a kernel argument.
    pub(crate) fn ptr(&self, buf: &CudaSlice<u8>) -> Ptr {
        // Without event tracking the guard that comes with the address records nothing.
        let (ptr, _guard) = buf.device_ptr(&self.stream);
        Ptr(ptr)
    }

    /// Waits for everything queued on the device; `what` names the operation in an error.
    pub(crate) fn synchronize(&self, what: &str) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            anyhow!(
                "{}: {what}: {} (a kernel queued earlier may have failed: rerun with \
                 KDX_CUDA_CHECK=1 to name it)",
                self.device(),
                error_text(e)
            )
        })
    }

    /// Launches `kernel` with `config` and `args`; use it through the `launch!` macro. A launch with
    /// no blocks is skipped (empty tensors).
    ///
    /// # Safety
    /// The arguments must have the C types of the kernel's parameters, in order, and every buffer
    /// must hold what the launch reads and writes.
    pub(crate) unsafe fn launch(
        &self,
        kernel: &'static str,
        config: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let (grid, block) = (config.grid_dim, config.block_dim);
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let function = self.function(kernel)?;
        if let Some(params) = &function.params {
            if args.len() != params.len() || args.iter().zip(params).any(|(a, &p)| a.size != p) {
                let sizes: Vec<usize> = args.iter().map(|a| a.size).collect();
                bail!(
                    "CUDA kernel {kernel}: called with arguments of {sizes:?} bytes, but its \
                     parameters are {params:?} bytes: the Rust call and kernels/*.cu disagree"
                );
            }
        }
        let mut values: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.value).collect();
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.error(&format!("binding the context for CUDA kernel {kernel}"), e))?;
        if config.shared_mem_bytes > function.shared_limit.load(Ordering::Relaxed) {
            function
                .function
                .set_attribute(
                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    config.shared_mem_bytes as i32,
                )
                .map_err(|e| {
                    self.error(
                        &format!(
                            "allowing CUDA kernel {kernel} {} bytes of dynamic shared memory",
                            config.shared_mem_bytes
                        ),
                        e,
                    )
                })?;
            function
                .shared_limit
                .store(config.shared_mem_bytes, Ordering::Relaxed);
        }
        result::launch_kernel(
            function.function.cu_function(),
            grid,
            block,
            config.shared_mem_bytes,
            self.stream.cu_stream(),
            &mut values,
        )
        .map_err(|e| {
            anyhow!(
                "{}: CUDA kernel {kernel} (grid {grid:?}, block {block:?}) does not launch: {}",
                self.device(),
                error_text(e)
            )
        })?;
        if self.checked() {
            self.stream.synchronize().map_err(|e| {
                anyhow!(
                    "{}: CUDA kernel {kernel} (grid {grid:?}, block {block:?}) failed: {}",
                    self.device(),
                    error_text(e)
                )
            })?;
        }
        Ok(())
    }

    /// The kernel called `name`, loaded from the module on first use.
    fn function(&self, name: &'static str) -> Result<Arc<Function>> {
        let kernels = self
            .kernels
            .as_ref()
            .map_err(|why| anyhow!("{}: {why}", self.device()))?;
        let mut cache = kernels
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let function = kernels.module.load_function(name).map_err(|e| {
            anyhow!(
                "CUDA kernel {name} is not in the embedded kernels ({}): kernels/*.cu and \
                 src/backend/cuda disagree",
                error_text(e)
            )
        })?;
        let f = Arc::new(Function {
            params: param_sizes(&function),
            function,
            shared_limit: AtomicU32::new(DEFAULT_DYNAMIC_SHARED),
        });
        cache.insert(name, f.clone());
        Ok(f)
    }

    fn error(&self, what: &str, e: DriverError) -> anyhow::Error {
        failed(self.device(), what, e)
    }
}

/// Buffers come from the device's default memory pool (`cuMemAllocAsync`), which by default gives
/// freed memory back to the driver at every synchronisation: each training step would map and
/// unmap its activations again. Keeping it, as PyTorch's caching allocator does, makes allocations
/// after the first step nearly free; the cost is memory that stays reserved at the peak of a step.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), DriverError> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold is a cuuint64_t, read through the pointer during the call.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
}

/// `KDX_CUDA_CHECK` set to anything but empty, 0, false or no.
fn checks_from_env() -> bool {
    std::env::var("KDX_CUDA_CHECK")
        .map(|v| !matches!(v.trim(), "" | "0" | "false" | "no"))
        .unwrap_or(false)
}

fn load_kernels(ctx: &Arc<CudaContext>, driver: (i32, i32)) -> Result<Kernels, String> {
    let Some(image) = super::fatbin() else {
        return Err(
            "this build has no CUDA kernels (nvcc was not found when it was built): run \
                    tools/setup-cuda.sh and rebuild, or use --device cpu"
                .into(),
        );
    };
    if driver < KERNELS_CUDA {
        return Err(format!(
            "the kernels are built with CUDA {}.{} but the driver supports CUDA {}.{}: update the \
             NVIDIA driver, or use --device cpu",
            KERNELS_CUDA.0, KERNELS_CUDA.1, driver.0, driver.1
        ));
    }
    // The driver reads the image as 8-byte words. `from_binary` takes a Vec, whose heap block the
    // system allocator aligns to 16 bytes; checked rather than assumed.
    let copy = image.to_vec();
    if !(copy.as_ptr() as usize).is_multiple_of(8) {
        return Err("the copy of the kernel image is not 8-byte aligned".into());
    }
    let module = ctx.load_module(Ptx::from_binary(copy)).map_err(|e| {
        format!(
            "the kernels do not load on this GPU ({}): they are built for sm_80 and sm_90, plus \
             PTX that newer GPUs compile",
            error_text(e)
        )
    })?;
    Ok(Kernels {
        module,
        functions: Mutex::new(HashMap::new()),
    })
}

/// The size of each parameter of `function`, or `None` when the driver cannot say (then launches go
/// unchecked).
fn param_sizes(function: &CudaFunction) -> Option<Vec<usize>> {
    let mut sizes = Vec::new();
    // The driver answers an error past the last parameter; kdx kernels have far fewer than 64.
    while sizes.len() < 64 {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: a loaded function and two out-parameters.
        let status = unsafe {
            sys::cuFuncGetParamInfo(function.cu_function(), sizes.len(), &mut offset, &mut size)
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            break;
        }
        sizes.push(size);
    }
    (!sizes.is_empty()).then_some(sizes)
}

fn failed(device: Device, what: &str, e: DriverError) -> anyhow::Error {
    anyhow!("{device}: {what}: {}", error_text(e))
}

/// The driver's name and description of an error, e.g. `CUDA_ERROR_OUT_OF_MEMORY (out of memory)`.
fn error_text(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}
