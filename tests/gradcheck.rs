//! Numerical gradient checks of every tape operation on the CPU backend, plus value checks against
//! plain f64 formulas and a naive attention reference. The harness and the tolerance argument live in
//! `tests/common/mod.rs` (central differences, h = 1e-2, ‖g_a − g_n‖ ≤ 1e-2 · max(‖g_n‖, 1e-3)).
//!
//! Shapes are small and deliberately non-square / odd so that a swapped dimension or transpose cannot
//! hide; the whole file runs in a few seconds at the dev profile's opt-level 1.
mod common;

use common::*;
use std::sync::Arc;
use ur4rec_engine::backend::{Backend, CpuBackend, DropoutKey, SeqLayout, StoreFormat, Stored};
use ur4rec_engine::params::{Init, ParamBuilder};
use ur4rec_engine::rng::{counter_uniform, Rng};
use ur4rec_engine::tape::Tape;

fn rng(tag: &str) -> Rng {
    Rng::derive(20240611, tag)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn softplus64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn log_softmax64(row: &[f64]) -> Vec<f64> {
    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
    row.iter().map(|v| v - lse).collect()
}

// ---- harness self-checks ---------------------------------------------------------------------------

#[test]
fn harness_rejects_wrong_gradients() {
    // The acceptance rule must catch the smallest plausible bug: a 5% scale error or one wrong element.
    let g: Vec<f64> = (0..20).map(|i| (i as f64 * 0.7).sin()).collect();
    assert!(grads_agree(&g, &g, TOL));
    let scaled: Vec<f64> = g.iter().map(|v| v * 1.05).collect();
    assert!(!grads_agree(&scaled, &g, TOL));
    let mut one_off = g.clone();
    one_off[7] += 0.1;
    assert!(!grads_agree(&one_off, &g, TOL));
    // Zero against zero passes only through the floor.
    assert!(grads_agree(&[0.0; 3], &[0.0; 3], TOL));
    assert!(!grads_agree(&[1e-3; 3], &[0.0; 3], TOL));
}

#[test]
#[should_panic(expected = "all-zero analytic gradient")]
fn harness_refuses_vacuous_checks() {
    // An output that does not depend on the input cannot pass as a gradient check.
    let x = Input::randn(&mut rng("vacuous"), &[3], 1.0);
    check("vacuous").run(&[x], |t, _v| t.constant(&[2], &[1.0, 2.0]));
}

// ---- linear algebra --------------------------------------------------------------------------------

#[test]
fn linear_with_and_without_bias() {
    let mut r = rng("linear");
    // [rows, k] x [n, k]ᵀ + b, non-square everywhere.
    let ins = [Input::randn(&mut r, &[5, 7], 1.0), Input::randn(&mut r, &[3, 7], 0.5), Input::randn(&mut r, &[3], 1.0)];
    check("linear 5x7 · 3x7ᵀ + b").run(&ins, |t, v| t.linear(v[0], v[1], Some(v[2])));
    // 3-D input: the leading dimensions are flattened into rows.
    let ins = [Input::randn(&mut r, &[2, 3, 4], 1.0), Input::randn(&mut r, &[6, 4], 0.5)];
    let res = check("linear 2x3x4 · 6x4ᵀ").run(&ins, |t, v| t.linear(v[0], v[1], None));
    assert_eq!(res.out_shape, vec![2, 3, 6]);
    // Degenerate 1x1.
    let ins = [Input::randn(&mut r, &[1, 1], 1.0), Input::randn(&mut r, &[1, 1], 1.0), Input::randn(&mut r, &[1], 1.0)];
    check("linear 1x1").run(&ins, |t, v| t.linear(v[0], v[1], Some(v[2])));
}

#[test]
fn matmul_all_transposes_2d_and_batched() {
    let mut r = rng("matmul");
    let (m, n, k) = (3usize, 5usize, 4usize);
    for batch in [None, Some(2usize)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let sa = if ta { [k, m] } else { [m, k] };
                let sb = if tb { [n, k] } else { [k, n] };
                let (sa, sb): (Vec<usize>, Vec<usize>) = match batch {
                    None => (sa.to_vec(), sb.to_vec()),
                    Some(b) => ([&[b][..], &sa].concat(), [&[b][..], &sb].concat()),
                };
                let ins = [Input::randn(&mut r, &sa, 1.0), Input::randn(&mut r, &sb, 1.0)];
                let res = check(&format!("matmul batch {batch:?} ta {ta} tb {tb}"))
                    .run(&ins, move |t, v| t.matmul(v[0], v[1], ta, tb));
                let want: Vec<usize> = match batch { None => vec![m, n], Some(b) => vec![b, m, n] };
                assert_eq!(res.out_shape, want);
                // Value: against a naive product.
                let bcount = batch.unwrap_or(1);
                let mut c = vec![0.0f64; bcount * m * n];
                for b in 0..bcount {
                    let a = &ins[0].data[b * m * k..];
                    let bb = &ins[1].data[b * k * n..];
                    for i in 0..m {
                        for j in 0..n {
                            c[b * m * n + i * n + j] = (0..k).map(|l| {
                                let av = if ta { a[l * m + i] } else { a[i * k + l] };
                                let bv = if tb { bb[j * k + l] } else { bb[l * n + j] };
                                av as f64 * bv as f64
                            }).sum();
                        }
                    }
                }
                assert_close("matmul value", &res.output, &c, 1e-5, 1e-5);
            }
        }
    }
}

#[test]
fn matmul_large_enough_for_the_parallel_gemm_path() {
    // m·n·k above the CPU backend's GEMM_PARALLEL_MIN (2^17), so the product and both gradient products
    // are split into row blocks across threads; only a random subset of coordinates is differenced.
    let mut r = rng("matmul-big");
    for (ta, tb) in [(false, true), (true, false)] {
        let sa = if ta { [48, 70] } else { [70, 48] };
        let sb = if tb { [40, 48] } else { [48, 40] };
        let ins = [Input::randn(&mut r, &sa, 0.3), Input::randn(&mut r, &sb, 0.3)];
        check(&format!("matmul 70x48x40 ta {ta} tb {tb}")).max_coords(48)
            .run(&ins, move |t, v| t.matmul(v[0], v[1], ta, tb));
    }
}

// ---- elementwise -----------------------------------------------------------------------------------

#[test]
fn add_sub_mul_scale() {
    let mut r = rng("elementwise");
    for shape in [vec![4, 5], vec![3], vec![2, 3, 4]] {
        let ins = [Input::randn(&mut r, &shape, 1.0), Input::randn(&mut r, &shape, 1.0)];
        check("add").run(&ins, |t, v| t.add(v[0], v[1]));
        check("sub").run(&ins, |t, v| t.sub(v[0], v[1]));
        let res = check("mul").run(&ins, |t, v| t.mul(v[0], v[1]));
        let want: Vec<f64> = ins[0].data.iter().zip(&ins[1].data).map(|(a, b)| *a as f64 * *b as f64).collect();
        assert_close("mul value", &res.output, &want, 0.0, 1e-6);
        check("scale").run(&ins[..1], |t, v| t.scale(v[0], -1.7));
        // One input used twice: gradients of both uses must be summed.
        check("mul(x, x)").run(&ins[..1], |t, v| t.mul(v[0], v[0]));
        check("add(x, x)·x").run(&ins[..1], |t, v| {
            let s = t.add(v[0], v[0]);
            t.mul(s, v[0])
        });
    }
}

#[test]
fn concat_cols() {
    let mut r = rng("concat_cols");
    for (ra, rb) in [(vec![4, 3], vec![4, 5]), (vec![1, 1], vec![1, 2]), (vec![2, 3, 2], vec![6, 1])] {
        let ins = [Input::randn(&mut r, &ra, 1.0), Input::randn(&mut r, &rb, 1.0)];
        // Composed with a product so that a gradient routed to the wrong half or row shows up.
        let res = check(&format!("concat_cols {ra:?} {rb:?}")).run(&ins, |t, v| {
            let c = t.concat_cols(v[0], v[1]);
            t.mul(c, c)
        });
        let (ca, cb) = (*ra.last().unwrap(), *rb.last().unwrap());
        let rows = ins[0].len() / ca;
        assert_eq!(res.out_shape, vec![rows, ca + cb]);
        let want: Vec<f64> = (0..rows).flat_map(|i| {
            let a = &ins[0].data[i * ca..][..ca];
            let b = &ins[1].data[i * cb..][..cb];
            a.iter().chain(b).map(|&v| (v as f64) * (v as f64)).collect::<Vec<_>>()
        }).collect();
        assert_close("concat_cols value", &res.output, &want, 1e-7, 1e-6);
    }
}

#[test]
fn add_bias() {
    let mut r = rng("add_bias");
    let ins = [Input::randn(&mut r, &[4, 5], 1.0), Input::randn(&mut r, &[5], 1.0)];
    check("add_bias 4x5").run(&ins, |t, v| t.add_bias(v[0], v[1]));
    let ins = [Input::randn(&mut r, &[2, 3, 4], 1.0), Input::randn(&mut r, &[4], 1.0)];
    check("add_bias 2x3x4").run(&ins, |t, v| t.add_bias(v[0], v[1]));
}

#[test]
fn relu_away_from_the_kink() {
    // |x| >= 0.05 > h: the finite difference never straddles 0.
    let mut r = rng("relu");
    for shape in [vec![6, 7], vec![13]] {
        let x = Input::randn_away_from_zero(&mut r, &shape, 0.05);
        let res = check("relu").run(std::slice::from_ref(&x), |t, v| t.relu(v[0]));
        let want: Vec<f64> = x.data.iter().map(|&v| (v as f64).max(0.0)).collect();
        assert_close("relu value", &res.output, &want, 0.0, 0.0);
    }
}

#[test]
fn gelu_and_softplus() {
    let mut r = rng("gelu");
    for shape in [vec![6, 7], vec![11]] {
        let x = Input::randn(&mut r, &shape, 2.0);
        check("gelu").run(std::slice::from_ref(&x), |t, v| t.gelu(v[0]));
        let res = check("softplus").run(std::slice::from_ref(&x), |t, v| t.softplus(v[0]));
        let want: Vec<f64> = x.data.iter().map(|&v| softplus64(v as f64)).collect();
        assert_close("softplus value", &res.output, &want, 1e-6, 1e-6);
    }
    // Saturated tails: softplus must stay finite and exact-ish, its gradient σ(x) in {≈0, ≈1}.
    let x = Input::new(&[6], vec![-30.0, -9.0, -0.3, 0.4, 9.0, 30.0]);
    let res = check("softplus tails").run(std::slice::from_ref(&x), |t, v| t.softplus(v[0]));
    let want: Vec<f64> = x.data.iter().map(|&v| softplus64(v as f64)).collect();
    assert_close("softplus tails value", &res.output, &want, 1e-7, 1e-6);
    check("gelu tails").run(std::slice::from_ref(&x), |t, v| t.gelu(v[0]));
}

#[test]
fn elementwise_derivatives_match_closed_forms() {
    // For an elementwise op the analytic gradient of L = Σ f(x)∘W is W∘f'(x) exactly, so it can be held
    // to f32 precision against an f64 closed form — much tighter than the finite-difference check, and it
    // catches small constant slips (e.g. 0.4 for 1/√2π in the GELU derivative) that a 1e-2 relative
    // tolerance could let through.
    let x = Input::randn(&mut rng("closed-forms"), &[40], 2.5);
    let be = CpuBackend::new();
    let w = loss_weights(40, 0x5EED);
    type D = fn(f64) -> f64;
    let cases: [(&str, D, D); 3] = [
        ("gelu", |v| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)),
                 |v| 0.5 * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)) + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()),
        ("softplus", |v| softplus64(v), |v| 1.0 / (1.0 + (-v).exp())),
        ("log_sigmoid", |v| -softplus64(-v), |v| 1.0 / (1.0 + v.exp())),
    ];
    for (name, f, df) in cases {
        let mut t = Tape::new(&be, 0, 0);
        let lx = t.leaf(&[40], &x.data);
        let y = match name {
            "gelu" => t.gelu(lx),
            "softplus" => t.softplus(lx),
            _ => t.log_sigmoid(lx),
        };
        let out = t.to_host(y);
        let wv = t.constant(&[40], &w);
        let p = t.mul(y, wv);
        let loss = t.sum(p);
        t.backward(loss, &mut Vec::new());
        let g = t.grad(lx).unwrap();
        let xs = f64s(&x.data);
        assert_close(&format!("{name} value"), &out, &xs.iter().map(|&v| f(v)).collect::<Vec<_>>(), 1e-6, 1e-6);
        let want: Vec<f64> = xs.iter().zip(&w).map(|(&v, &wi)| df(v) * wi as f64).collect();
        assert_close(&format!("{name} derivative"), &g, &want, 1e-6, 1e-5);
    }
}

#[test]
fn log_sigmoid_gradient_and_value() {
    let mut r = rng("log_sigmoid");
    let mut x = Input::randn(&mut r, &[5, 3], 3.0);
    x.data[0] = -30.0;
    x.data[1] = 30.0;
    let res = check("log_sigmoid").run(std::slice::from_ref(&x), |t, v| t.log_sigmoid(v[0]));
    let want: Vec<f64> = x.data.iter().map(|&v| (1.0 / (1.0 + (-(v as f64)).exp())).ln()).collect();
    assert_close("log_sigmoid value", &res.output, &want, 1e-6, 1e-6);
}

#[test]
fn dropout_gradient_with_a_fixed_mask() {
    let mut r = rng("dropout");
    let x = Input::randn(&mut r, &[8, 9], 1.0);
    // Two dropouts in one tape (distinct op indices → distinct masks), composed with a nonlinearity so
    // the check is not just linear algebra.
    let res = check("dropout p=0.25").run(std::slice::from_ref(&x), |t, v| {
        let a = t.dropout(v[0], 0.25);
        let g = t.gelu(a);
        t.dropout(g, 0.25)
    });
    assert!(res.analytic[0].iter().any(|&g| g == 0.0), "some elements must be dropped");
    // 40 200 elements: more than one of the CPU backend's 16 Ki-element parallel chunks, so the mask's
    // global element index is exercised across chunk boundaries in forward and backward alike.
    let x = Input::randn(&mut r, &[200, 201], 1.0);
    let res = check("dropout single").max_coords(40).run(std::slice::from_ref(&x), |t, v| t.dropout(v[0], 0.25));
    let s = 1.0f32 / (1.0 - 0.25);
    for (i, (&y, &xv)) in res.output.iter().zip(&x.data).enumerate() {
        assert!(y == 0.0 || y == xv * s, "element {i}: {y} is neither 0 nor x/(1-p)");
        // Dropped elements get exactly zero gradient, kept ones W/(1-p).
        assert_eq!(res.analytic[0][i] == 0.0, y == 0.0);
    }
}

#[test]
fn dropout_mask_statistics_and_keys() {
    let be = CpuBackend::new();
    let n = 20_000;
    let data: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
    let run = |seed: u64, step: u64| {
        let mut t = Tape::new(&be, seed, step);
        let x = t.constant(&[n], &data);
        let a = t.dropout(x, 0.25);
        let b = t.dropout(x, 0.25);
        (t.to_host(a), t.to_host(b))
    };
    let (a, b) = run(1, 5);
    let dropped = a.iter().filter(|&&v| v == 0.0).count();
    // Binomial(20000, 0.25): mean 5000, sd ≈ 61.
    assert!((4700..5300).contains(&dropped), "dropped {dropped} of {n}");
    assert_ne!(a, b, "two dropout ops on one tape must use different masks");
    assert_eq!(run(1, 5).0, a, "same (seed, step) must give the same mask");
    assert_ne!(run(1, 6).0, a, "another step must give another mask");
    assert_ne!(run(2, 5).0, a, "another seed must give another mask");
    // Evaluation mode: identity.
    let mut t = Tape::inference(&be);
    let x = t.constant(&[n], &data);
    let y = t.dropout(x, 0.25);
    assert_eq!(t.to_host(y), data);
}

// ---- row-wise --------------------------------------------------------------------------------------

#[test]
fn layer_norm_wrt_x_gamma_beta() {
    let mut r = rng("layer_norm");
    for (shape, cols) in [(vec![4, 6], 6usize), (vec![3, 2, 5], 5), (vec![2, 3], 3)] {
        let ins = [Input::randn(&mut r, &shape, 1.5), Input::uniform(&mut r, &[cols], 0.5, 1.5), Input::randn(&mut r, &[cols], 1.0)];
        // Short rows have high curvature in x (rstd varies fast): smaller step.
        let res = check(&format!("layer_norm {shape:?}")).h(3e-3).run(&ins, |t, v| t.layer_norm(v[0], v[1], v[2], 1e-5));
        // Value against f64.
        let mut want = Vec::new();
        for row in ins[0].data.chunks(cols) {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / cols as f64;
            for (i, &v) in row.iter().enumerate() {
                want.push((v as f64 - m) / (var + 1e-5).sqrt() * ins[1].data[i] as f64 + ins[2].data[i] as f64);
            }
        }
        assert_close("layer_norm value", &res.output, &want, 1e-5, 1e-5);
    }
}

#[test]
fn row_wise_ops_over_more_rows_than_one_parallel_chunk() {
    // The CPU backend splits row-wise ops into rayon tasks of 64 rows; 150 rows span three tasks, the
    // last one partial. A random subset of coordinates is differenced.
    let mut r = rng("many-rows");
    let x = Input::randn(&mut r, &[150, 3], 1.5);
    let g = Input::uniform(&mut r, &[3], 0.5, 1.5);
    let b = Input::randn(&mut r, &[3], 1.0);
    check("layer_norm 150x3").h(3e-3).max_coords(60).run(&[x.clone(), g, b.clone()], |t, v| t.layer_norm(v[0], v[1], v[2], 1e-5));
    check("softmax 150x3").max_coords(60).run(std::slice::from_ref(&x), |t, v| t.softmax(v[0]));
    check("log_softmax 150x3").max_coords(60).run(std::slice::from_ref(&x), |t, v| t.log_softmax(v[0]));
    check("l2_normalize 150x3").max_coords(60).run(std::slice::from_ref(&x), |t, v| t.l2_normalize(v[0], 1e-8));
    check("add_bias 150x3").max_coords(60).run(&[x.clone(), b], |t, v| t.add_bias(v[0], v[1]));
    let target: Vec<u32> = (0..150).map(|i| (i * 7 % 3) as u32).collect();
    check("cross_entropy 150x3").max_coords(60).run(std::slice::from_ref(&x), |t, v| t.cross_entropy(v[0], &target));
}

#[test]
fn softmax_and_log_softmax() {
    let mut r = rng("softmax");
    for (shape, cols) in [(vec![4, 5], 5usize), (vec![3, 1, 7], 7), (vec![1, 2], 2)] {
        let x = Input::randn(&mut r, &shape, 2.0);
        let res = check(&format!("softmax {shape:?}")).run(std::slice::from_ref(&x), |t, v| t.softmax(v[0]));
        for row in res.output.chunks(cols) {
            let s: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((s - 1.0).abs() < 1e-6, "softmax row sums to {s}");
        }
        let res = check(&format!("log_softmax {shape:?}")).run(std::slice::from_ref(&x), |t, v| t.log_softmax(v[0]));
        let want: Vec<f64> = x.data.chunks(cols).flat_map(|row| log_softmax64(&f64s(row))).collect();
        assert_close("log_softmax value", &res.output, &want, 1e-6, 1e-6);
    }
    // One column: softmax ≡ 1 and log_softmax ≡ 0, so the gradient is exactly zero.
    let x = Input::randn(&mut r, &[3, 1], 1.0);
    let res = check("softmax 1 column").expect_zero(0).run(std::slice::from_ref(&x), |t, v| t.softmax(v[0]));
    assert!(res.output.iter().all(|&v| v == 1.0));
    check("log_softmax 1 column").expect_zero(0).run(std::slice::from_ref(&x), |t, v| t.log_softmax(v[0]));
}

#[test]
fn l2_normalize_row_dot_cosine() {
    let mut r = rng("l2");
    for (shape, cols) in [(vec![4, 6], 6usize), (vec![5, 3], 3), (vec![2, 3, 4], 4)] {
        let x = Input::randn(&mut r, &shape, 1.0);
        let res = check(&format!("l2_normalize {shape:?}")).run(std::slice::from_ref(&x), |t, v| t.l2_normalize(v[0], 1e-8));
        for row in res.output.chunks(cols) {
            let nrm: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            assert!((nrm - 1.0).abs() < 1e-6, "normalised row has norm {nrm}");
        }
        let ins = [x.clone(), Input::randn(&mut r, &shape, 1.0)];
        let res = check(&format!("row_dot {shape:?}")).run(&ins, |t, v| t.row_dot(v[0], v[1]));
        let want: Vec<f64> = ins[0].data.chunks(cols).zip(ins[1].data.chunks(cols))
            .map(|(a, b)| a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum()).collect();
        assert_close("row_dot value", &res.output, &want, 1e-6, 1e-6);
        let res = check(&format!("cosine {shape:?}")).run(&ins, |t, v| t.cosine(v[0], v[1], 1e-8));
        let want: Vec<f64> = ins[0].data.chunks(cols).zip(ins[1].data.chunks(cols)).map(|(a, b)| {
            let d: f64 = a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum();
            let na = a.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let nb = b.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            d / (na * nb)
        }).collect();
        assert_close("cosine value", &res.output, &want, 1e-6, 1e-6);
    }
    // A row shorter than eps is divided by eps (a plain scaling); a normal row next to it is normalised.
    // Small step so the tiny row stays below eps under perturbation.
    let mut x = Input::randn(&mut r, &[2, 4], 1.0);
    for v in &mut x.data[..4] {
        *v *= 1e-2;
    }
    let res = check("l2_normalize below eps").h(1e-3).run(std::slice::from_ref(&x), |t, v| t.l2_normalize(v[0], 0.5));
    assert_close("l2_normalize below eps value", &res.output[..4], &f64s(&x.data[..4]).iter().map(|v| v / 0.5).collect::<Vec<_>>(), 1e-7, 1e-6);
}

// ---- indexing --------------------------------------------------------------------------------------

#[test]
fn gather_rows_and_embedding_with_repeats_and_padding() {
    let mut r = rng("gather_rows");
    let table = Input::randn(&mut r, &[6, 4], 1.0);
    let ids = [3u32, 0, 5, 3, 3, 0, 1];
    let full = check("gather_rows (no skip)").run(std::slice::from_ref(&table), |t, v| t.gather_rows(v[0], &ids, None));
    assert_close("gather_rows value", &full.output,
                 &ids.iter().flat_map(|&i| f64s(&table.data[i as usize * 4..][..4])).collect::<Vec<_>>(), 0.0, 0.0);
    // Rows 2 and 4 are never looked up: exactly zero gradient.
    for row in [2usize, 4] {
        assert!(full.analytic[0][row * 4..][..4].iter().all(|&g| g == 0.0));
    }
    // Embedding: padding row 0 receives no gradient although the output depends on it, so it is left
    // out of the numeric comparison and checked to be exactly zero instead.
    let emb = check("embedding (padding 0)").exclude(0, 0..4).run(std::slice::from_ref(&table), |t, v| t.embedding(v[0], &ids));
    assert!(emb.analytic[0][..4].iter().all(|&g| g == 0.0), "padding row got {:?}", &emb.analytic[0][..4]);
    assert_eq!(emb.analytic[0][4..], full.analytic[0][4..], "non-padding rows must match the plain gather");
    // Row 3 appears three times: its gradient is the sum of three rows of W.
    let w = loss_weights(ids.len() * 4, 0x5EED);
    for c in 0..4 {
        let want = w[c] + w[3 * 4 + c] + w[4 * 4 + c];
        assert!((emb.analytic[0][3 * 4 + c] - want).abs() < 1e-6);
    }
}

#[test]
fn gather_cols_single_and_repeated() {
    let mut r = rng("gather_cols");
    let x = Input::randn(&mut r, &[4, 6], 1.0);
    // j = 3 with a column repeated inside a row and the same column in several rows.
    let idx = [2u32, 2, 5, 0, 1, 0, 5, 5, 5, 3, 4, 2];
    let res = check("gather_cols j=3").run(std::slice::from_ref(&x), |t, v| t.gather_cols(v[0], &idx, 3));
    let want: Vec<f64> = idx.iter().enumerate().map(|(p, &c)| x.data[(p / 3) * 6 + c as usize] as f64).collect();
    assert_close("gather_cols value", &res.output, &want, 0.0, 0.0);
    // j = 1.
    let idx1 = [5u32, 0, 3, 3];
    let res = check("gather_cols j=1").run(std::slice::from_ref(&x), |t, v| t.gather_cols(v[0], &idx1, 1));
    assert_eq!(res.out_shape, vec![4, 1]);
}

#[test]
fn score_candidates_single_and_repeated() {
    let mut r = rng("score_candidates");
    let ins = [Input::randn(&mut r, &[3, 5], 1.0), Input::randn(&mut r, &[7, 5], 1.0)];
    // j = 4: item 6 twice in row 0, item 2 in every row, item 0 included.
    let idx = [6u32, 2, 6, 0, 2, 1, 4, 3, 5, 2, 2, 6];
    let res = check("score_candidates j=4").run(&ins, |t, v| t.score_candidates(v[0], v[1], &idx, 4));
    let want: Vec<f64> = idx.iter().enumerate().map(|(p, &it)| {
        let h = &ins[0].data[(p / 4) * 5..][..5];
        let e = &ins[1].data[it as usize * 5..][..5];
        h.iter().zip(e).map(|(a, b)| *a as f64 * *b as f64).sum()
    }).collect();
    assert_close("score_candidates value", &res.output, &want, 1e-6, 1e-6);
    let idx1 = [4u32, 4, 0];
    let res = check("score_candidates j=1").run(&ins, |t, v| t.score_candidates(v[0], v[1], &idx1, 1));
    assert_eq!(res.out_shape, vec![3, 1]);
    // Items never scored get exactly zero gradient.
    for item in [1usize, 2, 3, 5, 6] {
        assert!(res.analytic[1][item * 5..][..5].iter().all(|&g| g == 0.0));
    }
}

// ---- attention -------------------------------------------------------------------------------------

/// Naive f64 attention: per sequence and head, causal softmax over valid keys, optional dropout on the
/// weights keyed like the backend (index in the per-(sequence, head) probability buffer).
fn attention_ref(qkv: &[f32], offsets: &[u32], valid: &[u32], d: usize, heads: usize, drop: Option<DropoutKey>) -> Vec<f64> {
    let t = *offsets.last().unwrap() as usize;
    let dh = d / heads;
    let mut out = vec![0.0f64; t * d];
    let mut prob_base = 0usize;
    let at = |row: usize, col: usize| qkv[row * 3 * d + col] as f64;
    for s in 0..offsets.len() - 1 {
        let (a, b) = (offsets[s] as usize, offsets[s + 1] as usize);
        let n = b - a;
        for h in 0..heads {
            for i in 0..n {
                let vis: Vec<usize> = (0..=i).filter(|&j| valid[a + j] != 0).collect();
                if vis.is_empty() {
                    continue;
                }
                let sc: Vec<f64> = vis.iter().map(|&j| {
                    (0..dh).map(|l| at(a + i, h * dh + l) * at(a + j, d + h * dh + l)).sum::<f64>() / (dh as f64).sqrt()
                }).collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (pi, &j) in vis.iter().enumerate() {
                    let mut p = e[pi] / z;
                    if let Some(key) = drop {
                        let el = (prob_base + h * n * n + i * n + j) as u64;
                        p = if counter_uniform(key.seed, key.stream, el) < key.p { 0.0 } else { p / (1.0 - key.p as f64) };
                    }
                    for l in 0..dh {
                        out[(a + i) * d + h * dh + l] += p * at(a + j, 2 * d + h * dh + l);
                    }
                }
            }
        }
        prob_base += heads * n * n;
    }
    out
}

fn offsets_of(lengths: &[usize]) -> Vec<u32> {
    let mut o = vec![0u32];
    for &n in lengths {
        o.push(o.last().unwrap() + n as u32);
    }
    o
}

#[test]
fn attention_forward_matches_naive_reference() {
    let be = CpuBackend::new();
    let mut r = rng("attention-ref");
    let cases: Vec<(Vec<usize>, Option<Vec<u32>>, usize, usize)> = vec![
        (vec![3, 1, 5, 2], None, 12, 3),
        // Left padding, a hole, an all-invalid sequence, and a query whose only visible key is invalid.
        (vec![4, 3, 2, 5], Some(vec![0, 0, 1, 1, /**/ 0, 0, 0, /**/ 1, 1, /**/ 1, 0, 1, 1, 0]), 12, 2),
        (vec![6, 1], Some(vec![0, 1, 1, 1, 1, 1, 1]), 8, 1),
    ];
    for (lengths, valid, d, heads) in cases {
        let offsets = offsets_of(&lengths);
        let t = *offsets.last().unwrap() as usize;
        let valid = valid.unwrap_or_else(|| vec![1; t]);
        let layout = SeqLayout::new(&be, offsets.clone(), valid.clone());
        let qkv: Vec<f32> = (0..t * 3 * d).map(|_| r.normal()).collect();
        for drop in [None, Some(DropoutKey { p: 0.3, seed: 99, stream: 4 })] {
            let (out, _) = be.attention(&qkv, &layout, d, heads, drop);
            let want = attention_ref(&qkv, &offsets, &valid, d, heads, drop);
            assert_close(&format!("attention {lengths:?} heads {heads} drop {}", drop.is_some()), &out, &want, 2e-5, 2e-5);
        }
    }
}

fn qkv_input(r: &mut Rng, t: usize, d: usize) -> Input {
    Input::randn(r, &[t, 3 * d], 1.0)
}

#[test]
fn attention_gradients_across_heads_and_lengths() {
    let be = CpuBackend::new();
    let mut r = rng("attention-grad");
    // Several sequences of different lengths including length 1; d = 12 with 1, 2 and 3 heads.
    let lengths = [3usize, 1, 5, 2];
    let layout = Arc::new(SeqLayout::from_lengths(&be, &lengths));
    for heads in [1usize, 2, 3] {
        let x = qkv_input(&mut r, 11, 12);
        let l = layout.clone();
        let res = check(&format!("attention heads {heads}")).run(std::slice::from_ref(&x), move |t, v| t.attention(v[0], &l, heads, 0.0));
        assert_eq!(res.out_shape, vec![11, 12]);
        // A length-1 sequence attends only to itself: output = its value row; its query and key get no
        // gradient (softmax over one key is constant).
        let row = 3;
        assert_close("length-1 output", &res.output[row * 12..][..12], &f64s(&x.data[row * 36 + 24..][..12]), 0.0, 0.0);
        assert!(res.analytic[0][row * 36..][..24].iter().all(|&g| g == 0.0));
    }
}

#[test]
fn attention_long_sequence() {
    // A 23-token sequence next to a 2-token one, 2 heads: longer softmax rows, subset of coordinates.
    let be = CpuBackend::new();
    let layout = Arc::new(SeqLayout::from_lengths(&be, &[23, 2]));
    let x = qkv_input(&mut rng("attention-long"), 25, 12);
    check("attention 23+2 heads 2").max_coords(150).run(std::slice::from_ref(&x), move |t, v| t.attention(v[0], &layout, 2, 0.0));
}

#[test]
fn attention_with_invalid_keys() {
    let be = CpuBackend::new();
    let mut r = rng("attention-masked");
    // seq 0: left padding [0,0,1,1]; seq 1: all keys invalid; seq 2: a hole in the middle, and its first
    // query sees only an invalid key; seq 3: length 1, valid.
    let lengths = [4usize, 3, 4, 1];
    let valid = vec![0, 0, 1, 1, /**/ 0, 0, 0, /**/ 0, 1, 0, 1, /**/ 1];
    let layout = Arc::new(SeqLayout::new(&be, offsets_of(&lengths), valid));
    for heads in [2usize, 3] {
        let x = qkv_input(&mut r, 12, 12);
        let l = layout.clone();
        let res = check(&format!("attention masked heads {heads}")).run(std::slice::from_ref(&x), move |t, v| t.attention(v[0], &l, heads, 0.0));
        // Queries with no visible key output exactly 0: rows 0, 1 (left padding), 4..7 (all invalid),
        // 7 (first query of seq 2 sees only its own invalid key). Their gradient is zero and finite.
        for row in [0usize, 1, 4, 5, 6, 7] {
            assert!(res.output[row * 12..][..12].iter().all(|&v| v == 0.0), "row {row} must be 0: {:?}", &res.output[row * 12..][..12]);
        }
        // Nothing in the all-invalid sequence influences anything.
        assert!(res.analytic[0][4 * 36..7 * 36].iter().all(|&g| g == 0.0));
        // Invalid keys get no key/value gradient.
        for row in [0usize, 1, 7, 9] {
            assert!(res.analytic[0][row * 36 + 12..][..24].iter().all(|&g| g == 0.0), "row {row}");
        }
    }
}

#[test]
fn attention_with_dropout() {
    let be = CpuBackend::new();
    let mut r = rng("attention-dropout");
    let lengths = [5usize, 1, 4];
    let valid = vec![0, 1, 1, 1, 1, /**/ 1, /**/ 1, 1, 0, 1];
    let layout = Arc::new(SeqLayout::new(&be, offsets_of(&lengths), valid));
    for heads in [1usize, 3] {
        let x = qkv_input(&mut r, 10, 12);
        let l = layout.clone();
        let res = check(&format!("attention dropout 0.3 heads {heads}")).seed_step(7, 11)
            .run(std::slice::from_ref(&x), move |t, v| t.attention(v[0], &l, heads, 0.3));
        // The mask really is active: the output differs from the no-dropout output.
        let mut t = Tape::inference(&be);
        let q = t.constant(&[10, 36], &x.data);
        let y = t.attention(q, &layout, heads, 0.3);
        assert_ne!(t.to_host(y), res.output, "dropout p=0.3 had no effect");
    }
}

#[test]
fn attention_is_independent_of_packing() {
    // One sequence packed alone and packed after others: bit-identical output rows and gradients.
    let be = CpuBackend::new();
    let mut r = rng("attention-packing");
    let d = 12;
    let heads = 3;
    let n = 5;
    let seq: Vec<f32> = (0..n * 3 * d).map(|_| r.normal()).collect();
    let seq_valid = vec![0u32, 1, 1, 0, 1];
    let dout_seq: Vec<f32> = (0..n * d).map(|_| r.normal()).collect();
    let run = |before: &[usize]| -> (Vec<f32>, Vec<f32>) {
        let mut r = Rng::new(before.len() as u64);
        let pre: usize = before.iter().sum();
        let mut qkv: Vec<f32> = (0..pre * 3 * d).map(|_| r.normal()).collect();
        qkv.extend_from_slice(&seq);
        let mut valid: Vec<u32> = (0..pre).map(|i| (i % 3 != 0) as u32).collect();
        valid.extend_from_slice(&seq_valid);
        let lengths: Vec<usize> = before.iter().cloned().chain([n]).collect();
        let layout = SeqLayout::new(&be, offsets_of(&lengths), valid);
        let (out, probs) = be.attention(&qkv, &layout, d, heads, None);
        let mut dout: Vec<f32> = (0..pre * d).map(|_| r.normal()).collect();
        dout.extend_from_slice(&dout_seq);
        let mut dqkv = vec![0.0; qkv.len()];
        be.attention_backward(&qkv, &probs, &layout, d, heads, None, &dout, &mut dqkv);
        (out[pre * d..].to_vec(), dqkv[pre * 3 * d..].to_vec())
    };
    let (alone_out, alone_grad) = run(&[]);
    assert!(alone_out.iter().any(|&v| v != 0.0) && alone_grad.iter().any(|&v| v != 0.0));
    for before in [vec![3usize], vec![2, 7, 1], vec![0, 4]] {
        let (out, grad) = run(&before);
        assert_eq!(out, alone_out, "output depends on packing after {before:?}");
        assert_eq!(grad, alone_grad, "gradient depends on packing after {before:?}");
    }
}

// ---- reductions and losses -------------------------------------------------------------------------

#[test]
fn sum_and_mean() {
    let mut r = rng("sum");
    for shape in [vec![3, 4], vec![7], vec![2, 3, 2]] {
        let x = Input::randn(&mut r, &shape, 1.0);
        let s: f64 = x.data.iter().map(|&v| v as f64).sum();
        let res = check("sum").run(std::slice::from_ref(&x), |t, v| t.sum(v[0]));
        assert_close("sum value", &res.output, &[s], 1e-6, 1e-6);
        let res = check("mean").run(std::slice::from_ref(&x), |t, v| t.mean(v[0]));
        assert_close("mean value", &res.output, &[s / x.len() as f64], 1e-6, 1e-6);
    }
}

#[test]
fn bpr_k1_and_k5() {
    let mut r = rng("bpr");
    for k in [1usize, 5] {
        let ins = [Input::randn(&mut r, &[4], 1.5), Input::randn(&mut r, &[4, k], 1.5)];
        let res = check(&format!("bpr k={k}")).run(&ins, |t, v| t.bpr(v[0], v[1]));
        let mut want = 0.0;
        for i in 0..4 {
            for j in 0..k {
                // −log σ(pos − neg)
                let x = ins[0].data[i] as f64 - ins[1].data[i * k + j] as f64;
                want -= (1.0 / (1.0 + (-x).exp())).ln();
            }
        }
        assert_close("bpr value", &res.output, &[want / (4 * k) as f64], 1e-6, 1e-6);
    }
}

#[test]
fn bce_logits() {
    let mut r = rng("bce");
    let x = Input::randn(&mut r, &[3, 5], 2.0);
    for labels in [(0..15).map(|i| ((i * 7) % 3 == 0) as u32 as f32).collect::<Vec<f32>>(),
                   (0..15).map(|_| r.uniform()).collect()] {
        let res = check("bce_logits").run(std::slice::from_ref(&x), |t, v| t.bce_logits(v[0], &labels));
        let want: f64 = x.data.iter().zip(&labels).map(|(&z, &y)| {
            let s = 1.0 / (1.0 + (-(z as f64)).exp());
            -(y as f64 * s.ln() + (1.0 - y as f64) * (1.0 - s).ln())
        }).sum::<f64>() / 15.0;
        assert_close("bce value", &res.output, &[want], 1e-6, 1e-6);
    }
}

#[test]
fn cross_entropy_c7_and_c1() {
    let mut r = rng("ce");
    let x = Input::randn(&mut r, &[5, 7], 2.0);
    let target = [0u32, 6, 3, 3, 1];
    let res = check("cross_entropy C=7").run(std::slice::from_ref(&x), |t, v| t.cross_entropy(v[0], &target));
    let want: f64 = x.data.chunks(7).zip(&target).map(|(row, &c)| -log_softmax64(&f64s(row))[c as usize]).sum::<f64>() / 5.0;
    assert_close("cross_entropy value", &res.output, &[want], 1e-6, 1e-6);
    // One class: the loss is identically 0 and so is its gradient.
    let x1 = Input::randn(&mut r, &[4, 1], 2.0);
    let res = check("cross_entropy C=1").expect_zero(0).run(std::slice::from_ref(&x1), |t, v| t.cross_entropy(v[0], &[0, 0, 0, 0]));
    assert_eq!(res.output, vec![0.0]);
}

#[test]
fn kl_div_against_a_softmax_teacher() {
    let mut r = rng("kl");
    for (rows, cols) in [(4usize, 6usize), (3, 2)] {
        let x = Input::randn(&mut r, &[rows, cols], 1.5);
        let teacher_logits: Vec<f32> = (0..rows * cols).map(|_| r.normal() * 2.0).collect();
        let tl = teacher_logits.clone();
        let res = check(&format!("kl_div {rows}x{cols}")).run(std::slice::from_ref(&x), move |t, v| {
            let c = t.constant(&[rows, cols], &tl);
            let teacher = t.softmax(c);
            t.kl_div(v[0], teacher)
        });
        let mut want = 0.0;
        for (row, trow) in x.data.chunks(cols).zip(teacher_logits.chunks(cols)) {
            let lq = log_softmax64(&f64s(row));
            let lp = log_softmax64(&f64s(trow));
            want += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        }
        assert_close("kl_div value", &res.output, &[want / rows as f64], 1e-6, 1e-5);
    }
    // A teacher with exact zeros (0·log 0 = 0), and the teacher is a constant: a leaf teacher gets no
    // gradient through kl_div.
    let x = Input::randn(&mut r, &[2, 4], 1.0);
    let probs = [0.0f32, 0.3, 0.7, 0.0, 0.25, 0.25, 0.25, 0.25];
    let res = check("kl_div zero teacher entries").run(std::slice::from_ref(&x), |t, v| {
        let teacher = t.constant(&[2, 4], &probs);
        t.kl_div(v[0], teacher)
    });
    let want: f64 = x.data.chunks(4).zip(probs.chunks(4)).map(|(row, p)| {
        let lq = log_softmax64(&f64s(row));
        p.iter().zip(&lq).map(|(&pi, q)| if pi > 0.0 { pi as f64 * ((pi as f64).ln() - q) } else { 0.0 }).sum::<f64>()
    }).sum::<f64>() / 2.0;
    assert_close("kl_div zero-teacher value", &res.output, &[want], 1e-6, 1e-5);
    let be = CpuBackend::new();
    let mut t = Tape::new(&be, 0, 0);
    let lx = t.leaf(&[2, 4], &x.data);
    let lt = t.leaf(&[2, 4], &probs);
    let loss = t.kl_div(lx, lt);
    t.backward(loss, &mut Vec::new());
    assert!(t.grad(lt).map_or(true, |g| g.iter().all(|&v| v == 0.0)), "teacher must be treated as constant");
}

#[test]
fn mse() {
    let mut r = rng("mse");
    for shape in [vec![3, 4], vec![5]] {
        let ins = [Input::randn(&mut r, &shape, 1.0), Input::randn(&mut r, &shape, 1.0)];
        let res = check("mse").run(&ins, |t, v| t.mse(v[0], v[1]));
        let want = ins[0].data.iter().zip(&ins[1].data).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>() / ins[0].len() as f64;
        assert_close("mse value", &res.output, &[want], 1e-6, 1e-6);
        // The backend's fused mse (not used by the tape, which composes sub/mul/mean) agrees.
        let be = CpuBackend::new();
        assert_close("backend mse", &be.mse(&ins[0].data, &ins[1].data), &[want], 1e-6, 1e-6);
    }
}

/// log det of a small dense matrix by Gaussian elimination with partial pivoting (independent of the
/// Cholesky code under test).
fn logdet_lu(mut a: Vec<f64>, n: usize) -> f64 {
    let mut ld = 0.0;
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs())).unwrap();
        if p != c {
            for k in 0..n {
                a.swap(c * n + k, p * n + k);
            }
        }
        let piv = a[c * n + c];
        assert!(piv > 0.0 || p != c, "unexpected sign pattern");
        ld += piv.abs().ln();
        for i in c + 1..n {
            let f = a[i * n + c] / piv;
            for k in c..n {
                a[i * n + k] -= f * a[c * n + k];
            }
        }
    }
    ld
}

#[test]
fn logdet_of_a_gram_matrix_built_on_the_tape() {
    // G = X Xᵀ / k + 0.5·I from a leaf X, so the gradient flows logdet → add → matmul(X, X, ·, ᵀ) → X
    // (X is used twice in the product). X [5, 3] makes X Xᵀ rank-deficient: only the 0.5·I keeps G
    // positive definite, the high-curvature case; X [4, 6] is the full-rank one.
    let mut r = rng("logdet");
    for (n, k) in [(5usize, 3usize), (4, 6)] {
        let x = Input::randn(&mut r, &[n, k], 1.0);
        let eye: Vec<f32> = (0..n * n).map(|i| if i % (n + 1) == 0 { 0.5 } else { 0.0 }).collect();
        let e = eye.clone();
        let res = check(&format!("logdet {n}x{k}")).h(3e-3).run(std::slice::from_ref(&x), move |t, v| {
            let xx = t.matmul(v[0], v[0], false, true);
            let xx = t.scale(xx, 1.0 / k as f32);
            let c = t.constant(&[n, n], &e);
            let g = t.add(xx, c);
            t.logdet(g)
        });
        let mut g = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (0..k).map(|l| x.data[i * k + l] as f64 * x.data[j * k + l] as f64).sum::<f64>() / k as f64
                    + eye[i * n + j] as f64;
            }
        }
        assert_close("logdet value", &res.output, &[logdet_lu(g, n)], 1e-5, 1e-5);
    }
    // Not positive definite: NaN, which the trainer's non-finite guard reports.
    let be = CpuBackend::new();
    let mut t = Tape::inference(&be);
    let g = t.constant(&[2, 2], &[1.0, 2.0, 2.0, 1.0]);
    let ld = t.logdet(g);
    assert!(t.scalar(ld).is_nan());
}

// ---- parameters ------------------------------------------------------------------------------------

#[test]
fn param_gradients_land_in_the_flat_store() {
    let be = CpuBackend::new();
    let mut init = rng("params");
    let mut pb = ParamBuilder::new();
    let a = pb.add("g1", "layer.a", &[3, 4], Init::Normal(1.0), &mut init);
    let f = pb.add("g2", "frozen.w", &[4, 2], Init::Normal(1.0), &mut init);
    let b = pb.add("g1", "layer.b", &[2], Init::Uniform(0.5), &mut init);
    let mut store = pb.build(&be);
    assert_eq!(store.set_prefix_trainable("frozen.", false), 1);
    let x: Vec<f32> = (0..5 * 3).map(|_| init.normal()).collect();
    let w = loss_weights(5 * 2, 1);

    // y = add_bias(tanh-free chain: (x A) F, b); L = Σ y ∘ W in f64 on the host.
    let forward = |t: &mut Tape<'_, CpuBackend>, store: &ur4rec_engine::params::ParamStore<CpuBackend>| {
        let xv = t.constant(&[5, 3], &x);
        let av = t.param(store, a);
        let fv = t.param(store, f);
        let bv = t.param(store, b);
        let h = t.matmul(xv, av, false, false);
        let h = t.gelu(h);
        let z = t.matmul(h, fv, false, false);
        t.add_bias(z, bv)
    };
    let loss_of = |store: &ur4rec_engine::params::ParamStore<CpuBackend>| -> f64 {
        let mut t = Tape::new(&be, 0, 0);
        let y = forward(&mut t, store);
        t.to_host(y).iter().zip(&w).map(|(p, q)| *p as f64 * *q as f64).sum()
    };

    // Sentinel in the gradient buffer: backward must ADD, and must not touch the frozen range.
    be.fill(&mut store.grads, 0.25);
    let mut t = Tape::new(&be, 0, 0);
    let y = forward(&mut t, &store);
    let wv = t.constant(&[5, 2], &w);
    let p = t.mul(y, wv);
    let loss = t.sum(p);
    let mut grads = std::mem::take(&mut store.grads);
    t.backward(loss, &mut grads);
    drop(t);
    store.grads = grads;
    assert_eq!(store.grads_of(&be, f), vec![0.25; 8], "frozen parameter received a gradient");

    for id in [a, b] {
        let info = store.info(id).clone();
        let analytic: Vec<f64> = store.grads_of(&be, id).iter().map(|g| *g as f64 - 0.25).collect();
        // The same numbers read straight from the flat buffer at the parameter's offset.
        let flat = be.to_host(&store.grads);
        assert_eq!(store.grads_of(&be, id), flat[info.offset..info.offset + info.len].to_vec());
        let orig = store.values_of(&be, id);
        let mut numeric = Vec::new();
        for c in 0..info.len {
            let mut v = orig.clone();
            v[c] = (orig[c] as f64 + H) as f32;
            store.set_values(&be, id, &v);
            let lp = loss_of(&store);
            v[c] = (orig[c] as f64 - H) as f32;
            store.set_values(&be, id, &v);
            let lm = loss_of(&store);
            numeric.push((lp - lm) / ((orig[c] as f64 + H) as f32 as f64 - (orig[c] as f64 - H) as f32 as f64));
        }
        store.set_values(&be, id, &orig);
        assert!(analytic.iter().any(|&g| g != 0.0));
        assert!(grads_agree(&analytic, &numeric, TOL), "{}: analytic {analytic:?} vs numeric {numeric:?}", info.name);
    }

    // Unfreezing makes the same parameter receive its gradient.
    store.set_group_trainable(store.group_index("g2").unwrap(), true);
    store.zero_grads(&be);
    let mut t = Tape::new(&be, 0, 0);
    let y = forward(&mut t, &store);
    let loss = t.sum(y);
    let mut grads = std::mem::take(&mut store.grads);
    t.backward(loss, &mut grads);
    drop(t);
    store.grads = grads;
    assert!(store.grads_of(&be, f).iter().any(|&g| g != 0.0));
}

#[test]
fn detach_stops_the_gradient() {
    let x = Input::randn(&mut rng("detach"), &[2, 3], 1.0);
    // y = x ∘ stop(x): dy/dx = stop(x), half of what mul(x, x) gives.
    let be = CpuBackend::new();
    let mut t = Tape::new(&be, 0, 0);
    let lx = t.leaf(&x.shape, &x.data);
    let dx = t.detach(lx);
    let y = t.mul(lx, dx);
    let loss = t.sum(y);
    t.backward(loss, &mut Vec::new());
    assert_eq!(t.grad(lx).unwrap(), x.data);
}

/// Fused InfoNCE against a memory bank: value against a direct f64 evaluation of the logits (positive once,
/// in-batch diagonal skipped, same-user bank slots masked, user-0 slots kept), and gradients to both the
/// queries and the in-batch keys. Inputs are normalised on the tape, as the model does. A bank stored in bf16
/// or f16 is read as its rounded values (the direct evaluation uses those).
#[test]
fn infonce_bank_value_and_gradients() {
    let mut r = rng("infonce");
    for (b, d, kslots, format) in [(4usize, 6usize, 0usize, StoreFormat::F32), (5, 3, 7, StoreFormat::F32),
                                   (1, 4, 5, StoreFormat::F32), (5, 3, 7, StoreFormat::Bf16), (3, 5, 6, StoreFormat::F16)] {
        let ins = [Input::randn(&mut r, &[b, d], 1.0), Input::randn(&mut r, &[b, d], 1.0)];
        let mut bank = Vec::new();
        for _ in 0..kslots {
            let row: Vec<f32> = (0..d).map(|_| r.normal()).collect();
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            bank.extend(row.iter().map(|x| x / n));
        }
        let users: Vec<u32> = (0..b as u32).map(|i| i + 1).collect();
        // Slot users: some match batch users (masked for that query), some are 0 (never masked).
        let bank_users: Vec<u32> = (0..kslots as u32).map(|s| if s % 3 == 0 { 0 } else { 1 + s % (b as u32 + 1) }).collect();
        let tau = 0.2;
        // No bank at all (K = 0) is in-batch InfoNCE.
        let shared = (Arc::new(Stored::from_host(&CpuBackend::new(), &bank, format)), Arc::new(bank_users.clone()));
        let users_on_device = Arc::new(users.clone());
        let res = check(&format!("infonce_bank b={b} d={d} K={kslots} bank {}", format.name())).run(&ins, |t, v| {
            let q = t.l2_normalize(v[0], 1e-12);
            let k = t.l2_normalize(v[1], 1e-12);
            t.infonce_bank(q, k, (kslots > 0).then_some(&shared), &users_on_device, tau)
        });
        let bank: Vec<f32> = bank.iter().map(|&x| format.round(x)).collect();
        if format != StoreFormat::F32 {
            assert!(shared.0.to_host(&CpuBackend::new()) == bank, "the stored bank reads as its rounded values");
        }
        let norm = |x: &[f32]| -> Vec<f64> {
            let n = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            x.iter().map(|v| *v as f64 / n).collect()
        };
        let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>() / tau as f64;
        let mut want = 0.0;
        for i in 0..b {
            let qi = norm(&ins[0].data[i * d..(i + 1) * d]);
            let mut logits = vec![dot(&qi, &norm(&ins[1].data[i * d..(i + 1) * d]))];
            for j in (0..b).filter(|&j| j != i) {
                logits.push(dot(&qi, &norm(&ins[1].data[j * d..(j + 1) * d])));
            }
            for s in 0..kslots {
                if bank_users[s] == 0 || bank_users[s] != users[i] {
                    let row: Vec<f64> = bank[s * d..(s + 1) * d].iter().map(|&v| v as f64).collect();
                    logits.push(dot(&qi, &row));
                }
            }
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            want += lse - logits[0];
        }
        assert_close("infonce_bank value", &res.output, &[want / b as f64], 1e-5, 1e-5);
    }
}

#[test]
fn reshape_and_add_identity() {
    let mut r = rng("reshape");
    let x = Input::randn(&mut r, &[3, 4], 1.0);
    check("reshape").run(std::slice::from_ref(&x), |t, v| {
        let y = t.reshape(v[0], &[4, 3]);
        let z = t.mul(y, y);
        t.reshape(z, &[12])
    });
    let a = Input::randn(&mut r, &[3, 3], 1.0);
    let res = check("add_identity").run(std::slice::from_ref(&a), |t, v| t.add_identity(v[0], 0.7));
    for i in 0..9 {
        let want = a.data[i] as f64 + if i % 4 == 0 { 0.7 } else { 0.0 };
        assert!((res.output[i] as f64 - want).abs() < 1e-6);
    }
}

#[test]
fn sigmoid_composition() {
    let mut r = rng("sigmoid");
    let x = Input::randn(&mut r, &[3, 5], 2.0);
    let res = check("sigmoid").run(std::slice::from_ref(&x), |t, v| t.sigmoid(v[0]));
    let want: Vec<f64> = x.data.iter().map(|&z| 1.0 / (1.0 + (-(z as f64)).exp())).collect();
    assert_close("sigmoid value", &res.output, &want, 1e-6, 1e-6);
}
