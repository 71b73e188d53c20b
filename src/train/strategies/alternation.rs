//! Stage-3 alternation: which tower trains at a step.
//!
//! - [`ParityAlternation`]: the reference's rule — even steps train SASRec, odd steps the retriever.
//! - [`AdaptiveAlternation`]: the seed's Strategy 1, plateau detection. Both towers' losses (measured
//!   before the step: BPR for SASRec, retrieval BCE for the retriever) are recorded every step; the active
//!   tower trains for at least `min_steps` steps; then, when its loss has stopped changing, the other tower
//!   takes over and the counter resets.
//!
//!   Two rules decide "stopped changing":
//!   - [`AdaptiveRule::Smoothed`] (the default): each tower's loss is smoothed by an exponential moving
//!     average `e ← ema·e + (1 − ema)·l` (the first value initialises `e`). The decision compares the active
//!     tower's smoothed loss now with its value `window` records ago: `change = |e_now − e_then| /
//!     (|e_then| + 1e-8)`. It is only evaluated once the active tower has trained for more than `window`
//!     steps, so the whole window lies inside the current training period (a frozen tower's flat loss never
//!     counts as a plateau of training). Per-batch losses move by far more than 1 % (mission §10), so the
//!     raw rule fires by chance; smoothing over a window longer than that noise does not.
//!   - [`AdaptiveRule::Faithful`]: the seed's raw rule, for reproducing it: with the last ten raw losses of
//!     the active tower available, `change = |l[-1] − l[-5]| / (l[-5] + 1e-8)`.
//!
//!   In both rules `change < threshold` switches. A non-finite loss is not recorded (the step still counts
//!   towards `min_steps`).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A tower of UR4Rec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Module {
    Sasrec,
    Retriever,
}

impl Module {
    pub fn other(self) -> Module {
        match self {
            Module::Sasrec => Module::Retriever,
            Module::Retriever => Module::Sasrec,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Module::Sasrec => "sasrec",
            Module::Retriever => "retriever",
        }
    }
    fn index(self) -> usize {
        match self {
            Module::Sasrec => 0,
            Module::Retriever => 1,
        }
    }
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A switch of the active tower, decided after recording the losses of `step`; `to` trains from `step + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchEvent {
    pub step: usize,
    pub from: Module,
    pub to: Module,
    /// The relative change that fell below the threshold.
    pub change: f32,
}

/// The reference's alternation: even steps train SASRec, odd steps the retriever.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParityAlternation;

impl ParityAlternation {
    pub fn active(&self, step: usize) -> Module {
        if step.is_multiple_of(2) {
            Module::Sasrec
        } else {
            Module::Retriever
        }
    }
}

/// How [`AdaptiveAlternation`] decides that the active tower has plateaued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaptiveRule {
    /// Relative change of the EMA-smoothed loss over `window` steps, all inside the current period.
    Smoothed,
    /// The seed's rule on raw losses: `|l[-1] − l[-5]| / (l[-5] + 1e-8)`, ten losses needed first.
    Faithful,
}

/// Raw losses the faithful rule needs before it decides (the seed's "last 10 losses").
const FAITHFUL_HISTORY: usize = 10;

/// Plateau-driven alternation (seed Strategy 1). Starts with SASRec, as the parity rule does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveAlternation {
    /// Switch when the relative change falls below this (seed: 0.01).
    pub threshold: f32,
    /// The active tower trains at least this many steps (seed recommendation: 10).
    pub min_steps: usize,
    /// Smoothed rule: the change is measured over this many steps (>= 1).
    pub window: usize,
    /// Smoothed rule: EMA decay in [0, 1).
    pub ema: f32,
    pub rule: AdaptiveRule,
    active: Module,
    steps_in_module: usize,
    /// Current EMA per tower (`None` before its first finite loss).
    smoothed: [Option<f32>; 2],
    /// Per tower: the last `window + 1` smoothed values (smoothed rule) or the last ten raw losses (faithful).
    history: [VecDeque<f32>; 2],
    switches: usize,
}

impl Default for AdaptiveAlternation {
    /// Threshold 0.01 and 10 steps minimum (the seed's recommendation), smoothed over an EMA of decay 0.95
    /// (time constant 20 steps) compared across a 20-step window.
    fn default() -> Self {
        AdaptiveAlternation::smoothed(0.01, 10, 20, 0.95)
    }
}

impl AdaptiveAlternation {
    /// The smoothed rule. Panics on `window == 0` or `ema` outside [0, 1) (configuration is validated earlier).
    pub fn smoothed(threshold: f32, min_steps: usize, window: usize, ema: f32) -> Self {
        assert!(window >= 1, "adaptive alternation: window must be >= 1");
        assert!(
            (0.0..1.0).contains(&ema),
            "adaptive alternation: ema decay must be in [0, 1), got {ema}"
        );
        Self::with_rule(threshold, min_steps, window, ema, AdaptiveRule::Smoothed)
    }

    /// The seed's raw rule (for the faithful configuration).
    pub fn faithful(threshold: f32, min_steps: usize) -> Self {
        Self::with_rule(threshold, min_steps, 4, 0.0, AdaptiveRule::Faithful)
    }

    fn with_rule(
        threshold: f32,
        min_steps: usize,
        window: usize,
        ema: f32,
        rule: AdaptiveRule,
    ) -> Self {
        AdaptiveAlternation {
            threshold,
            min_steps,
            window,
            ema,
            rule,
            active: Module::Sasrec,
            steps_in_module: 0,
            smoothed: [None, None],
            history: [VecDeque::new(), VecDeque::new()],
            switches: 0,
        }
    }

    /// The tower that trains at the next step.
    pub fn active(&self) -> Module {
        self.active
    }

    /// Steps the active tower has trained since it became active.
    pub fn steps_in_module(&self) -> usize {
        self.steps_in_module
    }

    /// The current smoothed loss of a tower (smoothed rule; `None` before its first finite loss).
    pub fn smoothed_loss(&self, module: Module) -> Option<f32> {
        self.smoothed[module.index()]
    }

    /// Number of switches so far.
    pub fn switches(&self) -> usize {
        self.switches
    }

    /// Records both towers' losses of `step` (the active tower trained at this step) and decides whether the
    /// other tower trains from the next step on.
    pub fn record(
        &mut self,
        step: usize,
        sasrec_loss: f32,
        retriever_loss: f32,
    ) -> Option<SwitchEvent> {
        for (m, loss) in [
            (Module::Sasrec, sasrec_loss),
            (Module::Retriever, retriever_loss),
        ] {
            if !loss.is_finite() {
                continue;
            }
            let i = m.index();
            let (value, keep) = match self.rule {
                AdaptiveRule::Smoothed => {
                    let e = match self.smoothed[i] {
                        None => loss,
                        Some(prev) => self.ema * prev + (1.0 - self.ema) * loss,
                    };
                    self.smoothed[i] = Some(e);
                    (e, self.window + 1)
                }
                AdaptiveRule::Faithful => (loss, FAITHFUL_HISTORY),
            };
            let h = &mut self.history[i];
            h.push_back(value);
            while h.len() > keep {
                h.pop_front();
            }
        }
        self.steps_in_module += 1;
        if self.steps_in_module < self.min_steps {
            return None;
        }
        let h = &self.history[self.active.index()];
        let n = h.len();
        let change = match self.rule {
            AdaptiveRule::Smoothed => {
                if self.steps_in_module <= self.window || n <= self.window {
                    return None;
                }
                let (old, new) = (h[n - 1 - self.window] as f64, h[n - 1] as f64);
                (new - old).abs() / (old.abs() + 1e-8)
            }
            AdaptiveRule::Faithful => {
                if n < FAITHFUL_HISTORY {
                    return None;
                }
                let (old, new) = (h[n - 5] as f64, h[n - 1] as f64);
                (new - old).abs() / (old + 1e-8)
            }
        };
        if change < self.threshold as f64 {
            let from = self.active;
            self.active = from.other();
            self.steps_in_module = 0;
            self.switches += 1;
            Some(SwitchEvent {
                step,
                from,
                to: self.active,
                change: change as f32,
            })
        } else {
            None
        }
    }
}

/// The alternation in effect for stage 3.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Alternation {
    Parity(ParityAlternation),
    Adaptive(AdaptiveAlternation),
}

impl Alternation {
    /// The tower that trains at `step` (the parity rule reads the step; the adaptive rule its own state).
    pub fn active(&self, step: usize) -> Module {
        match self {
            Alternation::Parity(p) => p.active(step),
            Alternation::Adaptive(a) => a.active(),
        }
    }

    /// The next step's tower depends on this step's losses: the trainer must read each step's losses back
    /// before the next (the adaptive rule); the parity rule needs nothing from the device.
    pub fn reads_losses(&self) -> bool {
        matches!(self, Alternation::Adaptive(_))
    }

    /// Records the losses of `step`; the parity rule never reports switches (it alternates every step).
    pub fn record(
        &mut self,
        step: usize,
        sasrec_loss: f32,
        retriever_loss: f32,
    ) -> Option<SwitchEvent> {
        match self {
            Alternation::Parity(_) => None,
            Alternation::Adaptive(a) => a.record(step, sasrec_loss, retriever_loss),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `(sasrec, retriever)` losses for steps `0..n` and returns the switch events.
    fn run(
        a: &mut AdaptiveAlternation,
        n: usize,
        loss: impl Fn(usize) -> (f32, f32),
    ) -> Vec<SwitchEvent> {
        (0..n)
            .filter_map(|k| {
                let (s, r) = loss(k);
                a.record(k, s, r)
            })
            .collect()
    }

    fn steps(ev: &[SwitchEvent]) -> Vec<usize> {
        ev.iter().map(|e| e.step).collect()
    }

    #[test]
    fn parity_follows_step_parity() {
        let p = ParityAlternation;
        assert_eq!(p.active(0), Module::Sasrec);
        assert_eq!(p.active(1), Module::Retriever);
        assert_eq!(p.active(1000), Module::Sasrec);
        let mut a = Alternation::Parity(p);
        assert_eq!(a.record(0, 1.0, 1.0), None);
        assert_eq!(a.active(7), Module::Retriever);
    }

    #[test]
    fn plateau_switches_right_after_min_steps() {
        // Window 5 < min_steps 10: a flat loss switches at the 10th step of each period: steps 9, 19, 29.
        let mut a = AdaptiveAlternation::smoothed(0.01, 10, 5, 0.9);
        assert_eq!(a.active(), Module::Sasrec);
        let ev = run(&mut a, 30, |_| (1.0, 2.0));
        assert_eq!(steps(&ev), vec![9, 19, 29]);
        assert_eq!((ev[0].from, ev[0].to), (Module::Sasrec, Module::Retriever));
        assert_eq!((ev[1].from, ev[1].to), (Module::Retriever, Module::Sasrec));
        assert_eq!(ev[0].change, 0.0);
        assert_eq!(a.active(), Module::Retriever);
        assert_eq!(a.switches(), 3);
        assert_eq!(a.steps_in_module(), 0);
    }

    #[test]
    fn window_longer_than_min_steps_waits_for_the_whole_window() {
        // Window 20: the comparison needs 21 records inside the period: switches at steps 20 and 41.
        let mut a = AdaptiveAlternation::smoothed(0.01, 10, 20, 0.9);
        let ev = run(&mut a, 50, |_| (1.0, 2.0));
        assert_eq!(steps(&ev), vec![20, 41]);
    }

    #[test]
    fn steady_decline_never_switches_then_plateau_does() {
        // Loss 2 − 0.01k for k < 40, then flat at 1.6. EMA decay 0 (= the raw loss) makes the point exact:
        // the change over 5 steps is 0.05 / level ≈ 3 % while declining; then k = 42: 0.03/1.63, k = 43:
        // 0.02/1.62 = 1.23 %, k = 44: 0.01/1.61 = 0.62 % < 1 % → switch.
        let mut a = AdaptiveAlternation::smoothed(0.01, 10, 5, 0.0);
        let ev = run(&mut a, 60, |k| {
            (if k < 40 { 2.0 - 0.01 * k as f32 } else { 1.6 }, 1.0)
        });
        assert_eq!(ev[0].step, 44);
        assert_eq!(ev[0].from, Module::Sasrec);
        // The retriever is flat: it switches back after min_steps (window 5 < 10): step 54.
        assert_eq!(steps(&ev), vec![44, 54]);
    }

    /// A loss that improves by 0.01 per step with a period-5 noise larger than the trend.
    fn noisy(k: usize) -> f32 {
        const NOISE: [f32; 5] = [0.0, 0.03, -0.02, 0.04, -0.01];
        2.0 - 0.01 * k as f32 + NOISE[k % 5]
    }

    #[test]
    fn noisy_but_improving_switches_only_in_faithful_mode() {
        // Faithful: l[k] − l[k−4] = −0.04 + n[k%5] − n[(k+1)%5], which is +0.01 when k % 5 ∈ {1, 3}:
        // relative change 0.01 / ~1.9 ≈ 0.5 % < 1 %. First eligible step is k = 9 (ten losses, ten steps);
        // k = 9 (−0.05), k = 10 (−0.07) do not switch, k = 11 does. The retriever (flat 1.0) then switches
        // back after its ten steps at k = 21; SASRec's next ten steps end at k = 31 (31 % 5 = 1): switch.
        let mut f = AdaptiveAlternation::faithful(0.01, 10);
        let ev = run(&mut f, 32, |k| (noisy(k), 1.0));
        assert_eq!(steps(&ev), vec![11, 21, 31]);
        assert!(
            (ev[0].change - 0.01 / 1.91).abs() < 1e-4,
            "{}",
            ev[0].change
        );

        // Smoothed: the EMA follows the trend; its change over 10 steps is about 0.1 / level >> 1 %.
        let mut s = AdaptiveAlternation::smoothed(0.01, 10, 10, 0.9);
        let ev = run(&mut s, 150, |k| (noisy(k), 1.0));
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(s.active(), Module::Sasrec);
        assert_eq!(s.steps_in_module(), 150);
    }

    #[test]
    fn non_finite_losses_are_skipped_and_state_round_trips() {
        let mut a = AdaptiveAlternation::smoothed(0.01, 3, 2, 0.5);
        assert_eq!(a.record(0, f32::NAN, 1.0), None);
        assert_eq!(a.smoothed_loss(Module::Sasrec), None);
        assert_eq!(a.record(1, 4.0, 1.0), None);
        assert_eq!(a.record(2, 2.0, 1.0), None);
        assert_eq!(a.smoothed_loss(Module::Sasrec), Some(3.0));
        let json = serde_json::to_string(&Alternation::Adaptive(a.clone())).unwrap();
        let mut b = match serde_json::from_str::<Alternation>(&json).unwrap() {
            Alternation::Adaptive(b) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(a, b);
        for k in 3..40 {
            assert_eq!(a.record(k, 3.0, 1.0), b.record(k, 3.0, 1.0));
        }
        assert_eq!(a, b);
    }
}
