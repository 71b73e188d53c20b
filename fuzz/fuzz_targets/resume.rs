//! Resume checkpoints (`train::resume::ResumeFile`): opening, the header, restoring parameters, moments and
//! step counts into a small fixed store, the epoch order and a memory bank — every accessor a resumed run
//! calls before it trusts the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::resume::{BankMeta, ResumeFile};
use ur4rec_engine_fuzz::{assert_names_file, scratch_file, two_param_store};

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("resume.safetensors", data);
    let check = |e: anyhow::Error| assert_names_file(&format!("{e:#}"), &path);
    let file = match ResumeFile::open(&path) {
        Ok(f) => f,
        Err(e) => return check(e),
    };
    if let Err(e) = file.info() {
        check(e);
    }
    let be = CpuBackend::new();
    let mut store = two_param_store(&be);
    let mut opt = AdamW::new(2, 0.9, 0.999, 1e-8, 0.0);
    if let Err(e) = file.restore_params(&be, &mut store, &mut opt) {
        check(e);
    }
    if let Err(e) = file.permutation("order", 5) {
        check(e);
    }
    if let Err(e) = file.bank("bank/text", &BankMeta { size: 4, dim: 3, ptr: 1, filled: 2 }, 3, 10) {
        check(e);
    }
});
