//! SASRec's training objectives (mission.md §4), built on the tape for one batch of users.
//!
//! - Every position (standard SASRec): the input is the training sequence without its last item, the
//!   target at each position is the next item, with one sampled negative per position; loss = mean BCE
//!   over the `[pos, neg]` logits of every token.
//! - Last-position BPR (the UR4Rec reference): input as above, one target (the last training item) against
//!   `k` negatives; loss = mean −log σ(s_pos − s_neg).
use crate::backend::Backend;
use crate::config::Objective;
use crate::data::negatives::NegativeSampler;
use crate::model::sasrec::{SasRec, SasRecVars};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::train::batch::SeqBatch;

/// The loss of one batch and how many supervised tokens it had.
pub struct BatchLoss {
    pub loss: Var,
    pub tokens: usize,
    pub sequences: usize,
}

/// The targets of one SASRec batch, as plain arrays (what [`sasrec_loss`] samples, or what a golden file holds).
#[derive(Clone, Debug, PartialEq)]
pub enum SasRecTargets {
    /// Every position: per packed token (sequence by sequence, in order), `[target, negative]`.
    EveryPosition { pairs: Vec<u32> },
    /// Last position: per sequence the positive, and `negatives` sampled ids per sequence (row-major).
    LastBpr { pos: Vec<u32>, neg: Vec<u32>, negatives: usize },
}

/// Builds the objective for `users` (0-based indices into `train`), skipping users whose training sequence
/// has fewer than 2 items (no input/target pair). Returns `None` if no user is left.
#[allow(clippy::too_many_arguments)]
pub fn sasrec_loss<B: Backend>(tape: &mut Tape<B>, model: &SasRec, vars: &SasRecVars, train: &[Vec<u32>],
                               users: &[usize], sampler: &NegativeSampler, rng: &mut Rng, objective: Objective,
                               negatives: usize) -> Option<BatchLoss> {
    let max_len = model.cfg.max_len;
    let users: Vec<usize> = users.iter().copied().filter(|&u| train[u].len() >= 2).collect();
    if users.is_empty() {
        return None;
    }
    let inputs: Vec<&[u32]> = users.iter().map(|&u| &train[u][..train[u].len() - 1]).collect();
    let targets = match objective {
        Objective::EveryPosition => {
            let mut pairs = Vec::new();
            let mut neg = [0u32];
            for &u in &users {
                let t = &train[u][1..];
                for &target in &t[t.len().saturating_sub(max_len)..] {
                    sampler.sample(rng, u as u32 + 1, &mut neg);
                    pairs.push(target);
                    pairs.push(neg[0]);
                }
            }
            SasRecTargets::EveryPosition { pairs }
        }
        Objective::LastBpr => {
            let pos: Vec<u32> = users.iter().map(|&u| *train[u].last().unwrap()).collect();
            let mut neg = vec![0u32; users.len() * negatives];
            for (i, &u) in users.iter().enumerate() {
                sampler.sample(rng, u as u32 + 1, &mut neg[i * negatives..(i + 1) * negatives]);
            }
            SasRecTargets::LastBpr { pos, neg, negatives }
        }
    };
    Some(sasrec_objective(tape, model, vars, &inputs, &targets))
}

/// The objective of an explicit batch: SASRec inputs `inputs` (each non-empty; the last `max_len` items are
/// used) and their targets. With `EveryPosition`, `pairs` holds one `[target, negative]` per used input token.
pub fn sasrec_objective<B: Backend>(tape: &mut Tape<B>, model: &SasRec, vars: &SasRecVars, inputs: &[&[u32]],
                                    targets: &SasRecTargets) -> BatchLoss {
    let batch = SeqBatch::new(tape.backend, inputs, model.cfg.max_len);
    let h = model.encode(tape, vars, &batch);
    match targets {
        SasRecTargets::EveryPosition { pairs } => {
            assert_eq!(pairs.len(), 2 * batch.num_tokens(), "sasrec_objective: one [target, negative] per token");
            let logits = tape.score_candidates(h, vars.item_table, pairs, 2);
            let labels: Vec<f32> = (0..pairs.len()).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect();
            let loss = tape.bce_logits(logits, &labels);
            BatchLoss { loss, tokens: batch.num_tokens(), sequences: inputs.len() }
        }
        SasRecTargets::LastBpr { pos, neg, negatives } => {
            let last = tape.gather_rows(h, &batch.last_rows, None);
            let pos = tape.score_candidates(last, vars.item_table, pos, 1);
            let neg = tape.score_candidates(last, vars.item_table, neg, *negatives);
            let loss = tape.bpr(pos, neg);
            BatchLoss { loss, tokens: inputs.len(), sequences: inputs.len() }
        }
    }
}
