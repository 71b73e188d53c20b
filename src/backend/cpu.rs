//! The CPU backend: the reference implementation every CUDA kernel is checked against.
//!
//! Multi-threaded with rayon over independent rows / sequences only, so every output element is computed
//! by one thread in a fixed order and results do not depend on the thread count. Matrix products go to
//! the `gemm` crate (one single-threaded call per row block).
use super::stored::{self, Stored};
use super::{bias_correction, AdamWGate, AdamWHyper, Backend, DropoutKey, Segments, SeqLayout, VerdictLayout};
use std::borrow::Cow;
use crate::rng::{counter_base, counter_uniform_at};
use rayon::prelude::*;

/// Rows per rayon task for row-wise ops; small enough to balance, large enough to amortise scheduling.
const ROW_CHUNK: usize = 64;
/// Below this many multiply-adds a product runs on the calling thread.
const GEMM_PARALLEL_MIN: usize = 1 << 17;
/// Multiply-adds per row block of a parallel product (~0.1 ms on one core): enough blocks to balance any
/// thread count, few enough that scheduling and re-packing `B` per block stay small.
const GEMM_BLOCK_WORK: usize = 1 << 20;
/// Row blocks are whole multiples of this many rows (the `gemm` crate's f32 micro-kernels are 8–48 rows
/// tall), so a block is never a sliver that re-packs `B` for a handful of rows.
const GEMM_BLOCK_ROWS: usize = 16;

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[inline]
pub(crate) fn softplus_scalar(x: f32) -> f32 {
    // log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}): no overflow, no loss of precision for large |x|.
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Elements per rayon task for elementwise ops: big enough that scheduling is noise, and the inner loop
/// is a plain slice loop the compiler vectorises.
const ELEM_CHUNK: usize = 16 * 1024;

/// `out[i] = f(x[i])` in parallel chunks.
fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(ELEM_CHUNK).zip(x.par_chunks(ELEM_CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = f(x);
        }
    });
    out
}

/// `out[i] = f(a[i], b[i])` in parallel chunks.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "elementwise op: lengths differ");
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(ELEM_CHUNK).zip(a.par_chunks(ELEM_CHUNK).zip(b.par_chunks(ELEM_CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    });
    out
}

/// `d[i] += f(a[i], b[i])` in parallel chunks (gradient accumulation).
fn acc2(d: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    assert!(a.len() == d.len() && b.len() == d.len(), "elementwise backward: lengths differ");
    d.par_chunks_mut(ELEM_CHUNK).zip(a.par_chunks(ELEM_CHUNK).zip(b.par_chunks(ELEM_CHUNK))).for_each(|(d, (a, b))| {
        for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
            *d += f(a, b);
        }
    });
}

/// `d[i] += f(i, a[i])` in parallel chunks, with the global element index (dropout masks).
fn acc1_indexed(d: &mut [f32], a: &[f32], f: impl Fn(usize, f32) -> f32 + Sync) {
    assert_eq!(a.len(), d.len(), "elementwise backward: lengths differ");
    d.par_chunks_mut(ELEM_CHUNK).zip(a.par_chunks(ELEM_CHUNK)).enumerate().for_each(|(c, (d, a))| {
        for (i, (d, &a)) in d.iter_mut().zip(a).enumerate() {
            *d += f(c * ELEM_CHUNK + i, a);
        }
    });
}

/// Rows per partial sum in column reductions. Fixed (not derived from the thread count), so the f64
/// partial sums and their in-order total are identical however many threads run.
const REDUCE_ROWS: usize = 256;

/// `Σ_r f(r, acc)` over `rows` into `cols` f64 column accumulators: parallel over fixed row blocks, then
/// the blocks' partial sums added in block order (deterministic).
fn column_sums(rows: usize, cols: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = (0..rows.div_ceil(REDUCE_ROWS)).into_par_iter().map(|blk| {
        let mut acc = vec![0.0f64; cols];
        for r in blk * REDUCE_ROWS..((blk + 1) * REDUCE_ROWS).min(rows) {
            f(r, &mut acc);
        }
        acc
    }).collect();
    let mut total = vec![0.0f64; cols];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Dropout's keep-and-scale factor for element `e`: `1/(1−p)` or 0.
#[inline]
fn dropout_factor(base: u64, p: f32, scale: f32, e: usize) -> f32 {
    if counter_uniform_at(base, e as u64) >= p { scale } else { 0.0 }
}

/// One single-threaded strided product, `C = alpha·A·B + beta·C` (`beta` 0 or 1) with explicit strides
/// (`C` row-major with row stride `rsc`). The `gemm` crate's kernels beat `matrixmultiply` at the small
/// inner dimensions of SASRec (d = 50); it computes `dst = a·dst + b·lhs·rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_raw(m: usize, k: usize, n: usize, alpha: f32, a: *const f32, rsa: isize, csa: isize,
                               b: *const f32, rsb: isize, csb: isize, beta: f32, c: *mut f32, rsc: isize) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(m, n, k, c, 1, rsc, beta != 0.0, a, csa, rsa, b, csb, rsb, beta, alpha, false, false, false,
               gemm::Parallelism::None);
}

/// Send-able raw pointer for splitting one product into row blocks across threads.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl CpuBackend {
    /// `C[m, n] = alpha·op(A)·op(B) + beta·C` for one matrix, split over row blocks of C.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_slices(&self, m: usize, n: usize, k: usize, alpha: f32, a: &[f32], trans_a: bool, b: &[f32],
                       trans_b: bool, beta: f32, c: &mut [f32]) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: buffer too small");
        // op(A)[i, l] = A[i*k + l] or A[l*m + i]; op(B)[l, j] = B[l*n + j] or B[j*k + l].
        let (rsa, csa) = if trans_a { (1isize, m as isize) } else { (k as isize, 1isize) };
        let (rsb, csb) = if trans_b { (1isize, k as isize) } else { (n as isize, 1isize) };
        let work = m * n * k;
        if work < GEMM_PARALLEL_MIN || m <= GEMM_BLOCK_ROWS {
            unsafe { sgemm_raw(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize) };
            return;
        }
        // Row blocks chosen from the shape alone, never from the thread count: the `gemm` crate's result
        // for a row can depend on the height of the call it is in (its blocking and k-order differ, e.g.
        // for thin products such as n = 7, k = 3000), so a thread-dependent split made results depend on
        // the thread count (tests/reliability.rs). Each C element is produced by exactly one call. At most
        // 4 blocks: more, smaller calls measured slower at SASRec's shapes (d = 50) on 2 cores.
        let blocks = (work / GEMM_BLOCK_WORK).clamp(2, 4);
        let rows_per = m.div_ceil(blocks).next_multiple_of(GEMM_BLOCK_ROWS);
        let cp = SyncPtr(c.as_mut_ptr());
        let ap = a.as_ptr() as usize;
        let bp = b.as_ptr() as usize;
        (0..m.div_ceil(rows_per)).into_par_iter().for_each(|blk| {
            let r0 = blk * rows_per;
            let r1 = (r0 + rows_per).min(m);
            let cp = cp;
            unsafe {
                let a0 = (ap as *const f32).offset(r0 as isize * rsa);
                sgemm_raw(r1 - r0, k, n, alpha, a0, rsa, csa, bp as *const f32, rsb, csb, beta,
                          cp.0.add(r0 * n), n as isize);
            }
        });
    }
}

/// A bank's keys as f32: borrowed when stored in f32, widened once per call when 16-bit.
fn widened(bank: &Stored<CpuBackend>) -> Cow<'_, [f32]> {
    match bank {
        Stored::F32(x) => Cow::Borrowed(x),
        Stored::Half(x, f) => Cow::Owned(stored::from_bits(*f, x)),
    }
}

fn rows_mut(x: &mut [f32], cols: usize) -> rayon::slice::ChunksMut<'_, f32> {
    x.par_chunks_mut(cols.max(1) * ROW_CHUNK)
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Idx = Vec<u32>;
    type Half = Vec<u16>;
    type Wide = Vec<f64>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn from_host(&self, x: &[f32]) -> Vec<f32> {
        x.to_vec()
    }
    fn idx_from_host(&self, x: &[u32]) -> Vec<u32> {
        x.to_vec()
    }
    fn to_host(&self, x: &Vec<f32>) -> Vec<f32> {
        x.clone()
    }
    fn idx_len(&self, x: &Vec<u32>) -> usize {
        x.len()
    }
    fn idx_to_host(&self, x: &Vec<u32>) -> Vec<u32> {
        x.clone()
    }
    fn half_from_host(&self, bits: &[u16]) -> Vec<u16> {
        bits.to_vec()
    }
    fn half_to_host(&self, x: &Vec<u16>) -> Vec<u16> {
        x.clone()
    }
    fn wide_zeros(&self, n: usize) -> Vec<f64> {
        vec![0.0; n]
    }
    fn wide_from_host(&self, x: &[f64]) -> Vec<f64> {
        x.to_vec()
    }
    fn wide_to_host(&self, x: &Vec<f64>) -> Vec<f64> {
        x.clone()
    }
    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }
    fn copy_range(&self, src: &Vec<f32>, offset: usize, len: usize) -> Vec<f32> {
        src[offset..offset + len].to_vec()
    }
    fn add_into_range(&self, dst: &mut Vec<f32>, offset: usize, src: &Vec<f32>) {
        for (d, s) in dst[offset..offset + src.len()].iter_mut().zip(src) {
            *d += *s;
        }
    }
    fn write_range(&self, dst: &mut Vec<f32>, offset: usize, src: &Vec<f32>) {
        dst[offset..offset + src.len()].copy_from_slice(src);
    }
    fn round_to_format(&self, x: &mut Vec<f32>, format: stored::StoreFormat) {
        if format != stored::StoreFormat::F32 {
            x.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v = format.round(*v)));
        }
    }
    fn axpy(&self, y: &mut Vec<f32>, a: f32, x: &Vec<f32>) {
        acc1_indexed(y, x, |_, x| a * x);
    }
    fn fill(&self, x: &mut Vec<f32>, value: f32) {
        x.iter_mut().for_each(|v| *v = value);
    }

    fn concat_cols(&self, a: &Vec<f32>, ca: usize, b: &Vec<f32>, cb: usize) -> Vec<f32> {
        let rows = a.len() / ca.max(1);
        assert_eq!(b.len(), rows * cb, "concat_cols: row counts differ");
        let mut out = vec![0.0; rows * (ca + cb)];
        out.par_chunks_mut(ca + cb).enumerate().for_each(|(r, o)| {
            o[..ca].copy_from_slice(&a[r * ca..][..ca]);
            o[ca..].copy_from_slice(&b[r * cb..][..cb]);
        });
        out
    }
    fn split_cols_acc(&self, g: &Vec<f32>, ca: usize, cb: usize, da: Option<&mut Vec<f32>>, db: Option<&mut Vec<f32>>) {
        if let Some(da) = da {
            da.par_chunks_mut(ca).enumerate().for_each(|(r, d)| {
                d.iter_mut().zip(&g[r * (ca + cb)..][..ca]).for_each(|(d, g)| *d += g);
            });
        }
        if let Some(db) = db {
            db.par_chunks_mut(cb).enumerate().for_each(|(r, d)| {
                d.iter_mut().zip(&g[r * (ca + cb) + ca..][..cb]).for_each(|(d, g)| *d += g);
            });
        }
    }

    fn ring_enqueue(&self, bank: &mut Stored<Self>, bank_users: &mut Vec<u32>, ptr: &mut Vec<u32>, keys: &Vec<f32>,
                    users: &Vec<u32>, dim: usize, gate: (&Vec<f64>, usize)) {
        let (b, size) = (users.len(), bank_users.len());
        assert_eq!(keys.len(), b * dim, "ring_enqueue: keys are [{b}, {dim}]");
        let at = ptr[0] as usize;
        assert!(at < size.max(1), "ring_enqueue: pointer {at} outside a bank of {size} slots");
        if gate.0[gate.1] == 0.0 || size == 0 {
            return;
        }
        for r in b.saturating_sub(size)..b {
            let slot = (at + r) % size;
            let src = &keys[r * dim..(r + 1) * dim];
            match bank {
                Stored::F32(x) => x[slot * dim..(slot + 1) * dim].copy_from_slice(src),
                Stored::Half(x, f) => x[slot * dim..(slot + 1) * dim].iter_mut().zip(src).for_each(|(d, &v)| *d = f.bits(v)),
            }
            bank_users[slot] = users[r];
        }
        ptr[0] = ((at + b) % size) as u32;
    }

    fn sum_squares(&self, x: &Vec<f32>, offset: usize, len: usize) -> f64 {
        x[offset..offset + len].iter().map(|&v| (v as f64) * (v as f64)).sum()
    }

    fn record_step(&self, log: &mut Vec<f64>, at: usize, x: &Vec<f32>, segs: &Segments<Self>, scalars: &[&Vec<f32>]) {
        let n = segs.len();
        assert!(at + n + scalars.len() <= log.len(), "record_step: the row does not fit the log");
        for (j, s) in segs.host.iter().enumerate() {
            log[at + j] = self.sum_squares(x, s.offset, s.len);
        }
        for (j, s) in scalars.iter().enumerate() {
            log[at + n + j] = s[0] as f64;
        }
    }

    fn step_verdict(&self, log: &mut Vec<f64>, at: usize, l: &VerdictLayout, groups: &Vec<u32>, clip: f32) {
        assert_eq!(groups.len(), l.sums, "step_verdict: one group per sum");
        let row = &mut log[at..];
        let ok = row[l.checked_at].is_finite() && row[..l.sums].iter().all(|s| s.is_finite());
        row[l.ok_at] = if ok { 1.0 } else { 0.0 };
        for g in 0..l.groups {
            let norm = (0..l.sums).filter(|&j| groups[j] as usize == g).map(|j| row[j]).sum::<f64>().sqrt();
            let scale = if clip > 0.0 { (clip as f64 / (norm + 1e-6)).min(1.0) as f32 } else { 1.0 };
            row[l.scales_at + g] = scale as f64;
        }
    }

    fn adamw(&self, p: &mut Vec<f32>, g: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, segs: &Segments<Self>,
             hp: &AdamWHyper, lrs: &[f32], gate: &AdamWGate<Self>) {
        assert!(lrs.len() <= super::MAX_LR_GROUPS, "adamw: {} learning rates, at most {}", lrs.len(), super::MAX_LR_GROUPS);
        if gate.log[gate.ok_at] == 0.0 {
            return;
        }
        for s in &segs.host {
            let grad_scale = gate.log[gate.scales_at + s.group] as f32;
            let t = gate.counts[s.param] as u64 + 1;
            let (bc1, bc2) = (bias_correction(hp.beta1, t), bias_correction(hp.beta2, t));
            let lr = lrs[s.group];
            let decay = 1.0 - lr * s.weight_decay;
            let r = s.offset..s.offset + s.len;
            p[r.clone()].par_chunks_mut(4096)
                .zip(m[r.clone()].par_chunks_mut(4096))
                .zip(v[r.clone()].par_chunks_mut(4096))
                .zip(g[r].par_chunks(4096))
                .for_each(|(((p, m), v), g)| {
                    for i in 0..p.len() {
                        let gi = g[i] * grad_scale;
                        m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * gi;
                        v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * gi * gi;
                        let mhat = m[i] / bc1;
                        let vhat = v[i] / bc2;
                        p[i] = p[i] * decay - lr * mhat / (vhat.sqrt() + hp.eps);
                    }
                });
        }
    }

    fn advance_steps(&self, counts: &mut Vec<u32>, segs: &Segments<Self>, log: &Vec<f64>, ok_at: usize) {
        if log[ok_at] != 0.0 {
            for s in &segs.host {
                counts[s.param] += 1;
            }
        }
    }

    fn gemm(&self, batch: usize, m: usize, n: usize, k: usize, alpha: f32, a: &Vec<f32>, trans_a: bool,
            b: &Vec<f32>, trans_b: bool, beta: f32, c: &mut Vec<f32>) {
        assert_eq!(a.len(), batch * m * k, "gemm: A has {} elements, expected {}x{}x{}", a.len(), batch, m, k);
        assert_eq!(b.len(), batch * k * n, "gemm: B has {} elements, expected {}x{}x{}", b.len(), batch, k, n);
        assert_eq!(c.len(), batch * m * n, "gemm: C has {} elements, expected {}x{}x{}", c.len(), batch, m, n);
        if batch == 1 {
            self.gemm_slices(m, n, k, alpha, a, trans_a, b, trans_b, beta, c);
            return;
        }
        c.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            let a = &a[i * m * k..(i + 1) * m * k];
            let b = &b[i * k * n..(i + 1) * k * n];
            let (rsa, csa) = if trans_a { (1isize, m as isize) } else { (k as isize, 1isize) };
            let (rsb, csb) = if trans_b { (1isize, k as isize) } else { (n as isize, 1isize) };
            unsafe { sgemm_raw(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize) };
        });
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, cols: usize) {
        assert_eq!(bias.len(), cols);
        rows_mut(x, cols).for_each(|chunk| {
            for row in chunk.chunks_mut(cols) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += *b;
                }
            }
        });
    }

    fn sum_rows_into(&self, x: &Vec<f32>, cols: usize, out: &mut Vec<f32>) {
        assert_eq!(out.len(), cols);
        let acc = column_sums(x.len() / cols.max(1), cols, |r, acc| {
            for (a, v) in acc.iter_mut().zip(&x[r * cols..][..cols]) {
                *a += *v as f64;
            }
        });
        for (o, a) in out.iter_mut().zip(acc) {
            *o += a as f32;
        }
    }

    fn add(&self, a: &Vec<f32>, b: &Vec<f32>) -> Vec<f32> {
        map2(a, b, |x, y| x + y)
    }
    fn mul(&self, a: &Vec<f32>, b: &Vec<f32>) -> Vec<f32> {
        map2(a, b, |x, y| x * y)
    }
    fn mul_acc(&self, dx: &mut Vec<f32>, dy: &Vec<f32>, other: &Vec<f32>) {
        acc2(dx, dy, other, |g, o| g * o);
    }
    fn scale(&self, x: &Vec<f32>, c: f32) -> Vec<f32> {
        map1(x, |v| v * c)
    }
    fn relu(&self, x: &Vec<f32>) -> Vec<f32> {
        map1(x, |v| v.max(0.0))
    }
    fn relu_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        acc2(dx, x, dy, |x, g| if x > 0.0 { g } else { 0.0 });
    }
    fn gelu(&self, x: &Vec<f32>) -> Vec<f32> {
        map1(x, |v| 0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2)))
    }
    fn gelu_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        acc2(dx, x, dy, |x, g| {
            let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
            g * (cdf + x * pdf)
        });
    }
    fn softplus(&self, x: &Vec<f32>) -> Vec<f32> {
        map1(x, softplus_scalar)
    }
    fn softplus_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        acc2(dx, x, dy, |x, g| g * sigmoid(x));
    }
    fn dropout(&self, x: &Vec<f32>, key: DropoutKey) -> Vec<f32> {
        let (base, s) = (counter_base(key.seed, key.stream), 1.0 / (1.0 - key.p));
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(ELEM_CHUNK).zip(x.par_chunks(ELEM_CHUNK)).enumerate().for_each(|(c, (o, x))| {
            for (i, (o, &v)) in o.iter_mut().zip(x).enumerate() {
                *o = v * dropout_factor(base, key.p, s, c * ELEM_CHUNK + i);
            }
        });
        out
    }
    fn dropout_backward(&self, dy: &Vec<f32>, key: DropoutKey, dx: &mut Vec<f32>) {
        let (base, s) = (counter_base(key.seed, key.stream), 1.0 / (1.0 - key.p));
        acc1_indexed(dx, dy, |e, g| g * dropout_factor(base, key.p, s, e));
    }

    fn layer_norm(&self, x: &Vec<f32>, gamma: &Vec<f32>, beta: &Vec<f32>, cols: usize, eps: f32)
        -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = x.len() / cols;
        let mut y = vec![0.0; x.len()];
        let mut mean = vec![0.0; rows];
        let mut rstd = vec![0.0; rows];
        y.par_chunks_mut(cols * ROW_CHUNK)
            .zip(mean.par_chunks_mut(ROW_CHUNK).zip(rstd.par_chunks_mut(ROW_CHUNK)))
            .enumerate()
            .for_each(|(c, (y, (mean, rstd)))| {
                for (r, yr) in y.chunks_mut(cols).enumerate() {
                    let xr = &x[(c * ROW_CHUNK + r) * cols..][..cols];
                    let m = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                    let var = xr.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / cols as f64;
                    let rs = 1.0 / (var + eps as f64).sqrt();
                    for i in 0..cols {
                        yr[i] = ((xr[i] as f64 - m) * rs) as f32 * gamma[i] + beta[i];
                    }
                    mean[r] = m as f32;
                    rstd[r] = rs as f32;
                }
            });
        (y, mean, rstd)
    }

    fn layer_norm_backward(&self, x: &Vec<f32>, gamma: &Vec<f32>, mean: &Vec<f32>, rstd: &Vec<f32>,
                           dy: &Vec<f32>, cols: usize, dx: Option<&mut Vec<f32>>,
                           dgamma: Option<&mut Vec<f32>>, dbeta: Option<&mut Vec<f32>>) {
        let rows = x.len() / cols;
        if let Some(dx) = dx {
            dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
                let xr = &x[r * cols..][..cols];
                let g = &dy[r * cols..][..cols];
                let (m, rs) = (mean[r], rstd[r]);
                // dx = rstd · (dŷ − mean(dŷ) − x̂·mean(dŷ·x̂)), with dŷ = dy·gamma.
                let mut s1 = 0.0f32;
                let mut s2 = 0.0f32;
                for i in 0..cols {
                    let xh = (xr[i] - m) * rs;
                    let dh = g[i] * gamma[i];
                    s1 += dh;
                    s2 += dh * xh;
                }
                s1 /= cols as f32;
                s2 /= cols as f32;
                for i in 0..cols {
                    let xh = (xr[i] - m) * rs;
                    dxr[i] += rs * (g[i] * gamma[i] - s1 - xh * s2);
                }
            });
        }
        if dgamma.is_some() || dbeta.is_some() {
            // One pass: columns 0..cols accumulate dγ = Σ dy·x̂, columns cols..2cols accumulate dβ = Σ dy.
            let sums = column_sums(rows, 2 * cols, |r, acc| {
                let xr = &x[r * cols..][..cols];
                let g = &dy[r * cols..][..cols];
                for i in 0..cols {
                    let xh = (xr[i] - mean[r]) * rstd[r];
                    acc[i] += (g[i] * xh) as f64;
                    acc[cols + i] += g[i] as f64;
                }
            });
            if let Some(out) = dgamma {
                out.iter_mut().zip(&sums[..cols]).for_each(|(o, v)| *o += *v as f32);
            }
            if let Some(out) = dbeta {
                out.iter_mut().zip(&sums[cols..]).for_each(|(o, v)| *o += *v as f32);
            }
        }
    }

    fn softmax(&self, x: &Vec<f32>, cols: usize) -> Vec<f32> {
        let mut y = x.clone();
        rows_mut(&mut y, cols).for_each(|chunk| {
            for row in chunk.chunks_mut(cols) {
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut s = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - mx).exp();
                    s += *v;
                }
                row.iter_mut().for_each(|v| *v /= s);
            }
        });
        y
    }
    fn softmax_backward(&self, y: &Vec<f32>, dy: &Vec<f32>, cols: usize, dx: &mut Vec<f32>) {
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
            let yr = &y[r * cols..][..cols];
            let g = &dy[r * cols..][..cols];
            let dot: f32 = yr.iter().zip(g).map(|(a, b)| a * b).sum();
            for i in 0..cols {
                dxr[i] += yr[i] * (g[i] - dot);
            }
        });
    }
    fn log_softmax(&self, x: &Vec<f32>, cols: usize) -> Vec<f32> {
        let mut y = x.clone();
        rows_mut(&mut y, cols).for_each(|chunk| {
            for row in chunk.chunks_mut(cols) {
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
                row.iter_mut().for_each(|v| *v -= lse);
            }
        });
        y
    }
    fn log_softmax_backward(&self, y: &Vec<f32>, dy: &Vec<f32>, cols: usize, dx: &mut Vec<f32>) {
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
            let yr = &y[r * cols..][..cols];
            let g = &dy[r * cols..][..cols];
            let s: f32 = g.iter().sum();
            for i in 0..cols {
                dxr[i] += g[i] - yr[i].exp() * s;
            }
        });
    }
    fn l2_normalize(&self, x: &Vec<f32>, cols: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
        let norms: Vec<f32> = x.par_chunks(cols).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
        let mut y = x.clone();
        y.par_chunks_mut(cols).zip(norms.par_iter()).for_each(|(r, &n)| {
            let inv = 1.0 / n.max(eps);
            r.iter_mut().for_each(|v| *v *= inv);
        });
        (y, norms)
    }
    fn l2_normalize_backward(&self, x: &Vec<f32>, norms: &Vec<f32>, dy: &Vec<f32>, cols: usize, eps: f32,
                             dx: &mut Vec<f32>) {
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
            let xr = &x[r * cols..][..cols];
            let g = &dy[r * cols..][..cols];
            let n = norms[r];
            if n <= eps {
                // y = x / eps: a plain scaling.
                for i in 0..cols {
                    dxr[i] += g[i] / eps;
                }
                return;
            }
            // y = x/n: dx = (g − y (y·g)) / n.
            let dot: f32 = xr.iter().zip(g).map(|(a, b)| a * b).sum::<f32>() / n;
            for i in 0..cols {
                dxr[i] += (g[i] - xr[i] / n * dot) / n;
            }
        });
    }
    fn row_dot(&self, a: &Vec<f32>, b: &Vec<f32>, cols: usize) -> Vec<f32> {
        a.par_chunks(cols).zip(b.par_chunks(cols)).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum()).collect()
    }

    fn row_scale_acc(&self, dx: &mut Vec<f32>, g: &Vec<f32>, other: &Vec<f32>, cols: usize) {
        dx.par_chunks_mut(cols).zip(other.par_chunks(cols)).zip(g.par_iter()).for_each(|((d, o), &g)| {
            for (d, o) in d.iter_mut().zip(o) {
                *d += g * o;
            }
        });
    }

    fn gather_rows(&self, table: &Vec<f32>, idx: &Vec<u32>, cols: usize) -> Vec<f32> {
        let rows = table.len() / cols;
        let mut out = vec![0.0; idx.len() * cols];
        out.par_chunks_mut(cols).zip(idx.par_iter()).for_each(|(o, &i)| {
            assert!((i as usize) < rows, "gather_rows: index {i} out of range for {rows} rows");
            o.copy_from_slice(&table[i as usize * cols..][..cols]);
        });
        out
    }
    fn scatter_add_rows(&self, dy: &Vec<f32>, idx: &Vec<u32>, cols: usize, skip: Option<u32>, dtable: &mut Vec<f32>) {
        // Sequential in index order: deterministic and cheap next to the products around it.
        for (r, &i) in idx.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let dst = &mut dtable[i as usize * cols..][..cols];
            for (d, g) in dst.iter_mut().zip(&dy[r * cols..][..cols]) {
                *d += *g;
            }
        }
    }
    fn gather_cols(&self, x: &Vec<f32>, idx: &Vec<u32>, c: usize, j: usize) -> Vec<f32> {
        let mut out = vec![0.0; idx.len()];
        out.par_chunks_mut(j).enumerate().for_each(|(r, o)| {
            for t in 0..j {
                let col = idx[r * j + t] as usize;
                assert!(col < c, "gather_cols: index {col} out of range for {c} columns");
                o[t] = x[r * c + col];
            }
        });
        out
    }
    fn gather_cols_backward(&self, dy: &Vec<f32>, idx: &Vec<u32>, c: usize, j: usize, dx: &mut Vec<f32>) {
        dx.par_chunks_mut(c).enumerate().for_each(|(r, d)| {
            for t in 0..j {
                d[idx[r * j + t] as usize] += dy[r * j + t];
            }
        });
    }
    fn score_candidates(&self, h: &Vec<f32>, table: &Vec<f32>, idx: &Vec<u32>, d: usize, j: usize) -> Vec<f32> {
        let mut out = vec![0.0; idx.len()];
        out.par_chunks_mut(j).enumerate().for_each(|(r, o)| {
            let hr = &h[r * d..][..d];
            for t in 0..j {
                let e = &table[idx[r * j + t] as usize * d..][..d];
                o[t] = hr.iter().zip(e).map(|(a, b)| a * b).sum();
            }
        });
        out
    }
    fn score_candidates_backward(&self, h: &Vec<f32>, table: &Vec<f32>, idx: &Vec<u32>, d: usize, j: usize,
                                 dy: &Vec<f32>, dh: Option<&mut Vec<f32>>, dtable: Option<&mut Vec<f32>>) {
        if let Some(dh) = dh {
            dh.par_chunks_mut(d).enumerate().for_each(|(r, dhr)| {
                for t in 0..j {
                    let g = dy[r * j + t];
                    let e = &table[idx[r * j + t] as usize * d..][..d];
                    for i in 0..d {
                        dhr[i] += g * e[i];
                    }
                }
            });
        }
        if let Some(dt) = dtable {
            for (p, &item) in idx.iter().enumerate() {
                let g = dy[p];
                let r = p / j;
                let dst = &mut dt[item as usize * d..][..d];
                for (o, hv) in dst.iter_mut().zip(&h[r * d..][..d]) {
                    *o += g * hv;
                }
            }
        }
    }

    fn attention(&self, qkv: &Vec<f32>, layout: &SeqLayout<Self>, d: usize, heads: usize,
                 dropout: Option<DropoutKey>) -> (Vec<f32>, Vec<f32>) {
        crate::backend::cpu_attention::forward(qkv, layout, d, heads, dropout)
    }
    fn attention_backward(&self, qkv: &Vec<f32>, probs: &Vec<f32>, layout: &SeqLayout<Self>, d: usize,
                          heads: usize, dropout: Option<DropoutKey>, dout: &Vec<f32>, dqkv: &mut Vec<f32>) {
        crate::backend::cpu_attention::backward(qkv, probs, layout, d, heads, dropout, dout, dqkv)
    }

    fn bpr(&self, pos: &Vec<f32>, neg: &Vec<f32>, k: usize) -> Vec<f32> {
        let mut s = 0.0f64;
        for (r, &p) in pos.iter().enumerate() {
            for &n in &neg[r * k..][..k] {
                s += softplus_scalar(n - p) as f64;
            }
        }
        vec![(s / (pos.len() * k).max(1) as f64) as f32]
    }
    fn bpr_backward(&self, pos: &Vec<f32>, neg: &Vec<f32>, k: usize, dloss: &Vec<f32>, mut dpos: Option<&mut Vec<f32>>,
                    mut dneg: Option<&mut Vec<f32>>) {
        let scale = dloss[0] / (pos.len() * k).max(1) as f32;
        for (r, &p) in pos.iter().enumerate() {
            for t in 0..k {
                let g = scale * sigmoid(neg[r * k + t] - p);
                if let Some(dp) = dpos.as_deref_mut() {
                    dp[r] -= g;
                }
                if let Some(dn) = dneg.as_deref_mut() {
                    dn[r * k + t] += g;
                }
            }
        }
    }
    fn bce_logits(&self, logits: &Vec<f32>, labels: &Vec<f32>) -> Vec<f32> {
        // softplus(x) − y·x = −[y log σ(x) + (1−y) log(1−σ(x))].
        let s: f64 = logits.iter().zip(labels).map(|(&x, &y)| (softplus_scalar(x) - y * x) as f64).sum();
        vec![(s / logits.len().max(1) as f64) as f32]
    }
    fn bce_logits_backward(&self, logits: &Vec<f32>, labels: &Vec<f32>, dloss: &Vec<f32>, dx: &mut Vec<f32>) {
        let scale = dloss[0] / logits.len().max(1) as f32;
        acc2(dx, logits, labels, |x, y| scale * (sigmoid(x) - y));
    }
    fn cross_entropy(&self, logits: &Vec<f32>, target: &Vec<u32>, cols: usize) -> Vec<f32> {
        let s: f64 = logits.par_chunks(cols).zip(target.par_iter()).map(|(row, &t)| {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
            (lse - row[t as usize]) as f64
        }).collect::<Vec<f64>>().iter().sum();
        vec![(s / target.len().max(1) as f64) as f32]
    }
    fn cross_entropy_backward(&self, logits: &Vec<f32>, target: &Vec<u32>, cols: usize, dloss: &Vec<f32>, dx: &mut Vec<f32>) {
        let scale = dloss[0] / target.len().max(1) as f32;
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, d)| {
            let row = &logits[r * cols..][..cols];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|v| (v - mx).exp()).sum();
            for i in 0..cols {
                d[i] += scale * ((row[i] - mx).exp() / s);
            }
            d[target[r] as usize] -= scale;
        });
    }
    fn kl_div(&self, logits: &Vec<f32>, teacher: &Vec<f32>, cols: usize) -> Vec<f32> {
        let rows = logits.len() / cols;
        let s: f64 = logits.par_chunks(cols).zip(teacher.par_chunks(cols)).map(|(row, t)| {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
            // Σ t (log t − log q); 0·log 0 = 0.
            row.iter().zip(t).map(|(&x, &p)| if p > 0.0 { (p * (p.ln() - (x - lse))) as f64 } else { 0.0 }).sum::<f64>()
        }).collect::<Vec<f64>>().iter().sum();
        vec![(s / rows.max(1) as f64) as f32]
    }
    fn kl_div_backward(&self, logits: &Vec<f32>, teacher: &Vec<f32>, cols: usize, dloss: &Vec<f32>, dx: &mut Vec<f32>) {
        let rows = logits.len() / cols;
        let scale = dloss[0] / rows.max(1) as f32;
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, d)| {
            let row = &logits[r * cols..][..cols];
            let t = &teacher[r * cols..][..cols];
            let tsum: f32 = t.iter().sum();
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|v| (v - mx).exp()).sum();
            for i in 0..cols {
                d[i] += scale * (tsum * (row[i] - mx).exp() / s - t[i]);
            }
        });
    }
    fn mse(&self, a: &Vec<f32>, b: &Vec<f32>) -> Vec<f32> {
        let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        vec![(s / a.len().max(1) as f64) as f32]
    }
    fn infonce_bank(&self, q: &Vec<f32>, k: &Vec<f32>, bank: &Stored<Self>, bank_users: &Vec<u32>, users: &Vec<u32>,
                    d: usize, tau: f32) -> Vec<f32> {
        vec![crate::backend::cpu_infonce::forward(q, k, &widened(bank), bank_users, users, d, tau)]
    }
    fn infonce_bank_backward(&self, q: &Vec<f32>, k: &Vec<f32>, bank: &Stored<Self>, bank_users: &Vec<u32>,
                             users: &Vec<u32>, d: usize, tau: f32, dloss: &Vec<f32>, dq: Option<&mut Vec<f32>>,
                             dk: Option<&mut Vec<f32>>) {
        crate::backend::cpu_infonce::backward(q, k, &widened(bank), bank_users, users, d, tau, dloss[0],
                                              dq.map(|v| v.as_mut_slice()), dk.map(|v| v.as_mut_slice()));
    }
    fn logdet_spd(&self, g: &Vec<f32>, n: usize) -> (Vec<f32>, Vec<f32>) {
        assert_eq!(g.len(), n * n, "logdet_spd: G is [{n}, {n}]");
        let a: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        match crate::linalg::cholesky(&a, n) {
            Some(l) => (vec![crate::linalg::cholesky_logdet(&l, n) as f32],
                        crate::linalg::cholesky_inverse(&l, n).iter().map(|&v| v as f32).collect()),
            None => (vec![f32::NAN], vec![f32::NAN; n * n]),
        }
    }
    fn fuse_softmax(&self, s: &Vec<f32>, q: &Vec<f32>, cols: usize, alpha: f32) -> Vec<f32> {
        assert_eq!(s.len(), q.len(), "fuse_softmax: the two score matrices differ in size");
        let mut out = vec![0.0; s.len()];
        out.par_chunks_mut(cols.max(1)).zip(s.par_chunks(cols.max(1))).zip(q.par_chunks(cols.max(1)))
            .for_each(|((o, s), q)| o.copy_from_slice(&crate::model::ur4rec::fuse_scores(s, q, cols, alpha)));
        out
    }
    fn rank_counts(&self, scores: &Vec<f32>, cols: usize, targets: &Vec<u32>, ex_offsets: &Vec<u32>,
                   ex_items: &Vec<u32>) -> Vec<u32> {
        let rows = targets.len();
        assert_eq!(scores.len(), rows * cols, "rank_counts: scores are [{rows}, {cols}]");
        assert_eq!(ex_offsets.len(), rows + 1, "rank_counts: {} offsets for {rows} rows", ex_offsets.len());
        (0..rows).into_par_iter().flat_map_iter(|r| {
            let row = &scores[r * cols..(r + 1) * cols];
            let ts = row[targets[r] as usize];
            let count = |x: f32| [(x > ts) as u32, (x == ts) as u32, (!x.is_finite()) as u32];
            let mut c = [0u32; 3];
            for &x in &row[1..] {
                c.iter_mut().zip(count(x)).for_each(|(c, v)| *c += v);
            }
            for &item in &ex_items[ex_offsets[r] as usize..ex_offsets[r + 1] as usize] {
                c.iter_mut().zip(count(row[item as usize])).for_each(|(c, v)| *c -= v);
            }
            c
        }).collect()
    }
    fn sum_all(&self, x: &Vec<f32>) -> Vec<f32> {
        vec![x.iter().map(|&v| v as f64).sum::<f64>() as f32]
    }
    fn add_scalar_acc(&self, dx: &mut Vec<f32>, c: &Vec<f32>, scale: f32) {
        let c = c[0] * scale;
        dx.iter_mut().for_each(|v| *v += c);
    }
    fn read_scalar(&self, x: &Vec<f32>) -> f32 {
        x[0]
    }
}
