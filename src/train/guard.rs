//! The non-finite guard shared by both trainers (mission.md §9, "a non-finite loss or gradient skips the
//! step and is logged with the tensor's name").
//!
//! A step is checked twice before the optimizer may touch anything: its total loss, then every trainable
//! parameter's slice of the flat gradient buffer (a sum of squares: a NaN or Inf anywhere makes it
//! non-finite). The check runs on the device (`train::step_log`: the verdict gates the AdamW update and the
//! memory-bank enqueue), so a bad step changes nothing — no AdamW update, so weights, moments and the
//! per-parameter step counts stay exactly as they were. The host learns of it when it next reads the step
//! log (every `train.readback_every` steps) and reports it, with its step number and the first bad loss term or
//! parameter, on stderr and as a `{"kind":"nonfinite", ...}` record in `metrics.jsonl`. Only a run of `train.max_bad_steps` consecutive bad steps is fatal —
//! one bad batch (an overflow, a degenerate Gram matrix) should not cost a long run, but a model that
//! has diverged should not spin forever either. Checkpoints are written only from weights that
//! [`check_weights`] finds finite, so whatever is on disk when the run stops is loadable and good.
use crate::backend::Backend;
use crate::params::ParamStore;
use crate::report::RunDir;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

/// What was non-finite in one step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NonFinite {
    /// `loss` (a loss term) or `grad` (a parameter's gradient).
    pub source: &'static str,
    /// The tensor: the loss term's name (`sasrec`, `retrieval`, ...) or the first parameter, in storage
    /// order, whose gradient is non-finite.
    pub tensor: String,
    /// The gradient's parameter group (`None` for a loss term).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The loss term's value, or the gradient's sum of squares (NaN or +Inf); written as a string
    /// (`"NaN"`, `"inf"`, `"-inf"`), since JSON has no non-finite numbers.
    #[serde(serialize_with = "as_string")]
    pub value: f64,
}

fn as_string<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.group {
            None => write!(f, "non-finite loss term '{}' = {}", self.tensor, self.value),
            Some(g) => write!(f, "non-finite gradient of parameter '{}' (group '{}', sum of squares {})", self.tensor, g,
                              self.value),
        }
    }
}

/// The first non-finite loss term, in the order given.
pub fn check_losses(terms: &[(&str, f32)]) -> Option<NonFinite> {
    terms.iter().find(|(_, v)| !v.is_finite())
        .map(|(name, v)| NonFinite { source: "loss", tensor: name.to_string(), group: None, value: *v as f64 })
}

/// The first of `params` (the parameters a step updated, in storage order) whose gradient sum of squares
/// (`sums[j]` for `params[j]`) is non-finite — its gradient holds a NaN or an Inf.
pub fn first_non_finite<B: Backend>(store: &ParamStore<B>, params: &[usize], sums: &[f64]) -> Option<NonFinite> {
    params.iter().zip(sums).find(|(_, s)| !s.is_finite()).map(|(&p, &s)| {
        let info = &store.infos[p];
        NonFinite { source: "grad", tensor: info.name.clone(), group: Some(store.groups[info.group].name.clone()), value: s }
    })
}

/// Refuses to write a checkpoint from non-finite weights (the guard should make this impossible; this is
/// the last line that keeps a bad file from replacing a good one).
pub fn check_weights<B: Backend>(backend: &B, store: &ParamStore<B>, path: &Path) -> Result<()> {
    for p in &store.infos {
        if !backend.sum_squares(&store.values, p.offset, p.len).is_finite() {
            bail!("refusing to write {}: parameter '{}' holds non-finite values", path.display(), p.name);
        }
    }
    Ok(())
}

/// The `nonfinite` record of `metrics.jsonl`.
#[derive(Serialize)]
struct Record<'a> {
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<usize>,
    epoch: usize,
    step: usize,
    #[serde(flatten)]
    what: &'a NonFinite,
    /// Consecutive bad steps including this one.
    consecutive: usize,
    action: &'a str,
}

/// Counts consecutive bad steps and stops the run after `max_bad_steps` of them.
#[derive(Clone, Debug)]
pub struct StepGuard {
    pub max_bad_steps: usize,
    pub consecutive: usize,
    pub total: usize,
}

impl StepGuard {
    pub fn new(max_bad_steps: usize) -> Self {
        StepGuard { max_bad_steps: max_bad_steps.max(1), consecutive: 0, total: 0 }
    }

    /// A step that updated the weights.
    pub fn good(&mut self) {
        self.consecutive = 0;
    }

    /// Reports a skipped step (stderr and `metrics.jsonl`, flushed so the record survives a stop); errors
    /// once `max_bad_steps` consecutive steps were bad. `stage` is `None` for the one-stage SASRec trainer.
    pub fn bad(&mut self, run: &mut RunDir, stage: Option<usize>, epoch: usize, step: usize, what: &NonFinite) -> Result<()> {
        self.consecutive += 1;
        self.total += 1;
        let fatal = self.consecutive >= self.max_bad_steps;
        let at = match stage {
            Some(s) => format!("stage {s}, epoch {epoch}, step {step}"),
            None => format!("epoch {epoch}, step {step}"),
        };
        eprintln!("{at}: {what}; step skipped ({} consecutive, limit train.max_bad_steps = {})", self.consecutive,
                  self.max_bad_steps);
        run.log(&Record { kind: "nonfinite", stage, epoch, step, what, consecutive: self.consecutive,
                          action: if fatal { "stop" } else { "skip" } })?;
        run.flush()?;
        if fatal {
            bail!("{} consecutive non-finite steps (train.max_bad_steps = {}), the last at {at}: {what}; \
                   the checkpoints on disk hold the last good weights", self.consecutive, self.max_bad_steps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::params::{Init, ParamBuilder};
    use crate::rng::Rng;

    #[test]
    fn names_the_first_bad_term_and_parameter() {
        assert_eq!(check_losses(&[("sasrec", 1.0), ("retrieval", f32::NAN), ("diversity", f32::INFINITY)]).unwrap().tensor,
                   "retrieval");
        assert!(check_losses(&[("sasrec", 1.0), ("total", -3.0)]).is_none());
        let be = CpuBackend::new();
        let mut rng = Rng::new(0);
        let mut b = ParamBuilder::new();
        b.add("g0", "g0.a", &[2], Init::Values(vec![1.0, 2.0]), &mut rng);
        b.add("g1", "g1.b", &[3], Init::Values(vec![1.0, 2.0, 3.0]), &mut rng);
        b.add("g1", "g1.c", &[1], Init::Values(vec![1.0]), &mut rng);
        let mut store = b.build(&be);
        let sums = |store: &ParamStore<CpuBackend>| -> Vec<f64> {
            store.infos.iter().map(|p| be.sum_squares(&store.grads, p.offset, p.len)).collect()
        };
        assert!(first_non_finite(&store, &[0, 1, 2], &sums(&store)).is_none());
        store.grads[3] = f32::INFINITY;
        store.grads[5] = f32::NAN;
        let nf = first_non_finite(&store, &[0, 1, 2], &sums(&store)).unwrap();
        assert_eq!((nf.tensor.as_str(), nf.group.as_deref(), nf.value), ("g1.b", Some("g1"), f64::INFINITY));
        // Only the parameters the step updated count (a frozen one is not the optimizer's business).
        let s = sums(&store);
        assert!(first_non_finite(&store, &[0], &s[..1]).is_none());
        assert_eq!(first_non_finite(&store, &[0, 2], &[s[0], s[2]]).unwrap().tensor, "g1.c");
    }
}
