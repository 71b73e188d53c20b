//! The four-stage UR4Rec trainer (mission.md §5) with the five improvements as switchable strategies.
//!
//! Stage 1 pre-trains SASRec (retriever frozen); stage 2 the retriever (SASRec frozen); stage 3 fine-tunes
//! jointly with alternation (parity or adaptive) — only the active tower's groups are trainable; stage 4
//! trains end to end (optionally unfreezing by schedule). Each stage has its own epochs, warmup + cosine
//! over its own steps, early stopping on validation NDCG@10 and a reload of its best weights (and memory
//! bank). With `keep_start_if_better`, a stage's starting weights are a selection candidate too.
use crate::backend::Backend;
use crate::checkpoint;
use crate::config::{AlternationKind, Config, ContrastiveKind, StageSelection, WeightsKind};
use crate::model::ur4rec::Ur4Rec;
use crate::params::{ParamBuilder, ParamStore};
use crate::ranking::{evaluate_ur4rec, EvalTarget, Ur4RecEval};
use crate::report::RunDir;
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::train::explicit_batch::{joint_losses, BankEnqueue, JointBatch, JointSettings, LossTerms};
use crate::train::objective::sasrec_loss;
use crate::train::guard::{self, NonFinite, StepGuard};
use crate::train::optim::AdamW;
use crate::train::schedule::lr_factor;
use crate::train::step_log::StepLog;
use crate::train::strategies::{AdaptiveAlternation, Alternation, DeviceBank, LossWeights, MemoryBank, Module, ParityAlternation,
                               UnfreezeSchedule, Weights};
use crate::train::resume::{BankMeta, Checkpointer, ResumeFile, ResumeWriter};
use crate::train::trainer::{say, PreparedData, RunOptions};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

const GROUPS_RETRIEVER: [&str; 3] = ["retriever", "visual", "fusion"];

/// Loss terms of one step (0 where a term is off).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepLosses {
    pub total: f32,
    pub sasrec: f32,
    pub retrieval: f32,
    pub consistency: f32,
    pub contrastive: f32,
    pub diversity: f32,
    pub distillation: f32,
}

impl StepLosses {
    /// The named terms, in the order a non-finite total is attributed to them.
    fn terms(&self) -> [(&'static str, f32); 7] {
        [("sasrec", self.sasrec), ("retrieval", self.retrieval), ("consistency", self.consistency),
         ("contrastive", self.contrastive), ("diversity", self.diversity), ("distillation", self.distillation),
         ("total", self.total)]
    }
}

/// What one UR4Rec training step did.
#[derive(Clone, Debug)]
pub struct StepResult {
    pub losses: StepLosses,
    /// Gradient norm (before clipping) per parameter group that stepped; empty when skipped.
    pub grad_norm: BTreeMap<String, f64>,
    /// Set when the loss or a gradient was non-finite: no optimizer update, no memory-bank enqueue.
    pub skipped: Option<NonFinite>,
}

#[derive(Serialize)]
struct StepRecord<'a> {
    kind: &'a str,
    stage: usize,
    epoch: usize,
    step: usize,
    stage_step: usize,
    losses: &'a StepLosses,
    weights: &'a Weights,
    lr: BTreeMap<String, f32>,
    active: &'a str,
    grad_norm: BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct EvalRecord<'a> {
    kind: &'a str,
    stage: usize,
    epoch: usize,
    step: usize,
    split: &'a str,
    eval: &'a Ur4RecEval,
    selection: f64,
    train_loss: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageSummary {
    pub stage: usize,
    pub epochs_run: usize,
    /// Epoch of the selected weights (0 = the stage's starting weights).
    pub best_epoch: usize,
    pub selection_ndcg10: f64,
    pub valid: Ur4RecEval,
    pub seconds: f64,
    pub switches: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ur4RecSummary {
    pub dataset: String,
    pub users: usize,
    pub items: usize,
    pub parameters: usize,
    pub stages: Vec<StageSummary>,
    pub test: Ur4RecEval,
    /// SASRec's fusion weight used for the test evaluation.
    pub fusion_alpha: f32,
    pub chance_hit10_sampled: f64,
    pub wall_seconds: f64,
}

impl std::fmt::Display for Ur4RecSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "data {}: {} users, {} items; {} parameters", self.dataset, self.users, self.items, self.parameters)?;
        for s in &self.stages {
            writeln!(f, "stage {}: {} epochs in {:.1} s, selected epoch {} (valid NDCG@10 {:.4}){}", s.stage, s.epochs_run,
                     s.seconds, s.best_epoch, s.selection_ndcg10,
                     if s.switches > 0 { format!(", {} switches", s.switches) } else { String::new() })?;
        }
        writeln!(f, "test, sampled: fused     {}  (α = {:.1})", self.test.fused.sampled, self.fusion_alpha)?;
        writeln!(f, "               SASRec    {}", self.test.sasrec.sampled)?;
        writeln!(f, "               retriever {}", self.test.retriever.sampled)?;
        writeln!(f, "  chance level Hit@10 = {:.4}", self.chance_hit10_sampled)?;
        if let Some(full) = &self.test.fused.full {
            writeln!(f, "test, full ranking (history masked): fused {full}")?;
        }
        write!(f, "wall time {:.1} s", self.wall_seconds)
    }
}


/// The selection metric of a stage. With calibration, the fused score is taken at its best weight.
fn selection(cfg: &Config, stage: usize, e: &Ur4RecEval) -> f64 {
    let fused = best_alpha(e).map(|(_, m)| m).unwrap_or(e.fused.sampled.ndcg10);
    match (stage, cfg.ur4rec.stage2_selection) {
        (1, _) => e.sasrec.sampled.ndcg10,
        (2, StageSelection::OwnTower) => e.retriever.sampled.ndcg10,
        _ => fused,
    }
}

/// The calibration grid's best SASRec weight by validation NDCG@10 (sampled); ties go to the larger α.
fn best_alpha(e: &Ur4RecEval) -> Option<(f32, f64)> {
    e.sweep.iter().map(|(a, m)| (*a, m.ndcg10)).fold(None, |best, (a, v)| match best {
        Some((_, bv)) if bv > v => best,
        _ => Some((a, v)),
    })
}

const ALPHA_GRID: [f32; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// The state of a UR4Rec run: model, parameters, optimizer, RNG, step, memory banks and loss weights.
pub struct Trainer<'a, B: Backend> {
    backend: &'a B,
    cfg: &'a Config,
    data: &'a PreparedData,
    pub model: Ur4Rec,
    pub store: ParamStore<B>,
    pub opt: AdamW,
    pub rng: Rng,
    pub step: usize,
    /// The (text, visual) memory banks, keys on the backend.
    pub banks: Option<(DeviceBank<B>, DeviceBank<B>)>,
    weights: LossWeights,
    unfreeze: UnfreezeSchedule,
    steps_per_epoch: usize,
    /// The device-side record of the steps not read back yet, and each one's global step and loss layout.
    log: StepLog<B>,
    submitted: Vec<(usize, LossTerms)>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Builds the model (item tables initialised from the projected features), the optimizer and the
    /// strategies' state; validates the unfreezing schedule against the parameter names.
    pub fn new(backend: &'a B, cfg: &'a Config, data: &'a PreparedData) -> Result<Self> {
        let u = &cfg.ur4rec;
        let mut init_rng = Rng::derive(cfg.seed, "init");
        let mut builder = ParamBuilder::new();
        let model = Ur4Rec::new(&mut builder, cfg, &data.dataset, &data.split, &mut init_rng)?;
        let mut store = builder.build(backend);
        store.table_format = cfg.train.table_format;
        model.init_item_tables(backend, &mut store);
        let steps_per_epoch = data.split.train.len().div_ceil(cfg.train.batch_size.max(1));
        let total_steps: usize = u.stage_epochs.iter().map(|e| e * steps_per_epoch).sum();
        let weights = match u.weights {
            WeightsKind::Fixed => LossWeights::fixed(),
            WeightsKind::Curriculum => LossWeights::curriculum(total_steps),
        };
        let banks = (u.contrastive == ContrastiveKind::MemoryBank && model.retriever.has_visual()).then(|| {
            let size = if u.bank_size > 0 { u.bank_size } else { MemoryBank::default_size(data.dataset.num_users) };
            let mut r = Rng::derive(cfg.seed, "memory-bank");
            let (t, v) = (MemoryBank::new(size, u.retriever.dim, &mut r), MemoryBank::new(size, u.retriever.dim, &mut r));
            (DeviceBank::upload(backend, t, u.bank_format), DeviceBank::upload(backend, v, u.bank_format))
        });
        let unfreeze = UnfreezeSchedule::parse(&u.unfreeze).map_err(anyhow::Error::msg)?;
        let names: Vec<&str> = store.infos.iter().map(|p| p.name.as_str()).collect();
        unfreeze.validate(&names).map_err(anyhow::Error::msg).context("ur4rec.unfreeze")?;
        let opt = AdamW::new(store.infos.len(), cfg.train.beta1, cfg.train.beta2, cfg.train.adam_eps, cfg.train.weight_decay);
        let log = StepLog::new(backend, &store, &opt, cfg.train.readback_interval());
        Ok(Trainer { backend, cfg, data, model, store, opt, rng: Rng::derive(cfg.seed, "train"), step: 0, banks, weights,
                     unfreeze, steps_per_epoch, log, submitted: Vec::new() })
    }

    /// Sets exactly the parameter groups that train in `stage` (in stage 3: the `active` tower's).
    pub fn set_stage_trainable(&mut self, stage: usize, active: Module) {
        let sasrec = self.store.group_index("sasrec");
        let on_sasrec = matches!((stage, active), (1, _) | (3, Module::Sasrec) | (4, _));
        let on_retriever = matches!((stage, active), (2, _) | (3, Module::Retriever) | (4, _));
        if let Some(g) = sasrec {
            self.store.set_group_trainable(g, on_sasrec);
        }
        for name in GROUPS_RETRIEVER {
            if let Some(g) = self.store.group_index(name) {
                self.store.set_group_trainable(g, on_retriever);
            }
        }
    }

    fn group_lrs(&self, stage: usize, stage_step: usize, stage_steps: usize) -> Vec<f32> {
        let t = &self.cfg.train;
        let f = lr_factor(t.schedule, stage_step, stage_steps, t.warmup_steps) * self.cfg.ur4rec.stage_lr_scale[stage - 1];
        self.store.groups.iter().map(|g| if g.name == "sasrec" { t.lr * f } else { self.cfg.ur4rec.retriever_lr * f }).collect()
    }

    /// Builds the loss of one batch of users (0-based) on `tape`; returns the total, its terms (tape variables,
    /// not read yet) and (with a memory bank) the batch's text and visual keys to enqueue after the step.
    #[allow(clippy::type_complexity)]
    pub fn losses(&mut self, tape: &mut Tape<B>, stage: usize, users: &[usize]) -> Result<Option<(Var, LossTerms, Option<BankEnqueue<B>>)>> {
        let cfg = &self.cfg.ur4rec;
        let data = self.data;
        let users: Vec<usize> = users.iter().copied().filter(|&u| data.split.train[u].len() >= 2).collect();
        if users.is_empty() {
            return Ok(None);
        }
        if stage == 1 {
            let sv = self.model.sasrec.bind(tape, &self.store);
            let Some(bl) = sasrec_loss(tape, &self.model.sasrec, &sv, &data.split.train, &users, &data.sampler, &mut self.rng,
                                       self.cfg.train.objective, cfg.negatives) else { return Ok(None) };
            let loss = if self.cfg.train.inject_nan(self.step) { tape.scale(bl.loss, f32::NAN) } else { bl.loss };
            let terms = LossTerms { total: Some(loss), sasrec: Some(loss), ..Default::default() };
            return Ok(Some((loss, terms, None)));
        }
        // The batch as plain arrays (explicit_batch.rs computes its losses): column 0 the last training item,
        // then `negatives` samples per user.
        let k = cfg.negatives;
        let j = 1 + k;
        let mut cands = vec![0u32; users.len() * j];
        for (i, &u) in users.iter().enumerate() {
            cands[i * j] = *data.split.train[u].last().unwrap();
            data.sampler.sample(&mut self.rng, u as u32 + 1, &mut cands[i * j + 1..(i + 1) * j]);
        }
        let ids: Vec<u32> = users.iter().map(|&u| u as u32 + 1).collect();
        let (user_text, user_visual) = self.model.inputs.user_rows(&ids);
        let seqs = if stage >= 3 {
            users.iter().map(|&u| data.split.train[u][..data.split.train[u].len() - 1].to_vec()).collect()
        } else {
            Vec::new()
        };
        let batch = JointBatch { users: ids, seqs, cands, negatives: k, user_text, user_visual };
        let set = JointSettings { cfg, weights: self.weights.at(self.step), banks: self.banks.as_ref(),
                                  poison_retrieval: self.cfg.train.inject_nan(self.step) };
        let o = joint_losses(tape, &self.model.sasrec, &self.model.retriever, &self.store, stage, &batch, &set)?;
        Ok(Some((o.total, o.terms, o.enqueue)))
    }

    /// One training step of `stage` on `users` (0-based) at global step `self.step` (not advanced here), on
    /// the device and without reading anything back: losses, backward, the step-log row and its verdict, the
    /// gated AdamW update with the per-group `lrs`, then the gated memory-bank enqueue (see
    /// `train::step_log`: a non-finite loss or gradient makes the device skip the update and the enqueue).
    /// `false`: no user had a training pair (nothing ran). [`Trainer::collect`] reads the results.
    pub fn submit_step(&mut self, stage: usize, users: &[usize], lrs: &[f32]) -> Result<bool> {
        let backend = self.backend;
        let mut tape = Tape::new(backend, self.cfg.seed, self.step as u64);
        let Some((loss, terms, enqueue)) = self.losses(&mut tape, stage, users)? else { return Ok(false) };
        self.store.zero_grads(backend);
        tape.backward(loss, &mut self.store.grads);
        // `vars()` starts with the total: the loss the verdict requires finite (a term with weight 0 may be
        // computed and not used; only the total reaches the weights).
        let values: Vec<&B::Buf> = terms.vars().into_iter().map(|v| tape.value(v)).collect();
        let row = self.log.step(backend, &mut self.store, &self.opt, lrs, self.cfg.train.clip_norm, &values, 0);
        drop(tape);
        if let (Some(banks), Some(e)) = (self.banks.as_mut(), enqueue) {
            e.apply(backend, banks, self.step as u64, self.log.gate(row));
        }
        self.submitted.push((self.step, terms));
        Ok(true)
    }

    /// Steps submitted and not collected yet.
    pub fn pending(&self) -> usize {
        self.log.pending()
    }

    /// The step log cannot take another step before a [`Trainer::collect`].
    pub fn log_full(&self) -> bool {
        self.log.is_full()
    }

    /// Reads back every submitted step (one host synchronisation on the GPU), oldest first, as
    /// `(global step, result)`; brings AdamW's host step counts and the memory banks' bookkeeping up to date.
    pub fn collect(&mut self) -> Vec<(usize, StepResult)> {
        let reads = self.log.read(self.backend, &mut self.opt);
        let submitted = std::mem::take(&mut self.submitted);
        assert_eq!(reads.len(), submitted.len(), "one step-log row per submitted step");
        let refused: Vec<u64> = reads.iter().zip(&submitted).filter(|(r, _)| !r.ok).map(|(_, (s, _))| *s as u64).collect();
        if let Some((t, v)) = self.banks.as_mut() {
            t.settle(&refused);
            v.settle(&refused);
        }
        reads.into_iter().zip(submitted).map(|(r, (step, terms))| {
            let losses = terms.values(&r.losses);
            let skipped = (!r.ok).then(|| {
                // A bad total is attributed to the first bad term, else the first bad gradient.
                guard::check_losses(&losses.terms()).filter(|_| !losses.total.is_finite())
                    .or_else(|| r.first_bad_gradient(&self.store))
                    .unwrap_or_else(|| NonFinite { source: "grad", tensor: "(unattributed)".into(), group: None, value: f64::NAN })
            });
            let grad_norm = if r.ok {
                r.groups.iter().map(|&(g, norm, _)| (self.store.groups[g].name.clone(), norm)).collect()
            } else {
                BTreeMap::new()
            };
            (step, StepResult { losses, grad_norm, skipped })
        }).collect()
    }

    /// [`Trainer::submit_step`] and its [`Trainer::collect`] at once (tests and benchmarks). `None`: no user
    /// had a training pair.
    pub fn train_step(&mut self, stage: usize, users: &[usize], lrs: &[f32]) -> Result<Option<StepResult>> {
        assert_eq!(self.pending(), 0, "train_step with steps still to collect");
        if !self.submit_step(stage, users, lrs)? {
            return Ok(None);
        }
        Ok(self.collect().pop().map(|(_, r)| r))
    }

    /// A host copy of both memory banks (a checkpoint, or the banks that go with a selected model).
    pub fn banks_on_host(&self) -> Option<(MemoryBank, MemoryBank)> {
        self.banks.as_ref().map(|(t, v)| (t.download(self.backend), v.download(self.backend)))
    }

    /// Replaces both memory banks (keys stored in the configured `ur4rec.bank_format`).
    pub fn set_banks(&mut self, banks: Option<(MemoryBank, MemoryBank)>) {
        let format = self.cfg.ur4rec.bank_format;
        self.banks = banks.map(|(t, v)| (DeviceBank::upload(self.backend, t, format), DeviceBank::upload(self.backend, v, format)));
    }

    /// The learning rates of every group at `stage_step` of a stage of `stage_steps` steps.
    pub fn lrs(&self, stage: usize, stage_step: usize, stage_steps: usize) -> Vec<f32> {
        self.group_lrs(stage, stage_step, stage_steps)
    }
}

/// Where a UR4Rec run is and what it has decided so far. With the tensors of the resume checkpoint
/// (weights, moments, the epoch's user order, memory banks) this is the whole state of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ur4RecProgress {
    /// The stage in progress (1..=4); 5 once every stage is done.
    stage: usize,
    /// The stage's set-up (trainable groups, starting-point evaluation) is done.
    stage_begun: bool,
    /// The epoch in progress within the stage (1-based; 0 before the first).
    epoch: usize,
    /// Batches of `epoch` done.
    next_chunk: usize,
    /// `epoch` is trained, evaluated and compared with the best.
    epoch_done: bool,
    /// Early stopping ended the stage.
    stage_stopped: bool,
    step: usize,
    stage_step: usize,
    since_best: usize,
    switches: usize,
    /// The epoch's training-loss sum and count (its mean is logged with the evaluation).
    loss_sum: f64,
    loss_n: usize,
    /// Wall time of the stage and of the run in earlier processes (a resumed run adds its own).
    stage_seconds: f64,
    wall_seconds: f64,
    /// SASRec's fusion weight (calibrated at each stage end).
    alpha: f32,
    best: Option<BestSoFar>,
    stages: Vec<StageSummary>,
    alternation: Alternation,
    unfreeze: UnfreezeSchedule,
    rng: Rng,
    guard_consecutive: usize,
    guard_total: usize,
    /// Scalars of the live memory banks and of the banks saved with the stage's best weights.
    banks: Option<(BankMeta, BankMeta)>,
    best_banks: Option<(BankMeta, BankMeta)>,
}

/// The stage's best validation so far (its weights are `RUN/stageN_best.safetensors`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BestSoFar {
    epoch: usize,
    selection: f64,
    valid: Ur4RecEval,
}

fn new_alternation(kind: AlternationKind) -> Alternation {
    match kind {
        AlternationKind::Parity => Alternation::Parity(ParityAlternation),
        AlternationKind::Adaptive => Alternation::Adaptive(AdaptiveAlternation::default()),
        AlternationKind::AdaptiveFaithful => Alternation::Adaptive(AdaptiveAlternation::faithful(0.01, 10)),
    }
}

#[allow(clippy::too_many_arguments)]
/// Writes the resume checkpoint: the trainer's tensors, the epoch's order, the banks and the progress record.
fn save_resume<B: Backend>(ck: &mut Checkpointer, tr: &Trainer<'_, B>, order: &[usize],
                           best_banks: &Option<(MemoryBank, MemoryBank)>, p: &mut Ur4RecProgress, guard: &StepGuard,
                           stage_clock: &Instant, wall: &Instant) -> Result<()> {
    guard::check_weights(tr.backend, &tr.store, &ck.path())?;
    let mut w = ResumeWriter::new();
    w.params(tr.backend, &tr.store, &tr.opt);
    w.u32("order", &order.iter().map(|&u| u as u32).collect::<Vec<_>>());
    p.banks = tr.banks_on_host().map(|(t, v)| (w.bank("bank/text", &t), w.bank("bank/visual", &v)));
    p.best_banks = best_banks.as_ref().map(|(t, v)| (w.bank("best_bank/text", t), w.bank("best_bank/visual", v)));
    p.rng = tr.rng.clone();
    p.unfreeze = tr.unfreeze.clone();
    (p.guard_consecutive, p.guard_total) = (guard.consecutive, guard.total);
    let mut state = p.clone();
    state.stage_seconds += stage_clock.elapsed().as_secs_f64();
    state.wall_seconds += wall.elapsed().as_secs_f64();
    ck.write(w, p.step, state)
}

impl<B: Backend> Trainer<'_, B> {
    /// Restores what a resume checkpoint holds beyond the progress record: weights, moments, trainable flags,
    /// RNG, unfreezing position and the live memory banks; returns the banks saved with the stage's best.
    fn restore(&mut self, file: &ResumeFile, p: &Ur4RecProgress) -> Result<Option<(MemoryBank, MemoryBank)>> {
        file.restore_params(self.backend, &mut self.store, &mut self.opt)?;
        // AdamW's step counts on the device come from the restored ones.
        self.log = StepLog::new(self.backend, &self.store, &self.opt, self.cfg.train.readback_interval());
        self.rng = p.rng.clone();
        if p.unfreeze.events != self.unfreeze.events {
            bail!("{}: the recorded unfreezing schedule differs from the configuration's", file.path.display());
        }
        self.unfreeze = p.unfreeze.clone();
        let (dim, users, has_bank) = (self.cfg.ur4rec.retriever.dim, self.data.dataset.num_users, self.banks.is_some());
        // The live banks exist exactly when the model has them; the best-so-far copy only after a selection.
        let read = |meta: &Option<(BankMeta, BankMeta)>, prefix: &str, live: bool| -> Result<Option<(MemoryBank, MemoryBank)>> {
            match (meta, has_bank) {
                (Some((t, v)), true) => Ok(Some((file.bank(&format!("{prefix}/text"), t, dim, users)?,
                                                 file.bank(&format!("{prefix}/visual"), v, dim, users)?))),
                (None, false) => Ok(None),
                (None, true) if !live => Ok(None),
                (m, _) => bail!("{}: memory bank {prefix:?} {} in the checkpoint but {} in this model", file.path.display(),
                                if m.is_some() { "present" } else { "absent" }, if m.is_some() { "absent" } else { "present" }),
            }
        };
        let live = read(&p.banks, "bank", true)?;
        self.set_banks(live);
        read(&p.best_banks, "best_bank", false)
    }
}

/// What the loop knew of a submitted step; the rest comes back from the step log.
struct StepContext {
    epoch: usize,
    stage_step: usize,
    lrs: Vec<f32>,
    active: Module,
}

/// Reads the submitted steps back ([`Trainer::collect`]) and does, in step order, what needs their numbers:
/// the guard (a skipped step's report; too many in a row stop the run), the adaptive alternation's record,
/// the step records of `metrics.jsonl` and the epoch's loss.
#[allow(clippy::too_many_arguments)]
fn absorb<B: Backend>(tr: &mut Trainer<'_, B>, waiting: &mut Vec<StepContext>, p: &mut Ur4RecProgress, guard: &mut StepGuard,
                      run: &mut RunDir, bar: &indicatif::ProgressBar, cfg: &Config, stage: usize) -> Result<()> {
    let results = tr.collect();
    assert_eq!(results.len(), waiting.len(), "one result per submitted step");
    for ((step, r), c) in results.into_iter().zip(waiting.drain(..)) {
        let StepResult { losses: l, grad_norm, skipped } = r;
        if let Some(what) = &skipped {
            // The batch is consumed and the schedule moves on; the update, the enqueue and the alternation's
            // loss record are dropped.
            guard.bad(run, Some(stage), c.epoch, step, what)?;
            continue;
        }
        guard.good();
        if stage == 3 {
            if let Some(ev) = p.alternation.record(c.stage_step, l.sasrec, l.retrieval) {
                p.switches += 1;
                run.log(&serde_json::json!({"kind": "switch", "stage": stage, "step": step, "stage_step": c.stage_step,
                                            "from": ev.from.name(), "to": ev.to.name(), "change": ev.change}))?;
            }
        }
        if cfg.train.log_every > 0 && step % cfg.train.log_every == 0 {
            let lr = tr.store.groups.iter().zip(&c.lrs).map(|(g, &l)| (g.name.clone(), l)).collect();
            let w = tr.weights.at(step);
            run.log(&StepRecord { kind: "step", stage, epoch: c.epoch, step, stage_step: c.stage_step, losses: &l, weights: &w, lr,
                                  active: if stage == 3 { c.active.name() } else { "all" }, grad_norm })?;
        }
        p.loss_sum += l.total as f64;
        p.loss_n += 1;
    }
    bar.set_message(format!("stage {stage} epoch {} loss {:.4}", p.epoch, p.loss_sum / p.loss_n.max(1) as f64));
    Ok(())
}

/// Trains the four UR4Rec stages and evaluates on the test split. Writes a resume checkpoint
/// (`RUN/resume.safetensors`) every `train.checkpoint_every` steps and at every epoch and stage end;
/// with `opts.resume` continues from it, repeating the straight run bit for bit on the CPU.
pub fn train_ur4rec<B: Backend>(backend: &B, cfg: &Config, data: &PreparedData, run: &mut RunDir, opts: &RunOptions)
                                -> Result<Ur4RecSummary> {
    let wall = Instant::now();
    let u = &cfg.ur4rec;
    let mut tr = Trainer::new(backend, cfg, data)?;
    let users = data.split.train.len();
    let bs = cfg.train.batch_size.max(1);
    let steps_per_epoch = tr.steps_per_epoch;
    let total_steps: usize = u.stage_epochs.iter().map(|e| e * steps_per_epoch).sum();
    let mut order: Vec<usize> = (0..users).collect();
    let mut guard = StepGuard::new(cfg.train.max_bad_steps);
    let mut best_banks: Option<(MemoryBank, MemoryBank)> = None;
    let mut p = Ur4RecProgress {
        stage: 1, stage_begun: false, epoch: 0, next_chunk: 0, epoch_done: true, stage_stopped: false, step: 0,
        stage_step: 0, since_best: 0, switches: 0, loss_sum: 0.0, loss_n: 0, stage_seconds: 0.0, wall_seconds: 0.0,
        alpha: u.fusion_alpha, best: None, stages: Vec::new(), alternation: new_alternation(u.alternation),
        unfreeze: tr.unfreeze.clone(), rng: tr.rng.clone(), guard_consecutive: 0, guard_total: 0, banks: None,
        best_banks: None,
    };
    let mut rs = Checkpointer::new(run, "ur4rec", cfg, data, opts);
    if opts.resume {
        let file = rs.open_for_resume()?;
        p = file.header::<Ur4RecProgress>()?.state;
        if !(1..=5).contains(&p.stage) {
            bail!("{}: stage {} in the header (expected 1 to 5)", file.path.display(), p.stage);
        }
        best_banks = tr.restore(&file, &p)?;
        order = file.permutation("order", users)?;
        tr.step = p.step;
        (guard.consecutive, guard.total) = (p.guard_consecutive, p.guard_total);
        eprintln!("resuming {} at stage {}, epoch {}, step {}", rs.run.path.display(), p.stage, p.epoch, p.step);
    }
    let bar = if opts.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_steps as u64) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar.set_position(p.step as u64);
    let sweep: &[f32] = if u.calibrate_fusion { &ALPHA_GRID } else { &[] };
    let mut waiting: Vec<StepContext> = Vec::new();
    while p.stage <= 4 {
        let stage = p.stage;
        let epochs = u.stage_epochs[stage - 1];
        if epochs == 0 {
            p.stage += 1;
            continue;
        }
        let stage_clock = Instant::now();
        let stage_steps = epochs * steps_per_epoch;
        let progressive = stage == 4 && !tr.unfreeze.is_empty();
        let ckpt = rs.run.file(&format!("stage{stage}_best.safetensors"));
        if !p.stage_begun {
            p.alternation = new_alternation(u.alternation);
            tr.set_stage_trainable(stage, p.alternation.active(0));
            if progressive {
                for g in 0..tr.store.groups.len() {
                    tr.store.set_group_trainable(g, false);
                }
            }
            p.best = None;
            best_banks = None;
            if u.keep_start_if_better && stage > 1 {
                let e = evaluate_ur4rec(backend, &tr.model, &tr.store, &data.split, &data.eval_negatives, EvalTarget::Valid, &cfg.eval, p.alpha, sweep, None)?;
                let sel = selection(cfg, stage, &e);
                rs.run.log(&EvalRecord { kind: "eval", stage, epoch: 0, step: tr.step, split: "valid", eval: &e, selection: sel, train_loss: f64::NAN })?;
                guard::check_weights(backend, &tr.store, &ckpt)?;
                checkpoint::save_params(backend, &tr.store, &ckpt, HashMap::from([("stage".into(), stage.to_string()), ("epoch".into(), "0".into())]))?;
                p.best = Some(BestSoFar { epoch: 0, selection: sel, valid: e });
                best_banks = tr.banks_on_host();
            }
            (p.stage_begun, p.epoch, p.epoch_done, p.stage_stopped) = (true, 0, true, false);
            (p.since_best, p.switches, p.stage_step, p.stage_seconds) = (0, 0, 0, 0.0);
        }
        loop {
            if p.epoch_done {
                if p.stage_stopped || p.epoch == epochs {
                    break;
                }
                p.epoch += 1;
                tr.rng.shuffle(&mut order);
                (p.next_chunk, p.loss_sum, p.loss_n, p.epoch_done) = (0, 0.0, 0, false);
            }
            let epoch = p.epoch;
            while p.next_chunk * bs < users {
                let chunk = &order[p.next_chunk * bs..((p.next_chunk + 1) * bs).min(users)];
                p.next_chunk += 1;
                let stage_step = p.stage_step;
                let active = p.alternation.active(stage_step);
                if stage == 3 {
                    tr.set_stage_trainable(3, active);
                }
                if progressive {
                    let due = tr.unfreeze.due(stage_step);
                    if !due.is_empty() {
                        // The steps before it are written to the log first, so the records keep step order
                        // whatever the reading interval.
                        absorb(&mut tr, &mut waiting, &mut p, &mut guard, rs.run, &bar, cfg, stage)
                            .inspect_err(|_| bar.finish_and_clear())?;
                    }
                    for ev in due {
                        for prefix in &ev.prefixes {
                            tr.store.set_prefix_trainable(prefix, true);
                        }
                        rs.run.log(&serde_json::json!({"kind": "unfreeze", "stage": stage, "step": tr.step, "stage_step": stage_step, "prefixes": ev.prefixes}))?;
                    }
                }
                let lrs = tr.group_lrs(stage, stage_step, stage_steps);
                if !tr.submit_step(stage, chunk, &lrs)? {
                    continue;
                }
                waiting.push(StepContext { epoch, stage_step, lrs, active });
                tr.step += 1;
                p.step = tr.step;
                p.stage_step += 1;
                bar.inc(1);
                // The step log is read when it is full, before a checkpoint, and after every step while the
                // adaptive alternation needs each step's losses to pick the next step's tower.
                let checkpoint = rs.due_after_step(p.step);
                if tr.log_full() || checkpoint || (stage == 3 && p.alternation.reads_losses()) {
                    absorb(&mut tr, &mut waiting, &mut p, &mut guard, rs.run, &bar, cfg, stage)
                        .inspect_err(|_| bar.finish_and_clear())?;
                }
                if checkpoint {
                    save_resume(&mut rs, &tr, &order, &best_banks, &mut p, &guard, &stage_clock, &wall)?;
                    rs.stop_if_asked(p.step, true).inspect_err(|_| bar.finish_and_clear())?;
                }
            }
            absorb(&mut tr, &mut waiting, &mut p, &mut guard, rs.run, &bar, cfg, stage).inspect_err(|_| bar.finish_and_clear())?;
            let e = evaluate_ur4rec(backend, &tr.model, &tr.store, &data.split, &data.eval_negatives, EvalTarget::Valid, &cfg.eval, p.alpha, sweep, None)?;
            let sel = selection(cfg, stage, &e);
            let train_loss = p.loss_sum / p.loss_n.max(1) as f64;
            rs.run.log(&EvalRecord { kind: "eval", stage, epoch, step: tr.step, split: "valid", eval: &e, selection: sel, train_loss })?;
            rs.run.flush()?;
            say(&bar, format!("stage {stage} epoch {epoch:>3}  loss {train_loss:.4}  valid NDCG@10 fused {:.4} sasrec {:.4} retriever {:.4}",
                              e.fused.sampled.ndcg10, e.sasrec.sampled.ndcg10, e.retriever.sampled.ndcg10));
            if p.best.as_ref().is_none_or(|b| sel > b.selection) {
                guard::check_weights(backend, &tr.store, &ckpt)?;
                checkpoint::save_params(backend, &tr.store, &ckpt, HashMap::from([("stage".into(), stage.to_string()), ("epoch".into(), epoch.to_string())]))?;
                p.best = Some(BestSoFar { epoch, selection: sel, valid: e });
                best_banks = tr.banks_on_host();
                p.since_best = 0;
            } else {
                p.since_best += 1;
                if cfg.train.patience > 0 && p.since_best >= cfg.train.patience {
                    say(&bar, format!("stage {stage}: early stop after {} epochs without improvement", p.since_best));
                    p.stage_stopped = true;
                }
            }
            p.epoch_done = true;
            save_resume(&mut rs, &tr, &order, &best_banks, &mut p, &guard, &stage_clock, &wall)?;
            rs.stop_if_asked(p.step, false).inspect_err(|_| bar.finish_and_clear())?;
        }
        let best = p.best.take().context("stage ran no epoch")?;
        let meta = checkpoint::load_params(backend, &mut tr.store, &ckpt)?;
        // A resumed run re-writes the best file only when it re-runs the epoch that improved; the file must be
        // the one the recorded state selected.
        if meta.get("epoch") != Some(&best.epoch.to_string()) {
            bail!("{}: holds epoch {:?}, but the run selected epoch {} of stage {stage}", ckpt.display(), meta.get("epoch"),
                  best.epoch);
        }
        // The memory bank goes back to the state it had with the selected weights (mission.md §10).
        let selected = best_banks.take();
        tr.set_banks(selected);
        if let Some((a, _)) = best_alpha(&best.valid) {
            p.alpha = a;
        }
        p.stages.push(StageSummary { stage, epochs_run: p.epoch, best_epoch: best.epoch, selection_ndcg10: best.selection,
                                     valid: best.valid, seconds: p.stage_seconds + stage_clock.elapsed().as_secs_f64(),
                                     switches: p.switches });
        (p.stage, p.stage_begun, p.stage_seconds) = (stage + 1, false, 0.0);
        save_resume(&mut rs, &tr, &order, &best_banks, &mut p, &guard, &Instant::now(), &wall)?;
        rs.stop_if_asked(p.step, false).inspect_err(|_| bar.finish_and_clear())?;
    }
    bar.finish_and_clear();
    let run = rs.run;
    let test = evaluate_ur4rec(backend, &tr.model, &tr.store, &data.split, &data.eval_negatives, EvalTarget::Test, &cfg.eval, p.alpha, &[], None)?;
    run.log(&EvalRecord { kind: "eval", stage: 5, epoch: 0, step: tr.step, split: "test", eval: &test, selection: test.fused.sampled.ndcg10, train_loss: f64::NAN })?;
    run.flush()?;
    guard::check_weights(backend, &tr.store, &run.file("final.safetensors"))?;
    checkpoint::save_params(backend, &tr.store, &run.file("final.safetensors"), HashMap::new())?;
    Ok(Ur4RecSummary {
        dataset: data.dataset.name.clone(),
        users: data.dataset.num_users,
        items: data.dataset.num_items,
        parameters: tr.store.len(),
        stages: p.stages,
        test,
        fusion_alpha: p.alpha,
        chance_hit10_sampled: data.sampled_chance_hit10(cfg.eval.negatives),
        wall_seconds: p.wall_seconds + wall.elapsed().as_secs_f64(),
    })
}
