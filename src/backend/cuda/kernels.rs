//! NVRTC compilation of the embedded `kernels/*.cu` sources (see build.rs).
//!
//! Every family (one `.cu` file) is compiled for `sm_90` (the H200) once per process, lazily, and cached;
//! a compile error carries the full NVRTC log. Headers: the include path comes from
//! `UR4REC_CUDA_INCLUDE` if set, else `/usr/local/cuda/include` (passed only where it exists; the kernels
//! themselves include nothing, so a bare NVRTC suffices). Everything here works without a GPU, which is
//! how CI checks every kernel (tests/nvrtc_compile.rs).
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::panic;
use std::sync::OnceLock;

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The GPU architecture the kernels are compiled for (H200, CUDA 13.0 driver).
pub const ARCH: &str = "sm_90";

#[derive(Clone, Debug, thiserror::Error)]
pub enum KernelError {
    #[error("NVRTC is not available: {0}")]
    NvrtcMissing(String),
    #[error("NVRTC failed to compile kernels/{family}.cu for {arch} (options {options:?}):\n{log}")]
    Compile { family: String, arch: String, options: Vec<String>, log: String },
    #[error("NVRTC call failed for kernels/{family}.cu: {what}")]
    Nvrtc { family: String, what: String },
}

/// What to take out of a compiled program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// PTX text (what the driver JIT-loads at run time).
    Ptx,
    /// Real SASS for `arch` (ptxas runs inside NVRTC), so register and shared-memory limits are checked.
    Cubin,
}

/// The header include directory NVRTC is given, if any.
pub fn include_path() -> Option<String> {
    let dir = std::env::var("UR4REC_CUDA_INCLUDE").unwrap_or_else(|_| "/usr/local/cuda/include".into());
    std::path::Path::new(&dir).is_dir().then_some(dir)
}

/// NVRTC options used for every kernel. Precise division / sqrt (NVRTC's defaults) keep the kernels
/// within rounding of their CPU twins; no fast math.
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    if let Some(inc) = include_path() {
        o.push(format!("--include-path={inc}"));
    }
    o
}

/// The `extern "C" __global__` kernel names a source defines (what the backend loads by name).
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("__global__ void ") {
        rest = &rest[i + "__global__ void ".len()..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compile one source; returns PTX text bytes or a CUBIN image. Never panics: a missing libnvrtc is an
/// error, and every NVRTC call runs inside `catch_unwind` (cudarc panics if the library vanishes).
pub fn compile(family: &str, src: &str, arch: &str, output: Output) -> Result<Vec<u8>, KernelError> {
    crate::backend::cuda::probe_nvrtc().map_err(KernelError::NvrtcMissing)?;
    let family_s = family.to_string();
    // The shared prelude first; `#line` restarts numbering so compile logs point into `{family}.cu`.
    let full = format!("{KERNEL_PRELUDE}\n#line 1 \"{family}.cu\"\n{src}");
    let src_c = CString::new(full).map_err(|_| KernelError::Nvrtc { family: family_s.clone(), what: "source contains NUL".into() })?;
    let name_c = CString::new(format!("{family}.cu")).unwrap();
    let opts = options(arch);
    let r = panic::catch_unwind(|| -> Result<Vec<u8>, KernelError> {
        let nv = |what: &str, e: result::NvrtcError| KernelError::Nvrtc { family: family_s.clone(), what: format!("{what}: {e:?}") };
        let prog = result::create_program(&src_c, Some(name_c.as_c_str())).map_err(|e| nv("create_program", e))?;
        let out = (|| {
            let compiled = unsafe { result::compile_program(prog, &opts) };
            if let Err(_e) = compiled {
                let log = unsafe { result::get_program_log(prog) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
                return Err(KernelError::Compile { family: family_s.clone(), arch: arch.to_string(), options: opts.clone(), log });
            }
            match output {
                Output::Ptx => {
                    let ptx = unsafe { result::get_ptx(prog) }.map_err(|e| nv("get_ptx", e))?;
                    Ok(c_chars_to_string(&ptx).into_bytes())
                }
                Output::Cubin => {
                    let mut size = 0usize;
                    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| nv("nvrtcGetCUBINSize", e))?;
                    let mut buf = vec![0u8; size];
                    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char) }
                        .result()
                        .map_err(|e| nv("nvrtcGetCUBIN", e))?;
                    Ok(buf)
                }
            }
        })();
        let _ = unsafe { result::destroy_program(prog) };
        out
    });
    r.unwrap_or_else(|_| Err(KernelError::NvrtcMissing("NVRTC panicked (library failed to load)".into())))
}

/// `(family, PTX)` for every kernel family, compiled on first use and cached for the process.
pub fn compiled_ptx() -> Result<&'static [(&'static str, String)], KernelError> {
    static CACHE: OnceLock<Result<Vec<(&'static str, String)>, KernelError>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            KERNEL_SOURCES
                .iter()
                .map(|&(family, src)| {
                    let ptx = compile(family, src, ARCH, Output::Ptx)?;
                    Ok((family, String::from_utf8_lossy(&ptx).into_owned()))
                })
                .collect()
        })
        .as_ref()
        .map(|v| v.as_slice())
        .map_err(|e| e.clone())
}
