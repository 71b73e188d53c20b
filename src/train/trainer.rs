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
use anyhow::{bail, Context, Result};
use serde::Serialize;
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

/// One SASRec training step on `users` (0-based): forward on a fresh tape, backward, AdamW — unless the
/// loss or a gradient is non-finite (see `train::guard`).
/// Returns `None` when no user in the batch has a training pair.
#[allow(clippy::too_many_arguments)]
pub fn sasrec_step<B: Backend>(backend: &B, cfg: &Config, model: &SasRec, store: &mut ParamStore<B>, opt: &mut AdamW,
                               data: &PreparedData, users: &[usize], rng: &mut Rng, step: usize, lr: f32)
                               -> Result<Option<StepOutcome>> {
    let t = &cfg.train;
    let mut tape = Tape::new(backend, cfg.seed, step as u64);
    let vars = model.bind(&mut tape, store);
    let Some(bl) = sasrec_loss(&mut tape, model, &vars, &data.split.train, users, &data.sampler, rng, t.objective,
                               t.negatives) else { return Ok(None) };
    let loss_var = if t.inject_nan(step) { tape.scale(bl.loss, f32::NAN) } else { bl.loss };
    let loss = tape.scalar(loss_var);
    let skipped = |what| Ok(Some(StepOutcome { loss, grad_norm: f64::NAN, sequences: bl.sequences, tokens: bl.tokens,
                                               skipped: Some(what) }));
    if let Some(what) = guard::check_losses(&[("sasrec", loss)]) {
        return skipped(what);
    }
    store.zero_grads(backend);
    tape.backward(loss_var, &mut store.grads);
    drop(tape);
    if let Some(what) = guard::check_grads(backend, store) {
        return skipped(what);
    }
    let reports = opt.step(backend, store, &[lr], t.clip_norm);
    let grad_norm = reports.first().map(|r| r.grad_norm).unwrap_or(0.0);
    Ok(Some(StepOutcome { loss, grad_norm, sequences: bl.sequences, tokens: bl.tokens, skipped: None }))
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
}

/// Trains SASRec as configured and writes the run directory.
pub fn train_sasrec<B: Backend>(backend: &B, cfg: &Config, data: &PreparedData, run: &mut RunDir, opts: &RunOptions)
                                -> Result<TrainSummary> {
    let wall = Instant::now();
    let t = &cfg.train;
    let mut init_rng = Rng::derive(cfg.seed, "init");
    let mut builder = ParamBuilder::new();
    let model = SasRec::new(&mut builder, &cfg.sasrec, data.dataset.num_items, &mut init_rng);
    let mut store = builder.build(backend);
    let mut opt = AdamW::new(store.infos.len(), t.beta1, t.beta2, t.adam_eps, t.weight_decay);
    let mut rng = Rng::derive(cfg.seed, "train");
    let users = data.split.train.len();
    let bs = t.batch_size.max(1);
    let steps_per_epoch = users.div_ceil(bs);
    let total_steps = steps_per_epoch * t.epochs;
    let best_path = run.file("best.safetensors");
    let mut best: Option<(usize, Metrics)> = None;
    let mut since_best = 0usize;
    let mut step = 0usize;
    let (mut train_secs, mut seqs_done, mut tokens_done) = (0.0f64, 0usize, 0usize);
    let mut epochs_run = 0;
    let mut guard = StepGuard::new(t.max_bad_steps);
    let bar = if opts.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_steps as u64) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let mut order: Vec<usize> = (0..users).collect();
    for epoch in 1..=t.epochs {
        epochs_run = epoch;
        rng.shuffle(&mut order);
        let (mut loss_sum, mut loss_n) = (0.0f64, 0usize);
        let epoch_start = Instant::now();
        let (mut ep_seqs, mut ep_tokens) = (0usize, 0usize);
        for chunk in order.chunks(bs) {
            let lr = t.lr * lr_factor(t.schedule, step, total_steps, t.warmup_steps);
            let Some(o) = sasrec_step(backend, cfg, &model, &mut store, &mut opt, data, chunk, &mut rng, step, lr)
                .with_context(|| format!("epoch {epoch}"))? else { continue };
            if let Some(what) = &o.skipped {
                // The batch is consumed and the schedule moves on; only the update is dropped.
                guard.bad(run, None, epoch, step, what).inspect_err(|_| bar.finish_and_clear())?;
                step += 1;
                bar.inc(1);
                continue;
            }
            guard.good();
            let (loss, grad_norm) = (o.loss, o.grad_norm);
            loss_sum += loss as f64;
            loss_n += 1;
            ep_seqs += o.sequences;
            ep_tokens += o.tokens;
            if t.log_every > 0 && step.is_multiple_of(t.log_every) {
                run.log(&StepRecord { kind: "step", epoch, step, loss, lr, grad_norm })?;
            }
            step += 1;
            bar.inc(1);
            let secs = epoch_start.elapsed().as_secs_f64();
            bar.set_message(format!("epoch {epoch} loss {:.4}  {:.0} seq/s", loss_sum / loss_n as f64, ep_seqs as f64 / secs.max(1e-9)));
        }
        let secs = epoch_start.elapsed().as_secs_f64();
        train_secs += secs;
        seqs_done += ep_seqs;
        tokens_done += ep_tokens;
        let evaluate_now = t.eval_every > 0 && (epoch % t.eval_every == 0 || epoch == t.epochs);
        if !evaluate_now {
            continue;
        }
        let valid = evaluate_sasrec(backend, &model, &store, &data.split, &data.eval_negatives, EvalTarget::Valid, &cfg.eval, None)?;
        run.log(&EvalRecord { kind: "eval", epoch, step, split: "valid", sampled: &valid.sampled, full: &valid.full,
                              train_loss: loss_sum / loss_n.max(1) as f64, sequences_per_s: ep_seqs as f64 / secs,
                              tokens_per_s: ep_tokens as f64 / secs })?;
        run.flush()?;
        say(&bar, format!("epoch {epoch:>4}  loss {:.4}  valid {}", loss_sum / loss_n.max(1) as f64, valid.sampled));
        let improved = best.as_ref().is_none_or(|(_, m)| valid.sampled.ndcg10 > m.ndcg10);
        if improved {
            best = Some((epoch, valid.sampled.clone()));
            since_best = 0;
            let meta = HashMap::from([("epoch".to_string(), epoch.to_string()), ("step".to_string(), step.to_string())]);
            guard::check_weights(backend, &store, &best_path)?;
            checkpoint::save_params(backend, &store, &best_path, meta)?;
        } else {
            since_best += 1;
            if t.patience > 0 && since_best >= t.patience {
                say(&bar, format!("early stop: no better validation NDCG@10 for {since_best} evaluations"));
                break;
            }
        }
    }
    bar.finish_and_clear();
    let (best_epoch, best_valid) = best.context("no validation was run (train.eval_every = 0?)")?;
    checkpoint::load_params(backend, &mut store, &best_path)?;
    let test = evaluate_sasrec(backend, &model, &store, &data.split, &data.eval_negatives, EvalTarget::Test, &cfg.eval, None)?;
    run.log(&EvalRecord { kind: "eval", epoch: best_epoch, step, split: "test", sampled: &test.sampled, full: &test.full,
                          train_loss: f64::NAN, sequences_per_s: 0.0, tokens_per_s: 0.0 })?;
    run.flush()?;
    Ok(TrainSummary {
        dataset: data.dataset.name.clone(),
        users: data.dataset.num_users,
        items: data.dataset.num_items,
        parameters: store.len(),
        epochs_run,
        best_epoch,
        best_valid,
        test,
        chance_hit10_sampled: data.sampled_chance_hit10(cfg.eval.negatives),
        train_seconds: train_secs,
        sequences_per_s: seqs_done as f64 / train_secs.max(1e-9),
        tokens_per_s: tokens_done as f64 / train_secs.max(1e-9),
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}

