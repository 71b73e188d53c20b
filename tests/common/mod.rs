//! Numerical gradient checking for the autograd tape on the CPU backend.
//!
//! A check takes seeded random input tensors and a closure that builds an output tensor from them on a
//! tape. It forms the scalar `L = Σ out ∘ W` with a fixed random weight tensor `W` (every entry of
//! magnitude 0.5..1.5 with a random sign, so every output element — and every mistake in it — matters),
//! and compares
//! - the analytic gradient: `backward` from `L` on a recording tape, read back from the `leaf` inputs;
//! - the numeric gradient: central differences `(L(x + h e_c) − L(x − h e_c)) / 2h`, each side on a
//!   freshly built `Tape::new(&be, seed, step)`, so every dropout mask (keyed by seed, step, op index
//!   and element) is the same in every evaluation and the function being differenced is smooth.
//!   `L` is accumulated in f64 on the host from the f32 outputs.
//!
//! # Tolerance
//! The backend computes in f32 (unit roundoff u ≈ 6e-8). Two error sources in the numeric gradient:
//! - rounding: the outputs carry relative errors of a few u. The CPU backend is deterministic, so outputs
//!   that do not depend on the perturbed coordinate are bit-identical in `L(x+h)` and `L(x−h)` and cancel
//!   exactly; only the affected ones contribute, roughly `k·u·Σ_affected |out·W| / h`. With O(1) values,
//!   tens of affected outputs and h = 1e-2 this is ~1e-4..1e-3 absolute per coordinate;
//! - truncation: `h²/6 · |∂³L|`, ~2e-5 for O(1) third derivatives (use h = 3e-3 where curvature is high:
//!   logdet, layer norm of short rows).
//! The perturbed input is rounded to f32, so the divisor is the actually realised step
//! `(x+h)_f32 − (x−h)_f32`, not 2h.
//! Over a whole input the combined error stays well under 1e-3 of `‖g‖₂` for O(1) gradients, so we assert
//! `‖g_analytic − g_numeric‖₂ ≤ TOL · max(‖g_numeric‖₂, FLOOR)` with TOL = 1e-2: ten times the noise,
//! while the bugs this is meant to catch (a wrong transpose, a missing term, a missing 1/n, a gradient
//! sent to the wrong row) give relative errors of order 1. (Measured on the current tests: ≤ 7e-5
//! everywhere except a mean loss over 150 rows, 7e-4 — there each coordinate's gradient is 1/150 of
//! O(1) while the rounding of L is not; run with GRADCHECK_VERBOSE=1 to print them.) Slips smaller than
//! 1e-2 in an elementwise derivative are caught by the closed-form checks in `tests/gradcheck.rs`.
//! To keep a check from passing vacuously, every input must have a non-zero analytic gradient and a
//! numeric gradient above FLOOR, unless the test declares its gradient exactly zero (`expect_zero`),
//! which is then asserted bit-exactly. The forward is also required to be bit-reproducible on a rebuilt
//! tape (same values, same dropout masks), which the whole method relies on.
#![allow(dead_code)]

use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::rng::Rng;
use ur4rec_engine::tape::{Tape, Var};

pub type CpuTape<'a> = Tape<'a, CpuBackend>;

/// Default central-difference step.
pub const H: f64 = 1e-2;
/// Default relative tolerance on the gradient norm (see the module comment).
pub const TOL: f64 = 1e-2;
/// Norm below which a gradient counts as zero (absolute floor of the comparison).
pub const FLOOR: f64 = 1e-3;

/// A host tensor used as a tape leaf.
#[derive(Clone, Debug)]
pub struct Input {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Input {
    pub fn new(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "Input::new: shape {shape:?} vs {} values", data.len());
        Input { shape: shape.to_vec(), data }
    }
    /// Normal values with standard deviation `std`.
    pub fn randn(rng: &mut Rng, shape: &[usize], std: f32) -> Self {
        let n = shape.iter().product();
        Self::new(shape, (0..n).map(|_| rng.normal() * std).collect())
    }
    /// Uniform values in `[lo, hi)`.
    pub fn uniform(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Self {
        let n = shape.iter().product();
        Self::new(shape, (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect())
    }
    /// Normal values pushed away from zero: `|x| >= min_abs` (keeps finite differences off a kink).
    pub fn randn_away_from_zero(rng: &mut Rng, shape: &[usize], min_abs: f32) -> Self {
        let mut x = Self::randn(rng, shape, 1.0);
        for v in x.data.iter_mut() {
            *v = v.signum() * (v.abs() + min_abs);
        }
        x
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
}

/// The weight tensor `W` of `L = Σ out ∘ W`: magnitudes in [0.5, 1.5) with random signs.
pub fn loss_weights(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::derive(seed, "gradcheck.weights");
    (0..n).map(|_| {
        let m = 0.5 + rng.uniform();
        if rng.uniform() < 0.5 { -m } else { m }
    }).collect()
}

/// `(‖a − b‖₂, ‖b‖₂)` in f64.
pub fn diff_norms(a: &[f64], b: &[f64]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let n = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    (d, n)
}

/// The acceptance rule: `‖analytic − numeric‖ ≤ tol · max(‖numeric‖, FLOOR)`.
pub fn grads_agree(analytic: &[f64], numeric: &[f64], tol: f64) -> bool {
    let (d, n) = diff_norms(analytic, numeric);
    d <= tol * n.max(FLOOR)
}

/// What a check produced, for further assertions by the test.
pub struct GradResult {
    pub out_shape: Vec<usize>,
    pub output: Vec<f32>,
    /// Analytic gradient of every input (zeros where the tape gave none).
    pub analytic: Vec<Vec<f32>>,
    /// `(coordinate, numeric gradient)` of every checked coordinate, per input.
    pub numeric: Vec<Vec<(usize, f64)>>,
    /// `‖g_a − g_n‖ / max(‖g_n‖, FLOOR)` per input.
    pub rel_err: Vec<f64>,
}

/// A configured gradient check; `run` executes it.
#[derive(Clone)]
pub struct GradCheck {
    name: String,
    h: f64,
    tol: f64,
    max_coords: usize,
    seed: u64,
    step: u64,
    expect_zero: Vec<usize>,
    excluded: Vec<(usize, std::ops::Range<usize>)>,
}

pub fn check(name: &str) -> GradCheck {
    GradCheck { name: name.to_string(), h: H, tol: TOL, max_coords: 400, seed: 0x5EED, step: 3, expect_zero: vec![], excluded: vec![] }
}

impl GradCheck {
    pub fn h(mut self, h: f64) -> Self {
        self.h = h;
        self
    }
    pub fn tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }
    /// Check at most this many (randomly chosen) coordinates per input; large inputs stay cheap.
    pub fn max_coords(mut self, n: usize) -> Self {
        self.max_coords = n;
        self
    }
    /// Tape seed and step (dropout keys).
    pub fn seed_step(mut self, seed: u64, step: u64) -> Self {
        self.seed = seed;
        self.step = step;
        self
    }
    /// Input `i`'s gradient must be exactly zero (analytic) and below the floor (numeric).
    pub fn expect_zero(mut self, i: usize) -> Self {
        self.expect_zero.push(i);
        self
    }
    /// Leave coordinates `range` of input `i` out of the comparison (e.g. an embedding's padding row,
    /// whose gradient is zero by design although the output depends on it).
    pub fn exclude(mut self, i: usize, range: std::ops::Range<usize>) -> Self {
        self.excluded.push((i, range));
        self
    }

    fn is_excluded(&self, i: usize, c: usize) -> bool {
        self.excluded.iter().any(|(j, r)| *j == i && r.contains(&c))
    }

    pub fn run<F>(&self, inputs: &[Input], f: F) -> GradResult
    where
        F: Fn(&mut CpuTape<'_>, &[Var]) -> Var,
    {
        let be = CpuBackend::new();
        let name = &self.name;

        // Analytic: L = Σ out ∘ W on the tape, backward, read the leaves.
        let mut tape = Tape::new(&be, self.seed, self.step);
        let vars: Vec<Var> = inputs.iter().map(|x| tape.leaf(&x.shape, &x.data)).collect();
        let y = f(&mut tape, &vars);
        let out_shape = tape.shape(y).to_vec();
        let output = tape.to_host(y);
        let w = loss_weights(output.len(), self.seed);
        let wv = tape.constant(&out_shape, &w);
        let prod = tape.mul(y, wv);
        let loss = tape.sum(prod);
        let mut no_params: Vec<f32> = Vec::new();
        tape.backward(loss, &mut no_params);
        let analytic: Vec<Vec<f32>> = vars.iter().zip(inputs)
            .map(|(v, x)| tape.grad(*v).unwrap_or_else(|| vec![0.0; x.len()]))
            .collect();
        drop(tape);
        assert!(output.iter().all(|v| v.is_finite()), "{name}: non-finite output {output:?}");

        // L(x) on a fresh tape with the same (seed, step).
        let loss_at = |data: &[Vec<f32>]| -> (f64, Vec<f32>) {
            let mut tape = Tape::new(&be, self.seed, self.step);
            let vars: Vec<Var> = inputs.iter().zip(data).map(|(x, d)| tape.leaf(&x.shape, d)).collect();
            let y = f(&mut tape, &vars);
            let out = tape.to_host(y);
            let l = out.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
            (l, out)
        };
        let mut data: Vec<Vec<f32>> = inputs.iter().map(|x| x.data.clone()).collect();
        // The forward must be a deterministic function of the inputs (same values, same masks).
        let (_, again) = loss_at(&data);
        assert!(again.iter().zip(&output).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: a rebuilt tape gives a different output");

        let mut numeric = Vec::new();
        let mut rel_err = Vec::new();
        for (i, x) in inputs.iter().enumerate() {
            let ga = &analytic[i];
            assert_eq!(ga.len(), x.len(), "{name}: gradient of input {i} has the wrong length");
            assert!(ga.iter().all(|g| g.is_finite()), "{name}: non-finite gradient of input {i}: {ga:?}");
            let mut coords: Vec<usize> = (0..x.len()).filter(|&c| !self.is_excluded(i, c)).collect();
            if coords.len() > self.max_coords {
                let mut rng = Rng::derive(self.seed ^ i as u64, "gradcheck.coords");
                rng.shuffle(&mut coords);
                coords.truncate(self.max_coords);
                coords.sort_unstable();
            }
            let mut num = Vec::with_capacity(coords.len());
            for &c in &coords {
                let orig = data[i][c];
                let xp = (orig as f64 + self.h) as f32;
                let xm = (orig as f64 - self.h) as f32;
                data[i][c] = xp;
                let (lp, _) = loss_at(&data);
                data[i][c] = xm;
                let (lm, _) = loss_at(&data);
                data[i][c] = orig;
                num.push((c, (lp - lm) / (xp as f64 - xm as f64)));
            }
            let a: Vec<f64> = num.iter().map(|&(c, _)| ga[c] as f64).collect();
            let n: Vec<f64> = num.iter().map(|&(_, g)| g).collect();
            let (d, nn) = diff_norms(&a, &n);
            let rel = d / nn.max(FLOOR);
            if self.expect_zero.contains(&i) {
                assert!(ga.iter().all(|&g| g == 0.0), "{name}: input {i} must get an exactly zero gradient, got {ga:?}");
                assert!(nn <= self.tol * FLOOR, "{name}: input {i}: numeric gradient {n:?} is not zero");
            } else {
                let full: Vec<f64> = (0..x.len()).filter(|&c| !self.is_excluded(i, c)).map(|c| ga[c] as f64).collect();
                assert!(full.iter().any(|&g| g != 0.0), "{name}: input {i} has an all-zero analytic gradient");
                assert!(nn > FLOOR, "{name}: input {i}: numeric gradient norm {nn:e} too small for a meaningful check");
                if d > self.tol * nn.max(FLOOR) {
                    let mut worst: Vec<(usize, f64, f64)> = num.iter().map(|&(c, g)| (c, ga[c] as f64, g)).collect();
                    worst.sort_by(|p, q| (q.1 - q.2).abs().total_cmp(&(p.1 - p.2).abs()));
                    worst.truncate(8);
                    panic!("{name}: input {i} {:?}: ‖analytic − numeric‖ = {d:e}, ‖numeric‖ = {nn:e}, relative {rel:e} > {}\n\
                            worst (coord, analytic, numeric): {worst:?}", x.shape, self.tol);
                }
            }
            if std::env::var_os("GRADCHECK_VERBOSE").is_some() {
                eprintln!("gradcheck {name}: input {i} {:?}: {} coords, ‖g‖ {nn:.3e}, relative error {rel:.2e}", x.shape, num.len());
            }
            numeric.push(num);
            rel_err.push(rel);
        }
        GradResult { out_shape, output, analytic, numeric, rel_err }
    }
}

/// `|a − b| ≤ atol + rtol·|b|` elementwise, with a readable failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(((g as f64) - w).abs() <= atol + rtol * w.abs(), "{what}: element {i}: got {g}, want {w}");
    }
}
