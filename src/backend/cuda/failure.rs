//! Turning a GPU failure in the middle of a run into a clear message instead of a panic.
//!
//! The `Backend` methods have no error channel (see `backend.rs`): a driver error after a successful start
//! — out of memory, an illegal address, a launch failure — panics inside the CUDA backend with the
//! driver's error code. [`run_guarded`] runs a whole job under `catch_unwind` with a silent panic hook and
//! returns such a panic as an error that says what happened and what to do ([`explain`]). The run's last
//! resume checkpoint is intact in either case (checkpoints are written atomically).
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;

/// What the user should do about a CUDA driver error, from its message (which names the error code).
pub fn advice(msg: &str) -> &'static str {
    if msg.contains("OUT_OF_MEMORY") {
        "the GPU ran out of memory: lower train.batch_size, sasrec.max_len or ur4rec.bank_size, store the bank in \
         half precision (ur4rec.bank_format = \"bf16\"), or use --device cpu"
    } else if msg.contains("UNSUPPORTED_PTX_VERSION") || msg.contains("INVALID_PTX") {
        "the CUDA driver is older than the NVRTC that compiled the kernels (CUDA 13 needs driver 580 or newer): \
         update the driver or use --device cpu"
    } else if msg.contains("NO_BINARY_FOR_GPU") || msg.contains("INVALID_IMAGE") {
        "the kernels were compiled for another GPU architecture: use --device cpu"
    } else if msg.contains("ILLEGAL_ADDRESS") || msg.contains("LAUNCH_FAILED") || msg.contains("MISALIGNED") {
        "a kernel faulted — an engine bug; please report it with the run's config.toml; use --device cpu meanwhile"
    } else {
        "an unexpected GPU error; use --device cpu to continue"
    }
}

/// The message for a GPU failure in the middle of a run, from the panic message.
pub fn explain(msg: &str) -> String {
    format!("GPU failure: {msg}\n  {}", advice(msg))
}

/// Runs `job`; a panic inside it becomes `Err` with [`explain`]'s message (and no panic report on stderr).
pub fn run_guarded<T>(job: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    static LAST: Mutex<Option<String>> = Mutex::new(None);
    let prev = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<String>().cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        let at = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg}{at}"));
    }));
    let r = panic::catch_unwind(AssertUnwindSafe(job));
    panic::set_hook(prev);
    match r {
        Ok(r) => r,
        Err(_) => {
            let msg = LAST.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            Err(anyhow::anyhow!(explain(&msg)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_driver_failure_gets_its_advice() {
        let oom = explain("CUDA backend: alloc failed: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(oom.starts_with("GPU failure: CUDA backend: alloc failed") && oom.contains("ran out of memory")
                && oom.contains("train.batch_size"), "{oom}");
        assert!(explain("loading kernels/attention.cu: DriverError(CUDA_ERROR_UNSUPPORTED_PTX_VERSION, ..)")
            .contains("driver is older"));
        assert!(explain("CUDA backend: attention_fwd failed: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, ..)")
            .contains("engine bug"));
        assert!(explain("something else").contains("--device cpu"));
    }

    #[test]
    fn a_panic_in_the_job_becomes_an_error_with_its_message() {
        let r: anyhow::Result<()> = run_guarded(|| panic!("CUDA backend: alloc failed: CUDA_ERROR_OUT_OF_MEMORY"));
        let msg = format!("{:#}", r.unwrap_err());
        assert!(msg.contains("CUDA_ERROR_OUT_OF_MEMORY") && msg.contains("ran out of memory") && msg.contains("failure.rs"),
                "{msg}");
        assert_eq!(run_guarded(|| Ok(7)).unwrap(), 7);
        assert!(run_guarded(|| -> anyhow::Result<()> { anyhow::bail!("plain error") }).unwrap_err().to_string() == "plain error");
    }
}
