//! The CUDA backend's entry point: finding a usable GPU without ever panicking.
//!
//! cudarc is built with dynamic loading, so the binary builds and starts where no CUDA library exists.
//! cudarc *panics* (rather than returning an error) when `libcuda` cannot be loaded, so every probe first
//! asks `is_culib_present()` and then calls the driver inside `catch_unwind`.
//! The kernels themselves (`kernels/*.cu`, compiled by NVRTC) are the subject of the CUDA backend issue;
//! until they land, `CudaBackend::new` reports that plainly.
use std::panic;

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
    #[error("the CUDA backend's kernels are not part of this build yet; use --device cpu")]
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
