//! CPU twin of `kernels/infonce_bank.cu`: InfoNCE of queries against their positives, the other in-batch
//! keys and a memory bank, with a streaming (online) log-sum-exp so the `[B, K]` logits never exist.
//!
//! For query `i` (all vectors L2-normalised by the caller, temperature τ):
//! ```text
//! logits_i = [ q_i·k_i | q_i·k_j (j ≠ i) | q_i·bank_s (bank_users[s] ≠ users[i]) ] / τ
//! loss     = mean_i ( logsumexp(logits_i) − q_i·k_i / τ )
//! ```
//! The positive appears once (the in-batch diagonal is skipped — the seed's formula counted it twice), and
//! bank slots written for the query's own user are masked as false negatives (mission.md §9). Bank slots
//! with user 0 (random initial keys) are never masked. The bank receives no gradient.
use rayon::prelude::*;

/// Per query: (log-sum-exp, positive logit). `q, k: [B, d]`, `bank: [K, d]`.
fn lse_rows(q: &[f32], k: &[f32], bank: &[f32], bank_users: &[u32], users: &[u32], d: usize, inv_tau: f32) -> Vec<(f64, f64)> {
    let b = users.len();
    (0..b).into_par_iter().map(|i| {
        let qi = &q[i * d..][..d];
        let dot = |x: &[f32]| -> f64 { qi.iter().zip(x).map(|(a, c)| (a * c) as f64).sum::<f64>() * inv_tau as f64 };
        let pos = dot(&k[i * d..][..d]);
        // Online log-sum-exp: running max m and running sum s of exp(l − m).
        let (mut m, mut s) = (pos, 1.0f64);
        let mut add = |l: f64| {
            if l > m {
                s = s * (m - l).exp() + 1.0;
                m = l;
            } else {
                s += (l - m).exp();
            }
        };
        for j in (0..b).filter(|&j| j != i) {
            add(dot(&k[j * d..][..d]));
        }
        for (slot, &u) in bank_users.iter().enumerate() {
            if u == 0 || u != users[i] {
                add(dot(&bank[slot * d..][..d]));
            }
        }
        (m + s.ln(), pos)
    }).collect()
}

pub fn forward(q: &[f32], k: &[f32], bank: &[f32], bank_users: &[u32], users: &[u32], d: usize, tau: f32) -> f32 {
    let rows = lse_rows(q, k, bank, bank_users, users, d, 1.0 / tau);
    let b = users.len().max(1);
    (rows.iter().map(|(lse, pos)| lse - pos).sum::<f64>() / b as f64) as f32
}

/// Accumulates `dq` and `dk` (either may be skipped) for upstream gradient `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], bank: &[f32], bank_users: &[u32], users: &[u32], d: usize, tau: f32, g: f32,
                dq: Option<&mut [f32]>, dk: Option<&mut [f32]>) {
    let b = users.len();
    let inv_tau = 1.0 / tau;
    let rows = lse_rows(q, k, bank, bank_users, users, d, inv_tau);
    let scale = g as f64 * inv_tau as f64 / b.max(1) as f64;
    let dot = |x: &[f32], y: &[f32]| -> f64 { x.iter().zip(y).map(|(a, c)| (a * c) as f64).sum::<f64>() * inv_tau as f64 };
    // p_ij = softmax weight of logit j in row i. dL/dq_i = scale · (Σ_j p_ij key_j − k_i).
    if let Some(dq) = dq {
        dq.par_chunks_mut(d).enumerate().for_each(|(i, dqi)| {
            let qi = &q[i * d..][..d];
            let lse = rows[i].0;
            let mut acc = vec![0.0f64; d];
            let mut push = |key: &[f32], coeff: f64| {
                for (a, x) in acc.iter_mut().zip(key) {
                    *a += coeff * *x as f64;
                }
            };
            let ki = &k[i * d..][..d];
            push(ki, (dot(qi, ki) - lse).exp() - 1.0);
            for j in (0..b).filter(|&j| j != i) {
                let kj = &k[j * d..][..d];
                push(kj, (dot(qi, kj) - lse).exp());
            }
            for (slot, &u) in bank_users.iter().enumerate() {
                if u == 0 || u != users[i] {
                    let ks = &bank[slot * d..][..d];
                    push(ks, (dot(qi, ks) - lse).exp());
                }
            }
            for (o, a) in dqi.iter_mut().zip(acc) {
                *o += (a * scale) as f32;
            }
        });
    }
    // dL/dk_j = scale · (Σ_{i≠j} p_ij q_i + (p_jj − 1) q_j).
    if let Some(dk) = dk {
        dk.par_chunks_mut(d).enumerate().for_each(|(j, dkj)| {
            let kj = &k[j * d..][..d];
            let mut acc = vec![0.0f64; d];
            for i in 0..b {
                let qi = &q[i * d..][..d];
                let p = (dot(qi, kj) - rows[i].0).exp();
                let coeff = if i == j { p - 1.0 } else { p };
                for (a, x) in acc.iter_mut().zip(qi) {
                    *a += coeff * *x as f64;
                }
            }
            for (o, a) in dkj.iter_mut().zip(acc) {
                *o += (a * scale) as f32;
            }
        });
    }
}
