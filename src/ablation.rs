//! `ur4rec-engine ablation`: the baseline, each improvement alone and all five combined (plus SASRec alone
//! and the faithful reference configuration), over several training seeds on the same data, candidates
//! and budget; a markdown and a JSON table of test Hit@10 / NDCG@10 / MRR (mean ± std) with paired
//! differences against the baseline, and wall time.
use crate::backend::Backend;
use crate::config::{AlternationKind, Config, ContrastiveKind, RetrievalLoss, StageSelection, WeightsKind};
use crate::report::RunDir;
use crate::train::trainer::{PreparedData, RunOptions};
use crate::train::ur4rec_trainer::{train_ur4rec, Ur4RecSummary};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// One row of the ablation: a name and the change it makes to the base configuration.
pub struct Variant {
    pub name: &'static str,
    pub apply: fn(&mut Config, usize),
}

/// A progressive-unfreezing schedule over stage 4's `steps`: output-side parameters first, then the upper
/// blocks and projections, then everything.
fn unfreeze_schedule(cfg: &Config, steps: usize) -> Vec<String> {
    let last = cfg.sasrec.blocks.saturating_sub(1);
    vec![
        "0:sasrec.final_norm,sasrec.item_embedding,retriever.item_text,retriever.fusion,retriever.item_visual".into(),
        format!("{}:sasrec.blocks.{last},retriever.text_proj,retriever.visual_proj", steps / 3),
        format!("{}:sasrec,retriever", 2 * steps / 3),
    ]
}

pub fn variants() -> Vec<Variant> {
    vec![
        Variant { name: "SASRec alone", apply: |c, _| c.ur4rec.stage_epochs = [c.ur4rec.stage_epochs[0], 0, 0, 0] },
        Variant { name: "faithful reference", apply: |c, _| {
            let u = &mut c.ur4rec;
            u.stage_lr_scale = [1.0; 4];
            u.keep_start_if_better = false;
            u.stage2_selection = StageSelection::Fused;
            u.center_features = false;
            u.retrieval_loss = RetrievalLoss::Bce;
            u.calibrate_fusion = false;
        } },
        Variant { name: "baseline (engine defaults)", apply: |_, _| {} },
        Variant { name: "+ adaptive alternation", apply: |c, _| c.ur4rec.alternation = AlternationKind::Adaptive },
        Variant { name: "+ curriculum weights", apply: |c, _| c.ur4rec.weights = WeightsKind::Curriculum },
        Variant { name: "+ memory bank", apply: |c, _| c.ur4rec.contrastive = ContrastiveKind::MemoryBank },
        Variant { name: "+ distillation", apply: |c, _| c.ur4rec.distillation.enabled = true },
        Variant { name: "+ progressive unfreezing", apply: |c, s4| c.ur4rec.unfreeze = unfreeze_schedule(c, s4) },
        Variant { name: "all five combined", apply: |c, s4| {
            c.ur4rec.alternation = AlternationKind::Adaptive;
            c.ur4rec.weights = WeightsKind::Curriculum;
            c.ur4rec.contrastive = ContrastiveKind::MemoryBank;
            c.ur4rec.distillation.enabled = true;
            c.ur4rec.unfreeze = unfreeze_schedule(c, s4);
        } },
    ]
}

#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
}

fn stat(v: &[f64]) -> Stat {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    Stat { mean, std: var.sqrt() }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub variant: String,
    pub hit10: Stat,
    pub ndcg10: Stat,
    pub mrr: Stat,
    /// Paired difference of NDCG@10 against the baseline (same seeds): mean and standard error.
    pub ndcg10_vs_baseline: Stat,
    pub hit10_vs_baseline: Stat,
    pub wall_seconds: Stat,
    pub per_seed: Vec<Ur4RecSummary>,
}

/// Runs every variant for `seeds` training seeds and writes `ablation.md` and `ablation.json` into `out`.
pub fn run_ablation<B: Backend>(backend: &B, base: &Config, data: &PreparedData, seeds: usize, out: &Path,
                                only: &[String]) -> Result<Vec<Row>> {
    std::fs::create_dir_all(out)?;
    let steps_per_epoch = data.split.train.len().div_ceil(base.train.batch_size.max(1));
    let stage4_steps = base.ur4rec.stage_epochs[3] * steps_per_epoch;
    let mut rows: Vec<Row> = Vec::new();
    for v in variants() {
        if !only.is_empty() && !only.iter().any(|o| v.name.contains(o.as_str())) {
            continue;
        }
        let mut summaries = Vec::new();
        for k in 0..seeds {
            let mut cfg = base.clone();
            cfg.seed = base.seed + k as u64;
            (v.apply)(&mut cfg, stage4_steps);
            let dir = out.join(format!("{}-seed{}", v.name.replace([' ', '(', ')', '+'], "").to_lowercase(), cfg.seed));
            let mut run = RunDir::create(&dir)?;
            run.write("config.toml", cfg.to_toml().as_bytes())?;
            eprintln!("ablation: {} (seed {})", v.name, cfg.seed);
            let s = train_ur4rec(backend, &cfg, data, &mut run, &RunOptions { quiet: true, ..Default::default() })?;
            run.write("summary.json", serde_json::to_string_pretty(&s)?.as_bytes())?;
            eprintln!("  test fused {}", s.test.fused.sampled);
            summaries.push(s);
        }
        let pick = |f: fn(&Ur4RecSummary) -> f64| summaries.iter().map(f).collect::<Vec<f64>>();
        let (hit, ndcg) = (pick(|s| s.test.fused.sampled.hit10), pick(|s| s.test.fused.sampled.ndcg10));
        rows.push(Row {
            variant: v.name.to_string(),
            ndcg10_vs_baseline: Stat { mean: f64::NAN, std: f64::NAN },
            hit10_vs_baseline: Stat { mean: f64::NAN, std: f64::NAN },
            hit10: stat(&hit),
            ndcg10: stat(&ndcg),
            mrr: stat(&pick(|s| s.test.fused.sampled.mrr)),
            wall_seconds: stat(&pick(|s| s.wall_seconds)),
            per_seed: summaries,
        });
        paired_differences(&mut rows);
        write_tables(out, &rows, seeds, data)?;
    }
    Ok(rows)
}

/// Fills every row's paired differences against the baseline row (same seeds), once the baseline exists.
fn paired_differences(rows: &mut [Row]) {
    let Some(base) = rows.iter().find(|r| r.variant.starts_with("baseline")).map(|r| r.per_seed.clone()) else { return };
    let paired = |x: &[Ur4RecSummary], f: fn(&Ur4RecSummary) -> f64| -> Stat {
        if x.len() != base.len() {
            return Stat { mean: f64::NAN, std: f64::NAN };
        }
        let d: Vec<f64> = x.iter().zip(&base).map(|(a, b)| f(a) - f(b)).collect();
        let s = stat(&d);
        Stat { mean: s.mean, std: s.std / (d.len() as f64).sqrt() }
    };
    for r in rows.iter_mut() {
        r.hit10_vs_baseline = paired(&r.per_seed, |s| s.test.fused.sampled.hit10);
        r.ndcg10_vs_baseline = paired(&r.per_seed, |s| s.test.fused.sampled.ndcg10);
    }
}

fn write_tables(out: &Path, rows: &[Row], seeds: usize, data: &PreparedData) -> Result<()> {
    let mut md = format!("# Ablation on {} ({} users, {} items), {} training seeds, test split, sampled protocol (target + {} negatives), fused ranking\n\n",
                         data.dataset.name, data.dataset.num_users, data.dataset.num_items, seeds,
                         data.eval_negatives.first().map(|n| n.len()).unwrap_or(0));
    md.push_str("| variant | Hit@10 | NDCG@10 | MRR | ΔHit@10 vs baseline (± s.e.) | ΔNDCG@10 vs baseline (± s.e.) | wall time (s) |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        let d = |s: &Stat| if s.mean.is_nan() { "—".to_string() } else { format!("{:+.4} ± {:.4}", s.mean, s.std) };
        md.push_str(&format!("| {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {} | {} | {:.0} |\n", r.variant,
                             r.hit10.mean, r.hit10.std, r.ndcg10.mean, r.ndcg10.std, r.mrr.mean, r.mrr.std,
                             d(&r.hit10_vs_baseline), d(&r.ndcg10_vs_baseline), r.wall_seconds.mean));
    }
    md.push_str("\nMean ± sample standard deviation over seeds; Δ = paired difference against the baseline with the same seed (± standard error).\n");
    crate::checkpoint::write_atomic(&out.join("ablation.md"), md.as_bytes())?;
    crate::checkpoint::write_atomic(&out.join("ablation.json"), serde_json::to_string_pretty(rows)?.as_bytes())?;
    Ok(())
}
