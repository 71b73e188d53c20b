//! CPU twin of `kernels/attention.cu`: fused causal multi-head self-attention over packed sequences.
//!
//! Per (sequence, head): `S = Q Kᵀ / √d_h`, masked (causal, key-valid), row softmax `P` (a row with no
//! visible key is all zeros, so its output is 0 and never NaN), optional dropout on `P`, `O = P' V`.
//! Sequences run in parallel; within one, the products go to the `gemm` crate with strides that read the
//! head's columns straight out of the packed `qkv` rows.
use super::{DropoutKey, SeqLayout};
use super::cpu::CpuBackend;
use crate::rng::{counter_base, counter_uniform_at};
use rayon::prelude::*;

/// Split `buf` into consecutive disjoint pieces of the given lengths.
fn split_lengths(mut buf: &mut [f32], lengths: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for n in lengths {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(a);
        buf = b;
    }
    out
}

use super::cpu::sgemm_raw as mm;

pub fn forward(qkv: &[f32], layout: &SeqLayout<CpuBackend>, d: usize, heads: usize,
               dropout: Option<DropoutKey>) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(d % heads, 0, "attention: d = {d} is not divisible by heads = {heads}");
    let t = layout.num_tokens();
    assert_eq!(qkv.len(), t * 3 * d, "attention: qkv has {} values, expected [{t}, {}]", qkv.len(), 3 * d);
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let prob_off = layout.prob_offsets(heads);
    let mut out = vec![0.0f32; t * d];
    let mut probs = vec![0.0f32; *prob_off.last().unwrap()];
    let ns: Vec<usize> = (0..layout.num_seqs()).map(|s| layout.seq_range(s).len()).collect();
    let outs = split_lengths(&mut out, ns.iter().map(|n| n * d));
    let ps = split_lengths(&mut probs, ns.iter().map(|n| heads * n * n));
    outs.into_par_iter().zip(ps).enumerate().for_each(|(s, (out_s, p_s))| {
        let r = layout.seq_range(s);
        let n = r.len();
        if n == 0 {
            return;
        }
        let valid = &layout.key_valid_host[r.clone()];
        let base = &qkv[r.start * 3 * d..];
        for h in 0..heads {
            let q = base[h * dh..].as_ptr();
            let k = base[d + h * dh..].as_ptr();
            let v = base[2 * d + h * dh..].as_ptr();
            let p = &mut p_s[h * n * n..][..n * n];
            // S = scale · Q Kᵀ into p (n × n).
            unsafe { mm(n, dh, n, scale, q, 3 * d as isize, 1, k, 1, 3 * d as isize, 0.0, p.as_mut_ptr(), n as isize) };
            for i in 0..n {
                let row = &mut p[i * n..][..n];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..=i {
                    if valid[j] != 0 {
                        mx = mx.max(row[j]);
                    }
                }
                if mx == f32::NEG_INFINITY {
                    row.iter_mut().for_each(|x| *x = 0.0);
                    continue;
                }
                let mut sum = 0.0f32;
                for j in 0..n {
                    let e = if j <= i && valid[j] != 0 { (row[j] - mx).exp() } else { 0.0 };
                    row[j] = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            let o = out_s[h * dh..].as_mut_ptr();
            match dropout {
                None => unsafe { mm(n, n, dh, 1.0, p.as_ptr(), n as isize, 1, v, 3 * d as isize, 1, 0.0, o, d as isize) },
                Some(key) => {
                    let f = dropout_factors(key, prob_off[s] + h * n * n, n);
                    let dropped: Vec<f32> = p.iter().zip(&f).map(|(p, f)| p * f).collect();
                    unsafe { mm(n, n, dh, 1.0, dropped.as_ptr(), n as isize, 1, v, 3 * d as isize, 1, 0.0, o, d as isize) };
                }
            }
        }
    });
    (out, probs)
}

/// Dropout factors (`1/(1−p)` or 0) of one (sequence, head) block of `n × n` attention weights, keyed by
/// each element's index in the whole probability buffer (`first + i·n + j`). Only the causal lower
/// triangle is drawn: the weights above the diagonal are 0 and stay 0.
fn dropout_factors(key: DropoutKey, first: usize, n: usize) -> Vec<f32> {
    let (base, s) = (counter_base(key.seed, key.stream), 1.0 / (1.0 - key.p));
    let mut f = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..=i {
            let e = i * n + j;
            if counter_uniform_at(base, (first + e) as u64) >= key.p {
                f[e] = s;
            }
        }
    }
    f
}

#[allow(clippy::too_many_arguments)]
pub fn backward(qkv: &[f32], probs: &[f32], layout: &SeqLayout<CpuBackend>, d: usize, heads: usize,
                dropout: Option<DropoutKey>, dout: &[f32], dqkv: &mut [f32]) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let prob_off = layout.prob_offsets(heads);
    let ns: Vec<usize> = (0..layout.num_seqs()).map(|s| layout.seq_range(s).len()).collect();
    let dq_s = split_lengths(dqkv, ns.iter().map(|n| n * 3 * d));
    dq_s.into_par_iter().enumerate().for_each(|(s, dqkv_s)| {
        let r = layout.seq_range(s);
        let n = r.len();
        if n == 0 {
            return;
        }
        let base = &qkv[r.start * 3 * d..];
        let dout_s = &dout[r.start * d..];
        let mut dp = vec![0.0f32; n * n];
        for h in 0..heads {
            let first = prob_off[s] + h * n * n;
            let p = &probs[first..][..n * n];
            let q = base[h * dh..].as_ptr();
            let k = base[d + h * dh..].as_ptr();
            let v = base[2 * d + h * dh..].as_ptr();
            let go = dout_s[h * dh..].as_ptr();
            let factors = dropout.map(|key| dropout_factors(key, first, n));
            let dropped: Option<Vec<f32>> = factors.as_ref().map(|f| p.iter().zip(f).map(|(p, f)| p * f).collect());
            let p_used: &[f32] = dropped.as_deref().unwrap_or(p);
            unsafe {
                // dV += P'ᵀ dO
                let dv = dqkv_s[2 * d + h * dh..].as_mut_ptr();
                mm(n, n, dh, 1.0, p_used.as_ptr(), 1, n as isize, go, d as isize, 1, 1.0, dv, 3 * d as isize);
                // dP' = dO Vᵀ
                mm(n, dh, n, 1.0, go, d as isize, 1, v, 1, 3 * d as isize, 0.0, dp.as_mut_ptr(), n as isize);
            }
            if let Some(f) = &factors {
                dp.iter_mut().zip(f).for_each(|(x, f)| *x *= f);
            }
            // dS = P ∘ (dP − rowsum(P ∘ dP)); masked entries have P = 0 and stay 0.
            for i in 0..n {
                let pr = &p[i * n..][..n];
                let dr = &mut dp[i * n..][..n];
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for j in 0..n {
                    dr[j] = pr[j] * (dr[j] - dot);
                }
            }
            unsafe {
                // dQ += scale · dS K ; dK += scale · dSᵀ Q
                let dq = dqkv_s[h * dh..].as_mut_ptr();
                mm(n, n, dh, scale, dp.as_ptr(), n as isize, 1, k, 3 * d as isize, 1, 1.0, dq, 3 * d as isize);
                let dk = dqkv_s[d + h * dh..].as_mut_ptr();
                mm(n, n, dh, scale, dp.as_ptr(), 1, n as isize, q, 3 * d as isize, 1, 1.0, dk, 3 * d as isize);
            }
        }
    });
}
