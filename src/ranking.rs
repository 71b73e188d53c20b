//! Scores users with a trained model and ranks their targets under both protocols of mission.md §6:
//! sampled (the target + the frozen negatives) and full ranking over every item (history masked).
//! Sampled and full results always come from the same pass over the same model.
use crate::backend::Backend;
use crate::config::EvalConfig;
use crate::data::Split;
use crate::eval::{rank_full, rank_sampled, EvalError, MetricAccumulator, Metrics};
use crate::model::SasRec;
use crate::params::ParamStore;
use crate::tape::Tape;
use crate::train::batch::SeqBatch;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalTarget {
    /// Input: the training items; target: the second-to-last item.
    Valid,
    /// Input: the training items and the validation item; target: the last item.
    Test,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub sampled: Metrics,
    pub full: Option<Metrics>,
}

/// The input sequence and target of user index `u` (0-based) for `which`.
pub fn eval_case(split: &Split, u: usize, which: EvalTarget) -> (Vec<u32>, u32) {
    let mut seq = split.train[u].clone();
    match which {
        EvalTarget::Valid => (seq, split.valid[u]),
        EvalTarget::Test => {
            seq.push(split.valid[u]);
            (seq, split.test[u])
        }
    }
}

/// Evaluates SASRec on every user. `eval_negatives[u]` are user `u+1`'s frozen sampled negatives.
pub fn evaluate_sasrec<B: Backend>(backend: &B, model: &SasRec, store: &ParamStore<B>, split: &Split,
                                   eval_negatives: &[Vec<u32>], which: EvalTarget, cfg: &EvalConfig)
                                   -> Result<EvalResult, EvalError> {
    let users = split.train.len();
    let n_items = model.num_items;
    let mut sampled = MetricAccumulator::default();
    let mut full = MetricAccumulator::default();
    for start in (0..users).step_by(cfg.batch_size.max(1)) {
        let end = (start + cfg.batch_size.max(1)).min(users);
        let cases: Vec<(Vec<u32>, u32)> = (start..end).map(|u| eval_case(split, u, which)).collect();
        let seqs: Vec<&[u32]> = cases.iter().map(|c| c.0.as_slice()).collect();
        let batch = SeqBatch::new(backend, &seqs, model.cfg.max_len);
        let mut tape = Tape::inference(backend);
        let vars = model.bind(&mut tape, store);
        let h = model.user_vectors(&mut tape, &vars, &batch);
        let s = end - start;
        // Sampled: candidate 0 is the target.
        let mut cand = Vec::with_capacity(s * (1 + cfg.negatives));
        let mut width = None;
        for (i, u) in (start..end).enumerate() {
            let negs = &eval_negatives[u];
            if *width.get_or_insert(negs.len()) != negs.len() {
                return Err(EvalError::Inconsistent(format!("user {} has {} sampled negatives, others {}", u + 1, negs.len(), width.unwrap())));
            }
            cand.push(cases[i].1);
            cand.extend_from_slice(negs);
        }
        let j = 1 + width.unwrap_or(0);
        let scores = tape.score_candidates(h, vars.item_table, &cand, j);
        let scores = tape.to_host(scores);
        for (i, u) in (start..end).enumerate() {
            sampled.push(&rank_sampled(&scores[i * j..(i + 1) * j], 0, u + 1)?);
        }
        if cfg.full_ranking {
            let all = tape.matmul(h, vars.item_table, false, true);
            let all = tape.to_host(all);
            debug_assert_eq!(all.len(), s * (n_items + 1));
            for (i, u) in (start..end).enumerate() {
                let row = &all[i * (n_items + 1)..(i + 1) * (n_items + 1)];
                full.push(&rank_full(row, cases[i].1, &cases[i].0, u + 1)?);
            }
        }
    }
    Ok(EvalResult { sampled: sampled.finish(), full: cfg.full_ranking.then(|| full.finish()) })
}
