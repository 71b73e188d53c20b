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
//!
//! Layout of the work: queries in fixed blocks of `ROWS` (one rayon task each), candidate columns in fixed
//! blocks of `COLS`; a block's dot products are one f32 matrix product (`sgemm_raw`), the log-sum-exp and
//! the softmax weights are f64. Only a `ROWS × COLS` tile of logits exists at a time, and since every block
//! boundary comes from the shape alone, the result does not depend on the thread count. The backward's
//! `Σ_j p_ij key_j` is again a product per tile, accumulated in f32 over the column blocks.
use crate::backend::cpu::sgemm_raw;
use rayon::prelude::*;

/// Queries per task.
const ROWS: usize = 32;
/// Candidate columns per tile (a 32 × 1024 f32 tile is 128 KiB: stays in L2).
const COLS: usize = 1024;

/// The candidate columns of every query: the batch's keys, then the bank.
struct Columns<'a> {
    k: &'a [f32],
    bank: &'a [f32],
    bank_users: &'a [u32],
    users: &'a [u32],
    d: usize,
}

impl Columns<'_> {
    fn b(&self) -> usize {
        self.users.len()
    }

    /// The column blocks: `(is_bank, first column, count)`.
    fn blocks(&self) -> Vec<(bool, usize, usize)> {
        let mut v = Vec::new();
        for (is_bank, n) in [(false, self.b()), (true, self.bank_users.len())] {
            v.extend((0..n).step_by(COLS).map(|c0| (is_bank, c0, COLS.min(n - c0))));
        }
        v
    }

    fn block_keys(&self, is_bank: bool, c0: usize, n: usize) -> &[f32] {
        let src = if is_bank { self.bank } else { self.k };
        &src[c0 * self.d..(c0 + n) * self.d]
    }

    /// Whether column `c` of a block enters query `i`'s log-sum-exp: every in-batch key (its own is the
    /// positive), and the bank slots not written for the query's user.
    fn included(&self, i: usize, is_bank: bool, c: usize) -> bool {
        if is_bank {
            let u = self.bank_users[c];
            u == 0 || u != self.users[i]
        } else {
            true
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// `tile[r, c] = q_{r0+r} · col_c` for the queries `r0 .. r0 + rows` and the block's columns.
    fn tile(&self, q: &[f32], r0: usize, rows: usize, is_bank: bool, c0: usize, n: usize, tile: &mut [f32]) {
        let d = self.d;
        let keys = self.block_keys(is_bank, c0, n);
        // [rows, d] · [n, d]ᵀ: B's element (l, j) is keys[j*d + l].
        unsafe {
            sgemm_raw(rows, d, n, 1.0, q[r0 * d..].as_ptr(), d as isize, 1, keys.as_ptr(), 1, d as isize, 0.0,
                      tile.as_mut_ptr(), n as isize);
        }
    }
}

/// Per query: (log-sum-exp, positive logit), logits in units of 1/τ.
fn lse_rows(q: &[f32], cols: &Columns, inv_tau: f64) -> Vec<(f64, f64)> {
    let b = cols.b();
    let blocks = cols.blocks();
    (0..b.div_ceil(ROWS)).into_par_iter().flat_map_iter(|rb| {
        let (r0, rows) = (rb * ROWS, ROWS.min(b - rb * ROWS));
        let mut tile = vec![0f32; rows * COLS];
        // Running max and running sum of exp(l − max) per query; the positive starts each sum.
        let mut pos = vec![0f64; rows];
        let (mut m, mut s) = (vec![f64::NEG_INFINITY; rows], vec![0f64; rows]);
        for &(is_bank, c0, n) in &blocks {
            cols.tile(q, r0, rows, is_bank, c0, n, &mut tile);
            for r in 0..rows {
                let i = r0 + r;
                let row = &tile[r * n..(r + 1) * n];
                if !is_bank && (c0..c0 + n).contains(&i) {
                    pos[r] = row[i - c0] as f64 * inv_tau;
                }
                let mut bm = f64::NEG_INFINITY;
                for (c, &v) in row.iter().enumerate() {
                    if cols.included(i, is_bank, c0 + c) {
                        bm = bm.max(v as f64 * inv_tau);
                    }
                }
                if bm == f64::NEG_INFINITY {
                    continue;
                }
                let new_m = m[r].max(bm);
                let mut acc = 0f64;
                for (c, &v) in row.iter().enumerate() {
                    if cols.included(i, is_bank, c0 + c) {
                        acc += (v as f64 * inv_tau - new_m).exp();
                    }
                }
                s[r] = s[r] * (m[r] - new_m).exp() + acc;
                m[r] = new_m;
            }
        }
        (0..rows).map(move |r| (m[r] + s[r].ln(), pos[r])).collect::<Vec<_>>()
    }).collect()
}

pub fn forward(q: &[f32], k: &[f32], bank: &[f32], bank_users: &[u32], users: &[u32], d: usize, tau: f32) -> f32 {
    let cols = Columns { k, bank, bank_users, users, d };
    let rows = lse_rows(q, &cols, 1.0 / tau as f64);
    let b = users.len().max(1);
    (rows.iter().map(|(lse, pos)| lse - pos).sum::<f64>() / b as f64) as f32
}

/// Accumulates `dq` and `dk` (either may be skipped) for upstream gradient `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], bank: &[f32], bank_users: &[u32], users: &[u32], d: usize, tau: f32, g: f32,
                dq: Option<&mut [f32]>, dk: Option<&mut [f32]>) {
    let b = users.len();
    let cols = Columns { k, bank, bank_users, users, d };
    let inv_tau = 1.0 / tau as f64;
    let rows = lse_rows(q, &cols, inv_tau);
    let scale = g as f64 * inv_tau / b.max(1) as f64;
    // The coefficient of column c in query i's gradient: p_ic (its softmax weight), minus 1 at the positive,
    // 0 where masked.
    let coeff = |i: usize, is_bank: bool, c: usize, logit: f32| -> f32 {
        if !cols.included(i, is_bank, c) {
            return 0.0;
        }
        let p = (logit as f64 * inv_tau - rows[i].0).exp();
        (if !is_bank && c == i { p - 1.0 } else { p }) as f32
    };
    // dL/dq_i = scale · Σ_c coeff_ic · col_c.
    if let Some(dq) = dq {
        let blocks = cols.blocks();
        dq.par_chunks_mut(ROWS * d).enumerate().for_each(|(rb, dq_blk)| {
            let (r0, nrows) = (rb * ROWS, dq_blk.len() / d);
            let mut tile = vec![0f32; nrows * COLS];
            let mut acc = vec![0f32; nrows * d];
            for &(is_bank, c0, n) in &blocks {
                cols.tile(q, r0, nrows, is_bank, c0, n, &mut tile);
                for r in 0..nrows {
                    for c in 0..n {
                        tile[r * n + c] = coeff(r0 + r, is_bank, c0 + c, tile[r * n + c]);
                    }
                }
                let keys = cols.block_keys(is_bank, c0, n);
                // acc[nrows, d] += tile[nrows, n] · keys[n, d].
                unsafe {
                    sgemm_raw(nrows, n, d, 1.0, tile.as_ptr(), n as isize, 1, keys.as_ptr(), d as isize, 1, 1.0,
                              acc.as_mut_ptr(), d as isize);
                }
            }
            for (o, a) in dq_blk.iter_mut().zip(acc) {
                *o += (a as f64 * scale) as f32;
            }
        });
    }
    // dL/dk_j = scale · Σ_i coeff_ij · q_i over the in-batch columns (the bank gets no gradient).
    if let Some(dk) = dk {
        // p[b, b]: the in-batch coefficients, from the same tiles (the same logits) as the log-sum-exp.
        let mut p = vec![0f32; b * b];
        let key_blocks: Vec<(bool, usize, usize)> = cols.blocks().into_iter().filter(|blk| !blk.0).collect();
        p.par_chunks_mut(ROWS * b).enumerate().for_each(|(rb, p_blk)| {
            let (r0, nrows) = (rb * ROWS, p_blk.len() / b);
            let mut tile = vec![0f32; nrows * COLS];
            for &(_, c0, n) in &key_blocks {
                cols.tile(q, r0, nrows, false, c0, n, &mut tile);
                for r in 0..nrows {
                    for c in 0..n {
                        p_blk[r * b + c0 + c] = coeff(r0 + r, false, c0 + c, tile[r * n + c]);
                    }
                }
            }
        });
        // dk[b, d] += scale · pᵀ[b, b] · q[b, d], in fixed row blocks.
        dk.par_chunks_mut(ROWS * d).enumerate().for_each(|(jb, dk_blk)| {
            let (j0, nrows) = (jb * ROWS, dk_blk.len() / d);
            let mut acc = vec![0f32; nrows * d];
            // pᵀ's element (j, i) is p[i*b + j].
            unsafe {
                sgemm_raw(nrows, b, d, 1.0, p[j0..].as_ptr(), 1, b as isize, q.as_ptr(), d as isize, 1, 0.0,
                          acc.as_mut_ptr(), d as isize);
            }
            for (o, a) in dk_blk.iter_mut().zip(acc) {
                *o += (a as f64 * scale) as f32;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The definition, directly: every logit in f64, softmax weights in f64, no tiling.
    fn reference(q: &[f32], k: &[f32], bank: &[f32], bank_users: &[u32], users: &[u32], d: usize, tau: f64)
                 -> (f64, Vec<f64>, Vec<f64>) {
        let b = users.len();
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>() / tau;
        let (mut loss, mut dq, mut dk) = (0.0, vec![0.0; b * d], vec![0.0; b * d]);
        for i in 0..b {
            let qi = &q[i * d..][..d];
            // (logit, key, Some(j) for an in-batch key)
            let mut cands: Vec<(f64, &[f32], Option<usize>)> = (0..b).map(|j| (dot(qi, &k[j * d..][..d]), &k[j * d..][..d], Some(j))).collect();
            for (s, &u) in bank_users.iter().enumerate() {
                if u == 0 || u != users[i] {
                    cands.push((dot(qi, &bank[s * d..][..d]), &bank[s * d..][..d], None));
                }
            }
            let m = cands.iter().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max);
            let lse = m + cands.iter().map(|c| (c.0 - m).exp()).sum::<f64>().ln();
            loss += lse - cands[i].0;
            for (l, key, j) in &cands {
                let coeff = (l - lse).exp() - if *j == Some(i) { 1.0 } else { 0.0 };
                for t in 0..d {
                    dq[i * d + t] += coeff * key[t] as f64 / tau / b as f64;
                    if let Some(j) = j {
                        dk[j * d + t] += coeff * qi[t] as f64 / tau / b as f64;
                    }
                }
            }
        }
        (loss / b as f64, dq, dk)
    }

    fn unit_rows(rng: &mut Rng, rows: usize, d: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..rows * d).map(|_| rng.normal()).collect();
        crate::train::strategies::memory_bank::l2_normalize_rows(&mut v, d);
        v
    }

    fn rel(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum::<f64>().sqrt();
        num / b.iter().map(|y| y * y).sum::<f64>().sqrt()
    }

    /// Shapes across the row and column tiles (70 queries = 3 row blocks, 2,500 slots = 3 column blocks),
    /// slots of batch users masked, user-0 slots kept. Tolerance: the tiles' f32 dot products and f32
    /// accumulation of `Σ p·key` against the f64 definition — a few 1e-7 relative; 1e-5 leaves room while a
    /// wrong mask or a missed tile gives 1e-2 or more.
    #[test]
    fn tiled_matches_the_definition_across_tile_boundaries() {
        let mut rng = Rng::new(7);
        let (b, kslots, d, tau) = (70usize, 2500usize, 24usize, 0.1f32);
        let (q, k, bank) = (unit_rows(&mut rng, b, d), unit_rows(&mut rng, b, d), unit_rows(&mut rng, kslots, d));
        let users: Vec<u32> = (1..=b as u32).collect();
        let bank_users: Vec<u32> = (0..kslots).map(|_| rng.below(2 * b as u64) as u32).collect();
        assert!(bank_users.contains(&0) && bank_users.iter().any(|&u| u >= 1 && u <= b as u32));
        let (want, want_dq, want_dk) = reference(&q, &k, &bank, &bank_users, &users, d, tau as f64);
        let got = forward(&q, &k, &bank, &bank_users, &users, d, tau) as f64;
        assert!((got - want).abs() <= 1e-5 * want.abs(), "loss {got} vs {want}");
        let (mut dq, mut dk) = (vec![0f32; b * d], vec![0f32; b * d]);
        backward(&q, &k, &bank, &bank_users, &users, d, tau, 1.0, Some(&mut dq), Some(&mut dk));
        assert!(rel(&dq, &want_dq) <= 1e-5, "dq relative error {:e}", rel(&dq, &want_dq));
        assert!(rel(&dk, &want_dk) <= 1e-5, "dk relative error {:e}", rel(&dk, &want_dk));
    }
}
