//! The TOML configuration: `Config::from_file` on the input; where it loads, the input's lines after the
//! first NUL byte are applied as `section.key=value` overrides, and the result must survive a round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::config::Config;
use ur4rec_engine_fuzz::{assert_names_file, scratch_file};

fuzz_target!(|data: &[u8]| {
    let (file, overrides) = match data.iter().position(|&b| b == 0) {
        Some(p) => (&data[..p], &data[p + 1..]),
        None => (data, &[][..]),
    };
    let path = scratch_file("c.toml", file);
    match Config::from_file(&path, "default") {
        Ok(mut c) => {
            let text = String::from_utf8_lossy(overrides);
            let list: Vec<String> = text.lines().map(String::from).collect();
            if c.apply_overrides(&list).is_ok() {
                // What `train` writes into the run directory must read back as the same configuration.
                let again = scratch_file("again.toml", c.to_toml().as_bytes());
                let back = Config::from_file(&again, "default").expect("resolved config reads back");
                // NaN floats are the one value that never equals itself.
                if !c.to_toml().contains("nan") {
                    assert_eq!(back, c);
                }
            }
        }
        Err(e) => assert_names_file(&e, &path),
    }
});
