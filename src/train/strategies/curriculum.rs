//! Auxiliary loss weights per step: fixed (the baseline) or the seed's curriculum (Strategy 2).
//!
//! The curriculum, with `progress = step / total_steps` and targets `(c, k, d)` = (0.1, 0.2, 0.05) for
//! (consistency, contrastive, diversity); retrieval is always 1.0:
//! - `step < warmup`: no auxiliary terms;
//! - `progress < 0.3`: consistency `c·α`, `α = (step − warmup) / (0.3·total − warmup)`;
//! - `progress < 0.6`: consistency `c`, contrastive `k·α`, `α = (progress − 0.3) / 0.3`;
//! - otherwise: consistency `c`, contrastive `k`, diversity `d·α`, `α = (progress − 0.6) / 0.4`, held at 1
//!   past the end (every `α` is clamped to [0, 1]).
//!
//! The seed hard-codes `total_steps = 100000, warmup = 2000`, but a whole four-stage run on ML-100K has about
//! 1,200 steps, so it would never leave warm-up (reference-model.md §11). [`Curriculum::scaled`] takes the
//! run's real step count and keeps the seed's ratio: warm-up = 2 % of the total (rounded down).

use serde::{Deserialize, Serialize};

/// The weight of each loss term at one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    pub retrieval: f32,
    pub consistency: f32,
    pub contrastive: f32,
    pub diversity: f32,
}

/// The seed's curriculum over the run's steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curriculum {
    pub total_steps: usize,
    pub warmup_steps: usize,
    /// Final (consistency, contrastive, diversity) weights.
    pub targets: (f32, f32, f32),
}

impl Curriculum {
    /// Targets of the seed (= the `MultiModalRetrievalLoss` defaults).
    pub const TARGETS: (f32, f32, f32) = (0.1, 0.2, 0.05);

    /// The curriculum over `total_steps` (at least 1) with warm-up = 2 % of it, rounded down — the seed's
    /// 2,000 of 100,000 scaled to the run.
    pub fn scaled(total_steps: usize) -> Curriculum {
        let total_steps = total_steps.max(1);
        Curriculum {
            total_steps,
            warmup_steps: total_steps / 50,
            targets: Self::TARGETS,
        }
    }

    /// The weights at `step` (a global step counted over the steps the curriculum covers).
    pub fn at(&self, step: usize) -> Weights {
        let (c, k, d) = self.targets;
        let total = self.total_steps.max(1) as f64;
        let warmup = self.warmup_steps as f64;
        let s = step as f64;
        let progress = s / total;
        let clamp = |a: f64| {
            if a.is_finite() {
                a.clamp(0.0, 1.0)
            } else {
                1.0
            }
        };
        let (cons, contr, div) = if step < self.warmup_steps {
            (0.0, 0.0, 0.0)
        } else if progress < 0.3 {
            let a = clamp((s - warmup) / (0.3 * total - warmup));
            (c as f64 * a, 0.0, 0.0)
        } else if progress < 0.6 {
            let a = clamp((progress - 0.3) / 0.3);
            (c as f64, k as f64 * a, 0.0)
        } else {
            let a = clamp((progress - 0.6) / 0.4);
            (c as f64, k as f64, d as f64 * a)
        };
        Weights {
            retrieval: 1.0,
            consistency: cons as f32,
            contrastive: contr as f32,
            diversity: div as f32,
        }
    }
}

/// The loss-weight policy of a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LossWeights {
    /// The same weights at every step (baseline: 0.1, 0.1, 0.01).
    Fixed {
        consistency: f32,
        contrastive: f32,
        diversity: f32,
    },
    Curriculum(Curriculum),
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights::fixed()
    }
}

impl LossWeights {
    /// The baseline's fixed weights: consistency 0.1, contrastive 0.1, diversity 0.01.
    pub fn fixed() -> Self {
        LossWeights::Fixed {
            consistency: 0.1,
            contrastive: 0.1,
            diversity: 0.01,
        }
    }

    /// The curriculum scaled to `total_steps` (see [`Curriculum::scaled`]).
    pub fn curriculum(total_steps: usize) -> Self {
        LossWeights::Curriculum(Curriculum::scaled(total_steps))
    }

    pub fn at(&self, step: usize) -> Weights {
        match *self {
            LossWeights::Fixed {
                consistency,
                contrastive,
                diversity,
            } => Weights {
                retrieval: 1.0,
                consistency,
                contrastive,
                diversity,
            },
            LossWeights::Curriculum(c) => c.at(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(step: usize, c: &Curriculum) -> (f32, f32, f32, f32) {
        let w = c.at(step);
        (w.retrieval, w.consistency, w.contrastive, w.diversity)
    }

    fn close(a: (f32, f32, f32, f32), b: (f32, f32, f32, f32)) {
        let d = [(a.0 - b.0), (a.1 - b.1), (a.2 - b.2), (a.3 - b.3)];
        assert!(d.iter().all(|x| x.abs() < 1e-6), "{a:?} vs {b:?}");
    }

    #[test]
    fn fixed_is_the_baseline() {
        let f = LossWeights::fixed();
        for step in [0, 7, 1_000_000] {
            assert_eq!(
                f.at(step),
                Weights {
                    retrieval: 1.0,
                    consistency: 0.1,
                    contrastive: 0.1,
                    diversity: 0.01
                }
            );
        }
    }

    #[test]
    fn scaled_keeps_the_two_percent_warmup() {
        assert_eq!(Curriculum::scaled(100_000).warmup_steps, 2_000);
        assert_eq!(Curriculum::scaled(1_000).warmup_steps, 20);
        assert_eq!(Curriculum::scaled(1_200).warmup_steps, 24);
        assert_eq!(Curriculum::scaled(49).warmup_steps, 0);
        assert_eq!(Curriculum::scaled(0).total_steps, 1);
    }

    #[test]
    fn weights_by_hand_over_1000_steps() {
        // total 1000, warm-up 20; phase 1 is steps 20..300 (α over 280 steps), phase 2 300..600, phase 3 600..
        let c = Curriculum::scaled(1_000);
        close(w(0, &c), (1.0, 0.0, 0.0, 0.0));
        close(w(19, &c), (1.0, 0.0, 0.0, 0.0)); // last warm-up step
        close(w(20, &c), (1.0, 0.0, 0.0, 0.0)); // phase 1 starts at α = 0
        close(w(160, &c), (1.0, 0.05, 0.0, 0.0)); // α = 140/280
        close(w(299, &c), (1.0, 0.1 * 279.0 / 280.0, 0.0, 0.0));
        close(w(300, &c), (1.0, 0.1, 0.0, 0.0)); // phase 2 boundary: α = 0
        close(w(450, &c), (1.0, 0.1, 0.1, 0.0)); // α = 0.5
        close(w(599, &c), (1.0, 0.1, 0.2 * 299.0 / 300.0, 0.0));
        close(w(600, &c), (1.0, 0.1, 0.2, 0.0)); // phase 3 boundary
        close(w(800, &c), (1.0, 0.1, 0.2, 0.025)); // α = 0.5
        close(w(1_000, &c), (1.0, 0.1, 0.2, 0.05));
        close(w(5_000, &c), (1.0, 0.1, 0.2, 0.05)); // past the end: held
        assert_eq!(LossWeights::curriculum(1_000).at(450), c.at(450));
    }

    #[test]
    fn seed_defaults_never_leave_warmup_in_a_short_run() {
        // Why scaling matters: the seed's 100,000/2,000 over a 1,200-step run gives no auxiliary term at all.
        let seed = Curriculum {
            total_steps: 100_000,
            warmup_steps: 2_000,
            targets: Curriculum::TARGETS,
        };
        assert!((0..1_200).all(|s| seed.at(s).consistency == 0.0));
    }

    #[test]
    fn round_trips_through_serde() {
        let c = LossWeights::curriculum(1_234);
        let back: LossWeights = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
