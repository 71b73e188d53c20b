//! Helpers shared by the fuzz targets.
//!
//! The readers under test take paths (they stream or stat the file), so each input is written to a scratch
//! file first. One file per target and process, reused for every input: libFuzzer runs inputs one at a time
//! in a process, and `-fork`/`-jobs` runs get a different process id.
use std::path::PathBuf;

/// Writes `bytes` to this process's scratch file `name` (under /dev/shm when it exists, so the write is a
/// memory copy rather than disk I/O) and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("ur4rec-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write scratch file");
    p
}

/// Every error message must name the file it is about: the property the corpus test checks, checked here
/// on every input the fuzzer makes up.
pub fn assert_names_file(msg: &str, file: &std::path::Path) {
    let shown = file.display().to_string();
    assert!(msg.contains(&shown), "error does not name the file {shown}: {msg}");
}

/// The parameter store the checkpoint and resume seeds are for: f32 `w [2, 3]` and `b [3]`, all zero.
pub fn two_param_store(be: &ur4rec_engine::backend::CpuBackend) -> ur4rec_engine::params::ParamStore<ur4rec_engine::backend::CpuBackend> {
    use ur4rec_engine::params::{Init, ParamBuilder};
    let mut rng = ur4rec_engine::rng::Rng::new(1);
    let mut b = ParamBuilder::new();
    b.add("g", "w", &[2, 3], Init::Zeros, &mut rng);
    b.add("g", "b", &[3], Init::Zeros, &mut rng);
    b.build(be)
}
