//! The built-in synthetic data set: sequences with learnable structure and side features that carry it.
//!
//! Every user and item has a latent factor vector. A sequence starts from the user's long-term preference
//! (a softmax over items of user·item affinity plus a popularity bias) and then, at each step, either
//! follows the last item's Markov transition (to one of a few latent-similar successors) or draws afresh
//! from the preference. No item repeats within a sequence, like ratings data. The text, visual and
//! user-text features are noisy projections of the same factors, so each tower has signal to learn.

use super::{Dataset, Features};
use crate::rng::Rng;

/// Size, structure and seed of the synthetic data set.
#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    pub users: usize,
    pub items: usize,
    pub latent_dim: usize,
    /// Sequence lengths are uniform in `min_len..=max_len` (capped at `items`).
    pub min_len: usize,
    pub max_len: usize,
    /// Probability that a step follows the Markov transition of the last item rather than the preference.
    pub markov_weight: f32,
    pub text_dim: usize,
    pub visual_dim: usize,
    /// Standard deviation of the feature noise, relative to the projected signal's (about 1 per entry).
    pub feature_noise: f32,
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            users: 1000,
            items: 500,
            latent_dim: 16,
            min_len: 12,
            max_len: 40,
            markov_weight: 0.6,
            text_dim: 384,
            visual_dim: 128,
            feature_noise: 0.5,
            seed: 42,
        }
    }
}

/// How strongly user·item affinity (a unit-variance score) drives the preference softmax.
const PREFERENCE_SHARPNESS: f64 = 2.0;
/// Popularity bias `-POPULARITY_SKEW * ln(rank)`: a Zipf-like head of popular items.
const POPULARITY_SKEW: f64 = 0.6;
/// Each item's successors are the most latent-similar of this many random items ...
const SUCCESSOR_POOL: usize = 24;
/// ... taken with these probabilities (most similar first).
const SUCCESSOR_WEIGHTS: [f32; 3] = [0.6, 0.3, 0.1];

/// Generates the data set; everything is determined by `cfg` (each part from its own seeded stream, so
/// changing a feature size does not change the sequences).
pub fn synthetic(cfg: &SyntheticConfig) -> Dataset {
    let d = cfg.latent_dim.max(1);
    let mut rng = Rng::derive(cfg.seed, "synthetic-factors");
    let user_f: Vec<f32> = (0..cfg.users * d).map(|_| rng.normal()).collect();
    let item_f: Vec<f32> = (0..cfg.items * d).map(|_| rng.normal()).collect();
    let dot =
        |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (d as f32).sqrt();
    let item = |i: usize| &item_f[i * d..(i + 1) * d];

    let mut rank: Vec<usize> = (1..=cfg.items).collect();
    rng.shuffle(&mut rank);
    let popularity: Vec<f64> = rank
        .iter()
        .map(|&r| -POPULARITY_SKEW * (r as f64).ln())
        .collect();

    let successors: Vec<Vec<usize>> = (0..cfg.items)
        .map(|i| {
            let mut pool: Vec<(f32, usize)> = (0..SUCCESSOR_POOL.min(cfg.items.saturating_sub(1)))
                .map(|_| {
                    // Any item but `i` itself.
                    let j = (i + 1 + rng.below(cfg.items as u64 - 1) as usize) % cfg.items;
                    (dot(item(i), item(j)), j)
                })
                .collect();
            pool.sort_by(|a, b| b.0.total_cmp(&a.0));
            pool.dedup_by_key(|p| p.1);
            pool.into_iter()
                .take(SUCCESSOR_WEIGHTS.len())
                .map(|p| p.1)
                .collect()
        })
        .collect();

    let mut rng = Rng::derive(cfg.seed, "synthetic-sequences");
    let max_len = cfg.max_len.min(cfg.items);
    let min_len = cfg.min_len.min(max_len);
    let mut used = vec![false; cfg.items];
    let mut cumulative = vec![0f64; cfg.items];
    let sequences: Vec<Vec<u32>> = (0..cfg.users)
        .map(|u| {
            let uf = &user_f[u * d..(u + 1) * d];
            let logits: Vec<f64> = (0..cfg.items)
                .map(|i| PREFERENCE_SHARPNESS * dot(uf, item(i)) as f64 + popularity[i])
                .collect();
            let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut acc = 0.0;
            for (c, l) in cumulative.iter_mut().zip(&logits) {
                acc += (l - top).exp();
                *c = acc;
            }
            let len = min_len + rng.below((max_len - min_len + 1) as u64) as usize;
            let mut seq: Vec<usize> = Vec::with_capacity(len);
            while seq.len() < len {
                let follow = seq.last().filter(|_| rng.uniform() < cfg.markov_weight);
                let next =
                    follow.and_then(|&last| pick_successor(&mut rng, &successors[last], &used));
                // Rejection on used items terminates: unused items remain (len <= items) and all have mass.
                let next = next.unwrap_or_else(|| loop {
                    let x = rng.uniform_f64() * acc;
                    let i = cumulative.partition_point(|&c| c <= x).min(cfg.items - 1);
                    if !used[i] {
                        break i;
                    }
                });
                used[next] = true;
                seq.push(next);
            }
            for &i in &seq {
                used[i] = false;
            }
            seq.into_iter().map(|i| i as u32 + 1).collect()
        })
        .collect();

    let mut ds = Dataset::from_sequences("synthetic", cfg.items, sequences);
    let text = Rng::derive(cfg.seed, "synthetic-text-projection");
    ds.item_text = Some(project(
        &item_f,
        d,
        cfg.text_dim,
        cfg.feature_noise,
        text.clone(),
        Rng::derive(cfg.seed, "synthetic-item-text"),
    ));
    ds.item_visual = Some(project(
        &item_f,
        d,
        cfg.visual_dim,
        cfg.feature_noise,
        Rng::derive(cfg.seed, "synthetic-visual-projection"),
        Rng::derive(cfg.seed, "synthetic-item-visual"),
    ));
    // Users use the item-text projection: a preference text lives in the same sentence-embedding space as
    // item descriptions, so user_text·item_text tracks user·item affinity.
    ds.user_text = Some(project(
        &user_f,
        d,
        cfg.text_dim,
        cfg.feature_noise,
        text,
        Rng::derive(cfg.seed, "synthetic-user-text"),
    ));
    ds
}

/// A successor of the last item by [`SUCCESSOR_WEIGHTS`], among those not yet in the sequence.
fn pick_successor(rng: &mut Rng, successors: &[usize], used: &[bool]) -> Option<usize> {
    let free = || {
        successors
            .iter()
            .zip(SUCCESSOR_WEIGHTS)
            .filter(|(&j, _)| !used[j])
    };
    let total: f32 = free().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return None;
    }
    let mut x = rng.uniform() * total;
    let mut last = None;
    for (&j, w) in free() {
        last = Some(j);
        if x < w {
            break;
        }
        x -= w;
    }
    last
}

/// `rows` (`count x d` factors) through a random `d x dim` projection with unit-variance output, plus
/// noise, L2-normalised per row like sentence embeddings. Row 0 is the padding row.
fn project(
    factors: &[f32],
    d: usize,
    dim: usize,
    noise: f32,
    mut proj_rng: Rng,
    mut noise_rng: Rng,
) -> Features {
    let count = factors.len() / d;
    let scale = 1.0 / (d as f32).sqrt();
    let proj: Vec<f32> = (0..d * dim).map(|_| proj_rng.normal() * scale).collect();
    let mut rows = vec![0f32; (count + 1) * dim];
    for (r, f) in factors.chunks_exact(d).enumerate() {
        let row = &mut rows[(r + 1) * dim..(r + 2) * dim];
        for (k, &x) in f.iter().enumerate() {
            for (o, p) in row.iter_mut().zip(&proj[k * dim..(k + 1) * dim]) {
                *o += x * p;
            }
        }
        for o in row.iter_mut() {
            *o += noise * noise_rng.normal();
        }
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    }
    let mut present = vec![true; count + 1];
    present[0] = false;
    Features { dim, rows, present }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{eval_negatives, leave_one_out};
    use std::collections::HashMap;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            users: 300,
            items: 200,
            ..Default::default()
        }
    }

    #[test]
    fn synthetic_is_deterministic_and_well_formed() {
        let cfg = small();
        let a = synthetic(&cfg);
        let b = synthetic(&cfg);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(
            a.item_text.as_ref().unwrap().rows,
            b.item_text.as_ref().unwrap().rows
        );
        assert_ne!(
            a.fingerprint,
            synthetic(&SyntheticConfig {
                seed: 43,
                ..cfg.clone()
            })
            .fingerprint
        );
        // Feature sizes do not change the sequences.
        assert_eq!(
            a.fingerprint,
            synthetic(&SyntheticConfig {
                text_dim: 8,
                ..cfg.clone()
            })
            .fingerprint
        );

        assert_eq!(
            (a.name.as_str(), a.num_users, a.num_items),
            ("synthetic", 300, 200)
        );
        assert_eq!(a.item_original[199], "200");
        for s in &a.sequences {
            assert!((12..=40).contains(&s.len()));
            let mut u = s.clone();
            u.sort_unstable();
            u.dedup();
            assert_eq!(u.len(), s.len(), "no repeats");
            assert!(s.iter().all(|&i| (1..=200).contains(&i)));
        }
        for (f, count, dim) in [
            (&a.item_text, 200, 384),
            (&a.item_visual, 200, 128),
            (&a.user_text, 300, 384),
        ] {
            let f = f.as_ref().unwrap();
            assert_eq!(
                (f.dim, f.rows.len(), f.present.len()),
                (dim, (count + 1) * dim, count + 1)
            );
            assert!(!f.present[0] && f.present[1..].iter().all(|&p| p));
            assert!(f.rows[..dim].iter().all(|&x| x == 0.0));
            for row in f.rows.chunks_exact(dim).skip(1) {
                let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-4);
            }
        }
    }

    /// Sampled Hit@10 (target among the 99 frozen negatives) of a scorer, ties counted against the target.
    fn hit_at_10(ds: &Dataset, score: impl Fn(usize, u32) -> f64) -> f64 {
        let split = leave_one_out(ds).unwrap();
        let negs = eval_negatives(ds, 1, 99).unwrap();
        let hits = (0..ds.num_users)
            .filter(|&u| {
                let t = score(u, split.test[u]);
                negs[u].iter().filter(|&&n| score(u, n) >= t).count() < 10
            })
            .count();
        hits as f64 / ds.num_users as f64
    }

    #[test]
    fn synthetic_sequences_carry_markov_and_preference_signal() {
        let ds = synthetic(&SyntheticConfig::default());
        let split = leave_one_out(&ds).unwrap();
        // Counted on the training split only; at test time the last input item is the validation item.
        let mut bigram: HashMap<(u32, u32), f64> = HashMap::new();
        let mut popularity = vec![0f64; ds.num_items + 1];
        for s in &split.train {
            for w in s.windows(2) {
                *bigram.entry((w[0], w[1])).or_default() += 1.0;
            }
            for &i in s {
                popularity[i as usize] += 1.0;
            }
        }
        let total: f64 = popularity.iter().sum();
        let pop = |i: u32| popularity[i as usize] / total;
        let pop_hit = hit_at_10(&ds, |_, i| pop(i));
        let bigram_hit = hit_at_10(&ds, |u, i| {
            bigram.get(&(split.valid[u], i)).copied().unwrap_or(0.0) + pop(i)
        });
        // Item text features know the latent factors: cosine to the last item finds its similar successors.
        let text = ds.item_text.as_ref().unwrap();
        let row = |i: u32| &text.rows[i as usize * text.dim..(i as usize + 1) * text.dim];
        let cos = |a: u32, b: u32| {
            row(a)
                .iter()
                .zip(row(b))
                .map(|(x, y)| (x * y) as f64)
                .sum::<f64>()
        };
        let text_hit = hit_at_10(&ds, |u, i| cos(split.valid[u], i));
        eprintln!("synthetic Hit@10 (chance 0.10): popularity {pop_hit:.3}, bigram {bigram_hit:.3}, text {text_hit:.3}");
        assert!(pop_hit > 0.15, "popularity skew: {pop_hit}");
        assert!(bigram_hit > 0.45, "Markov structure: {bigram_hit}");
        assert!(text_hit > 0.2, "text features: {text_hit}");
    }
}
