//! Checkpoint loading (`checkpoint::load_params`) into a small fixed parameter store, through the public API.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::checkpoint::load_params;
use ur4rec_engine_fuzz::{assert_names_file, scratch_file, two_param_store};

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("p.safetensors", data);
    let be = CpuBackend::new();
    let mut store = two_param_store(&be);
    if let Err(e) = load_params(&be, &mut store, &path) {
        assert_names_file(&e.to_string(), &path);
    }
});
