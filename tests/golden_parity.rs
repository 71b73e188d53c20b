//! Golden parity with PyTorch (after llm.c's test_gpt2): `tests/golden/ur4rec_tiny.safetensors`, written by
//! `reference/make_golden.py` from the PyTorch reference of this engine's model (`reference/ur4rec_ref.py`),
//! holds a tiny UR4Rec's weights (the engine's parameter names), one explicit batch (sequences, candidates,
//! stage-1 targets, user feature rows, memory-bank keys) and what PyTorch computed from them in float64:
//! every loss term, the scores, every trainable parameter's gradient, the group gradient norms and the
//! losses over 4 AdamW steps. No Python is needed here.
//!
//! Configuration: SASRec 2 blocks, d = 32, 2 heads, FFN 48, L = 12 (two inputs are longer and get
//! truncated); retriever hidden 40, dim 16, concat fusion, text 24-d / visual 20-d user rows; 8 users, 30
//! items, 5 negatives (6 candidates); memory bank of 12 slots (some hold keys of batch users, which must be
//! masked; it wraps around during the steps); AdamW with weight decay 0.01, per-group learning rates and
//! per-group clipping at 1.0 (active in most groups). **Dropout is off**: the engine's masks come from its
//! own counter hash and are not reproducible in PyTorch. Not covered: dropout, the item-table
//! initialisation from features, feature centring and pooling (the batch carries the final user rows).
//!
//! Scenarios and the loss terms each covers:
//! - `stage1`: stage 1, every-position BCE (post-norm SASRec); trains SASRec.
//! - `stage1_pre`: stage 1, last-position BPR, pre-norm SASRec with √d-scaled embeddings; trains SASRec.
//! - `stage4`: stage 4 with every term the engine computes there — SASRec BPR, retrieval softmax CE,
//!   modality consistency, memory-bank InfoNCE (symmetric, same-user slots masked), LogDet diversity,
//!   bidirectional distillation — plus SASRec, retriever and fused scores; trains everything. The memory
//!   bank is refreshed after every step as the trainer does.
//! - `stage2_bce`: stage 2 with the reference's retrieval BCE and in-batch InfoNCE, consistency and
//!   diversity; trains the retriever, visual and fusion groups.
//!
//! # Tolerances (engine f32 against the f64 reference)
//! Float32 has unit roundoff u ≈ 6e-8. On these inputs PyTorch's own float32 run lands within 3e-7
//! (losses, scores) and 6e-7 (per-tensor gradients) of the float64 reference, and within 3e-5 after four
//! steps (the generator stores these as `torch_f32_rel_err`; this test prints them beside the engine's).
//! The engine sums in other orders (packed sequences, blocked gemm, some reductions in f64), so a few
//! times PyTorch's error is expected. The bugs this test exists for — a wrong mask, a transposed weight, a
//! missing 1/n or factor ½, a gradient sent to the wrong row, a term left out — give errors of 1e-2 to 1.
//! - `LOSS_TOL` 1e-5, relative per loss term (plus `ABS_FLOOR` 1e-7 for terms that are 0): ~30× PyTorch's
//!   float32 error, 1000× below the smallest bug signal.
//! - `SCORE_TOL` 1e-5, ‖s_engine − s_ref‖ / ‖s_ref‖ per score matrix: same reasoning.
//! - `GRAD_TOL` 1e-4, ‖g_engine − g_ref‖ / ‖g_ref‖ per parameter tensor, and 1e-5 on each group's
//!   gradient norm: gradients pass through more operations (attention softmax, layer norms, the LogDet's
//!   inverse), and small tensors have little averaging; still 100× below a bug.
//! - `STEP_TOL` 1e-3, relative per loss term after 1–4 AdamW steps: Adam divides each gradient element by
//!   its own running RMS, so an element whose gradient is near zero (round-off sized, e.g. the key bias,
//!   to which softmax is invariant) moves by up to ±lr in float32 and by ~0 in float64; those elements
//!   barely change the loss, but the trajectories drift apart by more than one step's rounding (PyTorch
//!   float32 itself drifts by up to 3e-5 here). A wrong update rule (decay, bias correction, clipping)
//!   shows as ≥1e-2 within two steps.
//!
//! The same scenarios run on the GPU backend when `CudaBackend::new(0)` succeeds, with the same
//! tolerances; otherwise that test prints "skipped: no GPU (<reason>)".
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use ur4rec_engine::backend::cuda::CudaBackend;
use ur4rec_engine::backend::{Backend, CpuBackend};
use ur4rec_engine::config::{Config, ContrastiveKind, Objective};
use ur4rec_engine::model::retriever::Retriever;
use ur4rec_engine::model::SasRec;
use ur4rec_engine::params::{ParamBuilder, ParamStore};
use ur4rec_engine::rng::Rng;
use ur4rec_engine::tape::{Tape, Var};
use ur4rec_engine::train::explicit_batch::{joint_losses, JointBatch, JointSettings};
use ur4rec_engine::train::objective::{sasrec_objective, SasRecTargets};
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::strategies::{LossWeights, MemoryBank};
use ur4rec_engine::model::ur4rec::fuse_scores;

const LOSS_TOL: f64 = 1e-5;
const ABS_FLOOR: f64 = 1e-7;
const SCORE_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const GRAD_NORM_TOL: f64 = 1e-5;
const STEP_TOL: f64 = 1e-3;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/ur4rec_tiny.safetensors");

/// The golden file: its tensors and its metadata.
struct Golden {
    bytes: Vec<u8>,
    meta: serde_json::Value,
}

impl Golden {
    fn load() -> Golden {
        let bytes = std::fs::read(GOLDEN).unwrap_or_else(|e| panic!("{GOLDEN}: {e} (regenerate with reference/make_golden.py)"));
        let (_, m) = SafeTensors::read_metadata(&bytes).expect("golden: safetensors header");
        let meta_str = m.metadata().as_ref().and_then(|m| m.get("golden").cloned()).expect("golden: metadata key 'golden'");
        let meta: serde_json::Value = serde_json::from_str(&meta_str).expect("golden: metadata JSON");
        assert_eq!(meta["format"], "ur4rec-golden/1", "golden: format");
        Golden { bytes, meta }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden: safetensors")
    }
    fn names(&self) -> Vec<String> {
        self.st().names().into_iter().cloned().collect()
    }
    fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap_or_else(|_| panic!("golden: no tensor {name}")).shape().to_vec()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden: no tensor {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "golden: {name} dtype");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden: no tensor {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "golden: {name} dtype");
        t.data().chunks_exact(8).map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).expect("id")).collect()
    }
    fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap_or_else(|| panic!("golden: metadata {key}")) as usize
    }
    fn strings(v: &serde_json::Value) -> Vec<String> {
        v.as_array().expect("array").iter().map(|s| s.as_str().expect("string").to_string()).collect()
    }
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Largest error seen per kind, for the printed report; failures collected, not panicking at the first.
#[derive(Default)]
struct Errors {
    max: BTreeMap<&'static str, (f64, String)>,
    failures: Vec<String>,
}

impl Errors {
    fn check(&mut self, kind: &'static str, what: String, err: f64, tol: f64) {
        let e = self.max.entry(kind).or_insert((0.0, String::new()));
        if err > e.0 || !err.is_finite() {
            *e = (err, what.clone());
        }
        if !(err <= tol) {
            self.failures.push(format!("{kind} {what}: error {err:.3e} > {tol:.0e}"));
        }
    }
    /// Relative error of one loss value (absolute below `ABS_FLOOR`).
    fn loss(&mut self, kind: &'static str, what: String, got: f32, want: f32, tol: f64) {
        let err = (got as f64 - want as f64).abs() / (want as f64).abs().max(ABS_FLOOR / tol);
        self.check(kind, what, err, tol);
    }
}

/// What one training step's forward built.
struct Forward {
    total: Var,
    /// total, sasrec, retrieval, consistency, contrastive, diversity, distillation.
    terms: [f32; 7],
    sasrec_scores: Option<Var>,
    retriever_scores: Option<Var>,
    enqueue: Option<(Vec<f32>, Vec<f32>)>,
}

fn run_scenario<B: Backend>(be: &B, g: &Golden, sc: &serde_json::Value, errs: &mut Errors) {
    let name = sc["name"].as_str().unwrap();
    let stage = sc["stage"].as_u64().unwrap() as usize;
    let trainable = Golden::strings(&sc["trainable"]);
    let mut overrides = Golden::strings(&g.meta["engine_overrides"]);
    overrides.extend(Golden::strings(&sc["overrides"]));
    let mut cfg = Config::default();
    cfg.apply_overrides(&overrides).expect("golden overrides apply");
    let (num_items, text_dim, visual_dim) = (g.usize("num_items"), g.usize("text_dim"), g.usize("visual_dim"));

    // The model in the engine's order (as Ur4Rec::new), then every weight from the file.
    let mut rng = Rng::new(0);
    let mut b = ParamBuilder::new();
    let sasrec = SasRec::new(&mut b, &cfg.sasrec, num_items, &mut rng);
    let retriever = Retriever::new(&mut b, &cfg.ur4rec.retriever, num_items, text_dim, Some(visual_dim), &mut rng);
    let mut store: ParamStore<B> = b.build(be);
    for i in 0..store.infos.len() {
        let (pname, shape) = (store.infos[i].name.clone(), store.infos[i].shape.clone());
        assert_eq!(g.shape(&pname), shape, "golden weight {pname}: shape");
        store.set_values(be, ur4rec_engine::params::ParamId(i), &g.f32s(&pname));
    }
    let is_param = |n: &str| n.starts_with("sasrec.") || n.starts_with("retriever.");
    for n in g.names().iter().filter(|n| is_param(n)) {
        assert!(store.id(n).is_some(), "golden file has weight {n}, which the engine does not define");
    }
    for gi in 0..store.groups.len() {
        let on = trainable.contains(&store.groups[gi].name);
        store.set_group_trainable(gi, on);
    }
    let t = &cfg.train;
    let mut opt = AdamW::new(store.infos.len(), t.beta1, t.beta2, t.adam_eps, t.weight_decay);
    let lrs: Vec<f32> = store.groups.iter()
        .map(|gr| g.meta["lrs"][&gr.name].as_f64().unwrap_or_else(|| panic!("golden: lr of {}", gr.name)) as f32).collect();
    let weights = LossWeights::fixed();
    let aux = &g.meta["aux_weights"];
    let w0 = weights.at(0);
    for (k, v) in [("consistency", w0.consistency), ("contrastive", w0.contrastive), ("diversity", w0.diversity)] {
        assert_eq!(aux[k].as_f64().unwrap() as f32, v, "the fixed {k} weight differs from the golden file's");
    }

    // The batch, verbatim.
    let users = g.ids("batch.users");
    let lens = g.ids("batch.seq_lens");
    let items = g.ids("batch.seq_items");
    let mut seqs = Vec::new();
    let mut at = 0usize;
    for &n in &lens {
        seqs.push(items[at..at + n as usize].to_vec());
        at += n as usize;
    }
    let cands = g.ids("batch.cands");
    let j = g.shape("batch.cands")[1];
    let batch = JointBatch { users: users.clone(), seqs: seqs.clone(), cands: cands.clone(), negatives: j - 1,
                             user_text: g.f32s("batch.user_text"), user_visual: Some(g.f32s("batch.user_visual")) };
    let targets = match cfg.train.objective {
        Objective::EveryPosition => SasRecTargets::EveryPosition { pairs: g.ids("batch.stage1_pairs") },
        Objective::LastBpr => SasRecTargets::LastBpr {
            pos: cands.chunks(j).map(|r| r[0]).collect(),
            neg: cands.chunks(j).flat_map(|r| r[1..].to_vec()).collect(),
            negatives: j - 1,
        },
    };
    let bank_users = g.ids("bank.users");
    let bank = |keys: Vec<f32>| MemoryBank { size: bank_users.len(), dim: cfg.ur4rec.retriever.dim, keys,
                                             users: bank_users.clone(), steps: vec![0; bank_users.len()], ptr: 0, filled: 0 };
    let mut banks = (cfg.ur4rec.contrastive == ContrastiveKind::MemoryBank)
        .then(|| (bank(g.f32s("bank.text.keys")), bank(g.f32s("bank.visual.keys"))));

    let want_losses = g.f32s(&format!("{name}.losses"));
    let want_norms = g.f32s(&format!("{name}.grad_norms"));
    let steps = g.usize("steps");
    for step in 0..=steps {
        let mut tape = Tape::new(be, cfg.seed, step as u64);
        let f = if stage == 1 {
            let sv = sasrec.bind(&mut tape, &store);
            let inputs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
            let bl = sasrec_objective(&mut tape, &sasrec, &sv, &inputs, &targets);
            let l = tape.scalar(bl.loss);
            Forward { total: bl.loss, terms: [l, l, 0.0, 0.0, 0.0, 0.0, 0.0], sasrec_scores: None, retriever_scores: None,
                      enqueue: None }
        } else {
            let set = JointSettings { cfg: &cfg.ur4rec, weights: weights.at(step), banks: banks.as_ref(), poison_retrieval: false };
            let o = joint_losses(&mut tape, &sasrec, &retriever, &store, stage, &batch, &set).expect("joint losses");
            let l = &o.losses;
            Forward { total: o.total, terms: [l.total, l.sasrec, l.retrieval, l.consistency, l.contrastive, l.diversity, l.distillation],
                      sasrec_scores: o.sasrec_scores, retriever_scores: Some(o.retriever_scores), enqueue: o.enqueue }
        };
        let terms = g.meta["loss_terms"].as_array().unwrap();
        for (k, term) in terms.iter().enumerate() {
            let (got, want) = (f.terms[k], want_losses[step * 7 + k]);
            if step == 0 {
                errs.loss("loss", format!("{name} {}", term.as_str().unwrap()), got, want, LOSS_TOL);
            } else {
                errs.loss("loss after steps", format!("{name} step {step} {}", term.as_str().unwrap()), got, want, STEP_TOL);
            }
        }
        if step == 0 {
            let s = f.sasrec_scores.map(|v| tape.to_host(v));
            let r = f.retriever_scores.map(|v| tape.to_host(v));
            for (key, got) in [("sasrec_scores", s.clone()), ("retriever_scores", r.clone())] {
                let file = format!("{name}.{key}");
                assert_eq!(got.is_some(), g.has(&file), "{file}: engine and golden disagree on whether it exists");
                if let Some(got) = got {
                    errs.check("scores", file.clone(), rel_l2(&got, &g.f32s(&file)), SCORE_TOL);
                }
            }
            if let (Some(s), Some(r)) = (s, r) {
                let fused = fuse_scores(&s, &r, j, 0.5);
                errs.check("scores", format!("{name}.fused_scores"), rel_l2(&fused, &g.f32s(&format!("{name}.fused_scores"))), SCORE_TOL);
            }
        }
        if step == steps {
            break;
        }
        store.zero_grads(be);
        tape.backward(f.total, &mut store.grads);
        drop(tape);
        if step == 0 {
            for (i, p) in store.infos.iter().enumerate() {
                let file = format!("{name}.grad.{}", p.name);
                assert_eq!(p.trainable, g.has(&file), "{file}: trainable in the engine iff the golden file has its gradient");
                if p.trainable {
                    let got = store.grads_of(be, ur4rec_engine::params::ParamId(i));
                    errs.check("gradient", file.clone(), rel_l2(&got, &g.f32s(&file)), GRAD_TOL);
                }
            }
        }
        let reports = opt.step(be, &mut store, &lrs, cfg.train.clip_norm);
        let per_step = want_norms.len() / steps;
        assert_eq!(reports.len(), per_step, "{name}: groups that stepped");
        for (k, rep) in reports.iter().enumerate() {
            let want = want_norms[step * per_step + k];
            errs.loss("group grad norm", format!("{name} step {step} {}", store.groups[rep.group].name), rep.grad_norm as f32,
                      want, if step == 0 { GRAD_NORM_TOL } else { STEP_TOL });
        }
        if let (Some((bt, bv)), Some((kt, kv))) = (banks.as_mut(), f.enqueue) {
            bt.enqueue(&kt, &users, step as u64);
            bv.enqueue(&kv, &users, step as u64);
        }
    }
}

fn run_all<B: Backend>(be: &B, device: &str) {
    let g = Golden::load();
    let mut errs = Errors::default();
    let scenarios = g.meta["scenarios"].as_array().unwrap().clone();
    assert!(scenarios.len() >= 4, "golden: scenarios");
    for sc in &scenarios {
        run_scenario(be, &g, sc, &mut errs);
    }
    println!("golden parity on {device} ({} scenarios, reference: PyTorch {} in float64):", scenarios.len(), g.meta["torch"]);
    for (kind, (err, what)) in &errs.max {
        println!("  max {kind:<18} error {err:.2e}  ({what})");
    }
    println!("  PyTorch float32 against the same reference: {}", g.meta["torch_f32_rel_err"]);
    assert!(errs.failures.is_empty(), "golden parity on {device}:\n{}", errs.failures.join("\n"));
}

#[test]
fn golden_parity_cpu() {
    run_all(&CpuBackend::new(), "CPU");
}

#[test]
fn golden_parity_gpu() {
    match CudaBackend::new(0) {
        Ok(gpu) => run_all(&gpu, &format!("GPU ({})", gpu.name())),
        Err(e) => println!("skipped: no GPU ({e})"),
    }
}
