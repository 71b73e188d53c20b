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
use crate::train::explicit_batch::{joint_losses, JointBatch, JointSettings};
use crate::train::objective::sasrec_loss;
use crate::train::guard::{self, NonFinite, StepGuard};
use crate::train::optim::AdamW;
use crate::train::schedule::lr_factor;
use crate::train::strategies::{AdaptiveAlternation, Alternation, LossWeights, MemoryBank, Module, ParityAlternation,
                               UnfreezeSchedule, Weights};
use crate::train::trainer::{say, PreparedData, RunOptions};
use anyhow::{Context, Result};
use serde::Serialize;
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

#[derive(Clone, Debug, Serialize)]
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
    pub banks: Option<(MemoryBank, MemoryBank)>,
    weights: LossWeights,
    unfreeze: UnfreezeSchedule,
    steps_per_epoch: usize,
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
            (MemoryBank::new(size, u.retriever.dim, &mut r), MemoryBank::new(size, u.retriever.dim, &mut r))
        });
        let unfreeze = UnfreezeSchedule::parse(&u.unfreeze).map_err(anyhow::Error::msg)?;
        let names: Vec<&str> = store.infos.iter().map(|p| p.name.as_str()).collect();
        unfreeze.validate(&names).map_err(anyhow::Error::msg).context("ur4rec.unfreeze")?;
        let opt = AdamW::new(store.infos.len(), cfg.train.beta1, cfg.train.beta2, cfg.train.adam_eps, cfg.train.weight_decay);
        Ok(Trainer { backend, cfg, data, model, store, opt, rng: Rng::derive(cfg.seed, "train"), step: 0, banks, weights,
                     unfreeze, steps_per_epoch })
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

    /// Builds the loss of one batch of users (0-based) on `tape`; returns the total, its terms and (with a
    /// memory bank) the batch's text and visual keys to enqueue after the step.
    #[allow(clippy::type_complexity)]
    pub fn losses(&mut self, tape: &mut Tape<B>, stage: usize, users: &[usize]) -> Result<Option<(Var, StepLosses, Option<(Vec<f32>, Vec<f32>)>)>> {
        let cfg = &self.cfg.ur4rec;
        let data = self.data;
        let users: Vec<usize> = users.iter().copied().filter(|&u| data.split.train[u].len() >= 2).collect();
        if users.is_empty() {
            return Ok(None);
        }
        if stage == 1 {
            let sv = self.model.sasrec.bind(tape, &self.store);
            let mut l = StepLosses::default();
            let Some(bl) = sasrec_loss(tape, &self.model.sasrec, &sv, &data.split.train, &users, &data.sampler, &mut self.rng,
                                       self.cfg.train.objective, cfg.negatives) else { return Ok(None) };
            let loss = if self.cfg.train.inject_nan(self.step) { tape.scale(bl.loss, f32::NAN) } else { bl.loss };
            l.sasrec = tape.scalar(loss);
            l.total = l.sasrec;
            return Ok(Some((loss, l, None)));
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
        Ok(Some((o.total, o.losses, o.enqueue)))
    }

    /// One training step of `stage` on `users` (0-based) at global step `self.step` (not advanced here):
    /// losses, backward, AdamW with the per-group `lrs`, then the memory-bank enqueue. A non-finite loss or
    /// gradient skips the update and the enqueue (see `train::guard`). `None`: no user had a training pair.
    pub fn train_step(&mut self, stage: usize, users: &[usize], lrs: &[f32]) -> Result<Option<StepResult>> {
        let backend = self.backend;
        let mut tape = Tape::new(backend, self.cfg.seed, self.step as u64);
        let Some((loss, losses, enqueue)) = self.losses(&mut tape, stage, users)? else { return Ok(None) };
        let skipped = |losses, what| Ok(Some(StepResult { losses, grad_norm: BTreeMap::new(), skipped: Some(what) }));
        // Only the total reaches the weights (a term with weight 0 may be computed and not used); a bad total
        // is attributed to the first bad term.
        if !losses.total.is_finite() {
            let what = guard::check_losses(&losses.terms()).expect("the total is non-finite");
            return skipped(losses, what);
        }
        self.store.zero_grads(backend);
        tape.backward(loss, &mut self.store.grads);
        drop(tape);
        if let Some(what) = guard::check_grads(backend, &self.store) {
            return skipped(losses, what);
        }
        let reports = self.opt.step(backend, &mut self.store, lrs, self.cfg.train.clip_norm);
        let grad_norm = reports.iter().map(|r| (self.store.groups[r.group].name.clone(), r.grad_norm)).collect();
        if let (Some((bt, bv)), Some((t, v))) = (self.banks.as_mut(), enqueue) {
            let ids: Vec<u32> = users.iter().filter(|&&x| self.data.split.train[x].len() >= 2).map(|&x| x as u32 + 1).collect();
            bt.enqueue(&t, &ids, self.step as u64);
            bv.enqueue(&v, &ids, self.step as u64);
        }
        Ok(Some(StepResult { losses, grad_norm, skipped: None }))
    }

    /// The learning rates of every group at `stage_step` of a stage of `stage_steps` steps.
    pub fn lrs(&self, stage: usize, stage_step: usize, stage_steps: usize) -> Vec<f32> {
        self.group_lrs(stage, stage_step, stage_steps)
    }
}

/// Trains the four UR4Rec stages and evaluates on the test split.
pub fn train_ur4rec<B: Backend>(backend: &B, cfg: &Config, data: &PreparedData, run: &mut RunDir, opts: &RunOptions)
                                -> Result<Ur4RecSummary> {
    let wall = Instant::now();
    let u = &cfg.ur4rec;
    let mut tr = Trainer::new(backend, cfg, data)?;
    let users = data.split.train.len();
    let bs = cfg.train.batch_size.max(1);
    let steps_per_epoch = tr.steps_per_epoch;
    let total_steps: usize = u.stage_epochs.iter().map(|e| e * steps_per_epoch).sum();
    let bar = if opts.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_steps as u64) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let mut order: Vec<usize> = (0..users).collect();
    let mut stages = Vec::new();
    let mut alpha = u.fusion_alpha;
    let mut guard = StepGuard::new(cfg.train.max_bad_steps);
    let sweep: &[f32] = if u.calibrate_fusion { &ALPHA_GRID } else { &[] };
    for stage in 1..=4 {
        let epochs = u.stage_epochs[stage - 1];
        if epochs == 0 {
            continue;
        }
        let stage_start = Instant::now();
        let stage_steps = epochs * steps_per_epoch;
        let mut alternation = match u.alternation {
            AlternationKind::Parity => Alternation::Parity(ParityAlternation),
            AlternationKind::Adaptive => Alternation::Adaptive(AdaptiveAlternation::default()),
            AlternationKind::AdaptiveFaithful => Alternation::Adaptive(AdaptiveAlternation::faithful(0.01, 10)),
        };
        tr.set_stage_trainable(stage, alternation.active(0));
        let progressive = stage == 4 && !tr.unfreeze.is_empty();
        if progressive {
            for g in 0..tr.store.groups.len() {
                tr.store.set_group_trainable(g, false);
            }
        }
        let ckpt = run.file(&format!("stage{stage}_best.safetensors"));
        let mut best: Option<(usize, f64, Ur4RecEval, Option<(MemoryBank, MemoryBank)>)> = None;
        if u.keep_start_if_better && stage > 1 {
            let e = evaluate_ur4rec(backend, &tr.model, &tr.store, &data.split, &data.eval_negatives, EvalTarget::Valid, &cfg.eval, alpha, sweep, None)?;
            let sel = selection(cfg, stage, &e);
            run.log(&EvalRecord { kind: "eval", stage, epoch: 0, step: tr.step, split: "valid", eval: &e, selection: sel, train_loss: f64::NAN })?;
            guard::check_weights(backend, &tr.store, &ckpt)?;
            checkpoint::save_params(backend, &tr.store, &ckpt, HashMap::from([("stage".into(), stage.to_string()), ("epoch".into(), "0".into())]))?;
            best = Some((0, sel, e, tr.banks.clone()));
        }
        let mut since_best = 0;
        let mut epochs_run = 0;
        let mut switches = 0;
        let mut stage_step = 0usize;
        for epoch in 1..=epochs {
            epochs_run = epoch;
            tr.rng.shuffle(&mut order);
            let (mut loss_sum, mut loss_n) = (0.0f64, 0usize);
            for chunk in order.chunks(bs) {
                let active = alternation.active(stage_step);
                if stage == 3 {
                    tr.set_stage_trainable(3, active);
                }
                if progressive {
                    for ev in tr.unfreeze.due(stage_step) {
                        for p in &ev.prefixes {
                            tr.store.set_prefix_trainable(p, true);
                        }
                        run.log(&serde_json::json!({"kind": "unfreeze", "stage": stage, "step": tr.step, "stage_step": stage_step, "prefixes": ev.prefixes}))?;
                    }
                }
                let lrs = tr.group_lrs(stage, stage_step, stage_steps);
                let Some(StepResult { losses: l, grad_norm, skipped }) = tr.train_step(stage, chunk, &lrs)? else { continue };
                if let Some(what) = &skipped {
                    // The batch is consumed and the schedule moves on; the update, the enqueue and the
                    // alternation's loss record are dropped.
                    guard.bad(run, Some(stage), epoch, tr.step, what).inspect_err(|_| bar.finish_and_clear())?;
                    tr.step += 1;
                    stage_step += 1;
                    bar.inc(1);
                    continue;
                }
                guard.good();
                if stage == 3 {
                    if let Some(ev) = alternation.record(stage_step, l.sasrec, l.retrieval) {
                        switches += 1;
                        run.log(&serde_json::json!({"kind": "switch", "stage": stage, "step": tr.step, "stage_step": stage_step,
                                                    "from": ev.from.name(), "to": ev.to.name(), "change": ev.change}))?;
                    }
                }
                if cfg.train.log_every > 0 && tr.step % cfg.train.log_every == 0 {
                    let lr = tr.store.groups.iter().zip(&lrs).map(|(g, &l)| (g.name.clone(), l)).collect();
                    let w = tr.weights.at(tr.step);
                    run.log(&StepRecord { kind: "step", stage, epoch, step: tr.step, stage_step, losses: &l, weights: &w, lr,
                                          active: if stage == 3 { active.name() } else { "all" }, grad_norm })?;
                }
                loss_sum += l.total as f64;
                loss_n += 1;
                tr.step += 1;
                stage_step += 1;
                bar.inc(1);
                bar.set_message(format!("stage {stage} epoch {epoch} loss {:.4}", loss_sum / loss_n as f64));
            }
            let e = evaluate_ur4rec(backend, &tr.model, &tr.store, &data.split, &data.eval_negatives, EvalTarget::Valid, &cfg.eval, alpha, sweep, None)?;
            let sel = selection(cfg, stage, &e);
            run.log(&EvalRecord { kind: "eval", stage, epoch, step: tr.step, split: "valid", eval: &e, selection: sel,
                                  train_loss: loss_sum / loss_n.max(1) as f64 })?;
            run.flush()?;
            say(&bar, format!("stage {stage} epoch {epoch:>3}  loss {:.4}  valid NDCG@10 fused {:.4} sasrec {:.4} retriever {:.4}",
                              loss_sum / loss_n.max(1) as f64, e.fused.sampled.ndcg10, e.sasrec.sampled.ndcg10, e.retriever.sampled.ndcg10));
            if best.as_ref().is_none_or(|b| sel > b.1) {
                guard::check_weights(backend, &tr.store, &ckpt)?;
                checkpoint::save_params(backend, &tr.store, &ckpt, HashMap::from([("stage".into(), stage.to_string()), ("epoch".into(), epoch.to_string())]))?;
                best = Some((epoch, sel, e, tr.banks.clone()));
                since_best = 0;
            } else {
                since_best += 1;
                if cfg.train.patience > 0 && since_best >= cfg.train.patience {
                    say(&bar, format!("stage {stage}: early stop after {since_best} epochs without improvement"));
                    break;
                }
            }
        }
        let (best_epoch, sel, valid, banks) = best.context("stage ran no epoch")?;
        checkpoint::load_params(backend, &mut tr.store, &ckpt)?;
        // The memory bank goes back to the state it had with the selected weights (mission.md §10).
        tr.banks = banks;
        if let Some((a, _)) = best_alpha(&valid) {
            alpha = a;
        }
        stages.push(StageSummary { stage, epochs_run, best_epoch, selection_ndcg10: sel, valid,
                                   seconds: stage_start.elapsed().as_secs_f64(), switches });
    }
    bar.finish_and_clear();
    let test = evaluate_ur4rec(backend, &tr.model, &tr.store, &data.split, &data.eval_negatives, EvalTarget::Test, &cfg.eval, alpha, &[], None)?;
    run.log(&EvalRecord { kind: "eval", stage: 5, epoch: 0, step: tr.step, split: "test", eval: &test, selection: test.fused.sampled.ndcg10, train_loss: f64::NAN })?;
    run.flush()?;
    guard::check_weights(backend, &tr.store, &run.file("final.safetensors"))?;
    checkpoint::save_params(backend, &tr.store, &run.file("final.safetensors"), HashMap::new())?;
    Ok(Ur4RecSummary {
        dataset: data.dataset.name.clone(),
        users: data.dataset.num_users,
        items: data.dataset.num_items,
        parameters: tr.store.len(),
        stages,
        test,
        fusion_alpha: alpha,
        chance_hit10_sampled: data.sampled_chance_hit10(cfg.eval.negatives),
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}
