//! Integration tests for `ur4rec_engine::eval`: hand-computed ranks, the tie rule (a constant scorer
//! scores exactly chance level, mission.md §9), non-finite scores as errors (the reference ranked NaN
//! first), exclusion and padding in full ranking, and brute-force property checks.

use rayon::prelude::*;
use ur4rec_engine::eval::{
    rank_full, rank_sampled, EvalError, MetricAccumulator, Metrics, RankOutcome, KS,
};

const TOL: f64 = 1e-12;

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < TOL, "{what}: got {a}, want {b}");
}

/// Tiny seeded LCG (Knuth's MMIX constants) so the property tests need no rand crate.
struct Lcg(u64);
impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: usize) -> usize {
        self.next_u32() as usize % n
    }
}

/// Chance-level metrics for `c` candidates with the target uniformly placed among them.
fn chance(c: usize) -> Metrics {
    let hit = |k: usize| k.min(c) as f64 / c as f64;
    let ndcg = |k: usize| {
        (1..=k.min(c))
            .map(|r| 1.0 / ((r + 1) as f64).log2())
            .sum::<f64>()
            / c as f64
    };
    let mrr = (1..=c).rev().map(|r| 1.0 / r as f64).sum::<f64>() / c as f64;
    Metrics {
        hit5: hit(5),
        hit10: hit(10),
        hit20: hit(20),
        ndcg5: ndcg(5),
        ndcg10: ndcg(10),
        ndcg20: ndcg(20),
        mrr,
        users: 0,
    }
}

fn assert_metrics_close(got: &Metrics, want: &Metrics) {
    close(got.hit5, want.hit5, "Hit@5");
    close(got.hit10, want.hit10, "Hit@10");
    close(got.hit20, want.hit20, "Hit@20");
    close(got.ndcg5, want.ndcg5, "NDCG@5");
    close(got.ndcg10, want.ndcg10, "NDCG@10");
    close(got.ndcg20, want.ndcg20, "NDCG@20");
    close(got.mrr, want.mrr, "MRR");
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases

#[test]
fn sampled_rank_by_hand() {
    // Target 0.5 among [0.9, 0.5, 0.1, 0.7]: 0.9 and 0.7 are higher -> rank 3.
    let o = rank_sampled(&[0.9, 0.5, 0.1, 0.7], 1, 0).unwrap();
    assert_eq!(o, RankOutcome { higher: 2, ties: 0 });
    assert_eq!(o.pessimistic_rank(), 3);
    close(o.hit(5), 1.0, "Hit@5");
    close(o.ndcg(5), 1.0 / 4f64.log2(), "NDCG@5");
    close(o.ndcg(5), 0.5, "NDCG@5");
    close(o.reciprocal_rank(), 1.0 / 3.0, "MRR");
    // Target first: rank 1.
    let o = rank_sampled(&[0.9, 0.5, 0.1, 0.7], 0, 0).unwrap();
    assert_eq!(o, RankOutcome { higher: 0, ties: 0 });
    close(o.ndcg(5), 1.0, "NDCG@5 at rank 1");
    close(o.reciprocal_rank(), 1.0, "MRR at rank 1");
}

#[test]
fn tie_by_hand() {
    // Target 0.5 tied with one other 0.5, one candidate (0.9) higher: rank 2 or 3, each with prob 1/2.
    let o = rank_sampled(&[0.5, 0.9, 0.5, 0.2], 0, 0).unwrap();
    assert_eq!(o, RankOutcome { higher: 1, ties: 1 });
    assert_eq!(o.pessimistic_rank(), 3);
    close(o.reciprocal_rank(), (1.0 / 2.0 + 1.0 / 3.0) / 2.0, "MRR");
    close(
        o.ndcg(5),
        (1.0 / 3f64.log2() + 1.0 / 4f64.log2()) / 2.0,
        "NDCG@5",
    );
    close(o.hit(5), 1.0, "Hit@5");
    close(o.hit(2), 0.5, "Hit@2 (only rank 2 is inside)");
    close(o.hit(1), 0.0, "Hit@1");
    close(o.expected_rank(), 2.5, "expected rank");
}

#[test]
fn full_rank_by_hand_excludes_history_and_padding() {
    // Item 0 is padding with a huge score; items 1..=5. Target item 2 (0.5).
    let scores = [100.0, 0.9, 0.5, 0.1, 0.7, 0.95];
    // No exclusions: 0.9, 0.7, 0.95 are higher; padding is not counted.
    assert_eq!(
        rank_full(&scores, 2, &[], 0).unwrap(),
        RankOutcome { higher: 3, ties: 0 }
    );
    // History {5} (duplicated, plus padding 0 and the target itself): 5 is no competitor, the target
    // is still ranked, duplicates are removed once.
    assert_eq!(
        rank_full(&scores, 2, &[5, 0, 5, 2, 5], 0).unwrap(),
        RankOutcome { higher: 2, ties: 0 }
    );
    // Excluding everything that beats it -> rank 1.
    assert_eq!(
        rank_full(&scores, 2, &[1, 4, 5], 0).unwrap(),
        RankOutcome { higher: 0, ties: 0 }
    );
}

#[test]
fn full_rank_ties_and_excluded_ties() {
    // Target item 3 (0.5) ties with items 1 and 4; item 4 is history, so one tie remains.
    let scores = [0.5, 0.5, 0.9, 0.5, 0.5, 0.1];
    assert_eq!(
        rank_full(&scores, 3, &[4], 0).unwrap(),
        RankOutcome { higher: 1, ties: 1 }
    );
    // Padding (index 0) also scores 0.5 but never ties.
    assert_eq!(
        rank_full(&scores, 3, &[], 0).unwrap(),
        RankOutcome { higher: 1, ties: 2 }
    );
}

#[test]
fn full_rank_accepts_masked_history_and_padding() {
    // A caller may mask history and padding with -inf (or +inf) itself; those scores are never read.
    let scores = [f32::NEG_INFINITY, 0.3, f32::INFINITY, 0.2, f32::NAN];
    assert_eq!(
        rank_full(&scores, 3, &[2, 4], 0).unwrap(),
        RankOutcome { higher: 1, ties: 0 }
    );
}

// ---------------------------------------------------------------------------------------------
// Tie rule: a constant scorer scores exactly chance level (mission.md §9)

#[test]
fn constant_scorer_sampled_is_exactly_chance() {
    let mut acc = MetricAccumulator::default();
    let users = 1000;
    for u in 0..users {
        // A different constant per user and the target anywhere: still chance.
        let v = u as f32 * 0.37 - 50.0;
        let scores = vec![v; 100];
        let o = rank_sampled(&scores, u % 100, u).unwrap();
        assert_eq!(
            o,
            RankOutcome {
                higher: 0,
                ties: 99
            }
        );
        acc.push(&o);
    }
    let m = acc.finish();
    assert_eq!(m.users, users);
    close(m.hit5, 0.05, "Hit@5");
    close(m.hit10, 0.10, "Hit@10");
    close(m.hit20, 0.20, "Hit@20");
    let h100: f64 = (1..=100).map(|r| 1.0 / r as f64).sum();
    close(m.mrr, h100 / 100.0, "MRR = H_100/100");
    let ndcg10: f64 = (1..=10).map(|r| 1.0 / ((r + 1) as f64).log2()).sum::<f64>() / 100.0;
    close(m.ndcg10, ndcg10, "NDCG@10");
    assert_metrics_close(&m, &chance(100));
}

#[test]
fn constant_scorer_full_ranking_with_exclusions_is_chance() {
    let n_items = 500;
    let mut rng = Lcg(42);
    for u in 0..50 {
        let mut scores = vec![1.25f32; n_items + 1];
        // Padding and history scores are irrelevant, even when they would beat the target.
        scores[0] = 1e9;
        let target = 1 + rng.below(n_items) as u32;
        let len = rng.below(80);
        let mut history: Vec<u32> = (0..len).map(|_| rng.below(n_items + 1) as u32).collect();
        history.push(target); // the target in the history is still ranked
        if let Some(&h) = history.first() {
            history.push(h); // a duplicate
        }
        for &h in &history {
            if h != target && h != 0 {
                scores[h as usize] = 1e9;
            }
        }
        let mut distinct = history.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let removed = distinct.iter().filter(|&&h| h != 0 && h != target).count();
        let candidates = n_items - removed;

        let o = rank_full(&scores, target, &history, u).unwrap();
        assert_eq!(
            o,
            RankOutcome {
                higher: 0,
                ties: candidates - 1
            }
        );
        let mut acc = MetricAccumulator::default();
        acc.push(&o);
        assert_metrics_close(&acc.finish(), &chance(candidates));
    }
}

#[test]
fn constant_scorer_over_a_large_catalogue_is_chance() {
    // ML-1M-sized tie group: exercises the asymptotic harmonic-number path for MRR.
    let n_items = 23_716;
    let scores = vec![0.0f32; n_items + 1];
    let o = rank_full(&scores, 77, &[], 3).unwrap();
    assert_eq!(
        o,
        RankOutcome {
            higher: 0,
            ties: n_items - 1
        }
    );
    let mut acc = MetricAccumulator::default();
    acc.push(&o);
    assert_metrics_close(&acc.finish(), &chance(n_items));
    // A tie group that starts below the cut-offs and far beyond the asymptotic threshold.
    let o = RankOutcome {
        higher: 13,
        ties: 10_000,
    };
    let n = 10_001.0;
    let want_rr: f64 = (14..=10_014).rev().map(|r| 1.0 / r as f64).sum::<f64>() / n;
    close(o.reciprocal_rank(), want_rr, "MRR, offset tie group");
    let want_ndcg: f64 = (14..=20)
        .map(|r| 1.0 / ((r + 1) as f64).log2())
        .sum::<f64>()
        / n;
    close(o.ndcg(20), want_ndcg, "NDCG@20, offset tie group");
    close(o.hit(20), 7.0 / n, "Hit@20, offset tie group");
    close(o.hit(5), 0.0, "Hit@5, offset tie group");
}

// ---------------------------------------------------------------------------------------------
// Non-finite scores and bad indices are errors

#[test]
fn non_finite_sampled_scores_are_errors() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut scores = vec![0.1f32, 0.2, 0.3, 0.4, 0.5];
        scores[3] = bad;
        match rank_sampled(&scores, 0, 17) {
            Err(
                e @ EvalError::NonFinite {
                    user: 17, index: 3, ..
                },
            ) => {
                let msg = e.to_string();
                assert!(msg.contains("user 17") && msg.contains("index 3"), "{msg}");
            }
            other => panic!("{bad}: expected NonFinite, got {other:?}"),
        }
        // A non-finite target is an error too (the reference ranked NaN targets first).
        scores[3] = 0.4;
        scores[0] = bad;
        assert!(matches!(
            rank_sampled(&scores, 0, 2),
            Err(EvalError::NonFinite {
                user: 2,
                index: 0,
                ..
            })
        ));
    }
    // The lowest non-finite index is the one reported.
    let scores = [0.0, f32::NAN, f32::INFINITY];
    assert!(matches!(
        rank_sampled(&scores, 0, 0),
        Err(EvalError::NonFinite { index: 1, .. })
    ));
}

#[test]
fn non_finite_full_scores_are_errors() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut scores = vec![0.0f32, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        scores[5] = bad;
        // Item 5 is a competitor: error naming it.
        assert!(matches!(
            rank_full(&scores, 2, &[3], 9),
            Err(EvalError::NonFinite {
                user: 9,
                index: 5,
                ..
            })
        ));
        // Item 5 is history: it is not a candidate, so its score does not matter.
        assert!(rank_full(&scores, 2, &[5], 9).is_ok());
        // Target non-finite: error even if it is also listed in the history.
        assert!(matches!(
            rank_full(&scores, 5, &[5], 4),
            Err(EvalError::NonFinite {
                user: 4,
                index: 5,
                ..
            })
        ));
        // Padding non-finite: ignored.
        scores[5] = 0.5;
        scores[0] = bad;
        assert!(rank_full(&scores, 2, &[], 9).is_ok());
    }
    // Several bad competitors: the lowest item id is reported, skipping history.
    let scores = [0.0, 0.1, f32::NAN, 0.3, f32::NAN, f32::NAN];
    assert!(matches!(
        rank_full(&scores, 1, &[2], 0),
        Err(EvalError::NonFinite { index: 4, .. })
    ));
}

#[test]
fn bad_indices_are_errors() {
    assert!(matches!(
        rank_sampled(&[0.1, 0.2], 2, 5),
        Err(EvalError::TargetOutOfRange {
            user: 5,
            target_index: 2,
            len: 2
        })
    ));
    assert!(matches!(
        rank_sampled(&[], 0, 0),
        Err(EvalError::TargetOutOfRange { .. })
    ));
    let scores = [0.0f32, 0.1, 0.2, 0.3];
    assert!(matches!(
        rank_full(&scores, 0, &[], 1),
        Err(EvalError::BadTargetItem {
            user: 1,
            item: 0,
            n_items: 3
        })
    ));
    assert!(matches!(
        rank_full(&scores, 4, &[], 1),
        Err(EvalError::BadTargetItem { item: 4, .. })
    ));
    assert!(matches!(
        rank_full(&scores, 1, &[2, 9], 1),
        Err(EvalError::ExcludedOutOfRange {
            user: 1,
            item: 9,
            n_items: 3
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Property tests against brute force

/// Reference: average the target's Hit@K / NDCG@K / reciprocal rank over every ordering of the
/// candidates used as the tie-break (a stable sort by descending score from each permutation), i.e.
/// over a uniformly random order of each tie group. Exponential; only for a handful of candidates.
fn brute_force(scores: &[f32], target: usize) -> ([f64; 3], [f64; 3], f64) {
    let n = scores.len();
    let mut perm: Vec<usize> = (0..n).collect();
    let (mut hit, mut ndcg, mut rr, mut count) = ([0.0; 3], [0.0; 3], 0.0, 0.0);
    let mut visit = |p: &[usize]| {
        let mut order = p.to_vec();
        order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap()); // stable
        let rank = order.iter().position(|&i| i == target).unwrap() + 1;
        for (j, &k) in KS.iter().enumerate() {
            if rank <= k {
                hit[j] += 1.0;
                ndcg[j] += 1.0 / ((rank + 1) as f64).log2();
            }
        }
        rr += 1.0 / rank as f64;
        count += 1.0;
    };
    permute(&mut perm, 0, &mut visit);
    (hit.map(|h| h / count), ndcg.map(|x| x / count), rr / count)
}

fn permute(v: &mut Vec<usize>, start: usize, visit: &mut impl FnMut(&[usize])) {
    if start == v.len() {
        visit(v);
        return;
    }
    for i in start..v.len() {
        v.swap(start, i);
        permute(v, start + 1, visit);
        v.swap(start, i);
    }
}

#[test]
fn sampled_matches_brute_force_tie_permutations() {
    let mut rng = Lcg(2024);
    for case in 0..300 {
        let n = 1 + rng.below(7);
        // Few distinct values so ties are common.
        let levels = 1 + rng.below(4);
        let scores: Vec<f32> = (0..n)
            .map(|_| rng.below(levels) as f32 * 0.25 - 0.3)
            .collect();
        let target = rng.below(n);
        let o = rank_sampled(&scores, target, case).unwrap();
        let (hit, ndcg, rr) = brute_force(&scores, target);
        for (j, &k) in KS.iter().enumerate() {
            close(
                o.hit(k),
                hit[j],
                &format!("case {case} Hit@{k} {scores:?} t={target}"),
            );
            close(
                o.ndcg(k),
                ndcg[j],
                &format!("case {case} NDCG@{k} {scores:?} t={target}"),
            );
        }
        close(
            o.reciprocal_rank(),
            rr,
            &format!("case {case} RR {scores:?} t={target}"),
        );
    }
}

#[test]
fn wide_tie_groups_straddling_cutoffs_match_brute_force() {
    // Tie groups larger than 7 and crossing K = 5/10/20: compare with the direct average over ranks.
    let mut rng = Lcg(7);
    for _ in 0..200 {
        let o = RankOutcome {
            higher: rng.below(30),
            ties: rng.below(600),
        };
        let ranks = (o.higher + 1)..=(o.higher + o.ties + 1);
        let n = (o.ties + 1) as f64;
        for k in KS {
            let h = ranks.clone().filter(|&r| r <= k).count() as f64 / n;
            let d: f64 = ranks
                .clone()
                .filter(|&r| r <= k)
                .map(|r| 1.0 / ((r + 1) as f64).log2())
                .sum::<f64>()
                / n;
            close(o.hit(k), h, "Hit");
            close(o.ndcg(k), d, "NDCG");
        }
        let rr: f64 = ranks.clone().rev().map(|r| 1.0 / r as f64).sum::<f64>() / n;
        close(o.reciprocal_rank(), rr, "RR");
    }
}

#[test]
fn full_matches_filtering_then_sampled() {
    // rank_full must equal ranking the explicit candidate list (target + non-history real items).
    let mut rng = Lcg(99);
    for case in 0..300 {
        let n_items = 1 + rng.below(60);
        let scores: Vec<f32> = (0..=n_items).map(|_| rng.below(5) as f32 * 0.5).collect();
        let target = 1 + rng.below(n_items) as u32;
        let history: Vec<u32> = (0..rng.below(2 * n_items))
            .map(|_| rng.below(n_items + 1) as u32)
            .collect();
        let mut candidates = vec![scores[target as usize]];
        for i in 1..=n_items as u32 {
            if i != target && !history.contains(&i) {
                candidates.push(scores[i as usize]);
            }
        }
        let want = rank_sampled(&candidates, 0, case).unwrap();
        assert_eq!(
            rank_full(&scores, target, &history, case).unwrap(),
            want,
            "case {case}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Accumulator, Display, serde

#[test]
fn accumulator_means_and_rayon_merge() {
    let mut rng = Lcg(5);
    let outcomes: Vec<RankOutcome> = (0..5000)
        .map(|_| RankOutcome {
            higher: rng.below(40),
            ties: rng.below(4),
        })
        .collect();

    let mut seq = MetricAccumulator::default();
    for o in &outcomes {
        seq.push(o);
    }
    let m = seq.finish();
    assert_eq!(m.users, outcomes.len());
    let mean = |f: &dyn Fn(&RankOutcome) -> f64| {
        outcomes.iter().map(f).sum::<f64>() / outcomes.len() as f64
    };
    close(m.hit10, mean(&|o| o.hit(10)), "Hit@10 mean");
    close(m.ndcg20, mean(&|o| o.ndcg(20)), "NDCG@20 mean");
    close(m.mrr, mean(&|o| o.reciprocal_rank()), "MRR mean");

    let par = outcomes
        .par_iter()
        .fold(MetricAccumulator::default, |mut a, o| {
            a.push(o);
            a
        })
        .reduce(MetricAccumulator::default, |mut a, b| {
            a.merge(&b);
            a
        })
        .finish();
    assert_eq!(par.users, m.users);
    assert_metrics_close(&par, &m);
}

#[test]
fn display_and_serde_round_trip() {
    let mut acc = MetricAccumulator::default();
    acc.push(&RankOutcome { higher: 0, ties: 0 });
    acc.push(&RankOutcome { higher: 9, ties: 0 });
    let m = acc.finish();
    assert_eq!(m.hit5, 0.5);
    assert_eq!(m.hit10, 1.0);
    assert_eq!(m.hit_at(10), Some(1.0));
    assert_eq!(m.ndcg_at(7), None);
    let s = m.to_string();
    assert!(
        s.starts_with("Hit@5 0.5000 Hit@10 1.0000 Hit@20 1.0000 NDCG@5 "),
        "{s}"
    );
    assert!(s.contains("MRR 0.5500") && s.ends_with("(2 users)"), "{s}");
    let json = serde_json::to_string(&m).unwrap();
    let back: Metrics = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}
