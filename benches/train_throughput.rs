//! Training throughput of SASRec in the SASRec paper's configuration (hidden 50, 2 blocks, 1 head,
//! dropout 0.2, batch 128) on ML-100K at max length 50 and 200, on the CPU backend.
//!
//! Prints sequences/s and tokens/s and the ratio to the PyTorch reference measured on the same machine
//! kind (../shared/data/SOURCES.md: ~1,555 sequences/s at L=50, ~312 at L=200, 2 threads).
//! Run: `cargo bench --bench train_throughput` (needs ../shared/data; skips with a reason otherwise).
use std::time::Instant;
use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::config::Config;
use ur4rec_engine::data;
use ur4rec_engine::model::SasRec;
use ur4rec_engine::params::ParamBuilder;
use ur4rec_engine::rng::Rng;
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::trainer::{sasrec_step, PreparedData};

// Per-step activations are freed and reallocated every step; mimalloc reuses them without the page
// faults glibc's mmap threshold causes for large buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let path = std::path::Path::new("../shared/data/ml-100k/u.data");
    if !path.exists() {
        println!("skipped: {} not found (the benchmark needs the shared ML-100K data)", path.display());
        return;
    }
    let epochs: usize = std::env::var("BENCH_EPOCHS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let be = CpuBackend::new();
    println!("train_throughput: SASRec-paper config, ML-100K (all ratings), batch 128, {} threads, {epochs} epochs each",
             rayon::current_num_threads());
    println!("{:>6} {:>12} {:>12} {:>14} {:>10}", "maxlen", "seq/s", "tokens/s", "pytorch seq/s", "ratio");
    for (max_len, pytorch) in [(50usize, 1555.0f64), (200, 312.0)] {
        let mut cfg = Config::preset("sasrec-paper").unwrap();
        cfg.sasrec.max_len = max_len;
        let opts = data::LoadOptions { format: None, min_rating: None, min_items_per_user: 5 };
        let ds = data::load(path, &opts).expect("ML-100K loads");
        let prepared = PreparedData::from_dataset(ds, &cfg).expect("prepare");
        let mut b = ParamBuilder::new();
        let mut rng = Rng::new(1);
        let model = SasRec::new(&mut b, &cfg.sasrec, prepared.dataset.num_items, &mut rng);
        let mut store = b.build(&be);
        let mut opt = AdamW::new(store.infos.len(), 0.9, 0.98, 1e-8, 0.0);
        let users: Vec<usize> = (0..prepared.split.train.len()).collect();
        // One warm-up epoch, then timed epochs.
        let mut step = 0;
        let run_epoch = |store: &mut _, opt: &mut _, rng: &mut Rng, step: &mut usize| {
            let (mut seqs, mut toks) = (0usize, 0usize);
            let mut order = users.clone();
            rng.shuffle(&mut order);
            for chunk in order.chunks(cfg.train.batch_size) {
                let o = sasrec_step(&be, &cfg, &model, store, opt, &prepared, chunk, rng, *step, 1e-3).unwrap().unwrap();
                seqs += o.sequences;
                toks += o.tokens;
                *step += 1;
            }
            (seqs, toks)
        };
        run_epoch(&mut store, &mut opt, &mut rng, &mut step);
        let t0 = Instant::now();
        let (mut seqs, mut toks) = (0, 0);
        for _ in 0..epochs {
            let (s, t) = run_epoch(&mut store, &mut opt, &mut rng, &mut step);
            seqs += s;
            toks += t;
        }
        let secs = t0.elapsed().as_secs_f64();
        let sps = seqs as f64 / secs;
        println!("{:>6} {:>12.0} {:>12.0} {:>14.0} {:>9.2}x", max_len, sps, toks as f64 / secs, pytorch, sps / pytorch);
    }
}
