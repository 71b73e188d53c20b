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

/// The sampled-protocol candidates of a batch of users starting at user index `start`: per user the target
/// then its frozen negatives, flattened, and the per-user width (every user must have as many negatives).
fn sampled_candidates(cases: &[(Vec<u32>, u32)], eval_negatives: &[Vec<u32>], start: usize)
                      -> Result<(Vec<u32>, usize), EvalError> {
    let j = 1 + eval_negatives.get(start).map_or(0, |n| n.len());
    let mut cand = Vec::with_capacity(cases.len() * j);
    for (i, (_, target)) in cases.iter().enumerate() {
        let negs = &eval_negatives[start + i];
        if negs.len() + 1 != j {
            return Err(EvalError::Inconsistent(format!("user {} has {} sampled negatives, others {}", start + i + 1, negs.len(), j - 1)));
        }
        cand.push(*target);
        cand.extend_from_slice(negs);
    }
    Ok((cand, j))
}

/// Evaluates SASRec on every user. `eval_negatives[u]` are user `u+1`'s frozen sampled negatives.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_sasrec<B: Backend>(backend: &B, model: &SasRec, store: &ParamStore<B>, split: &Split,
                                   eval_negatives: &[Vec<u32>], which: EvalTarget, cfg: &EvalConfig,
                                   mut dump: Option<&mut ScoreDump>) -> Result<EvalResult, EvalError> {
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
        let (cand, j) = sampled_candidates(&cases, eval_negatives, start)?;
        let scores = tape.score_candidates(h, vars.item_table, &cand, j);
        let scores = tape.to_host(scores);
        if let Some(d) = dump.as_deref_mut() {
            d.width = j;
            d.candidates.extend_from_slice(&cand);
            d.sasrec.extend_from_slice(&scores);
        }
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

/// Per-user sampled candidates and their scores, for export (`ur4rec-engine eval --dump-scores`).
#[derive(Clone, Debug, Default)]
pub struct ScoreDump {
    /// Candidates per user (target first).
    pub width: usize,
    pub candidates: Vec<u32>,
    pub fused: Vec<f32>,
    pub sasrec: Vec<f32>,
    pub retriever: Vec<f32>,
}

/// UR4Rec's evaluation: the fused ranking and each tower's own, from one pass.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Ur4RecEval {
    /// The fusion weight of SASRec used for `fused`.
    pub alpha: f32,
    pub fused: EvalResult,
    pub sasrec: EvalResult,
    pub retriever: EvalResult,
    /// Sampled metrics of the fused ranking for each weight of the calibration grid.
    pub sweep: Vec<(f32, Metrics)>,
}

struct Accumulators {
    sampled: [MetricAccumulator; 3],
    full: [MetricAccumulator; 3],
}

/// Evaluates UR4Rec on every user under both protocols; fused = α·softmax(SASRec) + (1−α)·softmax(retriever)
/// over the candidates (over all items for full ranking). The reference fixed α = 0.5; `sweep` lists weights
/// whose sampled fused metrics are also computed, from the same scores, for calibration on validation.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_ur4rec<B: Backend>(backend: &B, model: &crate::model::ur4rec::Ur4Rec, store: &ParamStore<B>,
                                   split: &Split, eval_negatives: &[Vec<u32>], which: EvalTarget, cfg: &EvalConfig,
                                   alpha: f32, sweep: &[f32], mut dump: Option<&mut ScoreDump>)
                                   -> Result<Ur4RecEval, EvalError> {
    use crate::model::ur4rec::fuse_scores;
    let users = split.train.len();
    let n_items = model.sasrec.num_items;
    let mut acc = Accumulators { sampled: Default::default(), full: Default::default() };
    let mut sweep_acc = vec![MetricAccumulator::default(); sweep.len()];
    // Every item's retriever vector, once per pass (the fusion MLP runs over the whole catalogue); it stays
    // on the backend, and each batch takes a device-side copy.
    let all_items: Vec<u32> = (0..=n_items as u32).collect();
    let item_vectors = if cfg.full_ranking {
        let mut tape = Tape::inference(backend);
        let rv = model.retriever.bind(&mut tape, store);
        let v = model.retriever.items(&mut tape, &rv, &all_items);
        let value = tape.value(v);
        Some(backend.copy_range(value, 0, backend.len(value)))
    } else {
        None
    };
    let bs = cfg.batch_size.max(1);
    for start in (0..users).step_by(bs) {
        let end = (start + bs).min(users);
        let cases: Vec<(Vec<u32>, u32)> = (start..end).map(|u| eval_case(split, u, which)).collect();
        let seqs: Vec<&[u32]> = cases.iter().map(|c| c.0.as_slice()).collect();
        let batch = SeqBatch::new(backend, &seqs, model.sasrec.cfg.max_len);
        let mut tape = Tape::inference(backend);
        let sv = model.sasrec.bind(&mut tape, store);
        let rv = model.retriever.bind(&mut tape, store);
        let h = model.sasrec.user_vectors(&mut tape, &sv, &batch);
        let user_ids: Vec<u32> = (start as u32 + 1..=end as u32).collect();
        let (ti, vi) = model.user_inputs(&mut tape, &user_ids);
        let p = model.retriever.users(&mut tape, &rv, ti, vi).fused;
        let (cand, j) = sampled_candidates(&cases, eval_negatives, start)?;
        let ss = tape.score_candidates(h, sv.item_table, &cand, j);
        let rs = model.retriever.score(&mut tape, &rv, p, &cand, j);
        let (ss, rs) = (tape.to_host(ss), tape.to_host(rs));
        let fs = fuse_scores(&ss, &rs, j, alpha);
        if let Some(d) = dump.as_deref_mut() {
            d.width = j;
            d.candidates.extend_from_slice(&cand);
            d.fused.extend_from_slice(&fs);
            d.sasrec.extend_from_slice(&ss);
            d.retriever.extend_from_slice(&rs);
        }
        for (i, u) in (start..end).enumerate() {
            for (a, sc) in acc.sampled.iter_mut().zip([&fs, &ss, &rs]) {
                a.push(&rank_sampled(&sc[i * j..(i + 1) * j], 0, u + 1)?);
            }
        }
        for (a, &w) in sweep_acc.iter_mut().zip(sweep) {
            let f = fuse_scores(&ss, &rs, j, w);
            for (i, u) in (start..end).enumerate() {
                a.push(&rank_sampled(&f[i * j..(i + 1) * j], 0, u + 1)?);
            }
        }
        if let Some(iv) = &item_vectors {
            let w = n_items + 1;
            let s_all = tape.matmul(h, sv.item_table, false, true);
            let d = model.retriever.cfg.dim;
            let items = tape.constant_buf(&[w, d], backend.copy_range(iv, 0, w * d));
            let r_all = tape.matmul(p, items, false, true);
            let r_all = tape.scale(r_all, model.retriever.logit_scale());
            let (s_all, r_all) = (tape.to_host(s_all), tape.to_host(r_all));
            let f_all = fuse_scores(&s_all, &r_all, w, alpha);
            for (i, u) in (start..end).enumerate() {
                for (a, sc) in acc.full.iter_mut().zip([&f_all, &s_all, &r_all]) {
                    a.push(&rank_full(&sc[i * w..(i + 1) * w], cases[i].1, &cases[i].0, u + 1)?);
                }
            }
        }
    }
    let result = |k: usize| EvalResult { sampled: acc.sampled[k].finish(), full: cfg.full_ranking.then(|| acc.full[k].finish()) };
    Ok(Ur4RecEval { alpha, fused: result(0), sasrec: result(1), retriever: result(2),
                    sweep: sweep.iter().zip(&sweep_acc).map(|(&w, a)| (w, a.finish())).collect() })
}
