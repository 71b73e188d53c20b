//! Learning-rate schedules over a stage's own steps.
use crate::config::Schedule;

/// The learning-rate multiplier (of the base rate) used at 0-based step `step` of a stage of `total` steps.
///
/// `WarmupCosine`: `(step + 1) / warmup` during warmup (so the very first step already uses a small rate,
/// unlike the reference which used the full rate at step 0 — reference-model.md §7.2), then
/// `½(1 + cos(π · (step − warmup) / (total − warmup)))`, reaching 0 at the stage's last step + 1 and never
/// oscillating back up (the reference's `T_max = 1000` restarted).
pub fn lr_factor(schedule: Schedule, step: usize, total: usize, warmup: usize) -> f32 {
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::WarmupCosine => {
            if step < warmup {
                return (step + 1) as f32 / warmup as f32;
            }
            let span = total.saturating_sub(warmup).max(1);
            let t = ((step - warmup) as f64 / span as f64).min(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_by_hand() {
        let s = Schedule::WarmupCosine;
        // warmup 10 of 110 steps: step 0 -> 0.1, step 4 -> 0.5, step 9 -> 1.0
        assert!((lr_factor(s, 0, 110, 10) - 0.1).abs() < 1e-7);
        assert!((lr_factor(s, 4, 110, 10) - 0.5).abs() < 1e-7);
        assert!((lr_factor(s, 9, 110, 10) - 1.0).abs() < 1e-7);
        // cosine: step 10 -> 1, step 60 (halfway) -> 0.5, step 35 (quarter) -> (1 + cos(pi/4))/2
        assert!((lr_factor(s, 10, 110, 10) - 1.0).abs() < 1e-7);
        assert!((lr_factor(s, 60, 110, 10) - 0.5).abs() < 1e-6);
        assert!((lr_factor(s, 35, 110, 10) - 0.853_553_4).abs() < 1e-6);
        // the end stays at 0, no restart
        assert!(lr_factor(s, 110, 110, 10).abs() < 1e-7);
        assert!(lr_factor(s, 500, 110, 10).abs() < 1e-7);
        assert_eq!(lr_factor(Schedule::Constant, 77, 10, 5), 1.0);
    }
}
