//! `--device` choices and CUDA failures through the binary, with the CUDA libraries absent (this machine
//! and CI have no driver; `LD_LIBRARY_PATH` is emptied to take NVRTC away too): every case ends in a clear
//! message or a clean CPU fallback, never a panic. With a GPU present these tests print why they skip the
//! cases that need its absence. The failures that need a GPU to happen (out of memory, a driver older than
//! the PTX, a faulting kernel) are mapped to their advice in `src/backend/cuda/failure.rs`'s unit tests.
use std::process::{Command, Output};
use ur4rec_engine::backend::cuda;

const BIN: &str = env!("CARGO_BIN_EXE_ur4rec-engine");

fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let out_dir = std::env::temp_dir().join(format!("ur4rec-device-errors-{}-{}", std::process::id(), args.join("_").replace(['/', ':'], "-")));
    let mut c = Command::new(BIN);
    c.args(args);
    if args.first() == Some(&"train") {
        // One step of the default job is enough to see which device ran it.
        c.args(["--quiet", "--stop-after-steps", "1", "--out", &out_dir.display().to_string(), "data.synthetic_users=50"]);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "{args:?} panicked:\n{text}");
    (out, text)
}

fn no_gpu() -> bool {
    match cuda::probe(0) {
        Ok(g) => {
            println!("skipped: a GPU is present ({}); these cases need its absence", g.name);
            false
        }
        Err(_) => true,
    }
}

#[test]
fn device_cuda_without_a_driver_is_a_clear_error() {
    if !no_gpu() {
        return;
    }
    for dev in ["cuda", "cuda:0", "cuda:3"] {
        let (out, text) = run(&["train", "--device", dev], &[]);
        assert_eq!(out.status.code(), Some(1), "--device {dev}: {text}");
        assert!(text.contains(&format!("error: --device {dev}: no GPU found")) && text.contains("libcuda.so.1"), "{text}");
    }
}

#[test]
fn device_auto_falls_back_to_the_cpu_and_says_why() {
    if !no_gpu() {
        return;
    }
    let (out, text) = run(&["train", "--device", "auto"], &[]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("device: cpu (no GPU found: the CUDA driver library (libcuda.so.1) could not be loaded)"), "{text}");
    assert!(text.contains("stopped at the requested step limit at step 1"), "{text}");
    // Asked to use a GPU, and none starts: still the CPU, with the reason.
    let (out, text) = run(&["train", "--device", "auto"], &[("UR4REC_ENABLE_CUDA", "1")]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("device: cpu (UR4REC_ENABLE_CUDA=1 but the CUDA backend did not start: no GPU found"), "{text}");
}

#[test]
fn a_bad_device_name_lists_the_choices() {
    let (out, text) = run(&["train", "--device", "tpu"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("--device tpu: expected auto, cpu, cuda or cuda:N"), "{text}");
    let (out, text) = run(&["train", "--device", "cuda:x"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("--device cuda:x: bad GPU ordinal"), "{text}");
}

#[test]
fn info_reports_missing_libraries_without_failing() {
    // NVRTC taken away: the wheel CI installs is found only through LD_LIBRARY_PATH.
    let (out, text) = run(&["info"], &[("LD_LIBRARY_PATH", "")]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("GPU: "), "{text}");
    let ci = std::env::var("UR4REC_REQUIRE_NVRTC").as_deref() == Ok("1") && cuda::probe(0).is_err();
    if ci {
        // CI's NVRTC is on LD_LIBRARY_PATH only, so emptying it takes NVRTC away.
        assert!(text.contains("NVRTC: none — libnvrtc.so.13 could not be loaded"), "{text}");
    } else {
        println!("NVRTC may be in the ld.so cache here; with LD_LIBRARY_PATH emptied `info` said: {text}");
        assert!(text.contains("NVRTC: none — libnvrtc.so.13 could not be loaded") || text.contains("NVRTC: 13."), "{text}");
    }
    if no_gpu() {
        assert!(text.contains("GPU: none — no GPU found: the CUDA driver library (libcuda.so.1) could not be loaded"), "{text}");
    }
    // With NVRTC where CI puts it, `info` says it can compile the kernels.
    if std::env::var("UR4REC_REQUIRE_NVRTC").as_deref() == Ok("1") {
        let (_, text) = run(&["info"], &[]);
        assert!(text.contains("NVRTC: 13."), "{text}");
    }
}
