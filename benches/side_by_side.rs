//! The engine's side of `benches/side_by_side.py`: times one UR4Rec stage-4 training step (every term,
//! every parameter trainable) on the weights, batch and memory banks of a file the script wrote (format
//! `ur4rec-golden/1`, see `reference/README.md`), and prints one JSON line.
//!
//! One step = `joint_losses` on a fresh tape, backward, per-group clipping + AdamW, memory-bank enqueue —
//! `Trainer::train_step` without its non-finite checks (the PyTorch step has none either).
//!
//! Run by the script; by hand:
//! `cargo bench --bench side_by_side -- --file F.safetensors [--steps 10] [--warmup 2] [--threads N] [--device cpu|cuda]`
use std::time::Instant;
use ur4rec_engine::backend::cuda::CudaBackend;
use ur4rec_engine::backend::{Backend, CpuBackend};
use ur4rec_engine::golden::GoldenFile;
use ur4rec_engine::tape::Tape;
use ur4rec_engine::train::explicit_batch::{joint_losses, JointSettings};
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::strategies::LossWeights;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    file: String,
    steps: usize,
    warmup: usize,
    threads: usize,
    device: String,
}

fn args() -> Args {
    let mut a = Args { file: String::new(), steps: 10, warmup: 2, threads: 0, device: "cpu".into() };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || v.get(i + 1).cloned().unwrap_or_else(|| panic!("{} needs a value", v[i]));
        match v[i].as_str() {
            "--file" => { a.file = val(); i += 1; }
            "--steps" => { a.steps = val().parse().expect("--steps"); i += 1; }
            "--warmup" => { a.warmup = val().parse().expect("--warmup"); i += 1; }
            "--threads" => { a.threads = val().parse().expect("--threads"); i += 1; }
            "--device" => { a.device = val(); i += 1; }
            _ => {} // cargo bench adds --bench
        }
        i += 1;
    }
    assert!(!a.file.is_empty(), "usage: side_by_side --file F.safetensors [--steps N] [--warmup N] [--threads N] [--device cpu|cuda]");
    a
}

/// (ms per step, step-0 loss terms) over `steps` timed steps after `warmup`.
fn time_steps<B: Backend>(be: &B, g: &GoldenFile, warmup: usize, steps: usize, sync: &dyn Fn()) -> (f64, Vec<f32>) {
    let cfg = g.config(&[]).expect("configuration");
    let (sasrec, retriever, mut store) = g.model(be, &cfg).expect("model");
    let batch = g.batch().expect("batch");
    let mut banks = g.banks(be, cfg.ur4rec.retriever.dim).ok();
    let t = &cfg.train;
    let mut opt = AdamW::new(store.infos.len(), t.beta1, t.beta2, t.adam_eps, t.weight_decay);
    let lrs: Vec<f32> = store.groups.iter().map(|gr| g.meta["lrs"][&gr.name].as_f64().expect("lr") as f32).collect();
    let weights = LossWeights::fixed();
    let mut first = Vec::new();
    // The enqueue's gate, always open here (PyTorch's step has no non-finite check either).
    let open = be.wide_from_host(&[1.0]);
    let mut t0 = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            sync();
            t0 = Instant::now();
        }
        let mut tape = Tape::new(be, cfg.seed, step as u64);
        let set = JointSettings { cfg: &cfg.ur4rec, weights: weights.at(step), banks: banks.as_ref(), poison_retrieval: false };
        let o = joint_losses(&mut tape, &sasrec, &retriever, &store, 4, &batch, &set).expect("losses");
        if step == 0 {
            let l = &o.terms.read(&tape);
            first = vec![l.total, l.sasrec, l.retrieval, l.consistency, l.contrastive, l.diversity, l.distillation];
        }
        store.zero_grads(be);
        tape.backward(o.total, &mut store.grads);
        drop(tape);
        opt.step(be, &mut store, &lrs, t.clip_norm);
        if let (Some(banks), Some(e)) = (banks.as_mut(), o.enqueue) {
            e.apply(be, banks, step as u64, (&open, 0));
            banks.0.settle(&[]);
            banks.1.settle(&[]);
        }
    }
    sync();
    (t0.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64, first)
}

fn main() {
    let a = args();
    if a.threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(a.threads).build_global().expect("thread pool");
    }
    let g = GoldenFile::load(std::path::Path::new(&a.file)).unwrap_or_else(|e| panic!("{e:#}"));
    let (ms, first, device) = match a.device.as_str() {
        "cpu" => {
            let (ms, first) = time_steps(&CpuBackend::new(), &g, a.warmup, a.steps, &|| {});
            (ms, first, format!("cpu ({} threads)", rayon::current_num_threads()))
        }
        _ => {
            let gpu = CudaBackend::new(0).unwrap_or_else(|e| panic!("no GPU: {e}"));
            let (ms, first) = time_steps(&gpu, &g, a.warmup, a.steps, &|| gpu.synchronize());
            (ms, first, format!("cuda ({})", gpu.name()))
        }
    };
    let out = serde_json::json!({"engine_ms_per_step": ms, "steps": a.steps, "warmup": a.warmup, "device": device,
                                 "threads": rayon::current_num_threads(), "step0_losses": first});
    println!("{out}");
}
