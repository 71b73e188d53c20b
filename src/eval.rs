//! Ranking metrics: Hit@K, NDCG@K (K = 5, 10, 20) and MRR, for both evaluation protocols.
//!
//! Pure metric logic, no model code. The evaluation loop scores candidates (sampled protocol: the
//! target plus 99 frozen negatives; full protocol: every item id), turns each user's scores into a
//! [`RankOutcome`] with [`rank_sampled`] or [`rank_full`], and folds the outcomes into a
//! [`MetricAccumulator`] (per thread, merged with [`MetricAccumulator::merge`]).
//!
//! # Tie rule
//! The reference evaluator used a strict comparison, so ties were broken in the target's favour, and
//! NaN scores (which compare false with everything) gave rank 1: an untrained NaN model scored perfect
//! hits (reference-model.md §8, D5). We fix both:
//! - a non-finite score among the candidates is an [`EvalError`], never a rank;
//! - a target with `h` candidates scoring strictly higher and `t` others tying with it is credited with
//!   the *expectation* over a uniformly random order of its tie group: its rank is uniform on
//!   `h+1 ..= h+t+1`. Ties therefore never favour the target (it gets the tie group's average, not its
//!   best rank), and a constant scorer scores exactly chance level on every metric (mission.md §9,
//!   "Tie rule tested"). The pessimistic rank `1 + h + t` that mission.md §6 names is still reported
//!   by [`RankOutcome::pessimistic_rank`]; scoring it would put a constant scorer *below* chance.
//!
//! # Full ranking at scale
//! [`rank_full`] is one O(N) pass over the score vector with no sort: it counts higher and tying
//! items, then removes the contributions of the (deduplicated) history items. Only the target's
//! running counts are kept, the same shape a tiled GPU kernel uses.

use std::fmt;

/// The cut-offs reported for Hit@K and NDCG@K.
pub const KS: [usize; 3] = [5, 10, 20];

/// Metrics averaged over users. `users` is the number of evaluated users (0 means "no data", and then
/// every metric is 0, never NaN).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Metrics {
    pub hit5: f64,
    pub hit10: f64,
    pub hit20: f64,
    pub ndcg5: f64,
    pub ndcg10: f64,
    pub ndcg20: f64,
    pub mrr: f64,
    pub users: usize,
}

impl Metrics {
    /// Hit@k for k in [`KS`]; `None` for any other cut-off (we do not silently interpolate).
    pub fn hit_at(&self, k: usize) -> Option<f64> {
        match k {
            5 => Some(self.hit5),
            10 => Some(self.hit10),
            20 => Some(self.hit20),
            _ => None,
        }
    }

    /// NDCG@k for k in [`KS`]; `None` otherwise.
    pub fn ndcg_at(&self, k: usize) -> Option<f64> {
        match k {
            5 => Some(self.ndcg5),
            10 => Some(self.ndcg10),
            20 => Some(self.ndcg20),
            _ => None,
        }
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Hit@5 {:.4} Hit@10 {:.4} Hit@20 {:.4} NDCG@5 {:.4} NDCG@10 {:.4} NDCG@20 {:.4} MRR {:.4} ({} users)",
            self.hit5, self.hit10, self.hit20, self.ndcg5, self.ndcg10, self.ndcg20, self.mrr, self.users
        )
    }
}

/// Why a user's candidates could not be ranked. Every variant names the user so a log line points
/// straight at the offending row.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A NaN or infinite score among the candidates. `index` is the candidate position (sampled
    /// protocol) or the item id (full protocol); the lowest such index is reported.
    #[error("non-finite score {value} for user {user} at candidate index {index} (a NaN/inf score is never ranked)")]
    NonFinite {
        user: usize,
        index: usize,
        value: f32,
    },
    /// The target's position is outside the candidate list.
    #[error("user {user}: target index {target_index} is outside the {len} candidates")]
    TargetOutOfRange {
        user: usize,
        target_index: usize,
        len: usize,
    },
    /// Full ranking: the target is the padding id 0 or beyond the score vector (items 0..=n_items).
    #[error("user {user}: target item {item} is not a real item (valid ids are 1..={n_items})")]
    BadTargetItem {
        user: usize,
        item: u32,
        n_items: usize,
    },
    /// Full ranking: a history item beyond the score vector, i.e. the catalogue and the model disagree.
    #[error(
        "user {user}: excluded item {item} is beyond the catalogue (valid ids are 1..={n_items})"
    )]
    ExcludedOutOfRange {
        user: usize,
        item: u32,
        n_items: usize,
    },
    /// Inputs that disagree with each other (e.g. users with different numbers of sampled
    /// negatives); raised by the evaluation loop, which knows what it expected.
    #[error("inconsistent evaluation input: {0}")]
    Inconsistent(String),
}

/// Where one user's target landed: `higher` candidates score strictly above it, `ties` *other*
/// candidates score exactly the same. Its rank is uniform on `higher+1 ..= higher+ties+1`, and every
/// metric below is the exact expectation over that range (see the module docs for why).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankOutcome {
    pub higher: usize,
    pub ties: usize,
}

impl RankOutcome {
    /// The worst rank the tie group allows, `1 + higher + ties` (for information and logs).
    pub fn pessimistic_rank(&self) -> usize {
        1 + self.higher + self.ties
    }

    /// The expected rank, `higher + 1 + ties/2`.
    pub fn expected_rank(&self) -> f64 {
        self.higher as f64 + 1.0 + self.ties as f64 / 2.0
    }

    /// Expected Hit@k = P(rank <= k). Of the `ties+1` equally likely ranks, `k - higher` (clamped to
    /// `0..=ties+1`) are within the cut-off, so this is a closed form whatever the tie count.
    pub fn hit(&self, k: usize) -> f64 {
        let n = self.ties + 1;
        k.saturating_sub(self.higher).min(n) as f64 / n as f64
    }

    /// Expected NDCG@k with one relevant item (IDCG = 1): mean of `1/log2(rank+1)` over the equally
    /// likely ranks, counting 0 beyond k. Only ranks <= k contribute, so the loop is at most k terms
    /// even when the tie group spans the whole catalogue.
    pub fn ndcg(&self, k: usize) -> f64 {
        let n = self.ties + 1;
        let last = (self.higher + n).min(k);
        let mut sum = 0.0;
        for r in (self.higher + 1)..=last {
            sum += 1.0 / ((r + 1) as f64).log2();
        }
        sum / n as f64
    }

    /// Expected reciprocal rank: `(H(higher+ties+1) - H(higher)) / (ties+1)` with H the harmonic numbers.
    pub fn reciprocal_rank(&self) -> f64 {
        let n = self.ties + 1;
        harmonic_diff(self.higher, self.higher + n) / n as f64
    }
}

/// Tie groups up to this size are summed term by term (the sampled protocol never exceeds it, so its
/// MRR is a plain sum); larger ones (degenerate scorers under full ranking) use the asymptotic series.
const DIRECT_SUM_MAX: usize = 256;
/// The asymptotic series is only used from this index on, where its truncation error is < 4e-15.
const ASYMPTOTIC_FROM: usize = 32;

/// `H(b) - H(a) = sum_{r=a+1..=b} 1/r` for `a <= b`, accurate to about 1e-14 absolute, in O(1) time
/// for large ranges (a tie group can be the whole catalogue: 23,715 items for a constant scorer).
fn harmonic_diff(a: usize, b: usize) -> f64 {
    debug_assert!(a <= b);
    if b - a <= DIRECT_SUM_MAX {
        return sum_reciprocals(a, b);
    }
    // Small indices by direct summation, where the series would be inaccurate ...
    let s = a.max(ASYMPTOTIC_FROM);
    let head = sum_reciprocals(a, s);
    // ... the rest by H(m) = ln m + gamma + g(m) (gamma cancels). ln(b/s) via ln_1p keeps full
    // relative precision; the next term of g, 1/(240 m^8), is below 4e-15 for m >= 32.
    let g = |m: usize| {
        let m = m as f64;
        let m2 = m * m;
        1.0 / (2.0 * m) - 1.0 / (12.0 * m2) + 1.0 / (120.0 * m2 * m2) - 1.0 / (252.0 * m2 * m2 * m2)
    };
    let tail = ((b - s) as f64 / s as f64).ln_1p() + (g(b) - g(s));
    head + tail
}

/// `sum_{r=a+1..=b} 1/r`, smallest terms first so rounding error does not grow with the large ones.
fn sum_reciprocals(a: usize, b: usize) -> f64 {
    let mut sum = 0.0;
    for r in ((a + 1)..=b).rev() {
        sum += 1.0 / r as f64;
    }
    sum
}

/// Sampled protocol: rank the candidate at `target_index` among `scores` (usually the target at 0
/// followed by the frozen negatives). Every candidate must be finite.
pub fn rank_sampled(
    scores: &[f32],
    target_index: usize,
    user: usize,
) -> Result<RankOutcome, EvalError> {
    if target_index >= scores.len() {
        return Err(EvalError::TargetOutOfRange {
            user,
            target_index,
            len: scores.len(),
        });
    }
    // Checked before counting: NaN compares false with everything, which is how the reference
    // turned NaN into rank 1.
    if let Some(index) = scores.iter().position(|s| !s.is_finite()) {
        return Err(EvalError::NonFinite {
            user,
            index,
            value: scores[index],
        });
    }
    let ts = scores[target_index];
    let (mut higher, mut equal) = (0usize, 0usize);
    for &s in scores {
        higher += (s > ts) as usize;
        equal += (s == ts) as usize;
    }
    // `equal` counted the target itself.
    Ok(RankOutcome {
        higher,
        ties: equal - 1,
    })
}

/// The items a full ranking of `target_item` leaves out for `user`: `excluded` sorted, deduplicated and
/// without the padding id 0 and the target. Checks the target and every excluded id against the catalogue
/// `1..=n_items`. (`rank_full` and the device ranking, `Backend::rank_counts`, share it.)
pub fn full_rank_exclusions(
    target_item: u32,
    excluded: &[u32],
    user: usize,
    n_items: usize,
) -> Result<Vec<u32>, EvalError> {
    if target_item == 0 || target_item as usize > n_items {
        return Err(EvalError::BadTargetItem {
            user,
            item: target_item,
            n_items,
        });
    }
    let mut history: Vec<u32> = excluded.to_vec();
    history.sort_unstable();
    history.dedup();
    if let Some(&item) = history.last() {
        if item as usize > n_items {
            return Err(EvalError::ExcludedOutOfRange {
                user,
                item,
                n_items,
            });
        }
    }
    history.retain(|&i| i != 0 && i != target_item);
    Ok(history)
}

/// Full protocol: rank item `target_item` among all items. `scores[i]` is item `i`'s score for
/// `i in 0..=N`; index 0 is padding and never a competitor. `excluded` (the user's history; may hold
/// duplicates, the padding id 0 and the target) are not competitors either, but the target always is
/// ranked. Scores of padding and excluded items are never read for the result, so a caller may mask
/// them with -inf; every other score must be finite.
///
/// O(N + m log m) for a history of m items: one branch-free counting pass over all items, then the
/// history's contributions are subtracted once per distinct item (duplicates removed by sorting a
/// small scratch copy of `excluded`).
pub fn rank_full(
    scores: &[f32],
    target_item: u32,
    excluded: &[u32],
    user: usize,
) -> Result<RankOutcome, EvalError> {
    let n_items = scores.len().saturating_sub(1);
    let t = target_item as usize;
    let history = full_rank_exclusions(target_item, excluded, user, n_items)?;
    let ts = scores[t];
    if !ts.is_finite() {
        return Err(EvalError::NonFinite {
            user,
            index: t,
            value: ts,
        });
    }

    // Counting pass over the real items 1..=N, target included (it ties with itself).
    let (mut higher, mut equal, mut non_finite) = (0usize, 0usize, 0usize);
    for &s in &scores[1..] {
        higher += (s > ts) as usize;
        equal += (s == ts) as usize;
        non_finite += (!s.is_finite()) as usize;
    }
    // Remove each distinct history item once; the target and padding stay as they are.
    for &item in &history {
        let s = scores[item as usize];
        higher -= (s > ts) as usize;
        equal -= (s == ts) as usize;
        non_finite -= (!s.is_finite()) as usize;
    }
    if non_finite > 0 {
        // Error path only: find the lowest-id non-finite competitor to name it.
        let index = (1..=n_items)
            .find(|&i| {
                !scores[i].is_finite() && (i == t || history.binary_search(&(i as u32)).is_err())
            })
            .expect("a non-finite competitor was counted");
        return Err(EvalError::NonFinite {
            user,
            index,
            value: scores[index],
        });
    }
    Ok(RankOutcome {
        higher,
        ties: equal - 1,
    })
}

/// Running sums of the per-user expected metrics. One per thread (or rayon fold), combined with
/// [`merge`](Self::merge); sums are f64 so millions of users lose nothing visible at 4 decimals.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct MetricAccumulator {
    hit: [f64; 3],
    ndcg: [f64; 3],
    rr: f64,
    users: usize,
}

impl MetricAccumulator {
    /// Add one user's outcome.
    pub fn push(&mut self, o: &RankOutcome) {
        for (j, &k) in KS.iter().enumerate() {
            self.hit[j] += o.hit(k);
            self.ndcg[j] += o.ndcg(k);
        }
        self.rr += o.reciprocal_rank();
        self.users += 1;
    }

    /// Fold another accumulator's users into this one (for rayon `reduce`).
    pub fn merge(&mut self, other: &MetricAccumulator) {
        for j in 0..KS.len() {
            self.hit[j] += other.hit[j];
            self.ndcg[j] += other.ndcg[j];
        }
        self.rr += other.rr;
        self.users += other.users;
    }

    /// Number of users pushed so far.
    pub fn users(&self) -> usize {
        self.users
    }

    /// Means over users. With no users every metric is 0 (not NaN) and `users` is 0.
    pub fn finish(&self) -> Metrics {
        if self.users == 0 {
            return Metrics::default();
        }
        let n = self.users as f64;
        Metrics {
            hit5: self.hit[0] / n,
            hit10: self.hit[1] / n,
            hit20: self.hit[2] / n,
            ndcg5: self.ndcg[0] / n,
            ndcg10: self.ndcg[1] / n,
            ndcg20: self.ndcg[2] / n,
            mrr: self.rr / n,
            users: self.users,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compensated (Kahan) sum of 1/r, as an independent reference for `harmonic_diff`.
    fn kahan_harmonic(a: usize, b: usize) -> f64 {
        let (mut sum, mut c) = (0.0f64, 0.0f64);
        for r in ((a + 1)..=b).rev() {
            let y = 1.0 / r as f64 - c;
            let t = sum + y;
            c = (t - sum) - y;
            sum = t;
        }
        sum
    }

    #[test]
    fn harmonic_diff_matches_direct_sum_across_regimes() {
        let cases = [
            (0, 0),
            (0, 1),
            (0, 100),
            (0, 256),
            (0, 257),
            (3, 300),
            (31, 1000),
            (32, 1000),
            (33, 5000),
            (0, 23_716),
            (7, 23_716),
            (1000, 60_000),
            (20_000, 23_716),
        ];
        for &(a, b) in &cases {
            let got = harmonic_diff(a, b);
            let want = kahan_harmonic(a, b);
            assert!((got - want).abs() < 1e-12, "H({b})-H({a}): {got} vs {want}");
        }
    }

    #[test]
    fn no_ties_is_the_plain_rank() {
        let o = RankOutcome { higher: 2, ties: 0 };
        assert_eq!(o.pessimistic_rank(), 3);
        assert_eq!(o.expected_rank(), 3.0);
        assert_eq!(o.hit(5), 1.0);
        assert_eq!(o.hit(2), 0.0);
        assert!((o.ndcg(5) - 0.5).abs() < 1e-15);
        assert_eq!(o.ndcg(2), 0.0);
        assert!((o.reciprocal_rank() - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn tie_group_straddling_the_cutoff() {
        // Ranks 4..=7 equally likely; Hit@5 counts ranks 4 and 5.
        let o = RankOutcome { higher: 3, ties: 3 };
        assert_eq!(o.hit(5), 0.5);
        assert_eq!(o.hit(10), 1.0);
        let want = (1.0 / 5f64.log2() + 1.0 / 6f64.log2()) / 4.0;
        assert!((o.ndcg(5) - want).abs() < 1e-15);
        let want_rr = (1.0 / 4.0 + 1.0 / 5.0 + 1.0 / 6.0 + 1.0 / 7.0) / 4.0;
        assert!((o.reciprocal_rank() - want_rr).abs() < 1e-15);
        assert_eq!(o.pessimistic_rank(), 7);
    }

    #[test]
    fn empty_accumulator_finishes_at_zero_not_nan() {
        assert_eq!(MetricAccumulator::default().finish(), Metrics::default());
    }
}
