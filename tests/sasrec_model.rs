//! Whole-model checks of SASRec: the gradient of its training loss against central finite differences,
//! padding independence, and a short end-to-end training run that must beat chance on synthetic data.
use std::sync::Arc;
use ur4rec_engine::backend::{CpuBackend, SeqLayout};
use ur4rec_engine::config::{Config, NormPlacement, Objective, SasRecConfig};
use ur4rec_engine::data::negatives::NegativeSampler;
use ur4rec_engine::data::{self, SyntheticConfig};
use ur4rec_engine::model::SasRec;
use ur4rec_engine::params::{ParamBuilder, ParamStore};
use ur4rec_engine::report::RunDir;
use ur4rec_engine::rng::Rng;
use ur4rec_engine::tape::Tape;
use ur4rec_engine::train::batch::SeqBatch;
use ur4rec_engine::train::objective::sasrec_loss;
use ur4rec_engine::train::trainer::{train_sasrec, PreparedData, RunOptions};

fn tiny_cfg(norm: NormPlacement, dropout: f32) -> SasRecConfig {
    SasRecConfig { hidden: 8, blocks: 2, heads: 2, ffn: 12, dropout, max_len: 6, norm, scale_embedding: true,
                   layer_norm_eps: 1e-5 }
}

fn tiny_train() -> Vec<Vec<u32>> {
    // Lengths 2 (one pair), 4, 9 (truncated to max_len 6 + 1) and 5; ids in 1..=10.
    vec![vec![3, 7], vec![1, 2, 3, 4], vec![10, 9, 8, 7, 6, 5, 4, 3, 2], vec![5, 5, 1, 9, 2]]
}

/// The loss of the fixed batch as a function of the parameter values (same dropout masks and negatives).
fn loss_of(be: &CpuBackend, model: &SasRec, store: &ParamStore<CpuBackend>, train: &[Vec<u32>],
           sampler: &NegativeSampler, objective: Objective, grads: Option<&mut Vec<f32>>) -> f64 {
    let mut tape = Tape::new(be, 11, 5);
    let vars = model.bind(&mut tape, store);
    let mut rng = Rng::new(99);
    let users: Vec<usize> = (0..train.len()).collect();
    let bl = sasrec_loss(&mut tape, model, &vars, train, &users, sampler, &mut rng, objective, 3).unwrap();
    let v = tape.scalar(bl.loss) as f64;
    if let Some(g) = grads {
        tape.backward(bl.loss, g);
    }
    v
}

#[test]
fn sasrec_loss_gradient_matches_finite_differences() {
    // f32 throughout; h = 1e-2 keeps rounding (~1e-7·|L|/h ≈ 1e-5) and truncation (O(h²)) well below the
    // 2e-2 relative tolerance on the vector of checked coordinates.
    let be = CpuBackend::new();
    let train = tiny_train();
    let sampler = NegativeSampler::new(10, &train).unwrap();
    for (norm, dropout, objective) in [(NormPlacement::Post, 0.0, Objective::EveryPosition),
                                       (NormPlacement::Pre, 0.3, Objective::EveryPosition),
                                       (NormPlacement::Post, 0.2, Objective::LastBpr)] {
        let mut b = ParamBuilder::new();
        let model = SasRec::new(&mut b, &tiny_cfg(norm, dropout), 10, &mut Rng::new(4));
        let mut store = b.build(&be);
        let mut grads = vec![0.0f32; store.len()];
        loss_of(&be, &model, &store, &train, &sampler, objective, Some(&mut grads));
        // The padding row of the item embedding never receives gradient.
        let emb = store.info(model.item_embedding_id()).clone();
        assert!(grads[emb.offset..emb.offset + emb.shape[1]].iter().all(|&g| g == 0.0), "padding row got gradient");
        // Check coordinates from every parameter tensor.
        let mut rng = Rng::new(7);
        let (mut num, mut ana) = (Vec::new(), Vec::new());
        let h = 1e-2f32;
        for p in store.infos.clone() {
            for _ in 0..3 {
                let i = p.offset + rng.below(p.len as u64) as usize;
                let orig = store.values[i];
                store.values[i] = orig + h;
                let lp = loss_of(&be, &model, &store, &train, &sampler, objective, None);
                store.values[i] = orig - h;
                let lm = loss_of(&be, &model, &store, &train, &sampler, objective, None);
                store.values[i] = orig;
                num.push((lp - lm) / (2.0 * h as f64));
                ana.push(grads[i] as f64);
            }
        }
        let diff: f64 = num.iter().zip(&ana).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let norm_n: f64 = num.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(norm_n > 1e-3, "gradient vanishes: the check would be vacuous");
        assert!(diff <= 2e-2 * norm_n, "{norm:?} dropout {dropout} {objective:?}: |num−ana| = {diff:.3e}, |num| = {norm_n:.3e}");
    }
}

#[test]
fn outputs_do_not_depend_on_padding_or_batch_neighbours() {
    let be = CpuBackend::new();
    for norm in [NormPlacement::Post, NormPlacement::Pre] {
        let mut b = ParamBuilder::new();
        let cfg = tiny_cfg(norm, 0.0);
        let model = SasRec::new(&mut b, &cfg, 10, &mut Rng::new(5));
        let store = b.build(&be);
        let seq: Vec<u32> = vec![4, 2, 9];
        let user_vec = |batch: &SeqBatch<CpuBackend>, row: usize| {
            let mut tape = Tape::inference(&be);
            let vars = model.bind(&mut tape, &store);
            let h = model.encode(&mut tape, &vars, batch);
            let h = tape.to_host(h);
            h[row * 8..(row + 1) * 8].to_vec()
        };
        // Alone, packed.
        let alone = SeqBatch::new(&be, &[&seq], cfg.max_len);
        let a = user_vec(&alone, 2);
        // After another sequence.
        let other: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
        let both = SeqBatch::new(&be, &[&other, &seq], cfg.max_len);
        let b2 = user_vec(&both, 6 + 2);
        // Left-padded to max_len with masked padding keys (the reference's [B, L] form).
        let pad = cfg.max_len - seq.len();
        let items: Vec<u32> = std::iter::repeat(0).take(pad).chain(seq.iter().copied()).collect();
        let valid: Vec<u32> = items.iter().map(|&i| (i != 0) as u32).collect();
        let padded = SeqBatch { layout: Arc::new(SeqLayout::new(&be, vec![0, cfg.max_len as u32], valid)), items,
                                positions: (0..cfg.max_len as u32).collect(), last_rows: vec![cfg.max_len as u32 - 1] };
        let c = user_vec(&padded, cfg.max_len - 1);
        for (x, (y, z)) in a.iter().zip(b2.iter().zip(&c)) {
            assert!((x - y).abs() <= 1e-6 && (x - z).abs() <= 1e-5, "{norm:?}: {a:?} / {b2:?} / {c:?}");
        }
    }
}

#[test]
fn short_training_run_beats_chance_on_synthetic_data() {
    let be = CpuBackend::new();
    let mut cfg = Config::preset("sasrec").unwrap();
    cfg.train.epochs = 20;
    cfg.train.batch_size = 64;
    cfg.train.eval_every = 10;
    cfg.sasrec.hidden = 32;
    cfg.sasrec.ffn = 32;
    let ds = data::synthetic(&SyntheticConfig { users: 300, items: 300, seed: 3, ..Default::default() });
    let prepared = PreparedData::from_dataset(ds, &cfg).unwrap();
    let dir = std::env::temp_dir().join(format!("ur4rec-e2e-{}", std::process::id()));
    let mut run = RunDir::create(&dir).unwrap();
    let s = train_sasrec(&be, &cfg, &prepared, &mut run, &RunOptions { quiet: true, ..Default::default() }).unwrap();
    assert!(s.test.sampled.hit10 > 2.0 * s.chance_hit10_sampled, "Hit@10 {} vs chance {}", s.test.sampled.hit10, s.chance_hit10_sampled);
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(lines.lines().any(|l| l.contains("\"split\":\"test\"")), "metrics.jsonl lacks the test record");
    assert!(dir.join("best.safetensors").exists());
}
