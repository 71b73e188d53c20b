//! Training negatives: uniform items outside the user's training history.
//!
//! Only the training history is excluded (as in SASRec): the validation and test targets are unknown to
//! training, so excluding them would leak them.

use super::DataError;
use crate::rng::Rng;

/// Draws training negatives by rejection against each user's sorted, de-duplicated training history.
#[derive(Clone, Debug)]
pub struct NegativeSampler {
    num_items: usize,
    /// `histories[user - 1]`, sorted and unique, for binary search.
    histories: Vec<Vec<u32>>,
}

impl NegativeSampler {
    /// `histories[user - 1]` holds the user's training items (any order, repeats allowed). Fails where an
    /// item is outside `1..=num_items`, or where a history covers every item (no negative would exist and
    /// rejection sampling would never end).
    pub fn new(num_items: usize, histories: &[Vec<u32>]) -> Result<Self, DataError> {
        let mut sorted = Vec::with_capacity(histories.len());
        for (u, h) in histories.iter().enumerate() {
            let mut s = h.clone();
            s.sort_unstable();
            s.dedup();
            if let Some(&bad) = s.iter().find(|&&i| i == 0 || i as usize > num_items) {
                return Err(DataError::Invalid(format!(
                    "user {}: training item {bad} is outside 1..={num_items}",
                    u + 1
                )));
            }
            if s.len() >= num_items {
                return Err(DataError::Invalid(format!(
                    "user {}: the training history covers all {num_items} items, so no negative can be drawn",
                    u + 1
                )));
            }
            sorted.push(s);
        }
        Ok(NegativeSampler {
            num_items,
            histories: sorted,
        })
    }

    pub fn num_items(&self) -> usize {
        self.num_items
    }

    /// Fills `out` with items drawn uniformly (with replacement) from those outside the training history of
    /// dense user `user` (1-based; panics if out of range, a caller bug).
    pub fn sample(&self, rng: &mut Rng, user: u32, out: &mut [u32]) {
        let history = &self.histories[user as usize - 1];
        for slot in out.iter_mut() {
            *slot = loop {
                let i = 1 + rng.below(self.num_items as u64) as u32;
                if history.binary_search(&i).is_err() {
                    break i;
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negatives_avoid_the_training_history_and_reach_every_other_item() {
        let histories = vec![vec![3, 1, 3, 4], vec![2]];
        let s = NegativeSampler::new(6, &histories).unwrap();
        let mut rng = Rng::new(5);
        let mut out = [0u32; 2000];
        s.sample(&mut rng, 1, &mut out);
        let mut seen = [0usize; 7];
        for &i in &out {
            seen[i as usize] += 1;
        }
        assert_eq!((seen[0], seen[1], seen[3], seen[4]), (0, 0, 0, 0));
        for i in [2, 5, 6] {
            assert!((550..780).contains(&seen[i]), "roughly uniform: {seen:?}");
        }
        s.sample(&mut rng, 2, &mut out);
        assert!(out.iter().all(|&i| i != 2 && (1..=6).contains(&i)));
    }

    #[test]
    fn negatives_are_reproducible_from_the_rng_state() {
        let s = NegativeSampler::new(50, &[vec![1, 2, 3]]).unwrap();
        let (mut a, mut b) = ([0u32; 16], [0u32; 16]);
        s.sample(&mut Rng::new(9), 1, &mut a);
        s.sample(&mut Rng::new(9), 1, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn full_or_out_of_range_histories_are_refused() {
        let msg = NegativeSampler::new(3, &[vec![1], vec![3, 2, 1, 2]])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("user 2") && msg.contains("covers all 3 items"),
            "{msg}"
        );
        let msg = NegativeSampler::new(3, &[vec![4]]).unwrap_err().to_string();
        assert!(msg.contains("item 4 is outside 1..=3"), "{msg}");
    }
}
