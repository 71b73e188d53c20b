//! The UR4Rec losses of stages 2–4 on one batch given as plain arrays.
//!
//! `Trainer::losses` draws the batch (users, their negatives) from its RNG and reads the users' feature
//! rows, then calls [`joint_losses`]; the golden-parity test (`tests/golden_parity.rs`) builds the same
//! [`JointBatch`] from a file a PyTorch script wrote (`reference/make_golden.py`), so both run exactly this
//! code. Stage 1's SASRec objective has its explicit form in `objective::sasrec_objective`.
//!
//! Terms, each reported in [`StepLosses`] (0 where off), summed into the total in this order:
//! ```text
//! sasrec        BPR of column 0 against the k negatives, last position          (stages 3–4)   × sasrec_weight
//! retrieval     CE of column 0 (softmax) or BCE over [pos | negs] of cos/τ      (stages 2–4)   × retrieval_weight
//! consistency   mean (text − visual)²  of the normalised user vectors           (visual branch) × w.consistency
//! contrastive   ½ (InfoNCE(text → visual) + InfoNCE(visual → text)), bank keys  (visual branch) × w.contrastive
//! diversity     −log det(F Fᵀ + ε I), F the normalised fused user vectors        (visual branch) × w.diversity
//! distillation  T² (½ KL(p_r‖p_s) + ½ KL(p_s‖p_r)), teachers detached           (stages in cfg) × kd.weight
//! ```
use crate::backend::Backend;
use crate::config::{RetrievalLoss, Ur4RecConfig};
use crate::model::retriever::Retriever;
use crate::model::SasRec;
use crate::params::ParamStore;
use crate::tape::{Tape, Var};
use crate::train::batch::SeqBatch;
use crate::train::strategies::{DeviceBank, Weights};
use crate::train::ur4rec_trainer::StepLosses;
use anyhow::{bail, ensure, Result};
use std::sync::Arc;

/// One batch of `B` users for stages 2–4.
#[derive(Clone, Debug, Default)]
pub struct JointBatch {
    /// Dense user ids (1-based), `[B]`: memory-bank masking of same-user keys and the enqueue.
    pub users: Vec<u32>,
    /// Each user's SASRec input (the training sequence without its last item; only the last `max_len`
    /// items are used). Read in stages 3–4.
    pub seqs: Vec<Vec<u32>>,
    /// Candidates `[B, 1 + negatives]`, row-major; column 0 is the positive.
    pub cands: Vec<u32>,
    pub negatives: usize,
    /// The users' text input rows `[B, Dt]`.
    pub user_text: Vec<f32>,
    /// The users' visual input rows `[B, Dv]` (with a visual branch).
    pub user_visual: Option<Vec<f32>>,
}

impl JointBatch {
    pub fn len(&self) -> usize {
        self.users.len()
    }
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// How the terms are weighted and what they read besides the batch.
pub struct JointSettings<'c, B: Backend> {
    pub cfg: &'c Ur4RecConfig,
    /// Weights of the auxiliary terms at this step.
    pub weights: Weights,
    /// The (text, visual) memory banks, when contrastive = memory-bank.
    pub banks: Option<&'c (DeviceBank<B>, DeviceBank<B>)>,
    /// Testing aid (`train.inject_nan_*`): poisons the retrieval term, so the guard's attribution is exercised.
    pub poison_retrieval: bool,
}

/// What [`joint_losses`] built on the tape.
pub struct JointOutput<B: Backend> {
    pub total: Var,
    /// The loss terms (read with [`LossTerms::read`], or by the trainer with the gradient sums).
    pub terms: LossTerms,
    /// SASRec's candidate scores `[B, 1 + k]` (stages 3–4).
    pub sasrec_scores: Option<Var>,
    /// The retriever's candidate logits `[B, 1 + k]`.
    pub retriever_scores: Var,
    /// With a memory bank: what to enqueue once the step's update is done.
    pub enqueue: Option<BankEnqueue<B>>,
}

/// Builds the loss of `stage` (2, 3 or 4) for `batch` on `tape`.
pub fn joint_losses<B: Backend>(tape: &mut Tape<B>, sasrec: &SasRec, retriever: &Retriever, store: &ParamStore<B>,
                                stage: usize, batch: &JointBatch, set: &JointSettings<B>) -> Result<JointOutput<B>> {
    let cfg = set.cfg;
    let n = batch.len();
    let k = batch.negatives;
    let j = 1 + k;
    ensure!((2..=4).contains(&stage), "joint_losses: stage {stage} (stage 1 is objective::sasrec_objective)");
    ensure!(n > 0 && batch.cands.len() == n * j, "joint_losses: {} candidates for {n} users × {j}", batch.cands.len());
    let w = set.weights;
    let mut read = LossTerms::default();
    let mut terms: Vec<Var> = Vec::new();
    // SASRec: BPR of the last training item against the negatives (needed in stages 3–4, and for KD).
    let s = if stage >= 3 {
        ensure!(batch.seqs.len() == n, "joint_losses: {} sequences for {n} users", batch.seqs.len());
        let sv = sasrec.bind(tape, store);
        let inputs: Vec<&[u32]> = batch.seqs.iter().map(|s| s.as_slice()).collect();
        let sb = SeqBatch::new(tape.backend, &inputs, sasrec.cfg.max_len);
        let h = sasrec.user_vectors(tape, &sv, &sb);
        let s = tape.score_candidates(h, sv.item_table, &batch.cands, j);
        let pos = tape.gather_cols(s, &vec![0; n], 1);
        let neg_idx: Vec<u32> = (0..n).flat_map(|_| 1..j as u32).collect();
        let neg = tape.gather_cols(s, &neg_idx, k);
        let bpr = tape.bpr(pos, neg);
        read.sasrec = Some(bpr);
        terms.push(tape.scale(bpr, cfg.sasrec_weight));
        Some(s)
    } else {
        None
    };
    // Retriever: softmax cross-entropy (or BCE) over [positive | negatives] of cos/τ logits.
    let rv = retriever.bind(tape, store);
    ensure!(!batch.user_text.is_empty() && batch.user_text.len().is_multiple_of(n), "joint_losses: user text rows");
    let ti = tape.constant(&[n, batch.user_text.len() / n], &batch.user_text);
    let vi = batch.user_visual.as_ref().map(|v| tape.constant(&[n, v.len() / n], v));
    let uv = retriever.users(tape, &rv, ti, vi);
    let r = retriever.score(tape, &rv, uv.fused, &batch.cands, j);
    let ret = match cfg.retrieval_loss {
        RetrievalLoss::Bce => {
            let labels: Vec<f32> = (0..batch.cands.len()).map(|i| if i % j == 0 { 1.0 } else { 0.0 }).collect();
            tape.bce_logits(r, &labels)
        }
        RetrievalLoss::Softmax => tape.cross_entropy(r, &vec![0; n]),
    };
    let ret = if set.poison_retrieval { tape.scale(ret, f32::NAN) } else { ret };
    read.retrieval = Some(ret);
    terms.push(tape.scale(ret, cfg.retrieval_weight));
    let mut enqueue = None;
    if let Some(v) = uv.visual {
        // The batch's users on the backend, once: both InfoNCE directions and the enqueue read them.
        let users = Arc::new(tape.backend.idx_from_host(&batch.users));
        // Modality consistency, contrastive InfoNCE (symmetric), LogDet diversity of the fused vectors.
        let cons = tape.mse(uv.text, v);
        read.consistency = Some(cons);
        let bank_t = set.banks.map(|(bt, _)| bt.on_device());
        let bank_v = set.banks.map(|(_, bv)| bv.on_device());
        let tv = tape.infonce_bank(uv.text, v, bank_v, &users, cfg.contrastive_tau);
        let vt = tape.infonce_bank(v, uv.text, bank_t, &users, cfg.contrastive_tau);
        let ctr = tape.add(tv, vt);
        let ctr = tape.scale(ctr, 0.5);
        read.contrastive = Some(ctr);
        let g = tape.matmul(uv.fused, uv.fused, false, true);
        let g = tape.add_identity(g, cfg.diversity_eps);
        let ld = tape.logdet(g);
        let div = tape.scale(ld, -1.0);
        read.diversity = Some(div);
        if w.consistency > 0.0 { terms.push(tape.scale(cons, w.consistency)); }
        if w.contrastive > 0.0 { terms.push(tape.scale(ctr, w.contrastive)); }
        if w.diversity > 0.0 { terms.push(tape.scale(div, w.diversity)); }
        if set.banks.is_some() {
            let copy = |x: Var| tape.backend.copy_range(tape.value(x), 0, tape.backend.len(tape.value(x)));
            enqueue = Some(BankEnqueue { text: copy(uv.text), visual: copy(v), users: batch.users.clone(),
                                         users_on_device: users });
        }
    }
    // Bidirectional distillation over the same candidates.
    let kd = &cfg.distillation;
    if let (true, Some(s)) = (kd.applies(stage), s) {
        if kd.confidence_weighted {
            bail!("ur4rec.distillation.confidence_weighted is not supported by the trainer yet");
        }
        let t = kd.temperature;
        let r_scale = if retriever.cfg.raw_cosine { kd.retriever_logit_scale } else { 1.0 };
        let st = tape.scale(s, 1.0 / t);
        let rt = tape.scale(r, r_scale / t);
        let ps = tape.softmax(st);
        let ps = tape.detach(ps);
        let pr = tape.softmax(rt);
        let pr = tape.detach(pr);
        let (c_s, c_r) = kd.coefficients(0.5, 0.5);
        let to_s = tape.kl_div(st, pr);
        let to_r = tape.kl_div(rt, ps);
        let a = tape.scale(to_s, c_s as f32);
        let b = tape.scale(to_r, c_r as f32);
        let sum = tape.add(a, b);
        let kdl = tape.scale(sum, t * t);
        read.distillation = Some(kdl);
        terms.push(tape.scale(kdl, kd.weight));
    }
    let mut total = terms[0];
    for &t in &terms[1..] {
        total = tape.add(total, t);
    }
    read.total = Some(total);
    Ok(JointOutput { total, terms: read, sasrec_scores: s, retriever_scores: r, enqueue })
}

/// A step's memory-bank enqueue, applied after its update (a refused step writes nothing): the batch's normalised
/// text and visual user vectors (copies on the backend, so the tape can be dropped first) and their users.
pub struct BankEnqueue<B: Backend> {
    pub text: B::Buf,
    pub visual: B::Buf,
    pub users: Vec<u32>,
    pub users_on_device: Arc<B::Idx>,
}

impl<B: Backend> BankEnqueue<B> {
    /// Writes the text keys into the text bank and the visual keys into the visual bank, at global `step`,
    /// if the step's verdict `gate` (in the step log) allows it.
    pub fn apply(&self, backend: &B, (text, visual): &mut (DeviceBank<B>, DeviceBank<B>), step: u64, gate: (&B::Wide, usize)) {
        text.enqueue(backend, &self.text, &self.users, &self.users_on_device, step, gate);
        visual.enqueue(backend, &self.visual, &self.users, &self.users_on_device, step, gate);
    }
}

/// The loss terms' tape variables. The step records their values in the device-side step log
/// (`train::step_log`) with the gradient sums; the host reads them once per `train.readback_every` steps.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossTerms {
    pub total: Option<Var>,
    pub sasrec: Option<Var>,
    pub retrieval: Option<Var>,
    pub consistency: Option<Var>,
    pub contrastive: Option<Var>,
    pub diversity: Option<Var>,
    pub distillation: Option<Var>,
}

impl LossTerms {
    fn fields(&self) -> [Option<Var>; 7] {
        [self.total, self.sasrec, self.retrieval, self.consistency, self.contrastive, self.diversity, self.distillation]
    }
    /// The variables to read, in the order [`LossTerms::values`] expects their values.
    pub fn vars(&self) -> Vec<Var> {
        self.fields().iter().flatten().copied().collect()
    }
    /// The losses from the values of [`LossTerms::vars`] (0 for a term that is off).
    pub fn values(&self, values: &[f32]) -> StepLosses {
        let mut values = values.iter().copied();
        let [total, sasrec, retrieval, consistency, contrastive, diversity, distillation] =
            self.fields().map(|v| v.map(|_| values.next().expect("one value per variable")).unwrap_or(0.0));
        StepLosses { total, sasrec, retrieval, consistency, contrastive, diversity, distillation }
    }
    /// Reads the losses on their own (tests and benchmarks; the trainer reads them with the gradient sums).
    pub fn read<B: Backend>(&self, tape: &Tape<B>) -> StepLosses {
        self.values(&tape.scalars(&self.vars()))
    }
}
