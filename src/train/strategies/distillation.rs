//! Bidirectional knowledge distillation between the towers (seed Strategy 4): configuration and a host f64
//! reference of the loss, against which the tape implementation is checked.
//!
//! Over the same candidate list (column 0 the positive in training), with SASRec logits `s` and retriever
//! logits `r` of shape `[B, C]` and temperature `T`:
//! - the retriever's logits are first multiplied by `retriever_logit_scale` (its cosines lie in [−1, 1];
//!   divided by T = 4 they would give nearly uniform distributions — reference-model.md §11). With the
//!   engine's retriever scores already `cos / τ`, the trainer sets this scale to 1;
//! - `p_s = softmax(s / T)`, `p_r = softmax(r / T)`;
//! - SASRec learns from the retriever: `KL(p_r.detach() ‖ p_s)`; the retriever from SASRec:
//!   `KL(p_s.detach() ‖ p_r)`; each summed over candidates and divided by B ("batchmean");
//! - `kd = (c_s · KL(p_r‖p_s) + c_r · KL(p_s‖p_r)) · T²`, added with `weight` in the stages listed.
//!
//! The direction coefficients: `Both` → (½, ½) (the seed's average), `ToSasrec` → (1, 0), `ToRetriever` →
//! (0, 1). With `confidence_weighted`, each row's coefficients are multiplied by `2·w`, where the teacher's
//! share `w` is its probability of the positive (column 0, softmax at temperature 1, detached) over the sum of
//! both towers' probabilities of it: `w_s = q_r / (q_r + q_s)` for the term that teaches SASRec,
//! `w_r = q_s / (q_r + q_s)` for the other. Equally confident towers reproduce the plain coefficients; the
//! more confident tower teaches more (mission §10: plain KD pulled the stronger tower toward the weaker).

use serde::{Deserialize, Serialize};

/// Which tower(s) receive the distillation gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KdDirection {
    /// Both KL terms, averaged (the seed).
    Both,
    /// Only SASRec learns (from the retriever).
    ToSasrec,
    /// Only the retriever learns (from SASRec).
    ToRetriever,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    pub enabled: bool,
    pub temperature: f32,
    pub weight: f32,
    /// Training stages (1-based, as in the pipeline) in which the term is added.
    pub stages: Vec<usize>,
    /// Multiplies the retriever's logits before the temperature (1/0.07 for raw cosines).
    pub retriever_logit_scale: f32,
    pub direction: KdDirection,
    pub confidence_weighted: bool,
}

impl Default for DistillConfig {
    /// Off; when enabled, the seed's settings: T = 4, weight 0.1, stages 3 and 4, both directions, with a
    /// logit scale of 1/0.07 for raw cosine retriever scores.
    fn default() -> Self {
        DistillConfig {
            enabled: false,
            temperature: 4.0,
            weight: 0.1,
            stages: vec![3, 4],
            retriever_logit_scale: 1.0 / 0.07,
            direction: KdDirection::Both,
            confidence_weighted: false,
        }
    }
}

impl DistillConfig {
    /// Whether the term is added in `stage` (1-based).
    pub fn applies(&self, stage: usize) -> bool {
        self.enabled && self.stages.contains(&stage)
    }

    /// The coefficients `(c_s, c_r)` of `KL(p_r‖p_s)` and `KL(p_s‖p_r)` for one row, given both towers'
    /// temperature-1 probabilities of the positive `(q_s, q_r)` (used only when confidence-weighted).
    pub fn coefficients(&self, q_s: f64, q_r: f64) -> (f64, f64) {
        let (c_s, c_r) = match self.direction {
            KdDirection::Both => (0.5, 0.5),
            KdDirection::ToSasrec => (1.0, 0.0),
            KdDirection::ToRetriever => (0.0, 1.0),
        };
        if !self.confidence_weighted {
            return (c_s, c_r);
        }
        let sum = q_s + q_r;
        let (w_s, w_r) = if sum > 0.0 {
            (q_r / sum, q_s / sum)
        } else {
            (0.5, 0.5)
        };
        (c_s * 2.0 * w_s, c_r * 2.0 * w_r)
    }
}

/// Log-softmax of `x · scale / t` in f64.
fn log_softmax(x: &[f32], scale: f64, t: f64) -> Vec<f64> {
    let z: Vec<f64> = x.iter().map(|&v| v as f64 * scale / t).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// `KL(p ‖ q)` from log-probabilities.
fn kl(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum()
}

/// The distillation loss (before `cfg.weight`) for SASRec logits `s` and raw retriever logits `r`, both
/// `[B, cands]` row-major; see the module documentation. Ignores `cfg.enabled` and `cfg.stages`.
pub fn kd_loss(s: &[f32], r: &[f32], cands: usize, cfg: &DistillConfig) -> f64 {
    assert!(
        cands >= 1 && s.len() == r.len() && s.len().is_multiple_of(cands),
        "kd_loss: shapes [{}] / [{}] with {cands} candidates",
        s.len(),
        r.len()
    );
    let t = cfg.temperature as f64;
    let scale = cfg.retriever_logit_scale as f64;
    let rows = s.len() / cands;
    if rows == 0 {
        return 0.0;
    }
    let mut total = 0.0;
    for (sr, rr) in s.chunks(cands).zip(r.chunks(cands)) {
        let (ls, lr) = (log_softmax(sr, 1.0, t), log_softmax(rr, scale, t));
        let (q_s, q_r) = (
            log_softmax(sr, 1.0, 1.0)[0].exp(),
            log_softmax(rr, scale, 1.0)[0].exp(),
        );
        let (c_s, c_r) = cfg.coefficients(q_s, q_r);
        total += c_s * kl(&lr, &ls) + c_r * kl(&ls, &lr);
    }
    total / rows as f64 * t * t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(direction: KdDirection, confidence_weighted: bool) -> DistillConfig {
        DistillConfig {
            enabled: true,
            direction,
            confidence_weighted,
            ..Default::default()
        }
    }

    // Two candidates, T = 4, s = [4, 0], r = [0, 0] (the scale leaves 0 unchanged):
    // p_s = softmax([1, 0]) = [σ(1), σ(−1)] = [0.7310586, 0.2689414], p_r = [0.5, 0.5].
    // KL(p_r‖p_s) = 0.5·ln(0.5/0.7310586) + 0.5·ln(0.5/0.2689414) = 0.1201145
    // KL(p_s‖p_r) = 0.7310586·ln(1.4621172) + 0.2689414·ln(0.5378828) = 0.1109441
    const KL_RS: f64 = 0.120_114_506_958_277_6;
    const KL_SR: f64 = 0.110_944_071_671_727_4;

    #[test]
    fn two_candidates_by_hand() {
        let (s, r) = ([4.0f32, 0.0], [0.0f32, 0.0]);
        let both = kd_loss(&s, &r, 2, &cfg(KdDirection::Both, false));
        assert!((both - (KL_RS + KL_SR) / 2.0 * 16.0).abs() < 1e-9, "{both}");
        assert!((both - 1.848_468_629_040_039).abs() < 1e-9);
        let to_s = kd_loss(&s, &r, 2, &cfg(KdDirection::ToSasrec, false));
        assert!((to_s - KL_RS * 16.0).abs() < 1e-9, "{to_s}");
        let to_r = kd_loss(&s, &r, 2, &cfg(KdDirection::ToRetriever, false));
        assert!((to_r - KL_SR * 16.0).abs() < 1e-9, "{to_r}");
    }

    #[test]
    fn batchmean_divides_by_rows() {
        // A second row where both towers agree adds 0 and halves the mean.
        let s = [4.0f32, 0.0, 1.0, 1.0];
        let r = [0.0f32, 0.0, 0.0, 0.0];
        let v = kd_loss(&s, &r, 2, &cfg(KdDirection::Both, false));
        assert!((v - 1.848_468_629_040_039 / 2.0).abs() < 1e-9, "{v}");
    }

    #[test]
    fn logit_scale_applies_before_the_temperature() {
        // r = 0.28 · (1/0.07) = 4 = s: identical distributions, no loss. Without the scale it is not zero.
        let (s, r) = ([4.0f32, 0.0], [0.28f32, 0.0]);
        assert!(kd_loss(&s, &r, 2, &cfg(KdDirection::Both, false)).abs() < 1e-9);
        let unscaled = DistillConfig {
            retriever_logit_scale: 1.0,
            ..cfg(KdDirection::Both, false)
        };
        assert!(kd_loss(&s, &r, 2, &unscaled) > 1.0);
    }

    #[test]
    fn confidence_weighting_by_hand() {
        // q_s = σ(4) = 0.9820138, q_r = 0.5: w_s = 0.5/1.4820138 = 0.3373788, w_r = 0.6626212.
        // Both: (w_s·KL_RS + w_r·KL_SR)·16; ToSasrec: 2·w_s·KL_RS·16.
        let (s, r) = ([4.0f32, 0.0], [0.0f32, 0.0]);
        let q_s = 1.0 / (1.0 + (-4.0f64).exp());
        let w_s = 0.5 / (0.5 + q_s);
        let both = kd_loss(&s, &r, 2, &cfg(KdDirection::Both, true));
        assert!(
            (both - (w_s * KL_RS + (1.0 - w_s) * KL_SR) * 16.0).abs() < 1e-9,
            "{both}"
        );
        assert!((both - 1.824_607_710_614_148_7).abs() < 1e-9);
        let to_s = kd_loss(&s, &r, 2, &cfg(KdDirection::ToSasrec, true));
        assert!((to_s - 1.296_770_734_692_882).abs() < 1e-9, "{to_s}");
        // Equal confidence reproduces the plain weights.
        assert_eq!(
            cfg(KdDirection::Both, true).coefficients(0.3, 0.3),
            (0.5, 0.5)
        );
    }

    #[test]
    fn applies_only_when_enabled_in_listed_stages() {
        let c = cfg(KdDirection::Both, false);
        assert!(!c.applies(1) && !c.applies(2) && c.applies(3) && c.applies(4));
        assert!(!DistillConfig::default().applies(3));
        let back: DistillConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
