//! CPU (the reference) vs CUDA for every `Backend` method, on fresh seeded random inputs (never zeros) at
//! several shapes, including sizes that are not multiples of any block size. Each op group is written once,
//! generic over the backend, and run on both; outputs are compared by ‖gpu − cpu‖ / ‖cpu‖.
//!
//! Tolerances (relative L2):
//! - `EXACT` (0): copies, gathers, dropout masks — same bits by construction (the mask hash is integer
//!   arithmetic; kept values are x·scale in both).
//! - `ELEM` 1e-5: element-wise maps; CUDA's erff/expf/log1pf are within 2 ulp of libm, so errors are a few
//!   1e-7 relative.
//! - `RED` 1e-4: anything that sums (row reductions, gemm, losses, attention, scatter-adds with atomics):
//!   f32 sums in a different order differ by ~√n·ulp; for rows up to a few hundred terms that is ≲1e-5,
//!   and 1e-4 leaves headroom without hiding an indexing error (which shows as O(1)).
//! Without a GPU every test prints "skipped: no GPU (<reason>)" and returns.
mod fixtures;
use ur4rec_engine::backend::cuda::CudaBackend;
use ur4rec_engine::backend::{AdamWGate, AdamWHyper, Backend, Segment, Segments, VerdictLayout, CpuBackend, DropoutKey, SeqLayout, StoreFormat, Stored};
use ur4rec_engine::rng::Rng;

const EXACT: f64 = 0.0;
const ELEM: f64 = 1e-5;
const RED: f64 = 1e-4;

fn gpu() -> Option<CudaBackend> {
    fixtures::gpu_or_skip()
}

/// Uniform in ±[0.1, 1.1): random signs, never zero.
fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| {
        let m = 0.1 + rng.uniform();
        if rng.uniform() < 0.5 { -m } else { m }
    }).collect()
}

fn rand_idx(rng: &mut Rng, n: usize, below: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(below as u64) as u32).collect()
}

type Outputs = Vec<(String, Vec<f32>, f64)>;

fn compare(group: &str, cpu: Outputs, gpu: Outputs) {
    assert_eq!(cpu.len(), gpu.len());
    let mut bad = Vec::new();
    for ((name, c, tol), (_, g, _)) in cpu.iter().zip(&gpu) {
        assert_eq!(c.len(), g.len(), "{group}/{name}: lengths differ");
        let num: f64 = c.iter().zip(g).map(|(a, b)| ((*a as f64) - (*b as f64)).powi(2)).sum::<f64>().sqrt();
        let den: f64 = c.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
        let rel = num / den;
        let finite = g.iter().all(|v| v.is_finite()) == c.iter().all(|v| v.is_finite());
        if !(rel <= *tol) || !finite {
            bad.push(format!("{group}/{name}: relative error {rel:.3e} > {tol:.0e}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

fn out<B: Backend>(b: &B, o: &mut Outputs, name: impl Into<String>, x: &B::Buf, tol: f64) {
    o.push((name.into(), b.to_host(x), tol));
}

/// Runs `f` on both backends and compares. The CPU half runs without a GPU too, so the invariants an ops
/// function asserts on its own backend (exact equalities, refused steps changing nothing) are checked in CI.
macro_rules! parity {
    ($group:expr, $f:ident) => {{
        let cpu = $f(&CpuBackend::new());
        let Some(g) = gpu() else { return };
        compare($group, cpu, $f(&g));
    }};
}

// ---- storage, elementwise, dropout ------------------------------------------------------------------

const LENS: [usize; 4] = [1, 31, 257, 10_001];

fn storage_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &n) in LENS.iter().enumerate() {
        let mut rng = Rng::new(100 + t as u64);
        let x = b.from_host(&rand(&mut rng, n));
        let y0 = rand(&mut rng, n);
        out(b, &mut o, format!("from_host{n}"), &x, EXACT);
        out(b, &mut o, format!("zeros{n}"), &b.zeros(n), EXACT);
        // Several first elements in one read: the same values as one read each.
        let others = [b.from_host(&rand(&mut rng, 1)), b.from_host(&rand(&mut rng, 3))];
        let together = b.read_scalars(&[&x, &others[0], &others[1]]);
        assert_eq!(together, vec![b.read_scalar(&x), b.read_scalar(&others[0]), b.read_scalar(&others[1])]);
        o.push((format!("read_scalars{n}"), together, EXACT));
        let off = n / 3;
        let len = n - off;
        out(b, &mut o, format!("copy_range{n}"), &b.copy_range(&x, off, len), EXACT);
        let mut y = b.from_host(&y0);
        let part = b.from_host(&rand(&mut rng, len));
        b.add_into_range(&mut y, off, &part);
        out(b, &mut o, format!("add_into_range{n}"), &y, ELEM);
        b.write_range(&mut y, off, &part);
        out(b, &mut o, format!("write_range{n}"), &y, EXACT);
        b.axpy(&mut y, -0.7, &x);
        out(b, &mut o, format!("axpy{n}"), &y, ELEM);
        b.fill(&mut y, 0.25);
        out(b, &mut o, format!("fill{n}"), &y, EXACT);
        assert_eq!(b.len(&y), n);
    }
    for &(rows, ca, cb) in &[(1usize, 1usize, 1usize), (7, 3, 5), (129, 64, 33)] {
        let mut rng = Rng::new(7 * rows as u64);
        let a = b.from_host(&rand(&mut rng, rows * ca));
        let bb = b.from_host(&rand(&mut rng, rows * cb));
        let cat = b.concat_cols(&a, ca, &bb, cb);
        out(b, &mut o, format!("concat_cols{rows}"), &cat, EXACT);
        let g = b.from_host(&rand(&mut rng, rows * (ca + cb)));
        let mut da = b.from_host(&rand(&mut rng, rows * ca));
        let mut db = b.from_host(&rand(&mut rng, rows * cb));
        b.split_cols_acc(&g, ca, cb, Some(&mut da), Some(&mut db));
        out(b, &mut o, format!("split_cols_acc_a{rows}"), &da, ELEM);
        out(b, &mut o, format!("split_cols_acc_b{rows}"), &db, ELEM);
    }
    o
}

fn elementwise_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &n) in LENS.iter().enumerate() {
        let mut rng = Rng::new(200 + t as u64);
        // Spread to ±4.4 so GELU / softplus see both tails.
        let xs: Vec<f32> = rand(&mut rng, n).iter().map(|v| v * 4.0).collect();
        let x = b.from_host(&xs);
        let y = b.from_host(&rand(&mut rng, n));
        let dy = b.from_host(&rand(&mut rng, n));
        let d0 = rand(&mut rng, n);
        out(b, &mut o, format!("add{n}"), &b.add(&x, &y), ELEM);
        // 16-bit rounding must be the `half` crate's, bit for bit (exact: the same ties-to-even rule).
        for format in [StoreFormat::Bf16, StoreFormat::F16] {
            let mut r = b.from_host(&xs);
            b.round_to_format(&mut r, format);
            out(b, &mut o, format!("round_to_{}{n}", format.name()), &r, EXACT);
        }
        out(b, &mut o, format!("mul{n}"), &b.mul(&x, &y), ELEM);
        out(b, &mut o, format!("scale{n}"), &b.scale(&x, 0.3), ELEM);
        out(b, &mut o, format!("relu{n}"), &b.relu(&x), ELEM);
        out(b, &mut o, format!("gelu{n}"), &b.gelu(&x), ELEM);
        out(b, &mut o, format!("softplus{n}"), &b.softplus(&x), ELEM);
        let mut dx = b.from_host(&d0);
        b.mul_acc(&mut dx, &dy, &y);
        out(b, &mut o, format!("mul_acc{n}"), &dx, ELEM);
        let mut dx = b.from_host(&d0);
        b.relu_backward(&x, &dy, &mut dx);
        out(b, &mut o, format!("relu_backward{n}"), &dx, ELEM);
        let mut dx = b.from_host(&d0);
        b.gelu_backward(&x, &dy, &mut dx);
        out(b, &mut o, format!("gelu_backward{n}"), &dx, ELEM);
        let mut dx = b.from_host(&d0);
        b.softplus_backward(&x, &dy, &mut dx);
        out(b, &mut o, format!("softplus_backward{n}"), &dx, ELEM);
        let mut xb = b.from_host(&d0);
        b.add_bias(&mut xb, &b.from_host(&rand(&mut rng, 1)), 1);
        out(b, &mut o, format!("add_bias1_{n}"), &xb, ELEM);
        let c = b.from_host(&[1.7]);
        let mut dx = b.from_host(&d0);
        b.add_scalar_acc(&mut dx, &c, -0.25);
        out(b, &mut o, format!("add_scalar_acc{n}"), &dx, ELEM);
    }
    o
}

fn dropout_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &n) in LENS.iter().enumerate() {
        let mut rng = Rng::new(300 + t as u64);
        let x = b.from_host(&rand(&mut rng, n));
        for &p in &[0.1f32, 0.5] {
            let key = DropoutKey { p, seed: 0xDEAD_BEEF + t as u64, stream: 17 };
            out(b, &mut o, format!("dropout{n}_{p}"), &b.dropout(&x, key), EXACT);
            let mut dx = b.from_host(&rand(&mut rng, n));
            b.dropout_backward(&x, key, &mut dx);
            out(b, &mut o, format!("dropout_backward{n}_{p}"), &dx, ELEM);
        }
    }
    o
}

#[test]
fn storage_parity() {
    parity!("storage", storage_ops);
}
#[test]
fn elementwise_parity() {
    parity!("elementwise", elementwise_ops);
}
#[test]
fn dropout_masks_are_bit_identical() {
    parity!("dropout", dropout_ops);
}

// ---- row-wise ---------------------------------------------------------------------------------------

const SHAPES: [(usize, usize); 5] = [(1, 1), (7, 33), (300, 64), (65, 257), (3, 1000)];

fn rowwise_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &(rows, cols)) in SHAPES.iter().enumerate() {
        let mut rng = Rng::new(400 + t as u64);
        let n = rows * cols;
        let xs: Vec<f32> = rand(&mut rng, n).iter().map(|v| v * 3.0).collect();
        let x = b.from_host(&xs);
        let dy = b.from_host(&rand(&mut rng, n));
        let d0 = rand(&mut rng, n);
        let tag = format!("{rows}x{cols}");
        let gamma = b.from_host(&rand(&mut rng, cols));
        let beta = b.from_host(&rand(&mut rng, cols));
        let (y, mean, rstd) = b.layer_norm(&x, &gamma, &beta, cols, 1e-5);
        out(b, &mut o, format!("layer_norm_y{tag}"), &y, ELEM);
        out(b, &mut o, format!("layer_norm_mean{tag}"), &mean, ELEM);
        out(b, &mut o, format!("layer_norm_rstd{tag}"), &rstd, ELEM);
        let mut dx = b.from_host(&d0);
        let mut dg = b.from_host(&rand(&mut rng, cols));
        let mut db = b.from_host(&rand(&mut rng, cols));
        b.layer_norm_backward(&x, &gamma, &mean, &rstd, &dy, cols, Some(&mut dx), Some(&mut dg), Some(&mut db));
        out(b, &mut o, format!("layer_norm_dx{tag}"), &dx, RED);
        out(b, &mut o, format!("layer_norm_dgamma{tag}"), &dg, RED);
        out(b, &mut o, format!("layer_norm_dbeta{tag}"), &db, RED);

        let sm = b.softmax(&x, cols);
        out(b, &mut o, format!("softmax{tag}"), &sm, RED);
        let mut dx = b.from_host(&d0);
        b.softmax_backward(&sm, &dy, cols, &mut dx);
        out(b, &mut o, format!("softmax_backward{tag}"), &dx, RED);
        let ls = b.log_softmax(&x, cols);
        out(b, &mut o, format!("log_softmax{tag}"), &ls, RED);
        let mut dx = b.from_host(&d0);
        b.log_softmax_backward(&ls, &dy, cols, &mut dx);
        out(b, &mut o, format!("log_softmax_backward{tag}"), &dx, RED);

        // Row 0 scaled below eps exercises the clamped branch.
        let mut xl = xs.clone();
        xl[..cols].iter_mut().for_each(|v| *v *= 1e-9);
        let xl = b.from_host(&xl);
        let (yn, norms) = b.l2_normalize(&xl, cols, 1e-6);
        out(b, &mut o, format!("l2_normalize{tag}"), &yn, RED);
        out(b, &mut o, format!("l2_norms{tag}"), &norms, RED);
        let mut dx = b.from_host(&d0);
        b.l2_normalize_backward(&xl, &norms, &dy, cols, 1e-6, &mut dx);
        out(b, &mut o, format!("l2_normalize_backward{tag}"), &dx, RED);

        out(b, &mut o, format!("row_dot{tag}"), &b.row_dot(&x, &dy, cols), RED);
        let g = b.from_host(&rand(&mut rng, rows));
        let mut dx = b.from_host(&d0);
        b.row_scale_acc(&mut dx, &g, &x, cols);
        out(b, &mut o, format!("row_scale_acc{tag}"), &dx, ELEM);

        let bias = b.from_host(&rand(&mut rng, cols));
        let mut xb = b.from_host(&d0);
        b.add_bias(&mut xb, &bias, cols);
        out(b, &mut o, format!("add_bias{tag}"), &xb, ELEM);
        let mut s = b.from_host(&rand(&mut rng, cols));
        b.sum_rows_into(&x, cols, &mut s);
        out(b, &mut o, format!("sum_rows_into{tag}"), &s, RED);
    }
    o
}

#[test]
fn rowwise_parity() {
    parity!("rowwise", rowwise_ops);
}

// ---- indexing -----------------------------------------------------------------------------------------

fn indexing_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &(items, cols, n)) in [(5usize, 1usize, 1usize), (37, 33, 100), (1001, 64, 777)].iter().enumerate() {
        let mut rng = Rng::new(500 + t as u64);
        let table = b.from_host(&rand(&mut rng, items * cols));
        let idx_h = rand_idx(&mut rng, n, items);
        let idx = b.idx_from_host(&idx_h);
        let tag = format!("{items}x{cols}x{n}");
        out(b, &mut o, format!("gather_rows{tag}"), &b.gather_rows(&table, &idx, cols), EXACT);
        let dy = b.from_host(&rand(&mut rng, n * cols));
        for skip in [None, Some(idx_h[0])] {
            let mut dt = b.from_host(&rand(&mut rng, items * cols));
            b.scatter_add_rows(&dy, &idx, cols, skip, &mut dt);
            out(b, &mut o, format!("scatter_add_rows{tag}_{skip:?}"), &dt, RED);
        }
    }
    for (t, &(rows, c, j, d)) in [(1usize, 1usize, 1usize, 1usize), (7, 50, 13, 33), (129, 300, 101, 64)].iter().enumerate() {
        let mut rng = Rng::new(600 + t as u64);
        let tag = format!("{rows}x{c}x{j}x{d}");
        let x = b.from_host(&rand(&mut rng, rows * c));
        let idx = b.idx_from_host(&rand_idx(&mut rng, rows * j, c));
        out(b, &mut o, format!("gather_cols{tag}"), &b.gather_cols(&x, &idx, c, j), EXACT);
        let dy = b.from_host(&rand(&mut rng, rows * j));
        let mut dx = b.from_host(&rand(&mut rng, rows * c));
        b.gather_cols_backward(&dy, &idx, c, j, &mut dx);
        out(b, &mut o, format!("gather_cols_backward{tag}"), &dx, ELEM);
        // Candidate scoring against a table of c items.
        let h = b.from_host(&rand(&mut rng, rows * d));
        let table = b.from_host(&rand(&mut rng, c * d));
        out(b, &mut o, format!("score_candidates{tag}"), &b.score_candidates(&h, &table, &idx, d, j), RED);
        let mut dh = b.from_host(&rand(&mut rng, rows * d));
        let mut dt = b.from_host(&rand(&mut rng, c * d));
        b.score_candidates_backward(&h, &table, &idx, d, j, &dy, Some(&mut dh), Some(&mut dt));
        out(b, &mut o, format!("score_candidates_dh{tag}"), &dh, RED);
        out(b, &mut o, format!("score_candidates_dtable{tag}"), &dt, RED);
    }
    o
}

#[test]
fn indexing_parity() {
    parity!("indexing", indexing_ops);
}

// ---- gemm, optimizer, reductions -------------------------------------------------------------------------

fn gemm_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    let mut rng = Rng::new(700);
    for &(batch, m, n, k) in &[(1usize, 1usize, 1usize, 1usize), (1, 7, 5, 3), (3, 33, 65, 129), (2, 50, 50, 64)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for beta in [0.0f32, 1.0] {
                    let a = b.from_host(&rand(&mut rng, batch * m * k));
                    let bb = b.from_host(&rand(&mut rng, batch * k * n));
                    let mut c = b.from_host(&rand(&mut rng, batch * m * n));
                    b.gemm(batch, m, n, k, 0.75, &a, ta, &bb, tb, beta, &mut c);
                    out(b, &mut o, format!("gemm{batch}x{m}x{n}x{k}_{ta}{tb}_{beta}"), &c, RED);
                }
            }
        }
    }
    o
}

fn optimizer_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &n) in LENS.iter().enumerate() {
        let mut rng = Rng::new(800 + t as u64);
        let total = n + 10;
        let mut p = b.from_host(&rand(&mut rng, total));
        let g = b.from_host(&rand(&mut rng, total));
        let mut m = b.from_host(&rand(&mut rng, total).iter().map(|v| v * 0.1).collect::<Vec<_>>());
        let mut v = b.from_host(&rand(&mut rng, total).iter().map(|v| v * v * 0.01).collect::<Vec<_>>());
        let ss = b.sum_squares(&g, 3, n);
        o.push((format!("sum_squares{n}"), vec![ss as f32], RED));
        // Several ranges (one empty, some overlapping): record_step below must give each exactly these bits.
        let ranges = [(3, n), (0, 0), (1, n / 2 + 1), (n / 3, n / 3 + 2)];
        let many: Vec<f64> = ranges.iter().map(|&(off, len)| b.sum_squares(&g, off, len)).collect();
        o.push((format!("sum_squares_ranges{n}"), many.iter().map(|&v| v as f32).collect(), RED));
        // The step log (train::step_log): a row recorded at an offset (the ranges' sums — overlapping ranges,
        // one pass — then two losses), its verdict and per-group clip scales (groups 0, 1, 0, 1; clip 0.5),
        // the gated AdamW update of three disjoint segments (one empty) in one pass, taking each segment's
        // learning rate, clip scale and step count from the device, then the counts' advance.
        let sums_of = Segments::new(b, ranges.iter().enumerate()
            .map(|(j, &(offset, len))| Segment { offset, len, group: j % 2, param: j, weight_decay: 0.0 }).collect());
        let (l1, l2) = (b.sum_all(&g), b.from_host(&rand(&mut rng, 1)));
        let (width, at) = (16, 17);
        let mut log = b.wide_zeros(2 * width);
        b.record_step(&mut log, at, &g, &sums_of, &[&l1, &l2]);
        let recorded = b.wide_to_host(&log);
        assert_eq!(&recorded[at..at + 4], many.as_slice(), "record_step: the sums are sum_squares's, bit for bit");
        assert_eq!(recorded[at + 4] as f32, b.read_scalar(&l1), "record_step: the loss widened");
        let groups = b.idx_from_host(&[0, 1, 0, 1]);
        let layout = VerdictLayout { sums: 4, checked_at: 4, ok_at: 6, scales_at: 7, groups: 2 };
        b.step_verdict(&mut log, at, &layout, &groups, 0.5);
        let update = Segments::new(b, vec![
            Segment { offset: 0, len: 2, group: 0, param: 0, weight_decay: 0.01 },
            Segment { offset: 5, len: n, group: 1, param: 1, weight_decay: 0.01 },
            Segment { offset: n + 5, len: 0, group: 0, param: 2, weight_decay: 0.0 },
        ]);
        let mut counts = b.idx_from_host(&[2, 7, 0]);
        let hp = AdamWHyper { beta1: 0.9, beta2: 0.98, eps: 1e-8 };
        let lrs = [2e-3, 1e-3];
        let gate = AdamWGate { log: &log, ok_at: at + 6, scales_at: at + 7, counts: &counts };
        b.adamw(&mut p, &g, &mut m, &mut v, &update, &hp, &lrs, &gate);
        b.advance_steps(&mut counts, &update, &log, at + 6);
        let row = b.wide_to_host(&log)[at..at + 9].to_vec();
        assert_eq!(row[6], 1.0, "step_verdict: finite sums and loss pass");
        for gr in 0..2 {
            let norm = (0..4).filter(|j| j % 2 == gr).map(|j| many[j]).sum::<f64>().sqrt();
            let want = (0.5 / (norm + 1e-6)).min(1.0) as f32 as f64;
            assert_eq!(row[7 + gr], want, "group {gr}'s clip scale from the row's own sums: {row:?}");
        }
        o.push((format!("step_log_row{n}"), row.iter().map(|&x| x as f32).collect(), RED));
        assert_eq!(b.idx_to_host(&counts), vec![3, 8, 1], "advance_steps after an accepted step");
        out(b, &mut o, format!("adamw_p{n}"), &p, ELEM);
        out(b, &mut o, format!("adamw_m{n}"), &m, ELEM);
        out(b, &mut o, format!("adamw_v{n}"), &v, ELEM);
        // A refused step: a NaN in one gradient range makes the verdict 0; the update and the advance then
        // leave everything exactly as it was.
        let mut bad = b.to_host(&g);
        bad[1 + n / 2] = f32::NAN;
        let bad = b.from_host(&bad);
        b.record_step(&mut log, 0, &bad, &sums_of, &[&l1]);
        let layout = VerdictLayout { sums: 4, checked_at: 4, ok_at: 5, scales_at: 6, groups: 2 };
        b.step_verdict(&mut log, 0, &layout, &groups, 0.5);
        assert_eq!(b.wide_to_host(&log)[5], 0.0, "step_verdict: a NaN gradient refuses the step");
        let before = (b.to_host(&p), b.to_host(&m), b.to_host(&v));
        let gate = AdamWGate { log: &log, ok_at: 5, scales_at: 6, counts: &counts };
        b.adamw(&mut p, &bad, &mut m, &mut v, &update, &hp, &lrs, &gate);
        b.advance_steps(&mut counts, &update, &log, 5);
        assert_eq!((b.to_host(&p), b.to_host(&m), b.to_host(&v)), before, "a refused AdamW update changes nothing");
        assert_eq!(b.idx_to_host(&counts), vec![3, 8, 1], "a refused step advances no count");
        out(b, &mut o, format!("sum_all{n}"), &b.sum_all(&g), RED);
        o.push((format!("read_scalar{n}"), vec![b.read_scalar(&b.sum_all(&g))], RED));
    }
    // Segments past the reductions' block cap (1,024 blocks of 256: grid-stride within a segment), and more
    // segments than a warp: sums bit for bit sum_squares's, the update in one pass.
    let mut rng = Rng::new(870);
    let lens = [300_001usize, 1, 299_999, 0, 5, 70_000, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 17];
    let total: usize = lens.iter().sum();
    let mut segs = Vec::new();
    let mut offset = 0;
    for (j, &len) in lens.iter().enumerate() {
        segs.push(Segment { offset, len, group: j % 3, param: j, weight_decay: if j % 2 == 0 { 0.01 } else { 0.0 } });
        offset += len;
    }
    let segs = Segments::new(b, segs);
    let (mut p, g) = (b.from_host(&rand(&mut rng, total)), b.from_host(&rand(&mut rng, total)));
    let (mut m, mut v) = (b.from_host(&rand(&mut rng, total)), b.from_host(&rand(&mut rng, total).iter().map(|x| x * x).collect::<Vec<_>>()));
    let loss = b.from_host(&[1.5]);
    let mut log = b.wide_zeros(lens.len() + 5);
    b.record_step(&mut log, 0, &g, &segs, &[&loss]);
    let sums = b.wide_to_host(&log)[..lens.len()].to_vec();
    let want: Vec<f64> = segs.host.iter().map(|s| b.sum_squares(&g, s.offset, s.len)).collect();
    assert_eq!(sums, want, "record_step over many and large segments: sum_squares's bits");
    let layout = VerdictLayout { sums: lens.len(), checked_at: lens.len(), ok_at: lens.len() + 1, scales_at: lens.len() + 2, groups: 3 };
    b.step_verdict(&mut log, 0, &layout, &b.idx_from_host(&segs.host.iter().map(|s| s.group as u32).collect::<Vec<_>>()), 1.0);
    let mut counts = b.idx_from_host(&(0..lens.len() as u32).collect::<Vec<_>>());
    let gate = AdamWGate { log: &log, ok_at: layout.ok_at, scales_at: layout.scales_at, counts: &counts };
    let hp = AdamWHyper { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    b.adamw(&mut p, &g, &mut m, &mut v, &segs, &hp, &[1e-3, 2e-3, 3e-3], &gate);
    b.advance_steps(&mut counts, &segs, &log, layout.ok_at);
    assert_eq!(b.idx_to_host(&counts), (1..=lens.len() as u32).collect::<Vec<_>>());
    o.push(("step_log_large_row".into(), b.wide_to_host(&log).iter().map(|&x| x as f32).collect(), RED));
    out(b, &mut o, "adamw_large_p".to_string(), &p, ELEM);
    out(b, &mut o, "adamw_large_m".to_string(), &m, ELEM);
    out(b, &mut o, "adamw_large_v".to_string(), &v, ELEM);
    o
}

#[test]
fn gemm_parity() {
    parity!("gemm", gemm_ops);
}
/// `train.tf32`: with TF32 math, cuBLAS rounds the inputs to 10 mantissa bits (unit roundoff 2⁻¹¹ ≈ 4.9e-4)
/// and accumulates in f32 — within 3e-3 relative of the CPU's f32 product at k = 256, and not equal to the
/// GPU's own f32 product (the mode took effect); switched back off, the products are f32 again (RED).
#[test]
fn gemm_in_tf32_is_close_to_f32_and_switches_off() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let (m, n, k) = (300usize, 257usize, 256usize);
    let mut rng = Rng::new(777);
    let (a, bm) = (rand(&mut rng, m * k), rand(&mut rng, k * n));
    let on_cpu = {
        let mut out = c.zeros(m * n);
        c.gemm(1, m, n, k, 1.0, &c.from_host(&a), false, &c.from_host(&bm), false, 0.0, &mut out);
        out
    };
    let run = |g: &CudaBackend| {
        let mut out = g.zeros(m * n);
        g.gemm(1, m, n, k, 1.0, &g.from_host(&a), false, &g.from_host(&bm), false, 0.0, &mut out);
        g.to_host(&out)
    };
    let g = g.with_tf32(true);
    let tf32 = run(&g);
    let g = g.with_tf32(false);
    let f32 = run(&g);
    let rel = |x: &[f32]| {
        let num: f64 = x.iter().zip(&on_cpu).map(|(a, b)| ((*a as f64) - (*b as f64)).powi(2)).sum::<f64>().sqrt();
        num / on_cpu.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
    };
    println!("gemm {m}x{n}x{k}: TF32 relative error {:.2e}, f32 {:.2e}", rel(&tf32), rel(&f32));
    assert!(rel(&tf32) <= 3e-3, "TF32 product off by {:.2e}", rel(&tf32));
    assert!(rel(&f32) <= RED, "f32 product off by {:.2e}", rel(&f32));
    assert_ne!(tf32, f32, "train.tf32 changed nothing: cuBLAS did not use TF32");
}

#[test]
fn optimizer_and_reduction_parity() {
    parity!("optimizer", optimizer_ops);
}

// ---- losses -------------------------------------------------------------------------------------------

fn loss_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &(rows, k)) in [(1usize, 1usize), (7, 33), (300, 101), (2, 2000)].iter().enumerate() {
        let mut rng = Rng::new(900 + t as u64);
        let tag = format!("{rows}x{k}");
        let dloss = b.from_host(&[1.3]);
        let pos = b.from_host(&rand(&mut rng, rows));
        let neg = b.from_host(&rand(&mut rng, rows * k).iter().map(|v| v * 3.0).collect::<Vec<_>>());
        out(b, &mut o, format!("bpr{tag}"), &b.bpr(&pos, &neg, k), RED);
        let mut dp = b.from_host(&rand(&mut rng, rows));
        let mut dn = b.from_host(&rand(&mut rng, rows * k));
        b.bpr_backward(&pos, &neg, k, &dloss, Some(&mut dp), Some(&mut dn));
        out(b, &mut o, format!("bpr_dpos{tag}"), &dp, RED);
        out(b, &mut o, format!("bpr_dneg{tag}"), &dn, ELEM);

        let labels = b.from_host(&(0..rows * k).map(|_| rng.uniform()).collect::<Vec<_>>());
        out(b, &mut o, format!("bce{tag}"), &b.bce_logits(&neg, &labels), RED);
        let mut dx = b.from_host(&rand(&mut rng, rows * k));
        b.bce_logits_backward(&neg, &labels, &dloss, &mut dx);
        out(b, &mut o, format!("bce_backward{tag}"), &dx, ELEM);

        let target = b.idx_from_host(&rand_idx(&mut rng, rows, k));
        out(b, &mut o, format!("cross_entropy{tag}"), &b.cross_entropy(&neg, &target, k), RED);
        let mut dx = b.from_host(&rand(&mut rng, rows * k));
        b.cross_entropy_backward(&neg, &target, k, &dloss, &mut dx);
        out(b, &mut o, format!("cross_entropy_backward{tag}"), &dx, RED);

        // A proper teacher distribution per row, with one exact zero (0·log 0 = 0 path).
        let mut teacher: Vec<f32> = (0..rows * k).map(|_| 0.05 + rng.uniform()).collect();
        for r in 0..rows {
            let row = &mut teacher[r * k..(r + 1) * k];
            if k > 1 {
                row[0] = 0.0;
            }
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        let teacher = b.from_host(&teacher);
        out(b, &mut o, format!("kl{tag}"), &b.kl_div(&neg, &teacher, k), RED);
        let mut dx = b.from_host(&rand(&mut rng, rows * k));
        b.kl_div_backward(&neg, &teacher, k, &dloss, &mut dx);
        out(b, &mut o, format!("kl_backward{tag}"), &dx, RED);

        let other = b.from_host(&rand(&mut rng, rows * k));
        out(b, &mut o, format!("mse{tag}"), &b.mse(&neg, &other), RED);
    }
    o
}

#[test]
fn loss_parity() {
    parity!("losses", loss_ops);
}

// ---- attention ----------------------------------------------------------------------------------------

fn attention_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    let lengths = [1usize, 7, 50, 130, 9];
    for &(d, heads) in &[(64usize, 2usize), (32, 4), (96, 1)] {
        for dropout in [None, Some(DropoutKey { p: 0.2, seed: 99, stream: 3 })] {
            let mut rng = Rng::new(1000 + d as u64 + heads as u64);
            let t: usize = lengths.iter().sum();
            // Key validity: random dropouts in sequence 2, and the last sequence (9 tokens) all invalid.
            let mut valid = vec![1u32; t];
            let s2 = lengths[0] + lengths[1];
            for v in &mut valid[s2..s2 + lengths[2]] {
                if rng.uniform() < 0.3 {
                    *v = 0;
                }
            }
            let last = t - lengths[4];
            valid[last..].iter_mut().for_each(|v| *v = 0);
            let mut offsets = vec![0u32];
            for &n in &lengths {
                offsets.push(offsets.last().unwrap() + n as u32);
            }
            let layout = SeqLayout::new(b, offsets, valid);
            let qkv = b.from_host(&rand(&mut rng, t * 3 * d));
            let tag = format!("d{d}h{heads}_{}", dropout.is_some());
            let (y, probs) = b.attention(&qkv, &layout, d, heads, dropout);
            out(b, &mut o, format!("attention_out{tag}"), &y, RED);
            out(b, &mut o, format!("attention_probs{tag}"), &probs, RED);
            let dout = b.from_host(&rand(&mut rng, t * d));
            let mut dqkv = b.from_host(&rand(&mut rng, t * 3 * d));
            b.attention_backward(&qkv, &probs, &layout, d, heads, dropout, &dout, &mut dqkv);
            out(b, &mut o, format!("attention_dqkv{tag}"), &dqkv, RED);
        }
    }
    o
}

#[test]
fn attention_parity() {
    parity!("attention", attention_ops);
}

// ---- fused InfoNCE against the memory bank -----------------------------------------------------------------

fn normalize_rows(x: &mut [f32], d: usize) {
    for r in x.chunks_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        r.iter_mut().for_each(|v| *v /= n);
    }
}

const FORMATS: [StoreFormat; 3] = [StoreFormat::F32, StoreFormat::Bf16, StoreFormat::F16];

fn infonce_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    let shapes = [(1usize, 1usize, 1usize), (7, 100, 33), (33, 1000, 64), (5, 70, 256)];
    for (t, (&(bsz, slots, d), format)) in shapes.iter().flat_map(|s| FORMATS.map(|f| (s, f))).enumerate() {
        let mut rng = Rng::new(1100 + t as u64);
        // The bank's keys are rounded to `format` on both backends; the kernels widen them as they read.
        let tag = format!("{bsz}x{slots}x{d}_{}", format.name());
        let (mut qh, mut kh, mut bh) = (rand(&mut rng, bsz * d), rand(&mut rng, bsz * d), rand(&mut rng, slots * d));
        normalize_rows(&mut qh, d);
        normalize_rows(&mut kh, d);
        normalize_rows(&mut bh, d);
        // Users 1..=4 so some bank slots are masked; some slots hold user 0 (never masked).
        let users = b.idx_from_host(&rand_idx(&mut rng, bsz, 4).iter().map(|u| u + 1).collect::<Vec<_>>());
        let bank_users = b.idx_from_host(&rand_idx(&mut rng, slots, 5));
        let (q, k, bank) = (b.from_host(&qh), b.from_host(&kh), Stored::from_host(b, &bh, format));
        out(b, &mut o, format!("infonce{tag}"), &b.infonce_bank(&q, &k, &bank, &bank_users, &users, d, 0.07), RED);
        let dloss = b.from_host(&[0.8]);
        let mut dq = b.from_host(&rand(&mut rng, bsz * d));
        let mut dk = b.from_host(&rand(&mut rng, bsz * d));
        b.infonce_bank_backward(&q, &k, &bank, &bank_users, &users, d, 0.07, &dloss, Some(&mut dq), Some(&mut dk));
        out(b, &mut o, format!("infonce_dq{tag}"), &dq, RED);
        out(b, &mut o, format!("infonce_dk{tag}"), &dk, RED);
    }
    o
}

#[test]
fn infonce_bank_parity() {
    parity!("infonce", infonce_ops);
}

// ---- LogDet: Cholesky log-determinant and inverse -----------------------------------------------------

/// `F Fᵀ + 0.1·I` for random unit rows `F: [n, d]` (the diversity term's Gram matrix), at sizes around and
/// above the block's thread count, and a matrix that is not positive definite (NaN value and inverse on both).
fn logdet_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &(n, d)) in [(1usize, 3usize), (5, 4), (33, 16), (256, 64), (300, 256)].iter().enumerate() {
        let mut rng = Rng::new(1400 + t as u64);
        let mut f = rand(&mut rng, n * d);
        normalize_rows(&mut f, d);
        let g: Vec<f32> = (0..n * n).map(|e| {
            let (i, j) = (e / n, e % n);
            let dot: f32 = (0..d).map(|x| f[i * d + x] * f[j * d + x]).sum();
            dot + if i == j { 0.1 } else { 0.0 }
        }).collect();
        let (value, inverse) = b.logdet_spd(&b.from_host(&g), n);
        out(b, &mut o, format!("logdet_value{n}"), &value, ELEM);
        out(b, &mut o, format!("logdet_inverse{n}"), &inverse, ELEM);
    }
    // [[1, 2], [2, 1]] has a negative eigenvalue: both outputs are NaN everywhere (compared as NaN flags).
    let (value, inverse) = b.logdet_spd(&b.from_host(&[1.0, 2.0, 2.0, 1.0]), 2);
    let flags: Vec<f32> = b.to_host(&value).into_iter().chain(b.to_host(&inverse)).map(|v| v.is_nan() as u8 as f32).collect();
    assert_eq!(flags, vec![1.0; 5], "an indefinite matrix gives NaN value and inverse");
    o.push(("logdet_indefinite_nan_flags".into(), flags, EXACT));
    o
}

#[test]
fn logdet_parity() {
    parity!("logdet", logdet_ops);
}

// ---- evaluation over the whole catalogue -------------------------------------------------------------

/// Fused softmax scores and target-rank counts at the reference catalogue sizes (1,683 and 23,716 items plus
/// padding) and a tiny one, with scores on a coarse grid so that ties occur, and exclusion lists. Counts are
/// integers: EXACT.
fn ranking_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &(rows, cols)) in [(1usize, 2usize), (5, 1684), (3, 23_717)].iter().enumerate() {
        let mut rng = Rng::new(1500 + t as u64);
        let s_h: Vec<f32> = (0..rows * cols).map(|_| (rng.below(64) as f32) * 0.125 - 4.0).collect();
        let q_h = rand(&mut rng, rows * cols);
        let (s, q) = (b.from_host(&s_h), b.from_host(&q_h));
        out(b, &mut o, format!("fuse_softmax{rows}x{cols}"), &b.fuse_softmax(&s, &q, cols, 0.3), ELEM);
        let targets: Vec<u32> = (0..rows).map(|_| 1 + rng.below(cols as u64 - 1) as u32).collect();
        let (mut offsets, mut items) = (vec![0u32], Vec::new());
        for &target in &targets {
            let mut ex: Vec<u32> = (0..rng.below(40)).map(|_| 1 + rng.below(cols as u64 - 1) as u32).collect();
            ex.sort_unstable();
            ex.dedup();
            ex.retain(|&i| i != target);
            items.extend(ex);
            offsets.push(items.len() as u32);
        }
        let counts = b.rank_counts(&s, cols, &b.idx_from_host(&targets), &b.idx_from_host(&offsets), &b.idx_from_host(&items));
        o.push((format!("rank_counts{rows}x{cols}"), b.idx_to_host(&counts).iter().map(|&c| c as f32).collect(), EXACT));
    }
    o
}

#[test]
fn ranking_parity() {
    parity!("ranking", ranking_ops);
}

// ---- ring-buffer enqueue -------------------------------------------------------------------------------

/// Batches smaller than, equal to and larger than the bank, from pointers that wrap; keys rounded on the
/// device must equal the `half` crate's rounding bit for bit (EXACT), in all three formats.
fn ring_enqueue_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, (&(slots, d, batch, ptr), format)) in [(1usize, 1usize, 1usize, 0usize), (8, 3, 3, 6), (8, 5, 8, 3), (7, 33, 20, 4),
                                                   (1000, 256, 256, 900)]
        .iter().flat_map(|s| FORMATS.map(|f| (s, f))).enumerate() {
        let mut rng = Rng::new(1300 + t as u64);
        let tag = format!("{slots}x{d}_b{batch}_p{ptr}_{}", format.name());
        let mut bank = Stored::from_host(b, &rand(&mut rng, slots * d), format);
        let mut bank_users = b.idx_from_host(&rand_idx(&mut rng, slots, 50));
        // Keys with more mantissa than 16 bits hold, so the rounding is exercised.
        let keys = b.from_host(&rand(&mut rng, batch * d));
        let users = b.idx_from_host(&rand_idx(&mut rng, batch, 50).iter().map(|u| u + 1).collect::<Vec<_>>());
        // A closed gate (a refused step) writes nothing; an open one writes.
        let gates = b.wide_from_host(&[0.0, 1.0]);
        let before = bank.to_host(b);
        let mut at = b.idx_from_host(&[ptr as u32]);
        b.ring_enqueue(&mut bank, &mut bank_users, &mut at, &keys, &users, d, (&gates, 0));
        assert_eq!((bank.to_host(b), b.idx_to_host(&at)), (before, vec![ptr as u32]), "ring_enqueue with a closed gate acted");
        b.ring_enqueue(&mut bank, &mut bank_users, &mut at, &keys, &users, d, (&gates, 1));
        assert_eq!(b.idx_to_host(&at), vec![((ptr + batch) % slots) as u32], "ring_enqueue: the pointer moves by the batch");
        o.push((format!("ring_enqueue_keys{tag}"), bank.to_host(b), EXACT));
        // The trait has no index readback: read the slot users through gather_rows of the table u ↦ u.
        let table = b.from_host(&(0..51).map(|u| u as f32).collect::<Vec<_>>());
        o.push((format!("ring_enqueue_users{tag}"), b.to_host(&b.gather_rows(&table, &bank_users, 1)), EXACT));
    }
    o
}

#[test]
fn ring_enqueue_parity() {
    parity!("ring_enqueue", ring_enqueue_ops);
}

// ---- deterministic embedding backward (CudaBackend::with_deterministic(true)) ------------------------------

/// Lookups with heavy repetition (half of them into a handful of "popular" rows, row 0 — the padding row —
/// among them), so that several positions share a destination row.
fn skewed_idx(rng: &mut Rng, n: usize, items: usize) -> Vec<u32> {
    (0..n).map(|_| if rng.uniform() < 0.5 { rng.below(items.min(4) as u64) as u32 } else { rng.below(items as u64) as u32 }).collect()
}

fn deterministic_ops<B: Backend>(b: &B) -> Outputs {
    let mut o = Outputs::new();
    for (t, &(items, cols, n)) in [(1usize, 1usize, 1usize), (5, 3, 64), (37, 33, 100), (1683, 256, 1500), (23_716, 64, 3000)]
        .iter().enumerate() {
        let mut rng = Rng::new(900 + t as u64);
        let idx_h = skewed_idx(&mut rng, n, items);
        let idx = b.idx_from_host(&idx_h);
        let dy = b.from_host(&rand(&mut rng, n * cols));
        let tag = format!("{items}x{cols}x{n}");
        for skip in [None, Some(0u32)] {
            let mut dt = b.from_host(&rand(&mut rng, items * cols));
            b.scatter_add_rows(&dy, &idx, cols, skip, &mut dt);
            out(b, &mut o, format!("scatter_add_rows{tag}_{skip:?}"), &dt, EXACT);
        }
    }
    for (t, &(rows, c, j, d)) in [(1usize, 1usize, 1usize, 1usize), (7, 50, 13, 33), (129, 300, 101, 64), (256, 1683, 6, 256)]
        .iter().enumerate() {
        let mut rng = Rng::new(950 + t as u64);
        let tag = format!("{rows}x{c}x{j}x{d}");
        let idx = b.idx_from_host(&skewed_idx(&mut rng, rows * j, c));
        let dy = b.from_host(&rand(&mut rng, rows * j));
        let h = b.from_host(&rand(&mut rng, rows * d));
        let table = b.from_host(&rand(&mut rng, c * d));
        let mut dt = b.from_host(&rand(&mut rng, c * d));
        b.score_candidates_backward(&h, &table, &idx, d, j, &dy, None, Some(&mut dt));
        out(b, &mut o, format!("score_candidates_dtable{tag}"), &dt, EXACT);
    }
    o
}

fn gpu_deterministic() -> Option<CudaBackend> {
    gpu().map(|g| g.with_deterministic(true))
}

/// The deterministic variant sums each row's contributions in position order with rounded products (no
/// FMA), exactly as the CPU twin does, so the bits match the CPU (tolerance `EXACT`).
#[test]
fn deterministic_embedding_backward_matches_cpu_bits() {
    let Some(g) = gpu_deterministic() else { return };
    assert!(g.is_deterministic());
    compare("deterministic", deterministic_ops(&CpuBackend::new()), deterministic_ops(&g));
}

/// Same inputs, same bits, run after run (what the atomic version does not promise).
#[test]
fn deterministic_embedding_backward_is_reproducible() {
    let Some(g) = gpu_deterministic() else { return };
    let (a, b) = (deterministic_ops(&g), deterministic_ops(&g));
    for ((name, x, _), (_, y, _)) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: bits differ between two runs");
    }
}

/// The whole indexing group again with the deterministic variant selected (gathers unaffected).
#[test]
fn indexing_parity_deterministic() {
    let Some(g) = gpu_deterministic() else { return };
    compare("indexing/deterministic", indexing_ops(&CpuBackend::new()), indexing_ops(&g));
}
