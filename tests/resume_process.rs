//! Exact resume through real processes of the `ur4rec-engine` binary:
//! - a run killed with SIGKILL mid-run (no chance to clean up: a checkpoint or `metrics.jsonl` may be half
//!   written) and continued with `train --resume` ends exactly where the straight run ends;
//! - SIGINT stops a run after the step in flight with a fresh checkpoint, exit status 130 and a message
//!   saying how to continue; the continued run again matches the straight run.
//!
//! "Matches" means: `metrics.jsonl` byte for byte and every tensor of `final.safetensors` bit for bit.
mod fixtures;
use fixtures::tensors;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use ur4rec_engine::train::resume::{ResumeFile, RESUME_FILE};

const BIN: &str = env!("CARGO_BIN_EXE_ur4rec-engine");

/// A small UR4Rec run on the built-in synthetic data (~45 steps, a few seconds), checkpointing every 3 steps.
fn train_args(out: &Path) -> Vec<String> {
    ["train", "--device", "cpu", "--quiet", "--threads", "1", "--out", &out.display().to_string(), "data.synthetic_users=300",
     "ur4rec.stage_epochs=[3,2,2,2]", "train.checkpoint_every=3"]
        .iter().map(|s| s.to_string()).collect()
}

fn temp_dir(name: &str) -> PathBuf {
    fixtures::temp_dir("resume-process", name)
}

fn run_to_end(args: &[String]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The straight run, made once for both tests.
fn straight() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("straight");
        run_to_end(&train_args(&dir));
        dir
    })
}

/// Polls the run's resume checkpoint until it records at least `min_step` steps; returns that step.
fn wait_for_checkpoint(dir: &Path, min_step: usize, child: &mut Child) -> usize {
    let start = Instant::now();
    loop {
        if let Ok(Ok(info)) = ResumeFile::open(&dir.join(RESUME_FILE)).map(|f| f.info()) {
            if info.step >= min_step {
                return info.step;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before a checkpoint at step {min_step}");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint at step {min_step} after 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn assert_same_as_straight(dir: &Path) {
    let a = std::fs::read_to_string(straight().join("metrics.jsonl")).unwrap();
    let b = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(a.lines().filter(|l| l.contains("\"kind\":\"step\"")).count() >= 40);
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        assert_eq!(x, y, "metrics.jsonl line {} differs", i + 1);
    }
    assert_eq!(a.lines().count(), b.lines().count());
    assert!(tensors(&straight().join("final.safetensors")) == tensors(&dir.join("final.safetensors")),
            "final weights differ");
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_straight_runs_result() {
    let _ = straight();
    let dir = temp_dir("killed");
    let mut child = Command::new(BIN).args(train_args(&dir)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let seen = wait_for_checkpoint(&dir, 12, &mut child);
    // Not right after the checkpoint: somewhere in the following steps (a write may be in flight).
    std::thread::sleep(Duration::from_millis(120));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed, not finished ({status})");
    let at = ResumeFile::open(&dir.join(RESUME_FILE)).unwrap().info().unwrap().step;
    assert!(at >= seen, "checkpoint at step {at}, earlier than the {seen} seen before the kill");
    eprintln!("killed after a checkpoint at step {seen}; resuming from step {at}");
    run_to_end(&["train".into(), "--resume".into(), dir.display().to_string(), "--quiet".into(), "--threads".into(), "1".into()]);
    assert_same_as_straight(&dir);
}

#[test]
fn sigint_writes_a_checkpoint_and_the_run_resumes_to_the_straight_runs_result() {
    let _ = straight();
    let dir = temp_dir("interrupted");
    let mut child = Command::new(BIN).args(train_args(&dir)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let seen = wait_for_checkpoint(&dir, 6, &mut child);
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "exit status after SIGINT; stderr:\n{stderr}");
    let at = ResumeFile::open(&dir.join(RESUME_FILE)).unwrap().info().unwrap().step;
    assert!(at >= seen);
    assert!(stderr.contains(&format!("interrupted at step {at}")) && stderr.contains("--resume"), "{stderr}");
    run_to_end(&["train".into(), "--resume".into(), dir.display().to_string(), "--quiet".into(), "--threads".into(), "1".into()]);
    assert_same_as_straight(&dir);
}
