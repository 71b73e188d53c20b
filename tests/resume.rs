//! Exact resume (mission.md §9): a run stopped at any step and resumed from its checkpoint repeats the
//! straight run bit for bit on the CPU — every line of `metrics.jsonl` (losses, learning rates, gradient
//! norms, evaluations, alternation switches, unfreezing events) and the final weights. Stops fall in every
//! stage, mid-epoch and on epoch ends, with every improvement switched on (memory bank, adaptive
//! alternation, curriculum, distillation, progressive unfreezing). Also: a damaged or foreign checkpoint is
//! refused with a message naming the file and what is wrong.
//!
//! The killed-process variants (SIGKILL mid-run, SIGINT) are in `tests/resume_process.rs`.
mod fixtures;
use fixtures::{small_sasrec_config, small_sasrec_data, tensors, tiny_ur4rec_config, tiny_ur4rec_data};
use std::path::{Path, PathBuf};
use ur4rec_engine::backend::{CpuBackend, StoreFormat};
use ur4rec_engine::config::{AlternationKind, Config, ContrastiveKind, WeightsKind};
use ur4rec_engine::report::RunDir;
use ur4rec_engine::train::resume::{ResumeFile, StopReason, Stopped, RESUME_FILE};
use ur4rec_engine::train::trainer::{train_sasrec, PreparedData, RunOptions};
use ur4rec_engine::train::ur4rec_trainer::train_ur4rec;

/// The tiny UR4Rec model with every improvement on, checkpointing every 4 steps; stage 3 long enough for
/// the adaptive alternation to switch.
fn ur4rec_cfg() -> Config {
    let mut cfg = tiny_ur4rec_config();
    cfg.ur4rec.alternation = AlternationKind::Adaptive;
    cfg.ur4rec.weights = WeightsKind::Curriculum;
    cfg.ur4rec.unfreeze = vec!["0:sasrec.final_norm,retriever.item_text".into(), "3:sasrec,retriever".into()];
    cfg.ur4rec.stage_epochs = [2, 2, 10, 2];
    cfg.train.batch_size = 10;
    cfg.train.checkpoint_every = 4;
    cfg.eval.full_ranking = false;
    cfg
}

fn ur4rec_data(cfg: &Config) -> PreparedData {
    tiny_ur4rec_data(cfg, 40)
}

/// The small SASRec run over 4 epochs, evaluated every second one, checkpointing every 3 steps.
fn sasrec_cfg() -> Config {
    let mut cfg = small_sasrec_config();
    cfg.train.epochs = 4;
    cfg.train.eval_every = 2;
    cfg.train.checkpoint_every = 3;
    cfg
}

fn sasrec_data(cfg: &Config) -> PreparedData {
    small_sasrec_data(cfg, 90)
}

fn temp_dir(name: &str) -> PathBuf {
    fixtures::temp_dir("resume", name)
}

fn opts(resume: bool, stop: Option<usize>) -> RunOptions {
    RunOptions { quiet: true, resume, stop_after_steps: stop }
}

/// Runs `train` with a stop after each of `stops` (global steps), resuming from the checkpoint each time,
/// then to the end. Returns the run directory.
fn run_in_pieces<T>(name: &str, stops: &[usize], mut train: impl FnMut(&mut RunDir, &RunOptions) -> anyhow::Result<T>) -> PathBuf {
    let dir = temp_dir(name);
    let mut run = RunDir::create(&dir).unwrap();
    let mut resume = false;
    for &stop in stops {
        let e = train(&mut run, &opts(resume, Some(stop))).err().expect("the run stops at the step limit");
        let stopped = e.downcast_ref::<Stopped>().unwrap_or_else(|| panic!("not a stop: {e:#}"));
        assert_eq!((stopped.reason, stopped.step), (StopReason::StepLimit, stop));
        drop(run);
        let info = ResumeFile::open(&dir.join(RESUME_FILE)).unwrap().info().unwrap();
        assert_eq!(info.step, stop);
        run = RunDir::reopen(&dir, info.metrics_bytes).unwrap();
        resume = true;
    }
    train(&mut run, &opts(resume, None)).unwrap();
    dir
}

fn assert_same_run(straight: &Path, pieces: &Path, weights: &str) {
    let a = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let b = std::fs::read_to_string(pieces.join("metrics.jsonl")).unwrap();
    assert!(a.lines().filter(|l| l.contains("\"kind\":\"step\"")).count() > 20, "the straight run logged its steps");
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        assert_eq!(x, y, "metrics.jsonl line {} differs", i + 1);
    }
    assert_eq!(a.lines().count(), b.lines().count(), "metrics.jsonl length");
    assert!(tensors(&straight.join(weights)) == tensors(&pieces.join(weights)), "{weights} differs");
}

#[test]
fn ur4rec_stopped_and_resumed_anywhere_repeats_the_straight_run_bit_for_bit() {
    stopped_and_resumed_anywhere(ur4rec_cfg(), "ur4rec");
}

/// With the memory bank stored in bf16: the checkpoint holds its keys widened to f32, and storing them
/// again rounds nothing, so the resumed bank is the live one bit for bit.
#[test]
fn ur4rec_with_a_bf16_bank_resumes_bit_for_bit() {
    let mut cfg = ur4rec_cfg();
    cfg.ur4rec.bank_format = StoreFormat::Bf16;
    stopped_and_resumed_anywhere(cfg, "ur4rec-bf16");
}

fn stopped_and_resumed_anywhere(cfg: Config, name: &str) {
    let be = CpuBackend::new();
    assert_eq!(cfg.ur4rec.contrastive, ContrastiveKind::MemoryBank, "the configuration has a memory bank");
    let data = ur4rec_data(&cfg);
    let straight = temp_dir(&format!("{name}-straight"));
    let mut run = RunDir::create(&straight).unwrap();
    train_ur4rec(&be, &cfg, &data, &mut run, &opts(false, None)).unwrap();
    drop(run);
    let log = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"kind\":\"unfreeze\"") && log.contains("\"kind\":\"switch\""),
            "the configuration exercises unfreezing and alternation switches");
    // Stops in every stage: a third of the way in (mid-epoch with 4 batches per epoch) and at its last
    // step (the stage's end, after early stopping where it struck). `stops` counts steps done.
    let steps: Vec<(u64, u64)> = log.lines().filter(|l| l.contains("\"kind\":\"step\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|r| (r["stage"].as_u64().unwrap(), r["step"].as_u64().unwrap())).collect();
    let mut stops = Vec::new();
    for stage in 1..=4 {
        let s: Vec<u64> = steps.iter().filter(|(st, _)| *st == stage).map(|(_, x)| *x).collect();
        assert!(s.len() >= 6, "stage {stage} ran {} steps", s.len());
        stops.push(s[s.len() / 3] as usize + 1);
        stops.push(*s.last().unwrap() as usize + 1);
    }
    let pieces = run_in_pieces(&format!("{name}-pieces"), &stops, |run, o| train_ur4rec(&be, &cfg, &data, run, o));
    assert_same_run(&straight, &pieces, "final.safetensors");
    for st in 1..=4 {
        let f = format!("stage{st}_best.safetensors");
        assert!(tensors(&straight.join(&f)) == tensors(&pieces.join(&f)), "{f} differs");
    }
}

#[test]
fn sasrec_stopped_and_resumed_repeats_the_straight_run_bit_for_bit() {
    let be = CpuBackend::new();
    let cfg = sasrec_cfg();
    let data = sasrec_data(&cfg);
    let straight = temp_dir("sasrec-straight");
    let mut run = RunDir::create(&straight).unwrap();
    train_sasrec(&be, &cfg, &data, &mut run, &opts(false, None)).unwrap();
    drop(run);
    // 5 batches per epoch, 20 steps; evaluations after epochs 2 and 4.
    let pieces = run_in_pieces("sasrec-pieces", &[2, 5, 7, 13], |run, o| train_sasrec(&be, &cfg, &data, run, o));
    // Throughput fields of the evaluation lines are wall-clock measurements; everything else must match.
    let strip = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines()
            .map(|l| l.split("\"sequences_per_s\"").next().unwrap().to_string()).collect()
    };
    assert_eq!(strip(&straight), strip(&pieces));
    assert!(strip(&straight).iter().filter(|l| l.contains("\"kind\":\"step\"")).count() == 20);
    assert!(tensors(&straight.join("best.safetensors")) == tensors(&pieces.join("best.safetensors")));
}

#[test]
fn a_foreign_damaged_or_mismatched_checkpoint_is_refused_by_name() {
    let be = CpuBackend::new();
    let cfg = sasrec_cfg();
    let data = sasrec_data(&cfg);
    let dir = temp_dir("refused");
    let mut run = RunDir::create(&dir).unwrap();
    let e = train_sasrec(&be, &cfg, &data, &mut run, &opts(false, Some(6))).err().unwrap();
    assert!(e.downcast_ref::<Stopped>().is_some(), "{e:#}");
    let ckpt = dir.join(RESUME_FILE);
    let good = std::fs::read(&ckpt).unwrap();
    let resume = |cfg: &Config, run: &mut RunDir| format!("{:#}", train_sasrec(&be, cfg, &data, run, &opts(true, None)).err().unwrap());

    // Another configuration.
    let mut other = cfg.clone();
    other.train.lr *= 2.0;
    let msg = resume(&other, &mut run);
    assert!(msg.contains("resume.safetensors") && msg.contains("another configuration"), "{msg}");
    // A UR4Rec checkpoint given to the SASRec trainer.
    let u = ur4rec_cfg();
    let udata = ur4rec_data(&u);
    let udir = temp_dir("refused-ur4rec");
    let mut urun = RunDir::create(&udir).unwrap();
    assert!(train_ur4rec(&be, &u, &udata, &mut urun, &opts(false, Some(2))).is_err());
    std::fs::copy(udir.join(RESUME_FILE), &ckpt).unwrap();
    let msg = resume(&cfg, &mut run);
    assert!(msg.contains("a ur4rec run's checkpoint"), "{msg}");
    // Truncated (a torn write the atomic rename prevents, or a damaged disk).
    std::fs::write(&ckpt, &good[..good.len() / 2]).unwrap();
    let msg = resume(&cfg, &mut run);
    assert!(msg.contains("resume.safetensors") && msg.contains("not a valid safetensors"), "{msg}");
    // A parameter checkpoint is not a resume checkpoint.
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    std::fs::write(&ckpt, safetensors::serialize(vec![("w", view)], &None).unwrap()).unwrap();
    let msg = resume(&cfg, &mut run);
    assert!(msg.contains("not a resume checkpoint"), "{msg}");
    // No checkpoint at all.
    std::fs::remove_file(&ckpt).unwrap();
    let msg = resume(&cfg, &mut run);
    assert!(msg.contains("resume.safetensors"), "{msg}");
    // The good file still resumes.
    std::fs::write(&ckpt, &good).unwrap();
    drop(run);
    let info = ResumeFile::open(&ckpt).unwrap().info().unwrap();
    let mut run = RunDir::reopen(&dir, info.metrics_bytes).unwrap();
    train_sasrec(&be, &cfg, &data, &mut run, &opts(true, None)).unwrap();
}
