//! Embeds every `kernels/*.cu` file into the binary as a `(name, source)` table, plus the shared prelude
//! `kernels/common.cuh`, so NVRTC can compile them at run time without the source tree being present.
use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let mut entries: Vec<(String, String)> = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("cu") {
                println!("cargo:rerun-if-changed={}", p.display());
                let name = p.file_stem().unwrap().to_string_lossy().to_string();
                let abs = fs::canonicalize(&p).unwrap();
                entries.push((name, abs.to_string_lossy().to_string()));
            }
        }
    }
    entries.sort();
    // The shared prelude (kernels/common.cuh) every family is compiled with.
    let prelude = fs::canonicalize(dir.join("common.cuh")).expect("kernels/common.cuh is missing");
    println!("cargo:rerun-if-changed={}", prelude.display());
    let mut out = format!("/// The prelude (`kernels/common.cuh`) prepended to every kernel family before NVRTC compiles it.\n\
                           pub const KERNEL_PRELUDE: &str = include_str!({:?});\n", prelude.to_string_lossy());
    out.push_str("/// `(kernel family, CUDA source)` for every `.cu` file in `kernels/`.\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    for (name, path) in &entries {
        out.push_str(&format!("    ({name:?}, include_str!({path:?})),\n"));
    }
    out.push_str("];\n");
    let dest = Path::new(&env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    fs::write(dest, out).unwrap();
}
