//! Whole-model checks of UR4Rec: the gradient of the full stage-4 loss (SASRec BPR, retrieval, consistency,
//! memory-bank InfoNCE, LogDet diversity) against central finite differences, and a short four-stage run
//! with every improvement switched on.
mod fixtures;
use fixtures::{tiny_ur4rec_config, tiny_ur4rec_data};
use ur4rec_engine::backend::CpuBackend;
use ur4rec_engine::config::{AlternationKind, WeightsKind};
use ur4rec_engine::report::RunDir;
use ur4rec_engine::rng::Rng;
use ur4rec_engine::tape::Tape;
use ur4rec_engine::train::strategies::Module;
use ur4rec_engine::train::trainer::RunOptions;
use ur4rec_engine::train::ur4rec_trainer::{train_ur4rec, Trainer};

#[test]
fn full_ur4rec_loss_gradient_matches_finite_differences() {
    // f32 backend; h = 1e-2 and a 2e-2 relative tolerance on the vector of checked coordinates, as in
    // tests/sasrec_model.rs. Dropout masks, negatives and the memory bank are identical in every evaluation.
    let be = CpuBackend::new();
    // Distillation is off here: its teachers are detached by design (each tower learns from the other's
    // current distribution, not through it), so its update is deliberately not the derivative of the loss
    // value that finite differences measure. kl_div against a constant teacher is checked in gradcheck.rs.
    let mut cfg = tiny_ur4rec_config();
    cfg.ur4rec.distillation.enabled = false;
    let data = tiny_ur4rec_data(&cfg, 40);
    let mut tr = Trainer::new(&be, &cfg, &data).unwrap();
    tr.set_stage_trainable(4, Module::Sasrec);
    let users: Vec<usize> = (0..6).collect();
    let eval = |tr: &mut Trainer<CpuBackend>, grads: Option<&mut Vec<f32>>| -> (f64, f32, f32, f32) {
        tr.rng = Rng::new(5);
        let mut tape = Tape::new(&be, 1, 3);
        let (loss, terms, _) = tr.losses(&mut tape, 4, &users).unwrap().unwrap();
        let l = terms.read(&tape);
        let v = tape.scalar(loss) as f64;
        if let Some(g) = grads {
            tape.backward(loss, g);
        }
        (v, l.contrastive, l.diversity, l.distillation)
    };
    let mut grads = vec![0.0f32; tr.store.len()];
    let (_, ctr, div, kd) = eval(&mut tr, Some(&mut grads));
    assert!(ctr > 0.0 && div.is_finite() && kd == 0.0, "every auxiliary term but distillation must be active: {ctr} {div} {kd}");
    let mut rng = Rng::new(17);
    let (mut num, mut ana) = (Vec::new(), Vec::new());
    let h: f32 = std::env::var("GRAD_H").ok().and_then(|v| v.parse().ok()).unwrap_or(1e-2);
    for p in tr.store.infos.clone() {
        for _ in 0..2 {
            let i = p.offset + rng.below(p.len as u64) as usize;
            let orig = tr.store.values[i];
            tr.store.values[i] = orig + h;
            let lp = eval(&mut tr, None).0;
            tr.store.values[i] = orig - h;
            let lm = eval(&mut tr, None).0;
            tr.store.values[i] = orig;
            num.push((lp - lm) / (2.0 * h as f64));
            ana.push(grads[i] as f64);
            if std::env::var("GRAD_DEBUG").is_ok() {
                eprintln!("{:<40} num {:+.5e} ana {:+.5e}", p.name, num.last().unwrap(), ana.last().unwrap());
            }
        }
    }
    let diff: f64 = num.iter().zip(&ana).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = num.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!(norm > 1e-3, "gradient vanishes: the check would be vacuous");
    assert!(diff <= 2e-2 * norm, "|num − ana| = {diff:.3e} vs |num| = {norm:.3e}");
}

#[test]
fn four_stages_with_every_improvement_run_and_log_their_events() {
    let be = CpuBackend::new();
    let mut cfg = tiny_ur4rec_config();
    cfg.sasrec.hidden = 16;
    cfg.sasrec.ffn = 16;
    cfg.ur4rec.stage_epochs = [3, 2, 2, 2];
    cfg.ur4rec.alternation = AlternationKind::Adaptive;
    cfg.ur4rec.weights = WeightsKind::Curriculum;
    cfg.ur4rec.unfreeze = vec!["0:sasrec.final_norm,retriever.item_text".into(), "1:sasrec,retriever".into()];
    cfg.train.batch_size = 16;
    let data = tiny_ur4rec_data(&cfg, 40);
    let dir = std::env::temp_dir().join(format!("ur4rec-four-stages-{}", std::process::id()));
    let mut run = RunDir::create(&dir).unwrap();
    let s = train_ur4rec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).unwrap();
    assert_eq!(s.stages.iter().map(|s| s.stage).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for m in [&s.test.fused.sampled, &s.test.sasrec.sampled, &s.test.retriever.sampled] {
        assert!(m.hit10.is_finite() && m.users == 40);
    }
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"kind\":\"unfreeze\""), "unfreeze events are logged");
    assert!(log.contains("\"split\":\"test\""));
    assert!(log.lines().filter(|l| l.contains("\"kind\":\"step\"")).all(|l| l.contains("\"weights\"") && l.contains("\"lr\"")));
    for st in 1..=4 {
        assert!(dir.join(format!("stage{st}_best.safetensors")).exists());
    }
    // An unfreezing prefix that matches no parameter is refused up front.
    cfg.ur4rec.unfreeze = vec!["0:sasrec.attention".into()];
    let e = train_ur4rec(&be, &cfg, &data, &mut run, &RunOptions { quiet: true, ..Default::default() }).err().unwrap();
    assert!(format!("{e:#}").contains("sasrec.attention"), "{e:#}");
}
