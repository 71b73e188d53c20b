//! Reliability guarantees of mission.md §9 on the CPU backend:
//! - the non-finite guard: a NaN loss skips its step (weights, AdamW moments and step counts, memory bank
//!   untouched), is logged with the tensor's name, stage and step, and a run of `train.max_bad_steps`
//!   consecutive bad steps stops the run with the last good checkpoint intact;
//! - thread-count independence: training gives bit-identical losses and weights on 1, 2 and 3 threads;
//! - bounded memory: resident memory after 1,000 training steps equals that after 10 (within a margin).
//!
//! The tests share one lock: the memory test reads the process's resident set, which the other tests'
//! allocations (they run on parallel test threads by default) would disturb.
mod fixtures;
use fixtures::{small_sasrec_config, small_sasrec_data, tiny_ur4rec_config, tiny_ur4rec_data};
use std::sync::Mutex;
use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::checkpoint;
use ur4rec_engine::config::{Config, ContrastiveKind};
use ur4rec_engine::data::{self, SyntheticConfig};
use ur4rec_engine::model::SasRec;
use ur4rec_engine::params::{ParamBuilder, ParamStore};
use ur4rec_engine::report::RunDir;
use ur4rec_engine::rng::Rng;
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::strategies::Module;
use ur4rec_engine::train::trainer::{sasrec_step, train_sasrec, PreparedData, RunOptions};
use ur4rec_engine::train::ur4rec_trainer::{train_ur4rec, Trainer};

// The binary's allocator (src/main.rs), so the memory test measures what a real run does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tiny UR4Rec model over two short epochs per stage (1 in stages 3 and 4), sampled evaluation only.
fn tiny_ur4rec_cfg() -> Config {
    let mut cfg = tiny_ur4rec_config();
    cfg.ur4rec.stage_epochs = [2, 2, 1, 1];
    cfg.train.batch_size = 10;
    cfg.eval.full_ranking = false;
    cfg
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    fixtures::temp_dir("reliability", name)
}

fn records(dir: &std::path::Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == kind).collect()
}

fn sasrec_state(be: &CpuBackend, cfg: &Config, data: &PreparedData) -> (SasRec, ParamStore<CpuBackend>, AdamW) {
    let _ = be;
    let mut b = ParamBuilder::new();
    let model = SasRec::new(&mut b, &cfg.sasrec, data.dataset.num_items, &mut Rng::derive(cfg.seed, "init"));
    let store = b.build(be);
    let t = &cfg.train;
    let opt = AdamW::new(store.infos.len(), t.beta1, t.beta2, t.adam_eps, t.weight_decay);
    (model, store, opt)
}

#[test]
fn a_nan_step_is_skipped_named_logged_and_leaves_the_state_untouched() {
    let _lock = serial();
    let be = CpuBackend::new();
    let mut cfg = small_sasrec_config();
    cfg.train.inject_nan_at_step = Some(3);
    let data = small_sasrec_data(&cfg, 100);

    // Step by step: the poisoned step changes nothing the next step depends on.
    let (model, mut store, mut opt) = sasrec_state(&be, &cfg, &data);
    let mut rng = Rng::new(1);
    let users: Vec<usize> = (0..100).collect();
    for (step, chunk) in users.chunks(20).enumerate() {
        let before = (store.values.clone(), store.m.clone(), store.v.clone(), opt.steps.clone());
        let o = sasrec_step(&be, &cfg, &model, &mut store, &mut opt, &data, chunk, &mut rng, step, 1e-2).unwrap().unwrap();
        let after = (store.values.clone(), store.m.clone(), store.v.clone(), opt.steps.clone());
        if step == 3 {
            let what = o.skipped.expect("the poisoned step is skipped");
            assert_eq!((what.source, what.tensor.as_str()), ("loss", "sasrec"));
            assert!(o.loss.is_nan());
            assert!(after == before, "weights, moments or AdamW step counts moved on a skipped step");
        } else {
            assert!(o.skipped.is_none() && o.loss.is_finite(), "step {step}");
            assert!(after.0 != before.0 && after.3 != before.3, "a good step updates the weights and step counts");
        }
    }
    assert!(opt.steps.iter().all(|&s| s == 4), "4 of 5 steps updated: {:?}", opt.steps);

    // A whole SASRec run: it completes, with exactly one nonfinite record naming the tensor and the step.
    let dir = temp_dir("sasrec-one-nan");
    let mut run = RunDir::create(&dir).unwrap();
    let s = train_sasrec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).unwrap();
    assert!(s.test.sampled.hit10.is_finite());
    let bad = records(&dir, "nonfinite");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!((bad[0]["tensor"].as_str(), bad[0]["source"].as_str(), bad[0]["step"].as_u64()), (Some("sasrec"), Some("loss"), Some(3)));
    assert_eq!((bad[0]["action"].as_str(), bad[0]["value"].as_str()), (Some("skip"), Some("NaN")));
    assert!(records(&dir, "step").iter().all(|r| r["step"] != 3), "the skipped step has no step record");

    // UR4Rec, stage 2 (the retriever): the poisoned term is named, and the weights, moments, step counts
    // and memory banks are as before the step.
    let mut cfg = tiny_ur4rec_cfg();
    let data = tiny_ur4rec_data(&cfg, 40);
    let spe = 4; // 40 users / batch 10
    cfg.train.inject_nan_at_step = Some(2 * spe + 1); // stage 2, its second step
    let mut tr = Trainer::new(&be, &cfg, &data).unwrap();
    tr.set_stage_trainable(2, Module::Retriever);
    tr.step = 2 * spe;
    let users: Vec<usize> = (0..40).collect();
    for (i, chunk) in users.chunks(10).enumerate() {
        let before = (tr.store.values.clone(), tr.store.m.clone(), tr.store.v.clone(), tr.opt.steps.clone(), tr.banks_on_host());
        let lrs = tr.lrs(2, i, 4);
        let r = tr.train_step(2, chunk, &lrs).unwrap().unwrap();
        let after = (tr.store.values.clone(), tr.store.m.clone(), tr.store.v.clone(), tr.opt.steps.clone(), tr.banks_on_host());
        if tr.step == 2 * spe + 1 {
            let what = r.skipped.expect("the poisoned step is skipped");
            assert_eq!(what.tensor, "retrieval");
            assert!(after == before, "state moved on a skipped UR4Rec step");
        } else {
            assert!(r.skipped.is_none() && after.0 != before.0 && after.4 != before.4, "step {}", tr.step);
        }
        tr.step += 1;
    }
    let dir = temp_dir("ur4rec-one-nan");
    let mut run = RunDir::create(&dir).unwrap();
    train_ur4rec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).unwrap();
    let bad = records(&dir, "nonfinite");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!((bad[0]["tensor"].as_str(), bad[0]["stage"].as_u64(), bad[0]["step"].as_u64()),
               (Some("retrieval"), Some(2), Some(2 * spe as u64 + 1)));
}

#[test]
fn consecutive_nan_steps_stop_the_run_and_the_best_checkpoint_still_loads() {
    let _lock = serial();
    let be = CpuBackend::new();
    let mut cfg = small_sasrec_config();
    cfg.train.epochs = 5;
    // 5 steps per epoch: epoch 1 is evaluated and checkpointed, step 5 is good, every step from 6 on is
    // poisoned, and the 4th bad one (step 9) stops the run before epoch 2 is evaluated.
    cfg.train.inject_nan_from_step = Some(6);
    cfg.train.max_bad_steps = 4;
    let data = small_sasrec_data(&cfg, 100);
    let dir = temp_dir("sasrec-diverged");
    let mut run = RunDir::create(&dir).unwrap();
    let e = train_sasrec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).expect_err("the run must stop");
    let msg = format!("{e:#}");
    assert!(msg.contains("max_bad_steps") && msg.contains("step 9") && msg.contains("sasrec"), "{msg}");
    let bad = records(&dir, "nonfinite");
    assert_eq!(bad.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
    assert_eq!(bad.last().unwrap()["action"], "stop");
    // The checkpoint is the one written at epoch 1 from good weights, and loads.
    let (_, mut store, _) = sasrec_state(&be, &cfg, &data);
    let meta = checkpoint::load_params(&be, &mut store, &dir.join("best.safetensors")).expect("best checkpoint loads");
    assert_eq!(meta.get("epoch").map(String::as_str), Some("1"));
    assert!(store.values.iter().all(|v| v.is_finite()));

    // UR4Rec: diverging in stage 2 stops the run; stage 1's and stage 2's checkpoints load.
    let mut cfg = tiny_ur4rec_cfg();
    cfg.ur4rec.stage_epochs = [1, 3, 0, 0];
    cfg.ur4rec.keep_start_if_better = true;
    cfg.train.inject_nan_from_step = Some(4 + 5); // stage 2 starts at step 4; its epoch 1 finishes cleanly
    cfg.train.max_bad_steps = 3;
    let data = tiny_ur4rec_data(&cfg, 40);
    let dir = temp_dir("ur4rec-diverged");
    let mut run = RunDir::create(&dir).unwrap();
    let e = train_ur4rec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).expect_err("the run must stop");
    assert!(format!("{e:#}").contains("max_bad_steps"), "{e:#}");
    assert!(records(&dir, "nonfinite").iter().all(|r| r["stage"] == 2 && r["tensor"] == "retrieval"));
    for st in [1, 2] {
        let mut tr = Trainer::new(&be, &cfg, &data).unwrap();
        checkpoint::load_params(&be, &mut tr.store, &dir.join(format!("stage{st}_best.safetensors"))).unwrap();
        assert!(tr.store.values.iter().all(|v| v.is_finite()));
    }
}

/// SASRec sized so the matrix products take the multi-threaded row-block path of the CPU gemm.
/// The step log is read once per `train.readback_every` steps (`train::step_log`), and everything a step
/// decides — the skip of a NaN step, the clipping, AdamW's step counts, the memory-bank enqueue — happens on
/// the backend whether or not the host has read it yet. So the reading interval must change nothing: the same
/// weights and checkpoints bit for bit, and the same metrics records (every step logged), the skipped step
/// named in both.
#[test]
fn reading_the_step_log_every_step_or_every_few_steps_trains_the_same() {
    let _lock = serial();
    let be = CpuBackend::new();
    let logged = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(|l| {
            let mut r: serde_json::Value = serde_json::from_str(l).unwrap();
            // Throughput is timing, not training.
            r.as_object_mut().unwrap().retain(|k, _| !k.contains("per_s"));
            r
        }).collect()
    };
    let kinds = |records: &[serde_json::Value], kind: &str| records.iter().filter(|r| r["kind"] == kind).count();
    // SASRec: 5 steps per epoch, read every step and every 3 steps (windows cut across epochs and
    // checkpoints); step 7 is poisoned.
    let mut runs = Vec::new();
    for read_every in [1, 3] {
        let mut cfg = small_sasrec_config();
        cfg.train.readback_every = read_every;
        cfg.train.checkpoint_every = 4;
        cfg.train.inject_nan_at_step = Some(7);
        let data = small_sasrec_data(&cfg, 100);
        let dir = temp_dir(&format!("sasrec-read-every-{read_every}"));
        let mut run = RunDir::create(&dir).unwrap();
        train_sasrec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).unwrap();
        runs.push(dir);
    }
    assert_eq!(fixtures::tensors(&runs[0].join("best.safetensors")), fixtures::tensors(&runs[1].join("best.safetensors")));
    assert_eq!(fixtures::tensors(&runs[0].join("resume.safetensors")), fixtures::tensors(&runs[1].join("resume.safetensors")));
    let (a, b) = (logged(&runs[0]), logged(&runs[1]));
    assert_eq!((kinds(&a, "nonfinite"), kinds(&a, "step")), (1, 14), "one skipped step, 14 logged");
    assert_eq!(a, b, "the same metrics records, in the same order");

    // UR4Rec with a memory bank, all four stages (parity alternation in stage 3), read every step and every 5
    // steps; stage 2's second step is poisoned, so one enqueue is refused inside a reading window.
    let mut runs = Vec::new();
    for read_every in [1, 5] {
        let mut cfg = tiny_ur4rec_cfg();
        cfg.train.readback_every = read_every;
        cfg.train.inject_nan_at_step = Some(2 * 4 + 1);
        let data = tiny_ur4rec_data(&cfg, 40);
        let dir = temp_dir(&format!("ur4rec-read-every-{read_every}"));
        let mut run = RunDir::create(&dir).unwrap();
        train_ur4rec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).unwrap();
        runs.push(dir);
    }
    assert_eq!(fixtures::tensors(&runs[0].join("final.safetensors")), fixtures::tensors(&runs[1].join("final.safetensors")));
    // The resume checkpoint holds the memory banks (keys, slot users and steps, pointer) and AdamW's counts.
    assert_eq!(fixtures::tensors(&runs[0].join("resume.safetensors")), fixtures::tensors(&runs[1].join("resume.safetensors")));
    let (a, b) = (logged(&runs[0]), logged(&runs[1]));
    let bad: Vec<_> = a.iter().filter(|r| r["kind"] == "nonfinite").collect();
    assert_eq!((bad.len(), bad[0]["step"].as_u64(), bad[0]["tensor"].as_str()), (1, Some(9), Some("retrieval")));
    assert_eq!(a, b, "the same metrics records, in the same order");
}

fn sasrec_run(threads: usize, steps: usize) -> (Vec<u32>, Vec<u32>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let be = CpuBackend::new();
        let mut cfg = Config::preset("sasrec").unwrap(); // hidden 64, L 50, dropout 0.2
        cfg.train.clip_norm = 1.0;
        let ds = data::synthetic(&SyntheticConfig { users: 64 * steps, items: 300, seed: 5, ..Default::default() });
        let data = PreparedData::from_dataset(ds, &cfg).unwrap();
        let (model, mut store, mut opt) = sasrec_state(&be, &cfg, &data);
        let mut rng = Rng::new(3);
        let users: Vec<usize> = (0..data.split.train.len()).collect();
        let losses = users.chunks(64).take(steps).enumerate().map(|(step, chunk)| {
            let o = sasrec_step(&be, &cfg, &model, &mut store, &mut opt, &data, chunk, &mut rng, step, 1e-3).unwrap().unwrap();
            o.loss.to_bits()
        }).collect();
        (losses, store.values.iter().map(|v| v.to_bits()).collect())
    })
}

/// A few UR4Rec steps in stages 1, 2 and 4 (memory bank, distillation), retriever sized like the default.
fn ur4rec_run(threads: usize) -> (Vec<u32>, Vec<u32>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let be = CpuBackend::new();
        let mut cfg = Config::preset("default").unwrap();
        cfg.ur4rec.contrastive = ContrastiveKind::MemoryBank;
        cfg.ur4rec.distillation.enabled = true;
        cfg.eval.negatives = 20; // 60 items
        let data = tiny_ur4rec_data(&cfg, 256);
        let mut tr = Trainer::new(&be, &cfg, &data).unwrap();
        let users: Vec<usize> = (0..256).collect();
        let mut losses = Vec::new();
        for (stage, n) in [(1, 2), (2, 3), (4, 3)] {
            tr.set_stage_trainable(stage, Module::Sasrec);
            for (i, chunk) in users.chunks(64).take(n).enumerate() {
                let lrs = tr.lrs(stage, i, n);
                let r = tr.train_step(stage, chunk, &lrs).unwrap().unwrap();
                assert!(r.skipped.is_none());
                losses.push(r.losses.total.to_bits());
                tr.step += 1;
            }
        }
        let (bt, bv) = tr.banks_on_host().expect("memory bank on");
        let state = tr.store.values.iter().chain(&bt.keys).chain(&bv.keys).map(|v| v.to_bits()).collect();
        (losses, state)
    })
}

#[test]
fn cpu_training_is_bit_identical_on_1_2_and_3_threads() {
    let _lock = serial();
    let (l1, w1) = sasrec_run(1, 20);
    for threads in [2, 3] {
        let (l, w) = sasrec_run(threads, 20);
        assert!(l == l1, "SASRec losses differ between 1 and {threads} threads");
        assert!(w == w1, "SASRec weights differ between 1 and {threads} threads");
    }
    let (l1, w1) = ur4rec_run(1);
    for threads in [2, 3] {
        let (l, w) = ur4rec_run(threads);
        assert!(l == l1, "UR4Rec losses differ between 1 and {threads} threads");
        assert!(w == w1, "UR4Rec weights or memory banks differ between 1 and {threads} threads");
    }
}

/// Resident set size in bytes (Linux: `VmRSS` of /proc/self/status, in kB).
fn rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<usize>().ok()? * 1024)
}

#[test]
fn memory_after_1000_steps_equals_memory_after_10() {
    // The tape and every temporary are released at the end of each step, so nothing may grow with the step
    // count. 10 MB is far above the noise (allocator pages, a lazily grown thread-local buffer) and far
    // below a leak of one step's activations per step (~0.5 MB here: 1,000 steps would add ~500 MB).
    const MARGIN: usize = 10 << 20;
    let _lock = serial();
    let Some(_) = rss_bytes() else {
        eprintln!("skipped: /proc/self/status has no VmRSS on this system");
        return;
    };
    let be = CpuBackend::new();
    let mut cfg = small_sasrec_config();
    cfg.sasrec.hidden = 32;
    cfg.sasrec.ffn = 32;
    cfg.sasrec.max_len = 20;
    cfg.train.batch_size = 32;
    let data = small_sasrec_data(&cfg, 320);
    let (model, mut store, mut opt) = sasrec_state(&be, &cfg, &data);
    let mut rng = Rng::new(2);
    let mut order: Vec<usize> = (0..data.split.train.len()).collect();
    let (mut step, mut at10) = (0usize, 0usize);
    let t0 = std::time::Instant::now();
    while step < 1000 {
        rng.shuffle(&mut order);
        for chunk in order.chunks(cfg.train.batch_size) {
            if step == 1000 {
                break;
            }
            let o = sasrec_step(&be, &cfg, &model, &mut store, &mut opt, &data, chunk, &mut rng, step, 1e-3).unwrap().unwrap();
            assert!(o.skipped.is_none());
            step += 1;
            if step == 10 {
                at10 = rss_bytes().unwrap();
            }
        }
    }
    let at1000 = rss_bytes().unwrap();
    eprintln!("resident memory: {:.1} MB after step 10, {:.1} MB after step 1000 ({:.1} s)", at10 as f64 / 1e6,
              at1000 as f64 / 1e6, t0.elapsed().as_secs_f64());
    assert!(at1000 <= at10 + MARGIN, "resident memory grew from {at10} to {at1000} bytes over 990 steps");
}
