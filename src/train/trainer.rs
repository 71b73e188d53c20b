//! The SASRec training loop: epochs over shuffled users, AdamW steps, periodic validation with early
//! stopping on validation NDCG@10 (sampled), the best checkpoint kept and reloaded, then the test
//! evaluation under both protocols.
use crate::backend::Backend;
use crate::checkpoint;
use crate::config::Config;
use crate::data::negatives::NegativeSampler;
use crate::data::{self, Dataset, Split};
use crate::eval::Metrics;
use crate::model::SasRec;
use crate::params::{ParamBuilder, ParamStore};
use crate::ranking::{evaluate_sasrec, EvalResult, EvalTarget};
use crate::report::RunDir;
use crate::rng::Rng;
use crate::tape::Tape;
use crate::train::objective::sasrec_loss;
use crate::train::guard::{self, NonFinite, StepGuard};
use crate::train::optim::AdamW;
use crate::train::schedule::lr_factor;
use crate::train::step_log::{StepLog, StepRead};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use crate::train::resume::{Checkpointer, ResumeWriter};
use std::collections::HashMap;
use std::time::Instant;

/// A data set made ready for training: the split, the frozen evaluation negatives and the sampler.
pub struct PreparedData {
    pub dataset: Dataset,
    pub split: Split,
    pub eval_negatives: Vec<Vec<u32>>,
    pub eval_negatives_fingerprint: String,
    pub sampler: NegativeSampler,
}

impl PreparedData {
    pub fn from_config(cfg: &Config) -> Result<PreparedData> {
        let dataset = if cfg.data.source == "synthetic" {
            let syn = data::SyntheticConfig { users: cfg.data.synthetic_users, items: cfg.data.synthetic_items, seed: cfg.seed,
                                              ..Default::default() };
            data::synthetic(&syn)
        } else {
            let opts = data::LoadOptions {
                format: if cfg.data.format.is_empty() { None } else { Some(data::readers::parse_format(&cfg.data.format)?) },
                min_rating: (cfg.data.min_rating >= 0.0).then_some(cfg.data.min_rating),
                min_items_per_user: cfg.data.min_items_per_user,
            };
            data::load(std::path::Path::new(&cfg.data.source), &opts)?
        };
        let dataset = attach_features(dataset, &cfg.ur4rec.features)?;
        Self::from_dataset(dataset, cfg)
    }

    pub fn from_dataset(dataset: Dataset, cfg: &Config) -> Result<PreparedData> {
        let split = data::leave_one_out(&dataset)?;
        let eval_negatives = data::split::eval_negatives(&dataset, cfg.seed, cfg.eval.negatives)?;
        let eval_negatives_fingerprint = data::split::fingerprint_negatives(&eval_negatives);
        let sampler = NegativeSampler::new(dataset.num_items, &split.train)?;
        Ok(PreparedData { dataset, split, eval_negatives, eval_negatives_fingerprint, sampler })
    }

    /// Hit@10 of a random ranking under the sampled protocol.
    pub fn sampled_chance_hit10(&self, negatives: usize) -> f64 {
        (10.0 / (negatives + 1) as f64).min(1.0)
    }
}

/// Loads the configured side-feature files and aligns them with the data set's ids; missing rows are
/// reported (and masked), never shifted.
pub fn attach_features(mut ds: Dataset, files: &crate::config::FeatureFiles) -> Result<Dataset> {
    use crate::data::features::load_features;
    use std::path::Path;
    let load = |rows: &str, ids: &str, originals: &[String], what: &str| -> Result<Option<crate::data::Features>> {
        if rows.is_empty() {
            return Ok(None);
        }
        if ids.is_empty() {
            bail!("ur4rec.features.{what} is set but {what}_ids (the row -> original id file) is not");
        }
        let (f, report) = load_features(Path::new(rows), Path::new(ids), originals)?;
        eprintln!("features {what}: {report}");
        Ok(Some(f))
    };
    if let Some(f) = load(&files.item_text, &files.item_text_ids, &ds.item_original, "item_text")? {
        ds.item_text = Some(f);
    }
    if let Some(f) = load(&files.item_visual, &files.item_visual_ids, &ds.item_original, "item_visual")? {
        ds.item_visual = Some(f);
    }
    if let Some(f) = load(&files.user_text, &files.user_text_ids, &ds.user_original, "user_text")? {
        ds.user_text = Some(f);
    }
    Ok(ds)
}

#[derive(Serialize)]
struct StepRecord<'a> {
    kind: &'a str,
    epoch: usize,
    step: usize,
    loss: f32,
    lr: f32,
    grad_norm: f64,
}

#[derive(Serialize)]
struct EvalRecord<'a> {
    kind: &'a str,
    epoch: usize,
    step: usize,
    split: &'a str,
    sampled: &'a Metrics,
    full: &'a Option<Metrics>,
    train_loss: f64,
    sequences_per_s: f64,
    tokens_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub dataset: String,
    pub users: usize,
    pub items: usize,
    pub parameters: usize,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_valid: Metrics,
    pub test: EvalResult,
    pub chance_hit10_sampled: f64,
    pub train_seconds: f64,
    pub sequences_per_s: f64,
    pub tokens_per_s: f64,
    pub wall_seconds: f64,
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "data {}: {} users, {} items; {} parameters", self.dataset, self.users, self.items, self.parameters)?;
        writeln!(f, "trained {} epochs in {:.1} s ({:.0} sequences/s, {:.0} tokens/s); best validation at epoch {}",
                 self.epochs_run, self.train_seconds, self.sequences_per_s, self.tokens_per_s, self.best_epoch)?;
        writeln!(f, "test, sampled (target + negatives): {}", self.test.sampled)?;
        writeln!(f, "  chance level Hit@10 = {:.4}", self.chance_hit10_sampled)?;
        if let Some(full) = &self.test.full {
            writeln!(f, "test, full ranking (history masked): {full}")?;
        }
        write!(f, "wall time {:.1} s", self.wall_seconds)
    }
}

/// What one training step did.
pub struct StepOutcome {
    pub loss: f32,
    /// NaN when the step was skipped.
    pub grad_norm: f64,
    pub sequences: usize,
    pub tokens: usize,
    /// Set when the loss or a gradient was non-finite: the optimizer did not run (weights, moments and
    /// AdamW's step counts are untouched); the caller reports it through a [`StepGuard`].
    pub skipped: Option<NonFinite>,
}

/// One SASRec training step on `users` (0-based), on the device and without reading anything back: forward
/// on a fresh tape, backward, then the step-log row, its verdict and the gated AdamW update (see
/// `train::step_log`: a non-finite loss or gradient makes the device skip the update). Returns the step's
/// sequences and tokens, or `None` when no user in the batch has a training pair (nothing ran).
#[allow(clippy::too_many_arguments)]
pub fn sasrec_submit<B: Backend>(backend: &B, cfg: &Config, model: &SasRec, store: &mut ParamStore<B>, opt: &AdamW,
                                 log: &mut StepLog<B>, data: &PreparedData, users: &[usize], rng: &mut Rng, step: usize,
                                 lr: f32) -> Result<Option<(usize, usize)>> {
    let t = &cfg.train;
    let mut tape = Tape::new(backend, cfg.seed, step as u64);
    let vars = model.bind(&mut tape, store);
    let Some(bl) = sasrec_loss(&mut tape, model, &vars, &data.split.train, users, &data.sampler, rng, t.objective,
                               t.negatives) else { return Ok(None) };
    let loss_var = if t.inject_nan(step) { tape.scale(bl.loss, f32::NAN) } else { bl.loss };
    store.zero_grads(backend);
    tape.backward(loss_var, &mut store.grads);
    log.step(backend, store, opt, &[lr], t.clip_norm, &[tape.value(loss_var)], 0);
    Ok(Some((bl.sequences, bl.tokens)))
}

/// What a step read back from the step log says, as a [`StepOutcome`].
fn outcome<B: Backend>(store: &ParamStore<B>, r: &StepRead, sequences: usize, tokens: usize) -> StepOutcome {
    let loss = r.losses[0];
    let skipped = (!r.ok).then(|| {
        guard::check_losses(&[("sasrec", loss)]).or_else(|| r.first_bad_gradient(store))
            .unwrap_or_else(|| NonFinite { source: "grad", tensor: "(unattributed)".into(), group: None, value: f64::NAN })
    });
    let grad_norm = if r.ok { r.groups.first().map(|g| g.1).unwrap_or(0.0) } else { f64::NAN };
    StepOutcome { loss, grad_norm, sequences, tokens, skipped }
}

/// [`sasrec_submit`] read back at once (tests and benchmarks): one SASRec step with its outcome.
#[allow(clippy::too_many_arguments)]
pub fn sasrec_step<B: Backend>(backend: &B, cfg: &Config, model: &SasRec, store: &mut ParamStore<B>, opt: &mut AdamW,
                               data: &PreparedData, users: &[usize], rng: &mut Rng, step: usize, lr: f32)
                               -> Result<Option<StepOutcome>> {
    let mut log = StepLog::new(backend, store, opt, 1);
    let Some((sequences, tokens)) = sasrec_submit(backend, cfg, model, store, opt, &mut log, data, users, rng, step, lr)?
        else { return Ok(None) };
    let r = log.read(backend, opt).pop().expect("the step just logged");
    Ok(Some(outcome(store, &r, sequences, tokens)))
}

/// A submitted step as the loop knew it.
struct Waiting {
    step: usize,
    lr: f32,
    sequences: usize,
    tokens: usize,
}

/// Reads the submitted steps back and does, in step order, what needs their numbers: the guard, the step
/// records and the epoch's loss, sequences and tokens.
#[allow(clippy::too_many_arguments)]
fn absorb<B: Backend>(backend: &B, log: &mut StepLog<B>, opt: &mut AdamW, store: &ParamStore<B>, waiting: &mut Vec<Waiting>,
                      p: &mut SasRecProgress, guard: &mut StepGuard, run: &mut RunDir, log_every: usize) -> Result<()> {
    let reads = log.read(backend, opt);
    assert_eq!(reads.len(), waiting.len(), "one step-log row per submitted step");
    for (r, w) in reads.iter().zip(waiting.drain(..)) {
        let o = outcome(store, r, w.sequences, w.tokens);
        if let Some(what) = &o.skipped {
            // The batch is consumed and the schedule moves on; only the update is dropped.
            guard.bad(run, None, p.epoch, w.step, what)?;
            continue;
        }
        guard.good();
        p.loss_sum += o.loss as f64;
        p.loss_n += 1;
        p.ep_seqs += o.sequences;
        p.ep_tokens += o.tokens;
        if log_every > 0 && w.step.is_multiple_of(log_every) {
            run.log(&StepRecord { kind: "step", epoch: p.epoch, step: w.step, loss: o.loss, lr: w.lr, grad_norm: o.grad_norm })?;
        }
    }
    Ok(())
}

/// Prints above the progress bar, or plainly when the bar is hidden (quiet mode, not a terminal).
pub(crate) fn say(bar: &indicatif::ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}

/// Options that do not belong in the run configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// No progress bar (tests, benchmarks).
    pub quiet: bool,
    /// Continue from the run directory's resume checkpoint (`RUN/resume.safetensors`); the caller has
    /// reopened the run directory with [`RunDir::reopen`].
    pub resume: bool,
    /// Write a resume checkpoint and stop (with [`crate::train::resume::Stopped`]) once this many global
    /// steps are done — a time budget for a job, and how the resume tests split a run.
    pub stop_after_steps: Option<usize>,
}

/// Where a SASRec run is (with the resume checkpoint's tensors, the whole state of the run).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SasRecProgress {
    /// The epoch in progress (1-based; 0 before the first).
    epoch: usize,
    /// Batches of `epoch` done.
    next_chunk: usize,
    /// `epoch` is trained (and evaluated, when due).
    epoch_done: bool,
    /// Early stopping ended the run.
    stopped_early: bool,
    step: usize,
    since_best: usize,
    best: Option<(usize, Metrics)>,
    /// The epoch's loss sum and count, sequences and tokens (for its log line).
    loss_sum: f64,
    loss_n: usize,
    ep_seqs: usize,
    ep_tokens: usize,
    /// Seconds of the epoch in progress and of training so far, in earlier processes.
    ep_seconds: f64,
    train_seconds: f64,
    wall_seconds: f64,
    seqs_done: usize,
    tokens_done: usize,
    rng: Rng,
    guard_consecutive: usize,
    guard_total: usize,
}

/// Writes the resume checkpoint of a SASRec run.
#[allow(clippy::too_many_arguments)]
fn save_resume<B: Backend>(ck: &mut Checkpointer, backend: &B, store: &ParamStore<B>, opt: &AdamW, order: &[usize],
                           p: &SasRecProgress, guard: &StepGuard, epoch_clock: &Instant, wall: &Instant) -> Result<()> {
    guard::check_weights(backend, store, &ck.path())?;
    let mut w = ResumeWriter::new();
    w.params(backend, store, opt);
    w.u32("order", &order.iter().map(|&u| u as u32).collect::<Vec<_>>());
    let mut state = p.clone();
    (state.guard_consecutive, state.guard_total) = (guard.consecutive, guard.total);
    if !p.epoch_done {
        state.ep_seconds += epoch_clock.elapsed().as_secs_f64();
    }
    state.wall_seconds += wall.elapsed().as_secs_f64();
    ck.write(w, p.step, state)
}

/// Trains SASRec as configured and writes the run directory. Writes a resume checkpoint every
/// `train.checkpoint_every` steps and at every epoch end; with `opts.resume` continues from it.
pub fn train_sasrec<B: Backend>(backend: &B, cfg: &Config, data: &PreparedData, run: &mut RunDir, opts: &RunOptions)
                                -> Result<TrainSummary> {
    let wall = Instant::now();
    let t = &cfg.train;
    let mut init_rng = Rng::derive(cfg.seed, "init");
    let mut builder = ParamBuilder::new();
    let model = SasRec::new(&mut builder, &cfg.sasrec, data.dataset.num_items, &mut init_rng);
    let mut store = builder.build(backend);
    store.table_format = t.table_format;
    let mut opt = AdamW::new(store.infos.len(), t.beta1, t.beta2, t.adam_eps, t.weight_decay);
    let users = data.split.train.len();
    let bs = t.batch_size.max(1);
    let steps_per_epoch = users.div_ceil(bs);
    let total_steps = steps_per_epoch * t.epochs;
    let best_path = run.file("best.safetensors");
    let mut guard = StepGuard::new(t.max_bad_steps);
    let mut order: Vec<usize> = (0..users).collect();
    let mut p = SasRecProgress {
        epoch: 0, next_chunk: 0, epoch_done: true, stopped_early: false, step: 0, since_best: 0, best: None, loss_sum: 0.0,
        loss_n: 0, ep_seqs: 0, ep_tokens: 0, ep_seconds: 0.0, train_seconds: 0.0, wall_seconds: 0.0, seqs_done: 0,
        tokens_done: 0, rng: Rng::derive(cfg.seed, "train"), guard_consecutive: 0, guard_total: 0,
    };
    let mut ck = Checkpointer::new(run, "sasrec", cfg, data, opts);
    if opts.resume {
        let file = ck.open_for_resume()?;
        p = file.header::<SasRecProgress>()?.state;
        file.restore_params(backend, &mut store, &mut opt)?;
        order = file.permutation("order", users)?;
        (guard.consecutive, guard.total) = (p.guard_consecutive, p.guard_total);
        eprintln!("resuming {} at epoch {}, step {}", ck.run.path.display(), p.epoch, p.step);
    }
    // AdamW's step counts on the device start from the (possibly restored) host ones.
    let mut log = StepLog::new(backend, &store, &opt, t.readback_interval());
    let mut waiting: Vec<Waiting> = Vec::new();
    let bar = if opts.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_steps as u64) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar.set_position(p.step as u64);
    loop {
        if p.epoch_done {
            if p.stopped_early || p.epoch >= t.epochs {
                break;
            }
            p.epoch += 1;
            p.rng.shuffle(&mut order);
            (p.next_chunk, p.loss_sum, p.loss_n, p.ep_seqs, p.ep_tokens, p.ep_seconds, p.epoch_done) =
                (0, 0.0, 0, 0, 0, 0.0, false);
        }
        let epoch = p.epoch;
        let epoch_clock = Instant::now();
        while p.next_chunk * bs < users {
            let chunk = &order[p.next_chunk * bs..((p.next_chunk + 1) * bs).min(users)];
            p.next_chunk += 1;
            let lr = t.lr * lr_factor(t.schedule, p.step, total_steps, t.warmup_steps);
            let Some((sequences, tokens)) = sasrec_submit(backend, cfg, &model, &mut store, &opt, &mut log, data, chunk, &mut p.rng,
                                                          p.step, lr).with_context(|| format!("epoch {epoch}"))? else { continue };
            waiting.push(Waiting { step: p.step, lr, sequences, tokens });
            p.step += 1;
            bar.inc(1);
            // The step log is read when it is full and before a checkpoint (and at the epoch's end).
            let checkpoint = ck.due_after_step(p.step);
            if log.is_full() || checkpoint {
                absorb(backend, &mut log, &mut opt, &store, &mut waiting, &mut p, &mut guard, ck.run, t.log_every)
                    .inspect_err(|_| bar.finish_and_clear())?;
                let secs = p.ep_seconds + epoch_clock.elapsed().as_secs_f64();
                bar.set_message(format!("epoch {epoch} loss {:.4}  {:.0} seq/s", p.loss_sum / p.loss_n.max(1) as f64,
                                        p.ep_seqs as f64 / secs.max(1e-9)));
            }
            if checkpoint {
                save_resume(&mut ck, backend, &store, &opt, &order, &p, &guard, &epoch_clock, &wall)?;
                ck.stop_if_asked(p.step, true).inspect_err(|_| bar.finish_and_clear())?;
            }
        }
        absorb(backend, &mut log, &mut opt, &store, &mut waiting, &mut p, &mut guard, ck.run, t.log_every)
            .inspect_err(|_| bar.finish_and_clear())?;
        let secs = p.ep_seconds + epoch_clock.elapsed().as_secs_f64();
        p.train_seconds += secs;
        p.seqs_done += p.ep_seqs;
        p.tokens_done += p.ep_tokens;
        p.epoch_done = true;
        let evaluate_now = t.eval_every > 0 && (epoch.is_multiple_of(t.eval_every) || epoch == t.epochs);
        if evaluate_now {
            let valid = evaluate_sasrec(backend, &model, &store, &data.split, &data.eval_negatives, EvalTarget::Valid, &cfg.eval, None)?;
            let train_loss = p.loss_sum / p.loss_n.max(1) as f64;
            ck.run.log(&EvalRecord { kind: "eval", epoch, step: p.step, split: "valid", sampled: &valid.sampled, full: &valid.full,
                                     train_loss, sequences_per_s: p.ep_seqs as f64 / secs, tokens_per_s: p.ep_tokens as f64 / secs })?;
            ck.run.flush()?;
            say(&bar, format!("epoch {epoch:>4}  loss {train_loss:.4}  valid {}", valid.sampled));
            if p.best.as_ref().is_none_or(|(_, m)| valid.sampled.ndcg10 > m.ndcg10) {
                p.best = Some((epoch, valid.sampled.clone()));
                p.since_best = 0;
                let meta = HashMap::from([("epoch".to_string(), epoch.to_string()), ("step".to_string(), p.step.to_string())]);
                guard::check_weights(backend, &store, &best_path)?;
                checkpoint::save_params(backend, &store, &best_path, meta)?;
            } else {
                p.since_best += 1;
                if t.patience > 0 && p.since_best >= t.patience {
                    say(&bar, format!("early stop: no better validation NDCG@10 for {} evaluations", p.since_best));
                    p.stopped_early = true;
                }
            }
        }
        save_resume(&mut ck, backend, &store, &opt, &order, &p, &guard, &epoch_clock, &wall)?;
        ck.stop_if_asked(p.step, false).inspect_err(|_| bar.finish_and_clear())?;
    }
    bar.finish_and_clear();
    let run = ck.run;
    let (best_epoch, best_valid) = p.best.clone().context("no validation was run (train.eval_every = 0?)")?;
    let meta = checkpoint::load_params(backend, &mut store, &best_path)?;
    if meta.get("epoch") != Some(&best_epoch.to_string()) {
        bail!("{}: holds epoch {:?}, but the run selected epoch {best_epoch}", best_path.display(), meta.get("epoch"));
    }
    let test = evaluate_sasrec(backend, &model, &store, &data.split, &data.eval_negatives, EvalTarget::Test, &cfg.eval, None)?;
    run.log(&EvalRecord { kind: "eval", epoch: best_epoch, step: p.step, split: "test", sampled: &test.sampled, full: &test.full,
                          train_loss: f64::NAN, sequences_per_s: 0.0, tokens_per_s: 0.0 })?;
    run.flush()?;
    Ok(TrainSummary {
        dataset: data.dataset.name.clone(),
        users: data.dataset.num_users,
        items: data.dataset.num_items,
        parameters: store.len(),
        epochs_run: p.epoch,
        best_epoch,
        best_valid,
        test,
        chance_hit10_sampled: data.sampled_chance_hit10(cfg.eval.negatives),
        train_seconds: p.train_seconds,
        sequences_per_s: p.seqs_done as f64 / p.train_seconds.max(1e-9),
        tokens_per_s: p.tokens_done as f64 / p.train_seconds.max(1e-9),
        wall_seconds: p.wall_seconds + wall.elapsed().as_secs_f64(),
    })
}
