//! Scores users with a trained model and ranks their targets under both protocols of mission.md §6:
//! sampled (the target + the frozen negatives) and full ranking over every item (history masked).
//! Sampled and full results always come from the same pass over the same model.
use crate::backend::Backend;
use crate::config::EvalConfig;
use crate::data::Split;
use crate::eval::{full_rank_exclusions, rank_full, rank_sampled, EvalError, MetricAccumulator, Metrics, RankOutcome};
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
            debug_assert_eq!(backend.len(tape.value(all)), s * (n_items + 1));
            for o in rank_full_on_backend(backend, tape.value(all), n_items + 1, &cases, start)? {
                full.push(&o);
            }
        }
    }
    Ok(EvalResult { sampled: sampled.finish(), full: cfg.full_ranking.then(|| full.finish()) })
}

/// Full-ranking outcomes of a batch's users (`cases`, users `start + 1 ..`) from their scores `[rows, cols]`
/// on the backend: the backend counts (`Backend::rank_counts`), so only three numbers per user come back. A
/// row with a non-finite score is read back and ranked on the host, which names the offending item.
fn rank_full_on_backend<B: Backend>(backend: &B, scores: &B::Buf, cols: usize, cases: &[(Vec<u32>, u32)], start: usize)
                                    -> Result<Vec<RankOutcome>, EvalError> {
    let (mut targets, mut offsets, mut items) = (Vec::with_capacity(cases.len()), vec![0u32], Vec::new());
    for (i, (history, target)) in cases.iter().enumerate() {
        items.extend(full_rank_exclusions(*target, history, start + i + 1, cols - 1)?);
        offsets.push(items.len() as u32);
        targets.push(*target);
    }
    let counts = backend.rank_counts(scores, cols, &backend.idx_from_host(&targets), &backend.idx_from_host(&offsets),
                                     &backend.idx_from_host(&items));
    let counts = backend.idx_to_host(&counts);
    cases.iter().enumerate().map(|(i, (history, target))| {
        let (higher, equal, non_finite) = (counts[3 * i] as usize, counts[3 * i + 1] as usize, counts[3 * i + 2]);
        if non_finite > 0 || equal == 0 {
            let row = backend.to_host(&backend.copy_range(scores, i * cols, cols));
            return rank_full(&row, *target, history, start + i + 1);
        }
        Ok(RankOutcome { higher, ties: equal - 1 })
    }).collect()
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
            let (s_all, r_all) = (tape.value(s_all), tape.value(r_all));
            let f_all = backend.fuse_softmax(s_all, r_all, w, alpha);
            for (a, sc) in acc.full.iter_mut().zip([&f_all, s_all, r_all]) {
                for o in rank_full_on_backend(backend, sc, w, &cases, start)? {
                    a.push(&o);
                }
            }
        }
    }
    let result = |k: usize| EvalResult { sampled: acc.sampled[k].finish(), full: cfg.full_ranking.then(|| acc.full[k].finish()) };
    Ok(Ur4RecEval { alpha, fused: result(0), sasrec: result(1), retriever: result(2),
                    sweep: sweep.iter().zip(&sweep_acc).map(|(&w, a)| (w, a.finish())).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::rng::Rng;

    /// The backend's counting path gives exactly `rank_full`'s outcome or error, row by row: ties (scores on
    /// a coarse grid), histories with duplicates, the padding id and the target, a NaN among the competitors
    /// (an error naming it) and a NaN hidden in the history (ignored).
    #[test]
    fn backend_full_ranking_equals_rank_full() {
        let be = CpuBackend::new();
        let (rows, cols) = (9usize, 57usize);
        let mut rng = Rng::new(8);
        let mut scores: Vec<f32> = (0..rows * cols).map(|_| (rng.below(12) as f32) * 0.25).collect();
        let mut cases: Vec<(Vec<u32>, u32)> = (0..rows).map(|_| {
            let target = 1 + rng.below(cols as u64 - 1) as u32;
            let mut history: Vec<u32> = (0..rng.below(20)).map(|_| rng.below(cols as u64) as u32).collect();
            history.extend([0, target]);
            if let Some(&h) = history.first() {
                history.push(h);
            }
            (history, target)
        }).collect();
        // Row 3: a NaN competitor; row 5: a NaN inside the history only.
        let competitor = (1..cols as u32).find(|i| !cases[3].0.contains(i) && *i != cases[3].1).unwrap();
        scores[3 * cols + competitor as usize] = f32::NAN;
        cases[5].0.push(7);
        scores[5 * cols + 7] = if cases[5].1 == 7 { 0.5 } else { f32::NAN };
        let got = rank_full_on_backend(&be, &be.from_host(&scores), cols, &cases, 10);
        let want: Result<Vec<RankOutcome>, EvalError> = cases.iter().enumerate()
            .map(|(i, (h, t))| rank_full(&scores[i * cols..(i + 1) * cols], *t, h, 10 + i + 1)).collect();
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        assert!(matches!(got, Err(EvalError::NonFinite { user: 14, .. })), "{got:?}");
        // Without the bad row, every outcome matches.
        scores[3 * cols + competitor as usize] = 1.0;
        let got = rank_full_on_backend(&be, &be.from_host(&scores), cols, &cases, 10).unwrap();
        for (i, (h, t)) in cases.iter().enumerate() {
            assert_eq!(got[i], rank_full(&scores[i * cols..(i + 1) * cols], *t, h, 11 + i).unwrap(), "row {i}");
        }
    }
}
