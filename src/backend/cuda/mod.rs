//! The CUDA backend's entry point: finding a usable GPU without ever panicking.
//!
//! cudarc is built with dynamic loading, so the binary builds and starts where no CUDA library exists.
//! cudarc *panics* (rather than returning an error) when `libcuda` cannot be loaded, so every probe first
//! asks `is_culib_present()` and then calls the driver inside `catch_unwind`.
//!
//! - `kernels`: compiles every `kernels/*.cu` with NVRTC (lazily, once per process) and reports the full
//!   compiler log on failure.
//! - `backend`: [`CudaBackend`], the `Backend` implementation (cuBLAS for products, our kernels for the rest).
use std::panic;

pub mod backend;
pub mod failure;
pub mod kernels;

pub use backend::{CudaBackend, CudaError};
pub use kernels::KernelError;

/// What the probe found.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub device_count: usize,
}

/// Why no GPU is used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("no GPU found: the CUDA driver library (libcuda.so.1) could not be loaded")]
    NoDriver,
    #[error("no GPU found: the CUDA driver reports no device ({0})")]
    NoDevice(String),
    #[error("GPU {requested} requested, but only {count} device(s) found")]
    BadOrdinal { requested: usize, count: usize },
    /// Kept for `main.rs` until `--device cuda` is wired to [`CudaBackend`].
    #[error("the CUDA backend is not wired to the command line yet; use --device cpu")]
    NotImplemented,
}

/// Probe for a GPU; never panics.
pub fn probe(ordinal: usize) -> Result<GpuInfo, CudaUnavailable> {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaUnavailable::NoDriver);
    }
    let prev = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let found = panic::catch_unwind(|| -> Result<GpuInfo, CudaUnavailable> {
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| CudaUnavailable::NoDevice(format!("{e:?}")))? as usize;
        if count == 0 {
            return Err(CudaUnavailable::NoDevice("device count 0".into()));
        }
        if ordinal >= count {
            return Err(CudaUnavailable::BadOrdinal { requested: ordinal, count });
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| CudaUnavailable::NoDevice(format!("{e:?}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(GpuInfo { ordinal, name, device_count: count })
    });
    panic::set_hook(prev);
    match found {
        Ok(r) => r,
        Err(_) => Err(CudaUnavailable::NoDriver),
    }
}

/// What the NVRTC probe found: the library's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvrtcInfo {
    pub major: i32,
    pub minor: i32,
}

/// Probe for NVRTC (`libnvrtc.so.13`); never panics. Works without a GPU: NVRTC is a plain library.
pub fn probe_nvrtc() -> Result<NvrtcInfo, String> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc.so.13 could not be loaded (not on LD_LIBRARY_PATH or in the ld.so cache)".into());
    }
    let found = panic::catch_unwind(|| {
        let (mut major, mut minor) = (0i32, 0i32);
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            Ok(NvrtcInfo { major, minor })
        } else {
            Err(format!("nvrtcVersion failed: {r:?}"))
        }
    });
    match found {
        Ok(r) => r,
        Err(_) => Err("libnvrtc.so.13 failed to load".into()),
    }
}
