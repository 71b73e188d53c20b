//! The MoCo-style memory bank (seed Strategy 3): a FIFO ring of L2-normalised contrastive keys.
//!
//! The trainer owns two of them, text and visual. Each slot stores its key, the dense user id it came from
//! (0 = none: the random initial rows, never masked) and the global step it was written at, so that
//! - keys of the query's own user can be excluded as false negatives ([`MemoryBank::excluded_for`]),
//! - the queue's age can be logged ([`MemoryBank::age_stats`]),
//! - the whole state (keys, users, steps, pointer) goes into a checkpoint and comes back with it (keys from
//!   a discarded model must not survive a best-checkpoint reload; mission §10).
//!
//! Enqueueing works for any batch size (no `size % batch == 0` rule): rows wrap around the end of the ring,
//! and a batch larger than the ring leaves exactly its last `size` rows, where writing the rows one by one
//! would have left them.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// A ring queue of `size` keys of `dim` values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryBank {
    pub size: usize,
    pub dim: usize,
    /// `size * dim` values, slot-major.
    pub keys: Vec<f32>,
    /// Dense user id per slot (0: an initial random row).
    pub users: Vec<u32>,
    /// Global step at which each slot was written (0 for initial rows).
    pub steps: Vec<u64>,
    /// Next slot to write.
    pub ptr: usize,
    /// Slots written by [`MemoryBank::enqueue`] so far, at most `size`.
    pub filled: usize,
}

/// Most slots a default bank gets (the seed's size).
pub const MAX_DEFAULT_SIZE: usize = 65_536;

impl MemoryBank {
    /// A bank of `size` rows initialised with L2-normalised standard-normal rows (the seed's init), user 0.
    pub fn new(size: usize, dim: usize, rng: &mut Rng) -> MemoryBank {
        assert!(
            size >= 1 && dim >= 1,
            "memory bank: size and dim must be >= 1"
        );
        let mut keys: Vec<f32> = (0..size * dim).map(|_| rng.normal()).collect();
        l2_normalize_rows(&mut keys, dim);
        MemoryBank {
            size,
            dim,
            keys,
            users: vec![0; size],
            steps: vec![0; size],
            ptr: 0,
            filled: 0,
        }
    }

    /// The default size: the smallest power of two strictly above `num_users`, at most 65,536 — the seed's
    /// 65,536 would hold ~70 stale copies of each ML-100K user (reference-model.md §11 (iii)).
    pub fn default_size(num_users: usize) -> usize {
        (num_users + 1).next_power_of_two().min(MAX_DEFAULT_SIZE)
    }

    /// Writes `users.len()` rows of `keys` (each `dim` values, already L2-normalised and detached) at the
    /// pointer, wrapping around; all carry `step`.
    pub fn enqueue(&mut self, keys: &[f32], users: &[u32], step: u64) {
        let b = users.len();
        assert_eq!(
            keys.len(),
            b * self.dim,
            "memory bank enqueue: {} key values for {b} users of dim {}",
            keys.len(),
            self.dim
        );
        let d = self.dim;
        let slots: Vec<(usize, usize)> = self.destinations(b).collect();
        for (r, slot) in slots {
            self.keys[slot * d..(slot + 1) * d].copy_from_slice(&keys[r * d..(r + 1) * d]);
        }
        self.record(users, step);
    }

    /// `(batch row, slot)` of each row an enqueue of `b` rows writes: row `r` goes to slot
    /// `(ptr + r) mod size`, except the first `b − size` rows, which later rows of the same batch would
    /// overwrite (so the surviving rows land in distinct slots). `Backend::ring_enqueue` implements the same
    /// rule on the device.
    pub fn destinations(&self, b: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (b.saturating_sub(self.size)..b).map(move |r| (r, (self.ptr + r) % self.size))
    }

    /// The bookkeeping of an enqueue of `users.len()` rows — slot users and steps, pointer, fill — without the
    /// keys (a [`super::DeviceBank`] writes those on the device).
    pub fn record(&mut self, users: &[u32], step: u64) {
        let b = users.len();
        let slots: Vec<(usize, usize)> = self.destinations(b).collect();
        for (r, slot) in slots {
            self.users[slot] = users[r];
            self.steps[slot] = step;
        }
        self.ptr = (self.ptr + b) % self.size;
        self.filled = (self.filled + b).min(self.size);
    }

    /// The key in `slot`.
    pub fn key(&self, slot: usize) -> &[f32] {
        &self.keys[slot * self.dim..(slot + 1) * self.dim]
    }

    /// Mean and maximum age (`now − step written`) over the slots written so far; `(0.0, 0)` before any.
    /// Writes go to slots `0, 1, 2, …` from an empty bank, so until the ring is full these are `0..filled`.
    pub fn age_stats(&self, now: u64) -> (f64, u64) {
        if self.filled == 0 {
            return (0.0, 0);
        }
        let ages = self.steps[..self.filled]
            .iter()
            .map(|&s| now.saturating_sub(s));
        let (sum, max) = ages.fold((0u128, 0u64), |(s, m), a| (s + a as u128, m.max(a)));
        (sum as f64 / self.filled as f64, max)
    }

    /// Per slot, whether it must be excluded for a query of dense user `user`: it holds a key of the same
    /// user (a false negative). User 0 (initial rows, or "unknown") never matches.
    pub fn excluded_for(&self, user: u32) -> impl Iterator<Item = bool> + '_ {
        self.users.iter().map(move |&u| user != 0 && u == user)
    }

    /// The number of slots [`MemoryBank::excluded_for`] excludes for `user`.
    pub fn count_same_user(&self, user: u32) -> usize {
        self.excluded_for(user).filter(|&x| x).count()
    }
}

/// Scales each row of `dim` values to unit L2 norm (a zero row stays zero).
pub fn l2_normalize_rows(values: &mut [f32], dim: usize) {
    for row in values.chunks_mut(dim) {
        let n = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        if n > 0.0 {
            let inv = (1.0 / n) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key rows whose first value encodes `(user, index)` so slots can be identified.
    fn batch(users: &[u32], dim: usize) -> Vec<f32> {
        users
            .iter()
            .enumerate()
            .flat_map(|(i, &u)| {
                (0..dim).map(move |j| {
                    if j == 0 {
                        u as f32 * 100.0 + i as f32
                    } else {
                        0.5
                    }
                })
            })
            .collect()
    }

    /// The one-row-at-a-time reference.
    fn naive(bank: &mut MemoryBank, keys: &[f32], users: &[u32], step: u64) {
        for (i, &u) in users.iter().enumerate() {
            let p = bank.ptr;
            bank.keys[p * bank.dim..(p + 1) * bank.dim]
                .copy_from_slice(&keys[i * bank.dim..(i + 1) * bank.dim]);
            bank.users[p] = u;
            bank.steps[p] = step;
            bank.ptr = (p + 1) % bank.size;
            bank.filled = (bank.filled + 1).min(bank.size);
        }
    }

    #[test]
    fn default_size_is_a_power_of_two_above_the_users() {
        assert_eq!(MemoryBank::default_size(938), 1024);
        assert_eq!(MemoryBank::default_size(1023), 1024);
        assert_eq!(MemoryBank::default_size(1024), 2048);
        assert_eq!(MemoryBank::default_size(0), 1);
        assert_eq!(MemoryBank::default_size(31_013), 32_768);
        assert_eq!(MemoryBank::default_size(1_000_000), 65_536);
    }

    #[test]
    fn initial_rows_are_unit_and_unowned() {
        let b = MemoryBank::new(16, 8, &mut Rng::new(1));
        for s in 0..16 {
            let n: f32 = b.key(s).iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-5, "slot {s}: {n}");
        }
        assert!(b.users.iter().all(|&u| u == 0));
        assert_eq!((b.ptr, b.filled), (0, 0));
        assert_eq!(b.age_stats(100), (0.0, 0));
        assert_eq!(b.count_same_user(0), 0, "user 0 never masks");
    }

    #[test]
    fn wraps_when_the_batch_does_not_divide_the_size() {
        // size 8, batches of 3: pointer 3, 6, 1 (wrapped: rows 2 of batch 3 at slots 6,7 then 0), 4.
        let mut b = MemoryBank::new(8, 2, &mut Rng::new(2));
        let mut r = b.clone();
        let mut ptrs = vec![];
        for step in 1..=4u64 {
            let users: Vec<u32> = (0..3).map(|i| (step * 10 + i) as u32).collect();
            let keys = batch(&users, 2);
            b.enqueue(&keys, &users, step);
            naive(&mut r, &keys, &users, step);
            assert_eq!(b, r, "after batch {step}");
            ptrs.push(b.ptr);
        }
        assert_eq!(ptrs, vec![3, 6, 1, 4]);
        assert_eq!(b.filled, 8);
        // Slots 0 holds the third row of batch 3; slots 1..4 batch 4; 4,5 still batch 2's last rows.
        assert_eq!(b.users, vec![32, 40, 41, 42, 21, 22, 30, 31]);
        assert_eq!(b.steps, vec![3, 4, 4, 4, 2, 2, 3, 3]);
        assert_eq!(b.key(0)[0], 32.0 * 100.0 + 2.0);
    }

    #[test]
    fn a_batch_larger_than_the_bank_keeps_its_last_rows() {
        let mut b = MemoryBank::new(4, 3, &mut Rng::new(3));
        b.enqueue(&batch(&[1], 3), &[1], 1); // ptr 1
        let users: Vec<u32> = (100..110).collect(); // 10 rows into 4 slots
        let keys = batch(&users, 3);
        let mut r = b.clone();
        b.enqueue(&keys, &users, 2);
        naive(&mut r, &keys, &users, 2);
        assert_eq!(b, r);
        assert_eq!(b.ptr, (1 + 10) % 4);
        let mut kept = b.users.clone();
        kept.sort();
        assert_eq!(kept, vec![106, 107, 108, 109]);
        // The last row sits just before the pointer.
        assert_eq!(b.users[(b.ptr + 3) % 4], 109);
        assert_eq!(b.filled, 4);
        // Exactly the bank's size also works and leaves the pointer in place.
        let users: Vec<u32> = (200..204).collect();
        let p = b.ptr;
        b.enqueue(&batch(&users, 3), &users, 3);
        assert_eq!(b.ptr, p);
    }

    #[test]
    fn masks_same_user_slots() {
        let mut b = MemoryBank::new(6, 2, &mut Rng::new(4));
        b.enqueue(&batch(&[5, 7, 5], 2), &[5, 7, 5], 1);
        let m: Vec<bool> = b.excluded_for(5).collect();
        assert_eq!(m, vec![true, false, true, false, false, false]);
        assert_eq!(b.count_same_user(7), 1);
        assert_eq!(b.count_same_user(9), 0);
        assert_eq!(
            b.count_same_user(0),
            0,
            "random rows (user 0) are never excluded"
        );
    }

    #[test]
    fn ages_over_written_slots() {
        let mut b = MemoryBank::new(5, 1, &mut Rng::new(5));
        b.enqueue(&[1.0, 1.0], &[1, 2], 10);
        b.enqueue(&[1.0], &[3], 14);
        // slots 0,1 at step 10, slot 2 at 14; now 20 → ages 10, 10, 6.
        let (mean, max) = b.age_stats(20);
        assert!((mean - 26.0 / 3.0).abs() < 1e-12);
        assert_eq!(max, 10);
        b.enqueue(&[1.0; 4], &[4, 5, 6, 7], 18); // wraps: slots 3, 4, 0, 1 at 18
        assert_eq!(b.age_stats(20), ((2.0 * 4.0 + 6.0) / 5.0, 6));
    }

    #[test]
    fn state_round_trips() {
        let mut b = MemoryBank::new(4, 2, &mut Rng::new(6));
        b.enqueue(&batch(&[1, 2, 3], 2), &[1, 2, 3], 9);
        let back: MemoryBank = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }
}
