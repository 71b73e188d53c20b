//! The operation set every backend implements.
//!
//! Model code never calls a backend directly: it records operations on the [`crate::tape::Tape`], which
//! calls these methods forward and backward. A backend owns its storage types (`Buf` for f32 data,
//! `Idx` for u32 indices), so the CUDA backend keeps everything on the device while the tape and model
//! code stay the same. All tensors are dense, row-major and contiguous; shapes are passed explicitly.
//!
//! Conventions for backward methods: they ACCUMULATE into the gradient buffers they are given (`+=`),
//! because a tensor used twice receives the sum of both uses' gradients.

pub mod cpu;
pub mod cuda;
pub mod layout;
pub mod segments;
pub mod stored;
mod cpu_attention;
mod cpu_infonce;

pub use cpu::CpuBackend;
pub use layout::SeqLayout;
pub use segments::{Segment, Segments};
pub use stored::{StoreFormat, Stored};

/// Dropout parameters of one op application: drop probability and the counter-RNG key.
/// The mask element `e` is dropped iff `counter_uniform(seed, stream, e) < p`; see `crate::rng`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutKey {
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
}

/// AdamW's hyper-parameters common to every parameter (learning rates are per group, weight decay per
/// segment). The gradient scale (clipping), the step count and whether the update happens at all come from
/// the device-side step log ([`AdamWGate`]), so the host never has to read a step's gradients before updating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// Where an AdamW update reads what the step's verdict decided (`train::step_log`): the update runs only
/// if `log[ok_at] != 0`; group `g`'s gradient is multiplied by `log[scales_at + g]` (clipping); parameter
/// `p`'s step count is `counts[p] + 1` (the counts advance after the update, [`Backend::advance_steps`]).
pub struct AdamWGate<'a, B: Backend> {
    pub log: &'a B::Wide,
    pub ok_at: usize,
    pub scales_at: usize,
    pub counts: &'a B::Idx,
}

/// The most parameter groups (learning rates) one [`Backend::adamw`] pass takes; UR4Rec has 4.
pub const MAX_LR_GROUPS: usize = 8;

/// Where [`Backend::step_verdict`] reads and writes in a step-log row (offsets from the row's start).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VerdictLayout {
    /// The row starts with this many gradient sums of squares (one per stepped parameter).
    pub sums: usize,
    /// The loss value that must be finite (the total the backward started from).
    pub checked_at: usize,
    /// Written: 1 if the step may update, else 0.
    pub ok_at: usize,
    /// Written: the clip scale of each of `groups` parameter groups, from `scales_at`.
    pub scales_at: usize,
    pub groups: usize,
}

/// `1 − beta^t`, AdamW's bias correction: `beta^t` by squaring in f64 (a fixed sequence of correctly rounded
/// products, so the CUDA twin `bias_correction` in `kernels/adamw.cu` gives the same bits), then rounded to
/// f32. (PyTorch computes `1 − beta ** step` in Python floats, f64, too.)
pub fn bias_correction(beta: f32, t: u64) -> f32 {
    let (mut r, mut a, mut e) = (1.0f64, beta as f64, t);
    while e > 0 {
        if e & 1 == 1 {
            r *= a;
        }
        e >>= 1;
        if e > 0 {
            a *= a;
        }
    }
    (1.0 - r) as f32
}

pub trait Backend: Send + Sync + Sized + 'static {
    type Buf: Send + Sync;
    type Idx: Send + Sync;
    /// 16-bit storage (bf16 or f16 bits) of stored-only tensors; see [`stored`].
    type Half: Send + Sync;
    /// f64 storage of the step log (`train::step_log`): per step, the gradient sums, the loss values, the
    /// verdict and the clip scales, read back once per `train.readback_every` steps.
    type Wide: Send + Sync;

    fn name(&self) -> String;

    // ---- storage ---------------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> Self::Buf;
    fn from_host(&self, x: &[f32]) -> Self::Buf;
    fn idx_from_host(&self, x: &[u32]) -> Self::Idx;
    fn to_host(&self, x: &Self::Buf) -> Vec<f32>;
    fn idx_len(&self, x: &Self::Idx) -> usize;
    fn idx_to_host(&self, x: &Self::Idx) -> Vec<u32>;
    fn half_from_host(&self, bits: &[u16]) -> Self::Half;
    fn half_to_host(&self, x: &Self::Half) -> Vec<u16>;
    fn wide_zeros(&self, n: usize) -> Self::Wide;
    fn wide_from_host(&self, x: &[f64]) -> Self::Wide;
    /// On the GPU: the step log's readback, the trainers' one host synchronisation per reading interval.
    fn wide_to_host(&self, x: &Self::Wide) -> Vec<f64>;
    fn len(&self, x: &Self::Buf) -> usize;
    /// A copy of `src[offset .. offset + len]`.
    fn copy_range(&self, src: &Self::Buf, offset: usize, len: usize) -> Self::Buf;
    /// `dst[offset .. offset + src.len()] += src`.
    fn add_into_range(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf);
    /// `dst[offset .. offset + src.len()] = src`.
    fn write_range(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf);
    /// Rounds every element to `format` (to nearest, ties to even, as the `half` crate) and back to f32.
    fn round_to_format(&self, x: &mut Self::Buf, format: StoreFormat);
    /// `y += a * x`.
    fn axpy(&self, y: &mut Self::Buf, a: f32, x: &Self::Buf);
    fn fill(&self, x: &mut Self::Buf, value: f32);

    /// `out[r] = [a[r] | b[r]]` for `a: [R, ca]`, `b: [R, cb]`.
    fn concat_cols(&self, a: &Self::Buf, ca: usize, b: &Self::Buf, cb: usize) -> Self::Buf;
    /// The backward of `concat_cols`: `da += g[:, ..ca]`, `db += g[:, ca..]`.
    fn split_cols_acc(&self, g: &Self::Buf, ca: usize, cb: usize, da: Option<&mut Self::Buf>, db: Option<&mut Self::Buf>);

    /// Ring-buffer enqueue (the memory bank): of the `b` rows of `keys: [b, dim]` and `users: [b]`, row
    /// `r >= b − K` goes to slot `(ptr + r) mod K` of `bank: [K, dim]` (rounded to the bank's format) and
    /// `bank_users: [K]`; earlier rows would be overwritten within the batch and are skipped. This is
    /// exactly writing the rows one by one from slot `ptr` with wrap-around (`MemoryBank::enqueue`). The
    /// pointer `ptr: [1]` lives with the bank and advances to `(ptr + b) mod K`. Nothing is written and the
    /// pointer stays when `gate.0[gate.1] == 0` (the step's verdict refused it; `train::step_log`).
    #[allow(clippy::too_many_arguments)]
    fn ring_enqueue(&self, bank: &mut Stored<Self>, bank_users: &mut Self::Idx, ptr: &mut Self::Idx, keys: &Self::Buf,
                    users: &Self::Idx, dim: usize, gate: (&Self::Wide, usize));

    // ---- optimizer -------------------------------------------------------------------------------
    /// `Σ x[offset .. offset + len]²` (gradient-norm clipping), accumulated in f64.
    fn sum_squares(&self, x: &Self::Buf, offset: usize, len: usize) -> f64;
    /// Writes one step-log row from `log[at]` on: [`Backend::sum_squares`] of each segment of `x` (each
    /// summed exactly as `sum_squares` sums it; one pass over all segments), then each 1-element `scalars`
    /// buffer widened to f64. Nothing is read back: the trainers read the log once per `train.readback_every` steps.
    fn record_step(&self, log: &mut Self::Wide, at: usize, x: &Self::Buf, segs: &Segments<Self>, scalars: &[&Self::Buf]);
    /// The step's verdict, on the row at `log[at]` that [`Backend::record_step`] wrote: it may update iff the
    /// checked loss and every gradient sum are finite (written 1/0 at `ok_at`); each group's clip scale
    /// `min(1, clip / (‖g_group‖ + 1e−6))` (1 when `clip <= 0`), the norm the square root of the group's sums
    /// added in row order, goes to `scales_at + group`. `groups[j]` is the group of sum `j`.
    fn step_verdict(&self, log: &mut Self::Wide, at: usize, layout: &VerdictLayout, groups: &Self::Idx, clip: f32);
    /// One fused AdamW update of every segment of the flat buffers (decoupled weight decay; see
    /// `train::optim`), segment `s` at learning rate `lrs[s.group]` (at most [`MAX_LR_GROUPS`] groups: on the
    /// GPU they travel as kernel arguments, so a step uploads nothing for them), if the step's verdict allows
    /// it ([`AdamWGate`]). One launch on the GPU.
    #[allow(clippy::too_many_arguments)]
    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, segs: &Segments<Self>,
             hp: &AdamWHyper, lrs: &[f32], gate: &AdamWGate<Self>);
    /// `counts[s.param] += 1` for every segment (distinct parameters), if `log[ok_at] != 0` — after the step's
    /// AdamW update, which read the counts.
    fn advance_steps(&self, counts: &mut Self::Idx, segs: &Segments<Self>, log: &Self::Wide, ok_at: usize);

    // ---- dense linear algebra --------------------------------------------------------------------
    /// `C[i] = alpha * op(A[i]) · op(B[i]) + beta * C[i]` for `i < batch`, where `op(A)` is `[m, k]`
    /// (`A` stored `[k, m]` when `trans_a`) and `op(B)` is `[k, n]` (`B` stored `[n, k]` when `trans_b`).
    /// `beta` is 0 (overwrite) or 1 (accumulate).
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, batch: usize, m: usize, n: usize, k: usize, alpha: f32, a: &Self::Buf, trans_a: bool,
            b: &Self::Buf, trans_b: bool, beta: f32, c: &mut Self::Buf);
    /// `x[r, :] += bias` for each row.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, cols: usize);
    /// `out[c] += Σ_r x[r, c]` (bias gradient).
    fn sum_rows_into(&self, x: &Self::Buf, cols: usize, out: &mut Self::Buf);

    // ---- elementwise -----------------------------------------------------------------------------
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Self::Buf;
    fn mul(&self, a: &Self::Buf, b: &Self::Buf) -> Self::Buf;
    /// `dx += dy * other` (the backward of an elementwise product).
    fn mul_acc(&self, dx: &mut Self::Buf, dy: &Self::Buf, other: &Self::Buf);
    fn scale(&self, x: &Self::Buf, c: f32) -> Self::Buf;
    fn relu(&self, x: &Self::Buf) -> Self::Buf;
    fn relu_backward(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// Exact GELU, `x · Φ(x)` (erf form, as PyTorch's default).
    fn gelu(&self, x: &Self::Buf) -> Self::Buf;
    fn gelu_backward(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// `softplus(x) = log(1 + e^x)`, computed stably.
    fn softplus(&self, x: &Self::Buf) -> Self::Buf;
    /// `dx += dy · σ(x)`.
    fn softplus_backward(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// Inverted dropout: kept elements scaled by `1 / (1 - p)`.
    fn dropout(&self, x: &Self::Buf, key: DropoutKey) -> Self::Buf;
    fn dropout_backward(&self, dy: &Self::Buf, key: DropoutKey, dx: &mut Self::Buf);

    // ---- row-wise ops over the last dimension ----------------------------------------------------
    /// Returns `(y, mean, rstd)`.
    fn layer_norm(&self, x: &Self::Buf, gamma: &Self::Buf, beta: &Self::Buf, cols: usize, eps: f32)
        -> (Self::Buf, Self::Buf, Self::Buf);
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(&self, x: &Self::Buf, gamma: &Self::Buf, mean: &Self::Buf, rstd: &Self::Buf,
                           dy: &Self::Buf, cols: usize, dx: Option<&mut Self::Buf>,
                           dgamma: Option<&mut Self::Buf>, dbeta: Option<&mut Self::Buf>);
    fn softmax(&self, x: &Self::Buf, cols: usize) -> Self::Buf;
    /// From the softmax output `y`: `dx += y ∘ (dy − Σ dy·y)`.
    fn softmax_backward(&self, y: &Self::Buf, dy: &Self::Buf, cols: usize, dx: &mut Self::Buf);
    fn log_softmax(&self, x: &Self::Buf, cols: usize) -> Self::Buf;
    /// From the log-softmax output `y`: `dx += dy − e^y Σ dy`.
    fn log_softmax_backward(&self, y: &Self::Buf, dy: &Self::Buf, cols: usize, dx: &mut Self::Buf);
    /// `y[r] = x[r] / max(‖x[r]‖, eps)`; returns `(y, norms)`.
    fn l2_normalize(&self, x: &Self::Buf, cols: usize, eps: f32) -> (Self::Buf, Self::Buf);
    fn l2_normalize_backward(&self, x: &Self::Buf, norms: &Self::Buf, dy: &Self::Buf, cols: usize, eps: f32,
                             dx: &mut Self::Buf);
    /// `out[r] = a[r] · b[r]`.
    fn row_dot(&self, a: &Self::Buf, b: &Self::Buf, cols: usize) -> Self::Buf;
    /// `dx[r, :] += g[r] · other[r, :]` (the backward of `row_dot`).
    fn row_scale_acc(&self, dx: &mut Self::Buf, g: &Self::Buf, other: &Self::Buf, cols: usize);

    // ---- indexing ----------------------------------------------------------------------------------
    /// `out[r] = table[idx[r]]` (rows of `cols`).
    fn gather_rows(&self, table: &Self::Buf, idx: &Self::Idx, cols: usize) -> Self::Buf;
    /// `dtable[idx[r]] += dy[r]`, skipping rows whose index equals `skip` (the padding row).
    fn scatter_add_rows(&self, dy: &Self::Buf, idx: &Self::Idx, cols: usize, skip: Option<u32>,
                        dtable: &mut Self::Buf);
    /// `out[r, j] = x[r, idx[r, j]]` for `x: [R, C]`, `idx: [R, J]`.
    fn gather_cols(&self, x: &Self::Buf, idx: &Self::Idx, c: usize, j: usize) -> Self::Buf;
    fn gather_cols_backward(&self, dy: &Self::Buf, idx: &Self::Idx, c: usize, j: usize, dx: &mut Self::Buf);
    /// Candidate scoring: `out[r, j] = h[r] · table[idx[r, j]]` for `h: [R, d]`, `idx: [R, J]`.
    fn score_candidates(&self, h: &Self::Buf, table: &Self::Buf, idx: &Self::Idx, d: usize, j: usize) -> Self::Buf;
    #[allow(clippy::too_many_arguments)]
    fn score_candidates_backward(&self, h: &Self::Buf, table: &Self::Buf, idx: &Self::Idx, d: usize, j: usize,
                                 dy: &Self::Buf, dh: Option<&mut Self::Buf>, dtable: Option<&mut Self::Buf>);

    // ---- attention -------------------------------------------------------------------------------
    /// Fused causal multi-head self-attention over packed sequences. `qkv: [T, 3·d]` holds each token's
    /// query, key and value; tokens of sequence `s` are rows `offsets[s]..offsets[s+1]`, in time order.
    /// Query `i` attends to keys `j <= i` of its own sequence whose `key_valid[j] != 0`; a query with no
    /// visible key outputs 0. Optional dropout on the attention weights. Returns `(out [T, d], probs)`,
    /// where `probs` is whatever the backward needs (the pre-dropout attention weights).
    fn attention(&self, qkv: &Self::Buf, layout: &SeqLayout<Self>, d: usize, heads: usize,
                 dropout: Option<DropoutKey>) -> (Self::Buf, Self::Buf);
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(&self, qkv: &Self::Buf, probs: &Self::Buf, layout: &SeqLayout<Self>, d: usize,
                          heads: usize, dropout: Option<DropoutKey>, dout: &Self::Buf, dqkv: &mut Self::Buf);

    // ---- losses (each returns a 1-element buffer holding the mean loss; `dloss` is
    // the 1-element upstream gradient, kept on the device) ------------------------------
    /// `mean_{r,k} softplus(neg[r,k] − pos[r])` = mean −log σ(pos − neg).
    fn bpr(&self, pos: &Self::Buf, neg: &Self::Buf, k: usize) -> Self::Buf;
    #[allow(clippy::too_many_arguments)]
    fn bpr_backward(&self, pos: &Self::Buf, neg: &Self::Buf, k: usize, dloss: &Self::Buf,
                    dpos: Option<&mut Self::Buf>, dneg: Option<&mut Self::Buf>);
    /// Mean binary cross-entropy with logits against `labels` in [0, 1].
    fn bce_logits(&self, logits: &Self::Buf, labels: &Self::Buf) -> Self::Buf;
    fn bce_logits_backward(&self, logits: &Self::Buf, labels: &Self::Buf, dloss: &Self::Buf, dx: &mut Self::Buf);
    /// Mean over rows of `−log softmax(logits[r])[target[r]]`.
    fn cross_entropy(&self, logits: &Self::Buf, target: &Self::Idx, cols: usize) -> Self::Buf;
    fn cross_entropy_backward(&self, logits: &Self::Buf, target: &Self::Idx, cols: usize, dloss: &Self::Buf,
                              dx: &mut Self::Buf);
    /// `Σ_r KL(teacher[r] ‖ softmax(logits[r])) / R` (PyTorch's `kl_div(..., 'batchmean')`); the teacher is
    /// a probability table (constant).
    fn kl_div(&self, logits: &Self::Buf, teacher: &Self::Buf, cols: usize) -> Self::Buf;
    fn kl_div_backward(&self, logits: &Self::Buf, teacher: &Self::Buf, cols: usize, dloss: &Self::Buf, dx: &mut Self::Buf);
    /// `mean (a − b)²`.
    fn mse(&self, a: &Self::Buf, b: &Self::Buf) -> Self::Buf;
    /// Fused InfoNCE of `q: [B, d]` against positives `k: [B, d]`, the other in-batch keys and a memory
    /// `bank: [K, d]` (slots whose `bank_users` equals the query's user are masked; user 0 never is), with an
    /// online log-sum-exp that never materialises `[B, K]` logits. See `cpu_infonce.rs` for the formula.
    /// A 16-bit bank is widened to f32 as it is read.
    #[allow(clippy::too_many_arguments)]
    fn infonce_bank(&self, q: &Self::Buf, k: &Self::Buf, bank: &Stored<Self>, bank_users: &Self::Idx, users: &Self::Idx,
                    d: usize, tau: f32) -> Self::Buf;
    #[allow(clippy::too_many_arguments)]
    fn infonce_bank_backward(&self, q: &Self::Buf, k: &Self::Buf, bank: &Stored<Self>, bank_users: &Self::Idx,
                             users: &Self::Idx, d: usize, tau: f32, dloss: &Self::Buf, dq: Option<&mut Self::Buf>,
                             dk: Option<&mut Self::Buf>);
    /// `(log det G, G⁻¹)` of a symmetric positive-definite `g: [n, n]` by a Cholesky factorisation in f64 (the
    /// LogDet diversity term and its gradient); the value is a 1-element buffer, kept on the device. A matrix
    /// that is not positive definite gives NaN for both, which the trainer's non-finite guard reports.
    fn logdet_spd(&self, g: &Self::Buf, n: usize) -> (Self::Buf, Self::Buf);
    // ---- evaluation over the whole catalogue (the scores stay on the device) ------------------------
    /// `α·softmax(s[r]) + (1−α)·softmax(q[r])` for each row of `cols` scores, in f64, rounded to f32
    /// (UR4Rec's fused ranking; `model::ur4rec::fuse_scores` on the host).
    fn fuse_softmax(&self, s: &Self::Buf, q: &Self::Buf, cols: usize, alpha: f32) -> Self::Buf;
    /// Full ranking of each row's target: `[higher, equal, non_finite]` per row of `scores: [R, cols]`, over
    /// the items `1..cols` against `scores[r, targets[r]]`, leaving out row `r`'s excluded items
    /// `ex_items[ex_offsets[r] .. ex_offsets[r + 1]]` (distinct, never 0 or the target). The target counts as
    /// equal to itself. `eval::rank_full`'s counting pass, with only `3·R` numbers read back.
    fn rank_counts(&self, scores: &Self::Buf, cols: usize, targets: &Self::Idx, ex_offsets: &Self::Idx,
                   ex_items: &Self::Idx) -> Self::Idx;
    /// `Σ x` as a 1-element buffer.
    fn sum_all(&self, x: &Self::Buf) -> Self::Buf;
    /// `dx += scale · c[0]` for every element (the backward of a sum); `c` is a 1-element buffer so a
    /// device backend never has to read it back.
    fn add_scalar_acc(&self, dx: &mut Self::Buf, c: &Self::Buf, scale: f32);
    /// The first element, on the host.
    fn read_scalar(&self, x: &Self::Buf) -> f32;
    /// The first element of each buffer, read back together: one synchronisation on the GPU.
    fn read_scalars(&self, xs: &[&Self::Buf]) -> Vec<f32> {
        xs.iter().map(|x| self.read_scalar(x)).collect()
    }
}
