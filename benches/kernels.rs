//! Kernel microbenchmarks at the reference shapes, on the CPU backend always and on the CUDA backend when
//! `CudaBackend::new(0)` succeeds (otherwise one line "GPU: skipped (<reason>)").
//!
//! Per kernel: the median time of N timed runs after warm-up (GPU: CUDA events around each run on the
//! backend's stream; CPU: a host clock, the CPU ops being synchronous), the achieved GB/s and TFLOP/s of the
//! counted work (each input read once, each output written once; the FLOP count is stated per row), and the
//! share of the ceiling that binds (the larger of bytes/bandwidth and FLOPs/peak):
//! - GPU: H200, 4.3 TB/s device copy (measured, /work/shared/design/gpu-toolchain.md), ~67 TFLOP/s fp32 on
//!   CUDA cores (datasheet). Every kernel here is fp32 on CUDA cores; the bf16 tensor-core rate (~790
//!   TFLOP/s measured) is the ceiling of a tensor-core rewrite and is printed for the compute-bound rows.
//! - CPU: memcpy bandwidth measured here at start (bytes read + written) and threads × clock × FLOPs/cycle
//!   (FMA width from /proc/cpuinfo flags: 32 fp32 FLOP/cycle with AVX2+FMA, 64 with AVX-512).
//!
//! Reduced CPU shapes (said on each row): InfoNCE K = 4,096 (O(B·K·D)), attention L = 200 with B = 32.
//! `BENCH_GPU_ONLY=1` skips the CPU rows; `BENCH_REPS=N` sets the GPU repetitions (default 20).
//! Run: `cargo bench --bench kernels`.
use std::time::Instant;
use ur4rec_engine::backend::cuda::CudaBackend;
use ur4rec_engine::backend::{AdamWGate, AdamWHyper, Backend, Segment, Segments, CpuBackend, SeqLayout, StoreFormat, Stored};
use ur4rec_engine::rng::Rng;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const GPU_BW: f64 = 4.3e12;
const GPU_FP32: f64 = 67e12;
const GPU_BF16_TC: f64 = 790e12;

/// What a backend needs for timing: a median over repeated runs of `f`.
trait Timed: Backend {
    fn label(&self) -> &'static str;
    /// Median seconds of one call of `f` (after warm-up).
    fn median_secs(&self, f: &mut dyn FnMut()) -> f64;
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

impl Timed for CpuBackend {
    fn label(&self) -> &'static str {
        "cpu"
    }
    fn median_secs(&self, f: &mut dyn FnMut()) -> f64 {
        // One warm-up, then at least 3 and at most 7 runs, stopping after ~2 s.
        f();
        let (mut v, t0) = (Vec::new(), Instant::now());
        while v.len() < 3 || (v.len() < 7 && t0.elapsed().as_secs_f64() < 2.0) {
            let t = Instant::now();
            f();
            v.push(t.elapsed().as_secs_f64());
        }
        median(v)
    }
}

impl Timed for CudaBackend {
    fn label(&self) -> &'static str {
        if self.is_deterministic() { "gpu-det" } else { "gpu" }
    }
    fn median_secs(&self, f: &mut dyn FnMut()) -> f64 {
        use cudarc::driver::sys::CUevent_flags;
        let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20).max(1);
        for _ in 0..3 {
            f();
        }
        self.synchronize();
        let ev = || self.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("record CUDA event");
        let mut events = vec![ev()];
        for _ in 0..reps {
            f();
            events.push(ev());
        }
        self.synchronize();
        let v: Vec<f64> = events.windows(2).map(|w| w[0].elapsed_ms(&w[1]).expect("event timing") as f64 * 1e-3).collect();
        median(v)
    }
}

/// One result row.
fn row(be: &str, name: &str, shape: &str, secs: f64, bytes: f64, flops: f64, (bw, peak): (f64, f64)) {
    let (tb, tf) = (bytes / bw, flops / peak);
    let (bound, floor) = if tb >= tf { ("memory", tb) } else { ("compute", tf) };
    let tc = if be.starts_with("gpu") && bound == "compute" {
        format!(" (bf16 TC {:.2}%)", 100.0 * flops / GPU_BF16_TC / secs)
    } else {
        String::new()
    };
    println!("{be:<8} {name:<26} {shape:<34} {:>10.3} {:>9.1} {:>9.3} {bound:>8} {:>7.2}%{tc}",
             secs * 1e3, bytes / secs / 1e9, flops / secs / 1e12, 100.0 * floor / secs);
}

fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}

fn normalized(rng: &mut Rng, rows: usize, d: usize) -> Vec<f32> {
    let mut x = rand(rng, rows * d);
    for r in x.chunks_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        r.iter_mut().for_each(|v| *v /= n);
    }
    x
}

/// Runs every kernel on `b`. `cpu` selects the reduced CPU shapes.
fn bench_all<B: Timed>(b: &B, ceil: (f64, f64), cpu: bool) {
    let be = b.label();
    let mut rng = Rng::new(7);
    let f4 = 4.0f64;

    // ---- attention forward + backward: d = 256, 4 heads, full-length sequences -------------------------
    let (d, heads) = (256usize, 4usize);
    for l in [50usize, 200] {
        let nseq = if cpu && l == 200 { 32 } else { 256 };
        let layout = SeqLayout::from_lengths(b, &vec![l; nseq]);
        let t = nseq * l;
        let qkv = b.from_host(&rand(&mut rng, t * 3 * d));
        let dout = b.from_host(&rand(&mut rng, t * d));
        let mut dqkv = b.zeros(t * 3 * d);
        let (_, probs) = b.attention(&qkv, &layout, d, heads, None);
        let nprobs = b.len(&probs) as f64;
        let secs = b.median_secs(&mut || {
            let (_y, p) = b.attention(&qkv, &layout, d, heads, None);
            b.attention_backward(&qkv, &p, &layout, d, heads, None, &dout, &mut dqkv);
        });
        // Causal: each of QKᵀ, PV (forward) and dP, dV, dQ, dK (backward) is ≈ L²·hs multiply-adds per
        // (sequence, head) → 6 matmuls × L²·hs × 2 FLOP / 2 (half the square) = 6·L²·hs.
        let hs = (d / heads) as f64;
        let flops = 6.0 * (nseq * heads) as f64 * (l * l) as f64 * hs;
        // fwd: qkv, out, probs; bwd: qkv, probs, dout, dqkv (read + write).
        let bytes = f4 * ((t * 3 * d) as f64 * 4.0 + (t * d) as f64 * 2.0 + nprobs * 2.0);
        let note = if cpu && l == 200 { " (CPU: B=32)" } else { "" };
        row(be, "attention fwd+bwd", &format!("B={nseq} L={l} d={d} h={heads}{note}"), secs, bytes, flops, ceil);
    }

    // ---- InfoNCE against the memory bank, forward + backward (dq and dk), per bank storage format ---------
    for format in [StoreFormat::F32, StoreFormat::Bf16, StoreFormat::F16] {
        let (bsz, dim) = (256usize, 256usize);
        let kslots = if cpu { 4096 } else { 65_536 };
        let q = b.from_host(&normalized(&mut rng, bsz, dim));
        let k = b.from_host(&normalized(&mut rng, bsz, dim));
        let mut bank = Stored::from_host(b, &normalized(&mut rng, kslots, dim), format);
        let users_h: Vec<u32> = (0..bsz as u32).map(|u| u + 1).collect();
        let bank_users_h: Vec<u32> = (0..kslots).map(|_| rng.below(2000) as u32).collect();
        let (users, mut bank_users) = (b.idx_from_host(&users_h), b.idx_from_host(&bank_users_h));
        let dloss = b.from_host(&[1.0]);
        let (mut dq, mut dk) = (b.zeros(bsz * dim), b.zeros(bsz * dim));
        let secs = b.median_secs(&mut || {
            let _l = b.infonce_bank(&q, &k, &bank, &bank_users, &users, dim, 0.07);
            b.infonce_bank_backward(&q, &k, &bank, &bank_users, &users, dim, 0.07, &dloss, Some(&mut dq), Some(&mut dk));
        });
        // 2·B·K·D per pass over the bank: forward logits, backward logits, backward Σ p·key → 6·B·K·D.
        let flops = 6.0 * (bsz * kslots * dim) as f64;
        let bank_bytes = (format.bytes() * kslots * dim) as f64;
        let bytes = 2.0 * bank_bytes + f4 * 6.0 * (bsz * dim) as f64;
        let note = if cpu { " (CPU: K reduced)" } else { "" };
        let name = format!("infonce_bank fwd+bwd {}", format.name());
        row(be, &name, &format!("B={bsz} K={kslots} D={dim}{note}"), secs, bytes, flops, ceil);
        // The step's enqueue of the batch's keys, wrapping (pointer near the end of the ring).
        let ptr = kslots - bsz / 2;
        let open = b.wide_from_host(&[1.0]);
        let mut at = b.idx_from_host(&[ptr as u32]);
        let secs = b.median_secs(&mut || b.ring_enqueue(&mut bank, &mut bank_users, &mut at, &k, &users, dim, (&open, 0)));
        let bytes = (bsz * dim) as f64 * (4.0 + format.bytes() as f64) + (bsz * 8) as f64;
        row(be, &format!("ring_enqueue {}", format.name()), &format!("B={bsz} into K={kslots} D={dim}"), secs, bytes, 0.0, ceil);
    }

    // ---- embedding gather and scatter-add backward ---------------------------------------------------
    for rows in [1683usize, 23_716] {
        let (cols, n) = (256usize, 256 * 50);
        let table = b.from_host(&rand(&mut rng, rows * cols));
        let idx_h: Vec<u32> = (0..n).map(|_| 1 + rng.below(rows as u64 - 1) as u32).collect();
        let idx = b.idx_from_host(&idx_h);
        let mut uniq = idx_h.clone();
        uniq.sort_unstable();
        uniq.dedup();
        let shape = format!("{rows}x{cols}, {n} lookups");
        let secs = b.median_secs(&mut || {
            let _y = b.gather_rows(&table, &idx, cols);
        });
        let bytes = f4 * (2.0 * (n * cols) as f64 + n as f64);
        row(be, "embedding gather", &shape, secs, bytes, 0.0, ceil);
        let dy = b.from_host(&rand(&mut rng, n * cols));
        let mut dtable = b.zeros(rows * cols);
        let secs = b.median_secs(&mut || b.scatter_add_rows(&dy, &idx, cols, Some(0), &mut dtable));
        // dy read once, each touched table row read and written once.
        let bytes = f4 * ((n * cols) as f64 + 2.0 * (uniq.len() * cols) as f64 + n as f64);
        row(be, "embedding scatter-add bwd", &shape, secs, bytes, (n * cols) as f64, ceil);
    }

    // ---- AdamW over 2M parameters ------------------------------------------------------------------------
    {
        let n = 2_000_000usize;
        let mut p = b.from_host(&rand(&mut rng, n));
        let g = b.from_host(&rand(&mut rng, n));
        let (mut m, mut v) = (b.zeros(n), b.zeros(n));
        let hp = AdamWHyper { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        // One segment of 2M, as an accepted step (verdict 1, clip scale 1) at step count 1 gates it.
        let segs = Segments::new(b, vec![Segment { offset: 0, len: n, group: 0, param: 0, weight_decay: 0.01 }]);
        let (log, counts, lrs) = (b.wide_from_host(&[1.0, 1.0]), b.idx_from_host(&[0]), [1e-3f32]);
        let gate = AdamWGate { log: &log, ok_at: 0, scales_at: 1, counts: &counts };
        let secs = b.median_secs(&mut || b.adamw(&mut p, &g, &mut m, &mut v, &segs, &hp, &lrs, &gate));
        // p, m, v read and written, g read; ~15 FLOP per element (not the binding term).
        row(be, "adamw", "2,000,000 params", secs, f4 * 7.0 * n as f64, 15.0 * n as f64, ceil);
    }

    // ---- gemm 4096×256×256 --------------------------------------------------------------------------------
    {
        let (m, n, k) = (4096usize, 256usize, 256usize);
        let a = b.from_host(&rand(&mut rng, m * k));
        let w = b.from_host(&rand(&mut rng, n * k));
        let mut c = b.zeros(m * n);
        let secs = b.median_secs(&mut || b.gemm(1, m, n, k, 1.0, &a, false, &w, true, 0.0, &mut c));
        row(be, "gemm (x·Wᵀ)", &format!("{m}x{n}x{k} fp32"), secs, f4 * (m * k + n * k + m * n) as f64,
            2.0 * (m * n * k) as f64, ceil);
    }
}

/// CPU ceilings: measured copy bandwidth (bytes read + written, 256 MiB buffers, median of 5) and
/// threads × clock × FMA FLOPs per cycle.
fn cpu_ceilings() -> (f64, f64, String) {
    let n = 64 << 20; // 64 Mi floats = 256 MiB
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        v.push(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    let bw = 2.0 * 4.0 * n as f64 / median(v);
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = info.lines().find(|l| l.starts_with("cpu MHz")).and_then(|l| l.split(':').nth(1))
        .and_then(|s| s.trim().parse::<f64>().ok()).unwrap_or(2500.0);
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let per_cycle = if flags.contains(" avx512f") { 64.0 } else if flags.contains(" fma") && flags.contains(" avx2") { 32.0 } else { 8.0 };
    let threads = rayon::current_num_threads() as f64;
    let peak = threads * mhz * 1e6 * per_cycle;
    let how = format!("memcpy {:.1} GB/s (measured, one thread, read+write); compute {:.0} GFLOP/s = {} threads × {:.0} MHz × {} fp32 FLOP/cycle",
                      bw / 1e9, peak / 1e9, threads, mhz, per_cycle);
    (bw, peak, how)
}

fn header() {
    println!("{:<8} {:<26} {:<34} {:>10} {:>9} {:>9} {:>8} {:>8}", "backend", "kernel", "shape", "median ms", "GB/s",
             "TFLOP/s", "bound", "%ceil");
}

fn main() {
    let gpu_only = std::env::var("BENCH_GPU_ONLY").map(|v| v == "1").unwrap_or(false);
    println!("kernels: median of N timed runs after warm-up; %ceil = the binding ceiling's time / measured time");
    if !gpu_only {
        let (bw, peak, how) = cpu_ceilings();
        println!("CPU ceilings: {how}");
        header();
        bench_all(&CpuBackend::new(), (bw, peak), true);
    }
    match CudaBackend::new(0) {
        Err(e) => println!("GPU: skipped ({e})"),
        Ok(g) => {
            println!("GPU: {} — ceilings {:.1} TB/s copy, {:.0} TFLOP/s fp32 (CUDA cores), {:.0} TFLOP/s bf16 tensor cores \
                      (all kernels here are fp32 on CUDA cores)", g.name(), GPU_BW / 1e12, GPU_FP32 / 1e12, GPU_BF16_TC / 1e12);
            header();
            let ceil = (GPU_BW, GPU_FP32);
            bench_all(&g, ceil, false);
            // The deterministic embedding backward (no float atomics), same shapes.
            let g = g.with_deterministic(true);
            let mut rng = Rng::new(11);
            for rows in [1683usize, 23_716] {
                let (cols, n) = (256usize, 256 * 50);
                let idx_h: Vec<u32> = (0..n).map(|_| 1 + rng.below(rows as u64 - 1) as u32).collect();
                let mut uniq = idx_h.clone();
                uniq.sort_unstable();
                uniq.dedup();
                let idx = g.idx_from_host(&idx_h);
                let dy = g.from_host(&rand(&mut rng, n * cols));
                let mut dtable = g.zeros(rows * cols);
                let secs = g.median_secs(&mut || g.scatter_add_rows(&dy, &idx, cols, Some(0), &mut dtable));
                let bytes = 4.0 * ((n * cols) as f64 + 2.0 * (uniq.len() * cols) as f64 + n as f64);
                row(g.label(), "embedding scatter-add bwd", &format!("{rows}x{cols}, {n} lookups"), secs, bytes,
                    (n * cols) as f64, ceil);
            }
        }
    }
}
