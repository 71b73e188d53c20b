//! Checkpoint loading (`checkpoint::load_params`) into a small fixed parameter store, through the public API.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::checkpoint::load_params;
use ur4rec_engine::params::{Init, ParamBuilder};
use ur4rec_engine::rng::Rng;
use ur4rec_engine_fuzz::{assert_names_file, scratch_file};

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("p.safetensors", data);
    let be = CpuBackend::new();
    let mut rng = Rng::new(1);
    let mut b = ParamBuilder::new();
    // Names and shapes the seeds use (fuzz/seeds/checkpoint).
    b.add("g", "w", &[2, 3], Init::Zeros, &mut rng);
    b.add("g", "b", &[3], Init::Zeros, &mut rng);
    let mut store = b.build(&be);
    if let Err(e) = load_params(&be, &mut store, &path) {
        assert_names_file(&e.to_string(), &path);
    }
});
