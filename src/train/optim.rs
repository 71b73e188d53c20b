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
//! Only trainable parameters move; a frozen parameter's moments and step stay untouched.
use crate::backend::{AdamWStep, Backend};
use crate::params::ParamStore;

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

    /// L2 norm of a group's gradient over its trainable parameters.
    pub fn group_grad_norm<B: Backend>(backend: &B, store: &ParamStore<B>, group: usize) -> f64 {
        store.infos.iter().filter(|p| p.group == group && p.trainable)
            .map(|p| backend.sum_squares(&store.grads, p.offset, p.len)).sum::<f64>().sqrt()
    }

    /// One step for every group with `lrs[group] > 0`; `clip` is the per-group max norm (0 = off).
    pub fn step<B: Backend>(&mut self, backend: &B, store: &mut ParamStore<B>, lrs: &[f32], clip: f32) -> Vec<GroupStepReport> {
        let sums = crate::train::guard::grad_sum_squares(backend, store);
        self.step_with_sums(backend, store, lrs, clip, &sums)
    }

    /// [`AdamW::step`] given each parameter's gradient sum of squares (`guard::grad_sum_squares`, which the
    /// trainers compute once for the non-finite check and the clipping together). A group's norm is the
    /// square root of its parameters' sums added in storage order — the same bits as
    /// [`AdamW::group_grad_norm`].
    pub fn step_with_sums<B: Backend>(&mut self, backend: &B, store: &mut ParamStore<B>, lrs: &[f32], clip: f32,
                                      sums: &[f64]) -> Vec<GroupStepReport> {
        assert_eq!(lrs.len(), store.groups.len(), "one learning rate per parameter group");
        assert_eq!(sums.len(), store.infos.len(), "one sum of squares per parameter");
        let mut reports = Vec::new();
        for (group, &lr) in lrs.iter().enumerate() {
            if !store.infos.iter().any(|p| p.group == group && p.trainable) {
                continue;
            }
            let grad_norm = store.infos.iter().zip(sums).filter(|(p, _)| p.group == group && p.trainable)
                .map(|(_, s)| s).sum::<f64>().sqrt();
            let clip_scale = if clip > 0.0 { (clip as f64 / (grad_norm + 1e-6)).min(1.0) as f32 } else { 1.0 };
            reports.push(GroupStepReport { group, lr, grad_norm, clip_scale });
            for (i, p) in store.infos.iter().enumerate() {
                if p.group != group || !p.trainable {
                    continue;
                }
                self.steps[i] += 1;
                let t = self.steps[i] as i32;
                let hp = AdamWStep {
                    lr,
                    beta1: self.beta1,
                    beta2: self.beta2,
                    eps: self.eps,
                    weight_decay: if p.decay { self.weight_decay } else { 0.0 },
                    grad_scale: clip_scale,
                    bias_correction1: 1.0 - self.beta1.powi(t),
                    bias_correction2: 1.0 - self.beta2.powi(t),
                };
                backend.adamw(&mut store.values, &store.grads, &mut store.m, &mut store.v, p.offset, p.len, &hp);
            }
        }
        reports
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
        let mhat = m2 / (1.0 - 0.9f32.powi(2));
        let vhat = v2 / (1.0 - 0.999f32.powi(2));
        let expect = expect_a0 * (1.0 - 0.1 * 0.01) - 0.1 * mhat / (vhat.sqrt() + 1e-8);
        assert!((store.values_of(&be, a)[0] - expect).abs() < 1e-6);
    }
}
