//! Tape-based reverse-mode automatic differentiation.
//!
//! Every operation computes its forward value through the backend and, when recording, appends a node
//! that remembers its inputs and whatever its backward needs. `backward` walks the nodes in reverse and
//! accumulates gradients into the inputs; a parameter node adds its gradient into the flat gradient
//! buffer of the [`ParamStore`]. A tape lives for one step: dropping it frees every activation.
//! With recording off (`Tape::inference`) nodes keep only values — evaluation costs no gradient memory.
use crate::backend::{Backend, DropoutKey, SeqLayout, StoreFormat, Stored};
use crate::params::{ParamId, ParamStore};
use crate::rng::mix64;
use std::sync::Arc;

/// A memory bank an InfoNCE node reads: keys `[K, d]` and their user ids, shared with the bank's owner
/// (`train::strategies::DeviceBank`), so the step neither copies nor uploads it.
pub type SharedBank<B> = (Arc<Stored<B>>, Arc<<B as Backend>::Idx>);

/// A value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

enum Op<B: Backend> {
    Constant,
    Param { offset: usize },
    Linear { x: Var, w: Var, b: Option<Var>, rows: usize, k: usize, n: usize },
    Matmul { a: Var, b: Var, batch: usize, m: usize, n: usize, k: usize, ta: bool, tb: bool },
    Add { a: Var, b: Var },
    Sub { a: Var, b: Var },
    Mul { a: Var, b: Var },
    ConcatCols { a: Var, b: Var, ca: usize, cb: usize },
    Scale { x: Var, c: f32 },
    Reshape { x: Var },
    AddBias { x: Var, b: Var, cols: usize },
    GatherRows { table: Var, idx: B::Idx, cols: usize, skip: Option<u32> },
    LayerNorm { x: Var, g: Var, b: Var, mean: B::Buf, rstd: B::Buf, cols: usize },
    Relu { x: Var },
    Gelu { x: Var },
    Softplus { x: Var },
    Dropout { x: Var, key: DropoutKey },
    Attention { qkv: Var, layout: Arc<SeqLayout<B>>, d: usize, heads: usize, probs: B::Buf, key: Option<DropoutKey> },
    Softmax { x: Var, cols: usize },
    LogSoftmax { x: Var, cols: usize },
    L2Normalize { x: Var, norms: B::Buf, cols: usize, eps: f32 },
    RowDot { a: Var, b: Var, cols: usize },
    GatherCols { x: Var, idx: B::Idx, c: usize, j: usize },
    ScoreCandidates { h: Var, table: Var, idx: B::Idx, d: usize, j: usize },
    Bpr { pos: Var, neg: Var, k: usize },
    Bce { logits: Var, labels: B::Buf },
    CrossEntropy { logits: Var, target: B::Idx, cols: usize },
    KlDiv { logits: Var, teacher: B::Buf, cols: usize },
    InfoNceBank { q: Var, k: Var, bank: Option<SharedBank<B>>, users: Arc<B::Idx>, d: usize, tau: f32 },
    Sum { x: Var },
    LogDet { g: Var, inverse: B::Buf },
}

struct Node<B: Backend> {
    shape: Vec<usize>,
    value: B::Buf,
    grad: Option<B::Buf>,
    needs_grad: bool,
    op: Op<B>,
}

/// The autograd tape of one step.
pub struct Tape<'a, B: Backend> {
    pub backend: &'a B,
    nodes: Vec<Node<B>>,
    record: bool,
    /// Dropout is active (training mode).
    pub train: bool,
    seed: u64,
    step: u64,
    dropout_ops: u64,
}

/// Calls `f` with the bank's keys and users, or with an empty bank (in-batch InfoNCE).
fn with_bank<B: Backend, R>(be: &B, bank: &Option<SharedBank<B>>, f: impl FnOnce(&Stored<B>, &B::Idx) -> R) -> R {
    match bank {
        Some((keys, users)) => f(keys, users),
        None => f(&Stored::from_host(be, &[], StoreFormat::F32), &be.idx_from_host(&[])),
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<'a, B: Backend> Tape<'a, B> {
    /// A recording tape in training mode. Dropout masks are keyed by `(seed, step, op index, element)`.
    pub fn new(backend: &'a B, seed: u64, step: u64) -> Self {
        Tape { backend, nodes: Vec::new(), record: true, train: true, seed, step, dropout_ops: 0 }
    }

    /// A non-recording tape in evaluation mode (no dropout, no gradients).
    pub fn inference(backend: &'a B) -> Self {
        Tape { backend, nodes: Vec::new(), record: false, train: false, seed: 0, step: 0, dropout_ops: 0 }
    }

    pub fn is_recording(&self) -> bool {
        self.record
    }

    fn push(&mut self, shape: Vec<usize>, value: B::Buf, op: Op<B>, inputs: &[Var]) -> Var {
        debug_assert_eq!(self.backend.len(&value), numel(&shape), "op produced a wrong-sized value");
        let needs_grad = self.record && inputs.iter().any(|v| self.nodes[v.0].needs_grad);
        let op = if needs_grad { op } else { Op::Constant };
        self.nodes.push(Node { shape, value, grad: None, needs_grad, op });
        Var(self.nodes.len() - 1)
    }

    // ---- leaves and access -------------------------------------------------------------------------

    pub fn constant(&mut self, shape: &[usize], data: &[f32]) -> Var {
        assert_eq!(numel(shape), data.len(), "constant: shape {shape:?} vs {} values", data.len());
        let value = self.backend.from_host(data);
        self.push(shape.to_vec(), value, Op::Constant, &[])
    }

    pub fn constant_buf(&mut self, shape: &[usize], value: B::Buf) -> Var {
        self.push(shape.to_vec(), value, Op::Constant, &[])
    }

    /// A leaf whose gradient the caller reads after `backward` (tests, features being differentiated).
    pub fn leaf(&mut self, shape: &[usize], data: &[f32]) -> Var {
        let v = self.constant(shape, data);
        self.nodes[v.0].needs_grad = self.record;
        v
    }

    /// A parameter: its gradient is added into `store.grads` by `backward` when it is trainable.
    pub fn param(&mut self, store: &ParamStore<B>, id: ParamId) -> Var {
        let p = store.info(id);
        let mut value = self.backend.copy_range(&store.values, p.offset, p.len);
        if p.table && store.table_format != StoreFormat::F32 {
            // The forward sees the table as 16-bit storage holds it; the gradient goes to the f32 master.
            self.backend.round_to_format(&mut value, store.table_format);
        }
        let needs_grad = self.record && p.trainable;
        self.nodes.push(Node { shape: p.shape.clone(), value, grad: None, needs_grad, op: Op::Param { offset: p.offset } });
        Var(self.nodes.len() - 1)
    }

    /// The same value, cut off from the graph.
    pub fn detach(&mut self, x: Var) -> Var {
        let v = self.backend.copy_range(&self.nodes[x.0].value, 0, numel(&self.nodes[x.0].shape));
        self.push(self.nodes[x.0].shape.clone(), v, Op::Constant, &[])
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        &self.nodes[v.0].shape
    }
    pub fn value(&self, v: Var) -> &B::Buf {
        &self.nodes[v.0].value
    }
    pub fn to_host(&self, v: Var) -> Vec<f32> {
        self.backend.to_host(&self.nodes[v.0].value)
    }
    pub fn scalar(&self, v: Var) -> f32 {
        self.backend.read_scalar(&self.nodes[v.0].value)
    }
    /// The values of several scalar variables, read back together ([`Backend::read_scalars`]).
    pub fn scalars(&self, vs: &[Var]) -> Vec<f32> {
        let bufs: Vec<&B::Buf> = vs.iter().map(|v| &self.nodes[v.0].value).collect();
        self.backend.read_scalars(&bufs)
    }
    /// Gradient of a `leaf` after `backward`.
    pub fn grad(&self, v: Var) -> Option<Vec<f32>> {
        self.nodes[v.0].grad.as_ref().map(|g| self.backend.to_host(g))
    }
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    fn next_dropout_key(&mut self, p: f32) -> Option<DropoutKey> {
        if !self.train || p <= 0.0 {
            return None;
        }
        assert!(p < 1.0, "dropout probability {p} must be < 1");
        self.dropout_ops += 1;
        Some(DropoutKey { p, seed: mix64(self.seed ^ mix64(self.dropout_ops)), stream: self.step })
    }

    fn cols(&self, v: Var) -> usize {
        *self.nodes[v.0].shape.last().expect("scalar has no columns")
    }

    // ---- linear algebra ----------------------------------------------------------------------------

    /// `y = x Wᵀ + b` over the last dimension: `x: [.., k]`, `w: [n, k]`, `b: [n]`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Var {
        let xs = self.shape(x).to_vec();
        let ws = self.shape(w).to_vec();
        let k = *xs.last().unwrap();
        assert_eq!(ws.len(), 2, "linear: weight must be 2-D, got {ws:?}");
        assert_eq!(ws[1], k, "linear: x {xs:?} vs weight {ws:?}");
        let n = ws[0];
        let rows = numel(&xs) / k;
        let mut y = self.backend.zeros(rows * n);
        self.backend.gemm(1, rows, n, k, 1.0, self.value(x), false, self.value(w), true, 0.0, &mut y);
        if let Some(b) = b {
            assert_eq!(self.shape(b), &[n], "linear: bias shape");
            self.backend.add_bias(&mut y, self.value(b), n);
        }
        let mut shape = xs;
        *shape.last_mut().unwrap() = n;
        let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
        self.push(shape, y, Op::Linear { x, w, b, rows, k, n }, &inputs)
    }

    /// Batched product `op(a) · op(b)` of 2-D `[m, k]` or 3-D `[batch, m, k]` tensors.
    pub fn matmul(&mut self, a: Var, b: Var, ta: bool, tb: bool) -> Var {
        let sa = self.shape(a).to_vec();
        let sb = self.shape(b).to_vec();
        assert_eq!(sa.len(), sb.len(), "matmul: ranks differ {sa:?} {sb:?}");
        let (batch, ra, rb) = match sa.len() {
            2 => (1, &sa[..], &sb[..]),
            3 => {
                assert_eq!(sa[0], sb[0], "matmul: batch sizes differ");
                (sa[0], &sa[1..], &sb[1..])
            }
            _ => panic!("matmul: tensors must be 2-D or 3-D, got {sa:?}"),
        };
        let (m, k) = if ta { (ra[1], ra[0]) } else { (ra[0], ra[1]) };
        let (kb, n) = if tb { (rb[1], rb[0]) } else { (rb[0], rb[1]) };
        assert_eq!(k, kb, "matmul: inner dimensions differ: {sa:?}{} · {sb:?}{}", if ta { "ᵀ" } else { "" }, if tb { "ᵀ" } else { "" });
        let mut c = self.backend.zeros(batch * m * n);
        self.backend.gemm(batch, m, n, k, 1.0, self.value(a), ta, self.value(b), tb, 0.0, &mut c);
        let shape = if sa.len() == 3 { vec![batch, m, n] } else { vec![m, n] };
        self.push(shape, c, Op::Matmul { a, b, batch, m, n, k, ta, tb }, &[a, b])
    }

    // ---- elementwise -------------------------------------------------------------------------------

    pub fn add(&mut self, a: Var, b: Var) -> Var {
        assert_eq!(self.shape(a), self.shape(b), "add: shapes differ");
        let y = self.backend.add(self.value(a), self.value(b));
        self.push(self.shape(a).to_vec(), y, Op::Add { a, b }, &[a, b])
    }
    pub fn sub(&mut self, a: Var, b: Var) -> Var {
        assert_eq!(self.shape(a), self.shape(b), "sub: shapes differ");
        let nb = self.backend.scale(self.value(b), -1.0);
        let y = self.backend.add(self.value(a), &nb);
        self.push(self.shape(a).to_vec(), y, Op::Sub { a, b }, &[a, b])
    }
    pub fn mul(&mut self, a: Var, b: Var) -> Var {
        assert_eq!(self.shape(a), self.shape(b), "mul: shapes differ");
        let y = self.backend.mul(self.value(a), self.value(b));
        self.push(self.shape(a).to_vec(), y, Op::Mul { a, b }, &[a, b])
    }
    /// The same values under another shape with as many elements.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Var {
        assert_eq!(numel(shape), numel(self.shape(x)), "reshape: {:?} -> {shape:?}", self.shape(x));
        let y = self.backend.copy_range(self.value(x), 0, numel(shape));
        self.push(shape.to_vec(), y, Op::Reshape { x }, &[x])
    }
    /// `a + c·I` for a square matrix `a` (e.g. the ε·I of a Gram matrix).
    pub fn add_identity(&mut self, a: Var, c: f32) -> Var {
        let s = self.shape(a).to_vec();
        assert!(s.len() == 2 && s[0] == s[1], "add_identity: square matrix expected, got {s:?}");
        let eye: Vec<f32> = (0..s[0] * s[0]).map(|i| if i % (s[0] + 1) == 0 { c } else { 0.0 }).collect();
        let e = self.constant(&s, &eye);
        self.add(a, e)
    }
    /// `[a | b]` along the last dimension of two `[R, ·]` tensors.
    pub fn concat_cols(&mut self, a: Var, b: Var) -> Var {
        let (ca, cb) = (self.cols(a), self.cols(b));
        let rows = numel(self.shape(a)) / ca;
        assert_eq!(numel(self.shape(b)) / cb, rows, "concat_cols: row counts differ");
        let y = self.backend.concat_cols(self.value(a), ca, self.value(b), cb);
        self.push(vec![rows, ca + cb], y, Op::ConcatCols { a, b, ca, cb }, &[a, b])
    }
    pub fn scale(&mut self, x: Var, c: f32) -> Var {
        let y = self.backend.scale(self.value(x), c);
        self.push(self.shape(x).to_vec(), y, Op::Scale { x, c }, &[x])
    }
    /// `x[.., :] + b` with `b: [cols]`.
    pub fn add_bias(&mut self, x: Var, b: Var) -> Var {
        let cols = self.cols(x);
        assert_eq!(self.shape(b), &[cols], "add_bias: bias shape");
        let mut y = self.backend.copy_range(self.value(x), 0, numel(self.shape(x)));
        self.backend.add_bias(&mut y, self.value(b), cols);
        self.push(self.shape(x).to_vec(), y, Op::AddBias { x, b, cols }, &[x, b])
    }
    pub fn relu(&mut self, x: Var) -> Var {
        let y = self.backend.relu(self.value(x));
        self.push(self.shape(x).to_vec(), y, Op::Relu { x }, &[x])
    }
    pub fn gelu(&mut self, x: Var) -> Var {
        let y = self.backend.gelu(self.value(x));
        self.push(self.shape(x).to_vec(), y, Op::Gelu { x }, &[x])
    }
    pub fn softplus(&mut self, x: Var) -> Var {
        let y = self.backend.softplus(self.value(x));
        self.push(self.shape(x).to_vec(), y, Op::Softplus { x }, &[x])
    }
    /// `log σ(x) = −softplus(−x)`.
    pub fn log_sigmoid(&mut self, x: Var) -> Var {
        let n = self.scale(x, -1.0);
        let s = self.softplus(n);
        self.scale(s, -1.0)
    }
    /// `σ(x)`, composed as `softmax([x, 0])₀` per element (no backend op of its own; used by gated fusion).
    pub fn sigmoid(&mut self, x: Var) -> Var {
        let shape = self.shape(x).to_vec();
        let n = numel(&shape);
        let col = self.reshape(x, &[n, 1]);
        let zeros = self.constant(&[n, 1], &vec![0.0; n]);
        let pair = self.concat_cols(col, zeros);
        let sm = self.softmax(pair);
        let first = self.gather_cols(sm, &vec![0; n], 1);
        self.reshape(first, &shape)
    }
    /// Inverted dropout with probability `p` (identity in evaluation mode).
    pub fn dropout(&mut self, x: Var, p: f32) -> Var {
        match self.next_dropout_key(p) {
            None => x,
            Some(key) => {
                let y = self.backend.dropout(self.value(x), key);
                self.push(self.shape(x).to_vec(), y, Op::Dropout { x, key }, &[x])
            }
        }
    }

    // ---- row-wise ----------------------------------------------------------------------------------

    pub fn layer_norm(&mut self, x: Var, g: Var, b: Var, eps: f32) -> Var {
        let cols = self.cols(x);
        assert_eq!(self.shape(g), &[cols], "layer_norm: gamma shape");
        assert_eq!(self.shape(b), &[cols], "layer_norm: beta shape");
        let (y, mean, rstd) = self.backend.layer_norm(self.value(x), self.value(g), self.value(b), cols, eps);
        self.push(self.shape(x).to_vec(), y, Op::LayerNorm { x, g, b, mean, rstd, cols }, &[x, g, b])
    }
    pub fn softmax(&mut self, x: Var) -> Var {
        let cols = self.cols(x);
        let y = self.backend.softmax(self.value(x), cols);
        self.push(self.shape(x).to_vec(), y, Op::Softmax { x, cols }, &[x])
    }
    pub fn log_softmax(&mut self, x: Var) -> Var {
        let cols = self.cols(x);
        let y = self.backend.log_softmax(self.value(x), cols);
        self.push(self.shape(x).to_vec(), y, Op::LogSoftmax { x, cols }, &[x])
    }
    /// Rows divided by `max(‖row‖, eps)`.
    pub fn l2_normalize(&mut self, x: Var, eps: f32) -> Var {
        let cols = self.cols(x);
        let (y, norms) = self.backend.l2_normalize(self.value(x), cols, eps);
        self.push(self.shape(x).to_vec(), y, Op::L2Normalize { x, norms, cols, eps }, &[x])
    }
    /// `out[r] = a[r] · b[r]`, shape `[rows]`.
    pub fn row_dot(&mut self, a: Var, b: Var) -> Var {
        assert_eq!(self.shape(a), self.shape(b), "row_dot: shapes differ");
        let cols = self.cols(a);
        let y = self.backend.row_dot(self.value(a), self.value(b), cols);
        let rows = numel(self.shape(a)) / cols;
        self.push(vec![rows], y, Op::RowDot { a, b, cols }, &[a, b])
    }
    /// Row-wise cosine similarity.
    pub fn cosine(&mut self, a: Var, b: Var, eps: f32) -> Var {
        let na = self.l2_normalize(a, eps);
        let nb = self.l2_normalize(b, eps);
        self.row_dot(na, nb)
    }

    // ---- indexing ----------------------------------------------------------------------------------

    /// `out[r] = table[ids[r]]`. With `skip = Some(0)` this is an embedding lookup whose padding row
    /// receives no gradient.
    pub fn gather_rows(&mut self, table: Var, ids: &[u32], skip: Option<u32>) -> Var {
        let ts = self.shape(table).to_vec();
        assert_eq!(ts.len(), 2, "gather_rows: table must be 2-D");
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= ts[0]) {
            panic!("gather_rows: index {bad} out of range for a table of {} rows", ts[0]);
        }
        let idx = self.backend.idx_from_host(ids);
        let y = self.backend.gather_rows(self.value(table), &idx, ts[1]);
        self.push(vec![ids.len(), ts[1]], y, Op::GatherRows { table, idx, cols: ts[1], skip }, &[table])
    }
    /// Embedding lookup (padding row 0 gets no gradient).
    pub fn embedding(&mut self, table: Var, ids: &[u32]) -> Var {
        self.gather_rows(table, ids, Some(0))
    }
    /// `out[r, t] = x[r, idx[r, t]]` for `x: [R, C]`, `idx: [R, J]`.
    pub fn gather_cols(&mut self, x: Var, idx: &[u32], j: usize) -> Var {
        let xs = self.shape(x).to_vec();
        assert_eq!(xs.len(), 2, "gather_cols: x must be 2-D");
        assert_eq!(idx.len(), xs[0] * j, "gather_cols: idx length");
        assert!(idx.iter().all(|&i| (i as usize) < xs[1]), "gather_cols: index out of range");
        let ib = self.backend.idx_from_host(idx);
        let y = self.backend.gather_cols(self.value(x), &ib, xs[1], j);
        self.push(vec![xs[0], j], y, Op::GatherCols { x, idx: ib, c: xs[1], j }, &[x])
    }
    /// `out[r, t] = h[r] · table[idx[r, t]]`: scores of `j` candidates per row.
    pub fn score_candidates(&mut self, h: Var, table: Var, idx: &[u32], j: usize) -> Var {
        let hs = self.shape(h).to_vec();
        let ts = self.shape(table).to_vec();
        assert_eq!(hs.len(), 2, "score_candidates: h must be 2-D");
        assert_eq!(hs[1], ts[1], "score_candidates: dims differ");
        assert_eq!(idx.len(), hs[0] * j, "score_candidates: idx length");
        if let Some(bad) = idx.iter().find(|&&i| i as usize >= ts[0]) {
            panic!("score_candidates: item {bad} out of range for a table of {} rows", ts[0]);
        }
        let ib = self.backend.idx_from_host(idx);
        let y = self.backend.score_candidates(self.value(h), self.value(table), &ib, hs[1], j);
        self.push(vec![hs[0], j], y, Op::ScoreCandidates { h, table, idx: ib, d: hs[1], j }, &[h, table])
    }

    // ---- attention ---------------------------------------------------------------------------------

    /// Fused causal multi-head self-attention over packed sequences; `qkv: [T, 3d]` → `[T, d]`.
    pub fn attention(&mut self, qkv: Var, layout: &Arc<SeqLayout<B>>, heads: usize, p_drop: f32) -> Var {
        let s = self.shape(qkv).to_vec();
        assert_eq!(s.len(), 2, "attention: qkv must be [T, 3d]");
        assert_eq!(s[0], layout.num_tokens(), "attention: qkv rows vs layout tokens");
        assert_eq!(s[1] % 3, 0, "attention: qkv columns must be 3d");
        let d = s[1] / 3;
        let key = self.next_dropout_key(p_drop);
        let (y, probs) = self.backend.attention(self.value(qkv), layout, d, heads, key);
        self.push(vec![s[0], d], y, Op::Attention { qkv, layout: layout.clone(), d, heads, probs, key }, &[qkv])
    }

    // ---- reductions and losses ---------------------------------------------------------------------

    pub fn sum(&mut self, x: Var) -> Var {
        let y = self.backend.sum_all(self.value(x));
        self.push(vec![], y, Op::Sum { x }, &[x])
    }
    pub fn mean(&mut self, x: Var) -> Var {
        let n = numel(self.shape(x)).max(1);
        let s = self.sum(x);
        self.scale(s, 1.0 / n as f32)
    }
    /// `mean_{r,k} −log σ(pos[r] − neg[r, k])` for `pos: [R]`, `neg: [R, K]`.
    pub fn bpr(&mut self, pos: Var, neg: Var) -> Var {
        let r = numel(self.shape(pos));
        let ns = self.shape(neg).to_vec();
        assert_eq!(ns.len(), 2, "bpr: neg must be [R, K]");
        assert_eq!(ns[0], r, "bpr: pos and neg rows differ");
        let k = ns[1];
        let y = self.backend.bpr(self.value(pos), self.value(neg), k);
        self.push(vec![], y, Op::Bpr { pos, neg, k }, &[pos, neg])
    }
    /// Mean binary cross-entropy with logits; `labels` has the logits' shape.
    pub fn bce_logits(&mut self, logits: Var, labels: &[f32]) -> Var {
        assert_eq!(labels.len(), numel(self.shape(logits)), "bce_logits: labels length");
        let lb = self.backend.from_host(labels);
        let y = self.backend.bce_logits(self.value(logits), &lb);
        self.push(vec![], y, Op::Bce { logits, labels: lb }, &[logits])
    }
    /// Mean cross-entropy of `logits: [R, C]` against class indices `target: [R]`.
    pub fn cross_entropy(&mut self, logits: Var, target: &[u32]) -> Var {
        let cols = self.cols(logits);
        assert_eq!(target.len() * cols, numel(self.shape(logits)), "cross_entropy: target length");
        assert!(target.iter().all(|&t| (t as usize) < cols), "cross_entropy: class out of range");
        let tb = self.backend.idx_from_host(target);
        let y = self.backend.cross_entropy(self.value(logits), &tb, cols);
        self.push(vec![], y, Op::CrossEntropy { logits, target: tb, cols }, &[logits])
    }
    /// `KL(teacher ‖ softmax(logits))`, batch mean; the teacher's probabilities are taken as constants.
    pub fn kl_div(&mut self, logits: Var, teacher_probs: Var) -> Var {
        assert_eq!(self.shape(logits), self.shape(teacher_probs), "kl_div: shapes differ");
        let cols = self.cols(logits);
        let t = self.backend.copy_range(self.value(teacher_probs), 0, numel(self.shape(teacher_probs)));
        let y = self.backend.kl_div(self.value(logits), &t, cols);
        self.push(vec![], y, Op::KlDiv { logits, teacher: t, cols }, &[logits])
    }
    /// InfoNCE of the rows of `q` against their positives (same rows of `k`), the other rows of `k`, and a
    /// memory bank (detached; slots of the same user are masked). All inputs should be L2-normalised. No bank
    /// gives in-batch InfoNCE with the positive counted once. `users` (the rows' user ids, on the backend) is
    /// shared, so both directions of a symmetric InfoNCE and the bank enqueue use one upload.
    pub fn infonce_bank(&mut self, q: Var, k: Var, bank: Option<&SharedBank<B>>, users: &Arc<B::Idx>, tau: f32) -> Var {
        assert_eq!(self.shape(q), self.shape(k), "infonce_bank: q and k shapes differ");
        let d = self.cols(q);
        assert_eq!(numel(self.shape(q)) / d, self.backend.idx_len(users), "infonce_bank: one user id per row");
        let bank = bank.map(|(keys, users)| (keys.clone(), users.clone()));
        let y = with_bank(self.backend, &bank, |keys, bank_users| {
            self.backend.infonce_bank(self.value(q), self.value(k), keys, bank_users, users, d, tau)
        });
        self.push(vec![], y, Op::InfoNceBank { q, k, bank, users: users.clone(), d, tau }, &[q, k])
    }
    /// `mean (a − b)²`.
    pub fn mse(&mut self, a: Var, b: Var) -> Var {
        let d = self.sub(a, b);
        let sq = self.mul(d, d);
        self.mean(sq)
    }
    /// `log det(G)` of a symmetric positive-definite matrix through its Cholesky factor in f64
    /// (`Backend::logdet_spd`, on the device with the GPU). A matrix that is not positive definite gives NaN,
    /// which the trainer's non-finite guard reports.
    pub fn logdet(&mut self, g: Var) -> Var {
        let s = self.shape(g).to_vec();
        assert!(s.len() == 2 && s[0] == s[1], "logdet: G must be square, got {s:?}");
        let (y, inverse) = self.backend.logdet_spd(self.value(g), s[0]);
        self.push(vec![], y, Op::LogDet { g, inverse }, &[g])
    }

    // ---- backward ----------------------------------------------------------------------------------

    /// Takes `v`'s gradient buffer out (zeros if none yet), or `None` if `v` needs no gradient.
    fn take_grad(&mut self, v: Var) -> Option<B::Buf> {
        let node = &mut self.nodes[v.0];
        if !node.needs_grad {
            return None;
        }
        Some(match node.grad.take() {
            Some(g) => g,
            None => self.backend.zeros(numel(&node.shape)),
        })
    }
    fn put_grad(&mut self, v: Var, g: B::Buf) {
        self.nodes[v.0].grad = Some(g);
    }

    /// Reverse pass from the scalar `loss`; trainable parameters' gradients are ADDED into `param_grads`
    /// (the store's flat gradient buffer). Leaves created with `leaf` keep their gradient for `grad`.
    pub fn backward(&mut self, loss: Var, param_grads: &mut B::Buf) {
        assert!(self.record, "backward on an inference tape");
        assert_eq!(numel(self.shape(loss)), 1, "backward: loss must be a scalar");
        if !self.nodes[loss.0].needs_grad {
            return;
        }
        self.nodes[loss.0].grad = Some(self.backend.from_host(&[1.0]));
        for i in (0..=loss.0).rev() {
            if !self.nodes[i].needs_grad || self.nodes[i].grad.is_none() {
                continue;
            }
            let op = std::mem::replace(&mut self.nodes[i].op, Op::Constant);
            let is_leaf = matches!(op, Op::Constant);
            let g = if is_leaf { None } else { self.nodes[i].grad.take() };
            match (op, g) {
                (Op::Param { offset }, Some(g)) => self.backend.add_into_range(param_grads, offset, &g),
                (op, Some(g)) => self.backward_op(Var(i), &op, &g),
                _ => {}
            }
        }
    }

    fn backward_op(&mut self, out: Var, op: &Op<B>, g: &B::Buf) {
        let be = self.backend;
        match op {
            Op::Constant | Op::Param { .. } => unreachable!(),
            Op::Linear { x, w, b, rows, k, n } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.gemm(1, *rows, *k, *n, 1.0, g, false, self.value(*w), false, 1.0, &mut gx);
                    self.put_grad(*x, gx);
                }
                if let Some(mut gw) = self.take_grad(*w) {
                    be.gemm(1, *n, *k, *rows, 1.0, g, true, self.value(*x), false, 1.0, &mut gw);
                    self.put_grad(*w, gw);
                }
                if let Some(b) = b {
                    if let Some(mut gb) = self.take_grad(*b) {
                        be.sum_rows_into(g, *n, &mut gb);
                        self.put_grad(*b, gb);
                    }
                }
            }
            Op::Matmul { a, b, batch, m, n, k, ta, tb } => {
                // C = op(A) op(B): dop(A) = dC op(B)ᵀ, dop(B) = op(A)ᵀ dC; transpose back when stored transposed.
                if let Some(mut ga) = self.take_grad(*a) {
                    if *ta {
                        be.gemm(*batch, *k, *m, *n, 1.0, self.value(*b), *tb, g, true, 1.0, &mut ga);
                    } else {
                        be.gemm(*batch, *m, *k, *n, 1.0, g, false, self.value(*b), !*tb, 1.0, &mut ga);
                    }
                    self.put_grad(*a, ga);
                }
                if let Some(mut gb) = self.take_grad(*b) {
                    if *tb {
                        be.gemm(*batch, *n, *k, *m, 1.0, g, true, self.value(*a), *ta, 1.0, &mut gb);
                    } else {
                        be.gemm(*batch, *k, *n, *m, 1.0, self.value(*a), !*ta, g, false, 1.0, &mut gb);
                    }
                    self.put_grad(*b, gb);
                }
            }
            Op::Add { a, b } => {
                for v in [*a, *b] {
                    if let Some(mut gv) = self.take_grad(v) {
                        be.axpy(&mut gv, 1.0, g);
                        self.put_grad(v, gv);
                    }
                }
            }
            Op::Sub { a, b } => {
                for (v, s) in [(*a, 1.0), (*b, -1.0)] {
                    if let Some(mut gv) = self.take_grad(v) {
                        be.axpy(&mut gv, s, g);
                        self.put_grad(v, gv);
                    }
                }
            }
            Op::Mul { a, b } => {
                if let Some(mut ga) = self.take_grad(*a) {
                    be.mul_acc(&mut ga, g, self.value(*b));
                    self.put_grad(*a, ga);
                }
                if let Some(mut gb) = self.take_grad(*b) {
                    be.mul_acc(&mut gb, g, self.value(*a));
                    self.put_grad(*b, gb);
                }
            }
            Op::ConcatCols { a, b, ca, cb } => {
                let mut ga = self.take_grad(*a);
                let mut gb = self.take_grad(*b);
                be.split_cols_acc(g, *ca, *cb, ga.as_mut(), gb.as_mut());
                if let Some(v) = ga { self.put_grad(*a, v) }
                if let Some(v) = gb { self.put_grad(*b, v) }
            }
            Op::Reshape { x } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.axpy(&mut gx, 1.0, g);
                    self.put_grad(*x, gx);
                }
            }
            Op::Scale { x, c } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.axpy(&mut gx, *c, g);
                    self.put_grad(*x, gx);
                }
            }
            Op::AddBias { x, b, cols } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.axpy(&mut gx, 1.0, g);
                    self.put_grad(*x, gx);
                }
                if let Some(mut gb) = self.take_grad(*b) {
                    be.sum_rows_into(g, *cols, &mut gb);
                    self.put_grad(*b, gb);
                }
            }
            Op::GatherRows { table, idx, cols, skip } => {
                if let Some(mut gt) = self.take_grad(*table) {
                    be.scatter_add_rows(g, idx, *cols, *skip, &mut gt);
                    self.put_grad(*table, gt);
                }
            }
            Op::LayerNorm { x, g: gamma, b, mean, rstd, cols } => {
                let mut gx = self.take_grad(*x);
                let mut gg = self.take_grad(*gamma);
                let mut gb = self.take_grad(*b);
                be.layer_norm_backward(self.value(*x), self.value(*gamma), mean, rstd, g, *cols,
                                       gx.as_mut(), gg.as_mut(), gb.as_mut());
                if let Some(v) = gx { self.put_grad(*x, v) }
                if let Some(v) = gg { self.put_grad(*gamma, v) }
                if let Some(v) = gb { self.put_grad(*b, v) }
            }
            Op::Relu { x } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.relu_backward(self.value(*x), g, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::Gelu { x } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.gelu_backward(self.value(*x), g, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::Softplus { x } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.softplus_backward(self.value(*x), g, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::Dropout { x, key } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.dropout_backward(g, *key, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::Attention { qkv, layout, d, heads, probs, key } => {
                if let Some(mut gq) = self.take_grad(*qkv) {
                    be.attention_backward(self.value(*qkv), probs, layout, *d, *heads, *key, g, &mut gq);
                    self.put_grad(*qkv, gq);
                }
            }
            Op::Softmax { x, cols } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.softmax_backward(self.value(out), g, *cols, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::LogSoftmax { x, cols } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.log_softmax_backward(self.value(out), g, *cols, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::L2Normalize { x, norms, cols, eps } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.l2_normalize_backward(self.value(*x), norms, g, *cols, *eps, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::RowDot { a, b, cols } => {
                // d a[r] = g[r] · b[r], d b[r] = g[r] · a[r].
                if let Some(mut ga) = self.take_grad(*a) {
                    be.row_scale_acc(&mut ga, g, self.value(*b), *cols);
                    self.put_grad(*a, ga);
                }
                if let Some(mut gb) = self.take_grad(*b) {
                    be.row_scale_acc(&mut gb, g, self.value(*a), *cols);
                    self.put_grad(*b, gb);
                }
            }
            Op::GatherCols { x, idx, c, j } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.gather_cols_backward(g, idx, *c, *j, &mut gx);
                    self.put_grad(*x, gx);
                }
            }
            Op::ScoreCandidates { h, table, idx, d, j } => {
                let mut gh = self.take_grad(*h);
                let mut gt = self.take_grad(*table);
                be.score_candidates_backward(self.value(*h), self.value(*table), idx, *d, *j, g, gh.as_mut(), gt.as_mut());
                if let Some(v) = gh { self.put_grad(*h, v) }
                if let Some(v) = gt { self.put_grad(*table, v) }
            }
            Op::Bpr { pos, neg, k } => {
                let mut gp = self.take_grad(*pos);
                let mut gn = self.take_grad(*neg);
                be.bpr_backward(self.value(*pos), self.value(*neg), *k, g, gp.as_mut(), gn.as_mut());
                if let Some(v) = gp { self.put_grad(*pos, v) }
                if let Some(v) = gn { self.put_grad(*neg, v) }
            }
            Op::Bce { logits, labels } => {
                if let Some(mut gx) = self.take_grad(*logits) {
                    be.bce_logits_backward(self.value(*logits), labels, g, &mut gx);
                    self.put_grad(*logits, gx);
                }
            }
            Op::CrossEntropy { logits, target, cols } => {
                if let Some(mut gx) = self.take_grad(*logits) {
                    be.cross_entropy_backward(self.value(*logits), target, *cols, g, &mut gx);
                    self.put_grad(*logits, gx);
                }
            }
            Op::KlDiv { logits, teacher, cols } => {
                if let Some(mut gx) = self.take_grad(*logits) {
                    be.kl_div_backward(self.value(*logits), teacher, *cols, g, &mut gx);
                    self.put_grad(*logits, gx);
                }
            }
            Op::InfoNceBank { q, k, bank, users, d, tau } => {
                let mut gq = self.take_grad(*q);
                let mut gk = self.take_grad(*k);
                with_bank(be, bank, |keys, bank_users| {
                    be.infonce_bank_backward(self.value(*q), self.value(*k), keys, bank_users, users, *d, *tau, g,
                                             gq.as_mut(), gk.as_mut())
                });
                if let Some(v) = gq { self.put_grad(*q, v) }
                if let Some(v) = gk { self.put_grad(*k, v) }
            }
            Op::Sum { x } => {
                if let Some(mut gx) = self.take_grad(*x) {
                    be.add_scalar_acc(&mut gx, g, 1.0);
                    self.put_grad(*x, gx);
                }
            }
            Op::LogDet { g: gm, inverse } => {
                // d log det G / dG = G⁻ᵀ = G⁻¹ (symmetric).
                if let Some(mut gx) = self.take_grad(*gm) {
                    // gx += g[0] · G⁻¹ with the upstream scalar left on the device (a 1-row row_scale_acc).
                    be.row_scale_acc(&mut gx, g, inverse, numel(&self.nodes[gm.0].shape));
                    self.put_grad(*gm, gx);
                }
            }
        }
    }
}
