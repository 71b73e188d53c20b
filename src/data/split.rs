//! The evaluation protocol's data: the leave-one-out split and the frozen evaluation candidates.
//!
//! The candidates (sampled negatives) are drawn once per (data set, seed) and fingerprinted, so every
//! evaluation of a run — and every run that reports the same fingerprint — ranks against the same items.

use super::{hex, DataError, Dataset};
use crate::rng::{mix64, Rng};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// Leave-one-out split, indexed by `user - 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// All but the last two items of each sequence.
    pub train: Vec<Vec<u32>>,
    /// The second-to-last item.
    pub valid: Vec<u32>,
    /// The last item.
    pub test: Vec<u32>,
}

fn describe_user(ds: &Dataset, u: usize) -> String {
    match ds.user_original.get(u) {
        Some(orig) => format!("user {} (original id {orig:?})", u + 1),
        None => format!("user {}", u + 1),
    }
}

/// Train on all but the last two items, validate on the second-to-last, test on the last.
pub fn leave_one_out(ds: &Dataset) -> Result<Split, DataError> {
    let n = ds.sequences.len();
    let mut split = Split {
        train: Vec::with_capacity(n),
        valid: Vec::with_capacity(n),
        test: Vec::with_capacity(n),
    };
    for (u, s) in ds.sequences.iter().enumerate() {
        let len = s.len();
        if len < 3 {
            return Err(DataError::Invalid(format!(
                "{} has {len} items; leave-one-out needs at least 3 (train, valid, test) — raise min_items_per_user",
                describe_user(ds, u)
            )));
        }
        split.train.push(s[..len - 2].to_vec());
        split.valid.push(s[len - 2]);
        split.test.push(s[len - 1]);
    }
    Ok(split)
}

/// The frozen evaluation candidates: for each user, `count` distinct items drawn uniformly without
/// replacement from the items outside the user's whole sequence (so neither the validation nor the test
/// target can be drawn).
///
/// Each user gets its own stream derived from `(seed, user)`, so a row depends on nothing but the seed,
/// the user and that user's sequence — not on the thread count, nor on the other users. Rows are in draw
/// order (random), which keeps any position-based tie handling downstream unbiased.
pub fn eval_negatives(ds: &Dataset, seed: u64, count: usize) -> Result<Vec<Vec<u32>>, DataError> {
    let n = ds.num_items;
    let base = Rng::derive(seed, "eval-negatives").next_u64();
    // Bit `k` marks item `k` (history or already drawn); one bitset per worker, cleared after each user.
    let words = n / 64 + 1;
    let rows: Vec<Result<Vec<u32>, DataError>> = ds
        .sequences
        .par_iter()
        .enumerate()
        .map_init(
            || vec![0u64; words],
            |bits, (u, seq)| {
                let row = draw_row(bits, n, seq, count, mix64(base ^ mix64(u as u64 + 1)));
                for &i in seq.iter().chain(row.iter().flatten()) {
                    if (i as usize) <= n {
                        bits[i as usize / 64] = 0;
                    }
                }
                row.map_err(|why| DataError::Invalid(format!("{}: {why}", describe_user(ds, u))))
            },
        )
        .collect();
    // Sequential collect: the reported error is the first user's in id order, whatever the scheduling.
    rows.into_iter().collect()
}

fn draw_row(
    bits: &mut [u64],
    n: usize,
    seq: &[u32],
    count: usize,
    seed: u64,
) -> Result<Vec<u32>, String> {
    let test_and_set = |bits: &mut [u64], i: usize| {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let was = bits[w] & b != 0;
        bits[w] |= b;
        was
    };
    let mut history = 0usize;
    for &i in seq {
        if i == 0 || i as usize > n {
            return Err(format!("item id {i} is outside 1..={n}"));
        }
        if !test_and_set(bits, i as usize) {
            history += 1;
        }
    }
    let available = n - history;
    if available < count {
        return Err(format!(
            "only {available} items are outside the history ({history} distinct items of {n}); {count} evaluation negatives were asked for"
        ));
    }
    let mut rng = Rng::new(seed);
    let mut row = Vec::with_capacity(count);
    if count * 2 <= available {
        // Rejection sampling: at least half of the draws succeed, so this is O(count) expected.
        while row.len() < count {
            let i = 1 + rng.below(n as u64) as usize;
            if !test_and_set(bits, i) {
                row.push(i as u32);
            }
        }
    } else {
        // Nearly every free item is wanted: list them and take a partial Fisher–Yates prefix.
        let mut free: Vec<u32> = (1..=n)
            .filter(|&i| bits[i / 64] & (1u64 << (i % 64)) == 0)
            .map(|i| i as u32)
            .collect();
        for k in 0..count {
            let j = k + rng.below((free.len() - k) as u64) as usize;
            free.swap(k, j);
        }
        free.truncate(count);
        row = free;
    }
    Ok(row)
}

/// Hex SHA-256 of the evaluation candidates, for the run manifest.
pub fn fingerprint_negatives(rows: &[Vec<u32>]) -> String {
    let mut h = Sha256::new();
    h.update(b"ur4rec-eval-negatives-v1");
    h.update((rows.len() as u64).to_le_bytes());
    for row in rows {
        h.update((row.len() as u64).to_le_bytes());
        for &i in row {
            h.update(i.to_le_bytes());
        }
    }
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        Dataset::from_sequences(
            "toy",
            300,
            (0..40u32)
                .map(|u| (1..=3 + u % 20).map(|k| 1 + (k * 7 + u) % 300).collect())
                .collect(),
        )
    }

    #[test]
    fn leave_one_out_takes_the_last_two() {
        let ds = Dataset::from_sequences("s", 9, vec![vec![5, 3, 9, 1], vec![2, 4, 6]]);
        let s = leave_one_out(&ds).unwrap();
        assert_eq!(s.train, vec![vec![5, 3], vec![2]]);
        assert_eq!(s.valid, vec![9, 4]);
        assert_eq!(s.test, vec![1, 6]);
    }

    #[test]
    fn leave_one_out_names_a_short_user() {
        let mut ds = Dataset::from_sequences("s", 9, vec![vec![5, 3, 9], vec![2, 4]]);
        ds.user_original[1] = "alice".into();
        let msg = leave_one_out(&ds).unwrap_err().to_string();
        assert!(
            msg.contains("user 2 (original id \"alice\") has 2 items"),
            "{msg}"
        );
    }

    #[test]
    fn eval_negatives_avoid_the_whole_history_and_are_distinct() {
        let ds = toy();
        let negs = eval_negatives(&ds, 7, 99).unwrap();
        assert_eq!(negs.len(), ds.num_users);
        for (seq, row) in ds.sequences.iter().zip(&negs) {
            assert_eq!(row.len(), 99);
            let mut sorted = row.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 99, "duplicates in {row:?}");
            assert!(row
                .iter()
                .all(|i| (1..=300).contains(i) && !seq.contains(i)));
        }
    }

    #[test]
    fn eval_negatives_are_reproducible_and_independent_of_threads_and_other_users() {
        let ds = toy();
        let a = eval_negatives(&ds, 7, 99).unwrap();
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = one_thread.install(|| eval_negatives(&ds, 7, 99)).unwrap();
        assert_eq!(a, b);
        assert_eq!(fingerprint_negatives(&a), fingerprint_negatives(&b));
        // A user's row does not depend on who else is in the data set.
        let mut half = ds.clone();
        half.sequences.truncate(20);
        assert_eq!(eval_negatives(&half, 7, 99).unwrap()[..], a[..20]);
        let c = eval_negatives(&ds, 8, 99).unwrap();
        assert_ne!(a, c);
        assert_ne!(fingerprint_negatives(&a), fingerprint_negatives(&c));
    }

    #[test]
    fn eval_negatives_when_nearly_every_free_item_is_needed() {
        let ds = Dataset::from_sequences("s", 10, vec![vec![2, 5, 2, 9]]);
        let mut row = eval_negatives(&ds, 1, 7).unwrap().remove(0);
        row.sort_unstable();
        assert_eq!(row, vec![1, 3, 4, 6, 7, 8, 10]);
        let msg = eval_negatives(&ds, 1, 8).unwrap_err().to_string();
        assert!(
            msg.contains("user 1") && msg.contains("only 7 items"),
            "{msg}"
        );
    }

    #[test]
    fn eval_negatives_are_uniform_over_the_free_items() {
        // One user with history {1..=10} of 20 items, drawn 5 at a time over many seeds: each free item
        // should be picked half of the time.
        let ds = Dataset::from_sequences("s", 20, vec![(1..=10).collect()]);
        let mut hits = [0usize; 21];
        let seeds = 4000;
        for seed in 0..seeds {
            for i in eval_negatives(&ds, seed, 5).unwrap().remove(0) {
                hits[i as usize] += 1;
            }
        }
        for &h in &hits[11..] {
            let share = h as f64 / seeds as f64;
            assert!((share - 0.5).abs() < 0.04, "{hits:?}");
        }
    }

    #[test]
    fn amazon_games_negatives_are_fast_enough() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/amazon-games/Games.txt");
        if !p.exists() {
            eprintln!("skipped: {} is absent", p.display());
            return;
        }
        let all = crate::data::LoadOptions {
            min_items_per_user: 1,
            ..Default::default()
        };
        let ds = crate::data::load(&p, &all).unwrap();
        let t = std::time::Instant::now();
        let negs = eval_negatives(&ds, 42, 99).unwrap();
        let took = t.elapsed();
        eprintln!(
            "Games eval negatives: {} users x 99 in {took:?}",
            negs.len()
        );
        assert_eq!(negs.len(), 31_013);
        assert!(took.as_secs_f64() < 2.0, "{took:?}");
    }
}
