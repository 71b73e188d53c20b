//! End-to-end training step throughput (sequences/s) of SASRec and of UR4Rec (stage 4: SASRec BPR,
//! retrieval, consistency, memory-bank InfoNCE, LogDet diversity, distillation; all parameters trainable)
//! at batch 32 and 256, on synthetic data with text and visual features, in the `ur4rec` preset's model
//! (hidden 256, 2 blocks, 4 heads, L = 50). CPU always, GPU when `CudaBackend::new(0)` succeeds, in the
//! same run, with the GPU/CPU ratio and, on the GPU, milliseconds and kernel launches per step.
//!
//! One step = forward on the tape, backward, gradient clipping and AdamW, as in the trainers (the UR4Rec
//! memory bank is not refreshed between steps here: same work, static contents). CPU: 1 warm-up step and
//! `BENCH_CPU_STEPS` (default 3) timed steps per row, about a minute in all on 2 cores; GPU: 3 warm-up and
//! `BENCH_GPU_STEPS` (default 20) timed steps, wall clock with a device synchronisation at the end.
//! GPU only, two more rows: UR4Rec at batch 256 with the reference memory bank (65,536 slots) stored in f32
//! and in bf16 (`ur4rec.bank_format`), with the item tables read as bf16 in the second (`train.table_format`):
//! the speed effect of 16-bit storage; both models at batch 32 and 256 with the step log read after every step
//! instead of every 16 (`train.readback_every`, `train::step_log`): the cost of one host synchronisation a step;
//! and both models at batch 256 with cuBLAS in TF32 (`train.tf32`).
//! Run: `cargo bench --bench step`.
use std::time::Instant;
use ur4rec_engine::backend::cuda::CudaBackend;
use ur4rec_engine::backend::{Backend, CpuBackend, StoreFormat};
use ur4rec_engine::config::{Config, ContrastiveKind};
use ur4rec_engine::data::{self, SyntheticConfig};
use ur4rec_engine::model::SasRec;
use ur4rec_engine::params::ParamBuilder;
use ur4rec_engine::rng::Rng;
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::strategies::Module;
use ur4rec_engine::train::step_log::StepLog;
use ur4rec_engine::train::trainer::{sasrec_submit, PreparedData};
use ur4rec_engine::train::ur4rec_trainer::Trainer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config() -> Config {
    let mut cfg = Config::preset("ur4rec").expect("ur4rec preset");
    cfg.ur4rec.contrastive = ContrastiveKind::MemoryBank;
    cfg.ur4rec.distillation.enabled = true;
    cfg
}

fn prepared(cfg: &Config) -> PreparedData {
    let ds = data::synthetic(&SyntheticConfig { users: 1024, items: 1683, text_dim: 384, visual_dim: 512, min_len: 20,
                                                max_len: 60, seed: 3, ..Default::default() });
    PreparedData::from_dataset(ds, cfg).expect("synthetic data prepares")
}

/// The users of step `s` (consecutive chunks, wrapping around).
fn batch_users(s: usize, bsz: usize, users: usize) -> Vec<usize> {
    (0..bsz).map(|i| (s * bsz + i) % users).collect()
}

/// What the device does to time a step: wait for queued work, and count kernel launches so far (0 on the CPU).
struct Device<'a> {
    sync: &'a dyn Fn(),
    launches: &'a dyn Fn() -> u64,
}

/// Throughput of the timed steps: sequences/s, milliseconds per step and kernel launches per step.
struct Rate {
    seqs_per_s: f64,
    ms_per_step: f64,
    kernels_per_step: f64,
}

impl Rate {
    fn measure(dev: &Device, t0: Instant, launches0: u64, seqs: usize, steps: usize) -> Rate {
        (dev.sync)();
        let secs = t0.elapsed().as_secs_f64();
        Rate { seqs_per_s: seqs as f64 / secs, ms_per_step: secs * 1e3 / steps.max(1) as f64,
               kernels_per_step: ((dev.launches)() - launches0) as f64 / steps.max(1) as f64 }
    }
}

/// Throughput over `steps` timed steps after `warm` warm-up steps.
fn sasrec_rate<B: Backend>(be: &B, cfg: &Config, data: &PreparedData, bsz: usize, warm: usize, steps: usize,
                           dev: &Device) -> Rate {
    let mut rng = Rng::new(1);
    let mut b = ParamBuilder::new();
    let model = SasRec::new(&mut b, &cfg.sasrec, data.dataset.num_items, &mut rng);
    let mut store = b.build(be);
    let t = &cfg.train;
    let mut opt = AdamW::new(store.infos.len(), t.beta1, t.beta2, t.adam_eps, t.weight_decay);
    let mut log = StepLog::new(be, &store, &opt, t.readback_interval());
    let n = data.split.train.len();
    let (mut seqs, mut launches0) = (0usize, 0u64);
    let mut t0 = Instant::now();
    for s in 0..warm + steps {
        if s == warm {
            (dev.sync)();
            t0 = Instant::now();
            launches0 = (dev.launches)();
            seqs = 0;
        }
        // The trainer's step, its numbers read back once per `train.readback_every` steps as the trainer reads them.
        let (sequences, _) = sasrec_submit(be, cfg, &model, &mut store, &opt, &mut log, data, &batch_users(s, bsz, n), &mut rng,
                                           s, 1e-3).expect("sasrec step").expect("a non-empty batch");
        if log.is_full() || s + 1 == warm + steps {
            assert!(log.read(be, &mut opt).iter().all(|r| r.ok), "a non-finite SASRec step");
        }
        seqs += sequences;
    }
    Rate::measure(dev, t0, launches0, seqs, steps)
}

fn ur4rec_rate<B: Backend>(be: &B, cfg: &Config, data: &PreparedData, bsz: usize, warm: usize, steps: usize,
                           dev: &Device) -> Rate {
    let mut tr = Trainer::new(be, cfg, data).expect("UR4Rec trainer");
    tr.set_stage_trainable(4, Module::Sasrec);
    // The learning rates of a step well past warm-up of a long stage 4.
    let lrs = tr.lrs(4, 1_000, 100_000);
    let n = data.split.train.len();
    let (mut seqs, mut launches0) = (0usize, 0u64);
    let mut t0 = Instant::now();
    for s in 0..warm + steps {
        if s == warm {
            (dev.sync)();
            t0 = Instant::now();
            launches0 = (dev.launches)();
            seqs = 0;
        }
        let users = batch_users(s, bsz, n);
        // The trainer's own step: losses, backward, the non-finite guard, AdamW and the memory-bank enqueue,
        // read back once per `train.readback_every` steps as the trainer reads them.
        assert!(tr.submit_step(4, &users, &lrs).expect("UR4Rec step"), "a non-empty batch");
        if tr.log_full() || s + 1 == warm + steps {
            for (step, r) in tr.collect() {
                assert!(r.skipped.is_none(), "non-finite UR4Rec step {step}: {:?}", r.skipped);
            }
        }
        tr.step += 1;
        seqs += users.len();
    }
    Rate::measure(dev, t0, launches0, seqs, steps)
}

fn main() {
    let cfg = config();
    let data = prepared(&cfg);
    let (cpu_steps, gpu_steps) = (env_usize("BENCH_CPU_STEPS", 3), env_usize("BENCH_GPU_STEPS", 20));
    println!("step: training step throughput, synthetic data ({} users, {} items, text 384 / visual 512 features), \
              preset ur4rec (hidden {}, {} blocks, {} heads, L {}), memory bank + distillation on",
             data.dataset.num_users, data.dataset.num_items, cfg.sasrec.hidden, cfg.sasrec.blocks, cfg.sasrec.heads,
             cfg.sasrec.max_len);
    println!("CPU: {} threads, 1 warm-up + {cpu_steps} timed steps per row", rayon::current_num_threads());
    let gpu = match CudaBackend::new(0) {
        Ok(g) => {
            println!("GPU: {} — 3 warm-up + {gpu_steps} timed steps per row", g.name());
            Some(g)
        }
        Err(e) => {
            println!("GPU: skipped ({e})");
            None
        }
    };
    println!("{:<8} {:>6} {:>12} {:>12} {:>9} {:>12} {:>14}", "model", "batch", "CPU seq/s", "GPU seq/s", "GPU/CPU",
             "GPU ms/step", "kernels/step");
    let cpu = CpuBackend::new();
    let on_cpu = Device { sync: &|| {}, launches: &|| 0 };
    let gpu_sync = || gpu.as_ref().map(|g| g.synchronize()).unwrap_or(());
    let gpu_launches = || gpu.as_ref().map(|g| g.launches()).unwrap_or(0);
    let on_gpu = Device { sync: &gpu_sync, launches: &gpu_launches };
    for model in ["sasrec", "ur4rec"] {
        for bsz in [32usize, 256] {
            let c = match model {
                "sasrec" => sasrec_rate(&cpu, &cfg, &data, bsz, 1, cpu_steps, &on_cpu),
                _ => ur4rec_rate(&cpu, &cfg, &data, bsz, 1, cpu_steps, &on_cpu),
            };
            let g = gpu.as_ref().map(|g| match model {
                "sasrec" => sasrec_rate(g, &cfg, &data, bsz, 3, gpu_steps, &on_gpu),
                _ => ur4rec_rate(g, &cfg, &data, bsz, 3, gpu_steps, &on_gpu),
            });
            let c = c.seqs_per_s;
            match g {
                Some(g) => println!("{model:<8} {bsz:>6} {c:>12.1} {:>12.1} {:>8.2}x {:>12.2} {:>14.0}", g.seqs_per_s,
                                    g.seqs_per_s / c, g.ms_per_step, g.kernels_per_step),
                None => println!("{model:<8} {bsz:>6} {c:>12.1} {:>12} {:>9} {:>12} {:>14}", "-", "-", "-", "-"),
            }
        }
    }
    if let Some(g) = gpu.as_ref() {
        for format in [StoreFormat::F32, StoreFormat::Bf16] {
            let mut c = cfg.clone();
            c.ur4rec.bank_size = 65_536;
            c.ur4rec.bank_format = format;
            c.train.table_format = format;
            let r = ur4rec_rate(g, &c, &data, 256, 3, gpu_steps, &on_gpu);
            println!("{:<8} {:>6} {:>12} {:>12.1} {:>9} {:>12.2} {:>14.0}   bank 65,536 slots, bank and tables {}", "ur4rec", 256,
                     "-", r.seqs_per_s, "-", r.ms_per_step, r.kernels_per_step, format.name());
        }
        // The rows above read the step log as the trainer does by default (every 16 steps); reading it after
        // every step (one host synchronisation a step) costs:
        for (model, bsz) in [("sasrec", 32usize), ("sasrec", 256), ("ur4rec", 32), ("ur4rec", 256)] {
            let mut c = cfg.clone();
            c.train.readback_every = 1;
            let r = match model {
                "sasrec" => sasrec_rate(g, &c, &data, bsz, 3, gpu_steps, &on_gpu),
                _ => ur4rec_rate(g, &c, &data, bsz, 3, gpu_steps, &on_gpu),
            };
            println!("{model:<8} {bsz:>6} {:>12} {:>12.1} {:>9} {:>12.2} {:>14.0}   step log read after every step", "-",
                     r.seqs_per_s, "-", r.ms_per_step, r.kernels_per_step);
        }
    }
    // cuBLAS in TF32 (`train.tf32`): the plain matrix products on the tensor cores.
    if let Some(g) = gpu.map(|g| g.with_tf32(true)) {
        let sync = || g.synchronize();
        let launches = || g.launches();
        let on_tf32 = Device { sync: &sync, launches: &launches };
        for (model, bsz) in [("sasrec", 256usize), ("ur4rec", 256)] {
            let r = match model {
                "sasrec" => sasrec_rate(&g, &cfg, &data, bsz, 3, gpu_steps, &on_tf32),
                _ => ur4rec_rate(&g, &cfg, &data, bsz, 3, gpu_steps, &on_tf32),
            };
            println!("{model:<8} {bsz:>6} {:>12} {:>12.1} {:>9} {:>12.2} {:>14.0}   cuBLAS in TF32 (train.tf32)", "-",
                     r.seqs_per_s, "-", r.ms_per_step, r.kernels_per_step);
        }
    }
}
