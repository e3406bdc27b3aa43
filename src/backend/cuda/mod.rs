//! The CUDA backend. For now it only carries the kernels that build.rs compiled from `kernels/*.cu`:
//! one fatbin (SASS for sm_80 and sm_90, PTX for compute_90) holding every `kdx_*` entry point.

/// The driver reads the fatbin's header as 8-byte words: keep the embedded bytes aligned for it.
#[cfg(kdx_kernels)]
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

#[cfg(kdx_kernels)]
const FATBIN_LEN: usize = include_bytes!(env!("KDX_FATBIN")).len();

/// In the section where nvcc itself puts device code, so `cuobjdump --list-elf target/release/kdx`
/// shows which kernels and architectures a binary carries.
#[cfg(kdx_kernels)]
#[cfg_attr(target_os = "linux", link_section = ".nv_fatbin")]
static FATBIN: Aligned<[u8; FATBIN_LEN]> = Aligned(*include_bytes!(env!("KDX_FATBIN")));

/// The embedded kernel image, ready for `cuModuleLoadData`; `None` when this build has no kernels
/// (no nvcc at build time: see `tools/setup-cuda.sh`).
pub(crate) fn fatbin() -> Option<&'static [u8]> {
    #[cfg(kdx_kernels)]
    {
        Some(&FATBIN.0)
    }
    #[cfg(not(kdx_kernels))]
    {
        None
    }
}
