//! AdamW with decoupled weight decay, per-group learning rates and per-group gradient-norm clipping,
//! over the flat buffers of a [`ParamStore`].
//!
//! Update of one parameter with gradient `g` at its own step `t` (counted per parameter, so a group that
//! was frozen resumes its bias correction where it stopped, as PyTorch's per-parameter `step` does):
//! ```text
//! g ← g · c                      c = min(1, clip / (‖g_group‖ + 1e−6))  (clip > 0)
//! m ← β1 m + (1−β1) g ;  v ← β2 v + (1−β2) g²
//! p ← p·(1 − lr·wd) − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε)
//! ```
//! Only trainable parameters move; a frozen parameter's moments and step stay untouched. The update runs on the
//! device, gated by the step's verdict (`train::step_log`); `1 − β^t` is `backend::bias_correction`.
use crate::backend::Backend;
use crate::params::ParamStore;
use crate::train::step_log::StepLog;

#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Per-parameter step counts (index = ParamId).
    pub steps: Vec<u64>,
}

/// What one optimizer step did to a group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStepReport {
    pub group: usize,
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub clip_scale: f32,
}

impl AdamW {
    pub fn new(num_params: usize, beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        AdamW { beta1, beta2, eps, weight_decay, steps: vec![0; num_params] }
    }

    /// One immediate step for every group (tests, benchmarks and the golden parity check); `clip` is the
    /// per-group max norm (0 = off). It runs exactly what a trainer's step runs — the device-side step log
    /// of `train::step_log` with one row, read back at once — so a non-finite gradient skips the update
    /// (and the reports are empty).
    pub fn step<B: Backend>(&mut self, backend: &B, store: &mut ParamStore<B>, lrs: &[f32], clip: f32) -> Vec<GroupStepReport> {
        let mut log = StepLog::new(backend, store, self, 1);
        // No loss here: a finite stand-in is the value the verdict checks.
        let no_loss = backend.from_host(&[0.0]);
        log.step(backend, store, self, lrs, clip, &[&no_loss], 0);
        let read = log.read(backend, self).pop().expect("the step just logged");
        if !read.ok {
            return Vec::new();
        }
        read.groups.iter().map(|&(group, grad_norm, clip_scale)| GroupStepReport { group, lr: lrs[group], grad_norm, clip_scale })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::params::{Init, ParamBuilder};
    use crate::rng::Rng;

    #[test]
    fn adamw_matches_hand_computation_with_clipping_and_decay() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(0);
        let mut b = ParamBuilder::new();
        let a = b.add("g0", "a", &[2], Init::Values(vec![1.0, -2.0]), &mut rng);
        let c = b.add("g1", "c", &[1], Init::Values(vec![0.5]), &mut rng);
        let mut store = b.build(&be);
        let mut opt = AdamW::new(2, 0.9, 0.999, 1e-8, 0.01);
        // grads: group 0 = [3, 4] (norm 5), group 1 = [0.1]
        store.grads = vec![3.0, 4.0, 0.1];
        let rep = opt.step(&be, &mut store, &[0.1, 0.01], 1.0);
        // group 0 clipped by 1/(5+1e-6); first step: m̂ = g', v̂ = g'², update = lr·g'/(|g'|+eps) ≈ lr·sign
        let cs = (1.0 / (5.0 + 1e-6)) as f32;
        assert!((rep[0].clip_scale - cs).abs() < 1e-7);
        let expect_a0 = 1.0 * (1.0 - 0.1 * 0.01) - 0.1 * (3.0 * cs) / ((3.0 * cs) + 1e-8);
        let expect_a1 = -2.0 * (1.0 - 0.1 * 0.01) - 0.1 * (4.0 * cs) / ((4.0 * cs) + 1e-8);
        let got = store.values_of(&be, a);
        assert!((got[0] - expect_a0).abs() < 1e-6, "{got:?}");
        assert!((got[1] - expect_a1).abs() < 1e-6, "{got:?}");
        // group 1 not clipped (norm 0.1 < 1): 0.5·(1 − 0.01·0.01) − 0.01
        assert!((store.values_of(&be, c)[0] - (0.5 * (1.0 - 1e-4) - 0.01)).abs() < 1e-7);

        // Second step with a frozen group: its parameters, moments and step count must not move.
        store.set_group_trainable(1, false);
        store.grads = vec![1.0, 0.0, 5.0];
        let before = store.values_of(&be, c);
        opt.step(&be, &mut store, &[0.1, 0.01], 0.0);
        assert_eq!(store.values_of(&be, c), before);
        assert_eq!(opt.steps, vec![2, 1], "per-parameter step counts: a stepped twice, c once");
        // a[0] second step, by hand: m = 0.9·m1 + 0.1·1, v = 0.999·v1 + 0.001·1, t = 2.
        let g1 = 3.0 * cs;
        let (m1, v1) = (0.1 * g1, 0.001 * g1 * g1);
        let (m2, v2) = (0.9 * m1 + 0.1, 0.999 * v1 + 0.001);
        // 1 − β² in f64 (as PyTorch and `backend::bias_correction` compute it): in f32, 1 − 0.999² loses
        // ~5 of its 24 bits to cancellation, enough to move the update by 1e-6.
        let mhat = m2 / (1.0 - (0.9f32 as f64).powi(2)) as f32;
        let vhat = v2 / (1.0 - (0.999f32 as f64).powi(2)) as f32;
        let expect = expect_a0 * (1.0 - 0.1 * 0.01) - 0.1 * mhat / (vhat.sqrt() + 1e-8);
        assert!((store.values_of(&be, a)[0] - expect).abs() < 1e-6, "{} vs {expect}", store.values_of(&be, a)[0]);

        // A non-finite gradient: the step is refused, nothing moves and no group reports.
        store.grads = vec![f32::NAN, 1.0, 1.0];
        let before = (store.values.clone(), store.m.clone(), store.v.clone(), opt.steps.clone());
        assert!(opt.step(&be, &mut store, &[0.1, 0.01], 1.0).is_empty());
        assert_eq!((store.values.clone(), store.m.clone(), store.v.clone(), opt.steps.clone()), before);
    }

    /// `1 − β^t` by squaring in f64 against the closed form, over the step counts training reaches.
    #[test]
    fn bias_correction_follows_the_closed_form() {
        use crate::backend::bias_correction;
        for beta in [0.9f32, 0.98, 0.999] {
            for t in [1u64, 2, 3, 7, 100, 1_000, 12_345, 1_000_000] {
                let want = (1.0 - (beta as f64).powf(t as f64)) as f32;
                let got = bias_correction(beta, t);
                assert!((got - want).abs() <= f32::EPSILON * want, "beta {beta}, t {t}: {got} vs {want}");
            }
        }
        assert_eq!(bias_correction(0.9, 1), 1.0 - 0.9f32, "t = 1 is exact");
    }
}
