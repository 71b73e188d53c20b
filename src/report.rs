//! The run directory: resolved configuration, manifest, `metrics.jsonl`, checkpoints and the summary.
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub path: PathBuf,
    metrics: BufWriter<File>,
}

impl RunDir {
    /// Creates (or reuses) the directory and starts a fresh `metrics.jsonl`.
    pub fn create(path: &Path) -> std::io::Result<RunDir> {
        std::fs::create_dir_all(path)?;
        let metrics = BufWriter::new(File::create(path.join("metrics.jsonl"))?);
        Ok(RunDir { path: path.to_path_buf(), metrics })
    }

    /// Reopens a run directory to continue it: `metrics.jsonl` is cut back to `metrics_bytes` (its length at the
    /// resume checkpoint; the resumed run writes the later records again) and appended to.
    pub fn reopen(path: &Path, metrics_bytes: u64) -> std::io::Result<RunDir> {
        let file = path.join("metrics.jsonl");
        let f = std::fs::OpenOptions::new().write(true).open(&file)?;
        let len = f.metadata()?.len();
        if len < metrics_bytes {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!(
                "{}: {len} bytes, but the resume checkpoint was written after {metrics_bytes} bytes of it", file.display())));
        }
        f.set_len(metrics_bytes)?;
        let mut f = f;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))?;
        Ok(RunDir { path: path.to_path_buf(), metrics: BufWriter::new(f) })
    }

    /// Flushes `metrics.jsonl` and returns its length (recorded in resume checkpoints).
    pub fn metrics_bytes(&mut self) -> std::io::Result<u64> {
        self.metrics.flush()?;
        Ok(self.metrics.get_ref().metadata()?.len())
    }

    /// Appends one JSON object as a line of `metrics.jsonl`.
    pub fn log<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.metrics, record)?;
        self.metrics.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.metrics.flush()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a whole file atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        crate::checkpoint::write_atomic(&self.file(name), bytes)
    }
}

/// A default run directory name: `runs/<data>-<unix seconds>`.
pub fn default_run_dir(data_name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("{data_name}-{secs}"))
}

/// Writes `report.md` and the PNG plots of a UR4Rec run from its `metrics.jsonl` and summary: one loss
/// plot per stage (every logged term), and validation NDCG@10 of the fused ranking and of each tower.
pub fn write_ur4rec_report(run: &RunDir, cfg: &crate::config::Config,
                           s: &crate::train::ur4rec_trainer::Ur4RecSummary) -> std::io::Result<()> {
    use crate::plot::{line_plot, Series};
    use serde_json::Value;
    let text = std::fs::read_to_string(run.file("metrics.jsonl"))?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut md = format!("# UR4Rec run report\n\nData **{}**: {} users, {} items; {} parameters; wall time {:.1} s.\n\n",
                         s.dataset, s.users, s.items, s.parameters, s.wall_seconds);
    if cfg.ur4rec.user_vectors == crate::config::UserVectorSource::Provided && cfg.data.source != "synthetic" {
        md.push_str("> **Leakage warning:** user vectors come from the provided user-text features. For ML-100K those LLM \
                     summaries were written from histories that include the validation and test items.\n\n");
    }
    md.push_str("## Stages\n\n| stage | epochs | selected epoch | selection NDCG@10 | valid NDCG@10 fused / SASRec / retriever | switches | seconds |\n|---|---|---|---|---|---|---|\n");
    for st in &s.stages {
        md.push_str(&format!("| {} | {} | {} | {:.4} | {:.4} / {:.4} / {:.4} | {} | {:.1} |\n", st.stage, st.epochs_run,
                             st.best_epoch, st.selection_ndcg10, st.valid.fused.sampled.ndcg10, st.valid.sasrec.sampled.ndcg10,
                             st.valid.retriever.sampled.ndcg10, st.switches, st.seconds));
    }
    md.push_str(&format!("\n## Test (fusion weight α = {:.1} for SASRec)\n\n| ranking | Hit@10 | NDCG@10 | MRR | full-ranking Hit@10 | full-ranking NDCG@10 |\n|---|---|---|---|---|---|\n", s.fusion_alpha));
    for (name, r) in [("fused", &s.test.fused), ("SASRec", &s.test.sasrec), ("retriever", &s.test.retriever)] {
        let (fh, fnd) = r.full.as_ref().map(|f| (format!("{:.4}", f.hit10), format!("{:.4}", f.ndcg10))).unwrap_or(("—".into(), "—".into()));
        md.push_str(&format!("| {name} | {:.4} | {:.4} | {:.4} | {fh} | {fnd} |\n", r.sampled.hit10, r.sampled.ndcg10, r.sampled.mrr));
    }
    md.push_str(&format!("\nChance level (sampled) Hit@10 = {:.4}.\n\n## Plots\n\n", s.chance_hit10_sampled));
    let events = records.iter().filter(|r| matches!(r["kind"].as_str(), Some("switch") | Some("unfreeze"))).count();
    for st in &s.stages {
        let steps: Vec<&Value> = records.iter().filter(|r| r["kind"] == "step" && r["stage"] == st.stage).collect();
        let series: Vec<Series> = ["total", "sasrec", "retrieval", "consistency", "contrastive", "diversity", "distillation"]
            .iter().filter_map(|term| {
                let pts: Vec<(f64, f64)> = steps.iter()
                    .filter_map(|r| Some((r["step"].as_f64()?, r["losses"][*term].as_f64()?))).collect();
                pts.iter().any(|p| p.1 != 0.0).then(|| Series { name: term.to_string(), points: pts })
            }).collect();
        let name = format!("loss_stage{}.png", st.stage);
        line_plot(&run.file(&name), &format!("stage {} losses", st.stage), "step", &series)?;
        md.push_str(&format!("![stage {} losses]({name})\n\n", st.stage));
    }
    let evals: Vec<&Value> = records.iter().filter(|r| r["kind"] == "eval" && r["split"] == "valid").collect();
    let series: Vec<Series> = ["fused", "sasrec", "retriever"].iter().map(|k| Series {
        name: format!("valid NDCG@10 {k}"),
        points: evals.iter().filter_map(|r| Some((r["step"].as_f64()?, r["eval"][*k]["sampled"]["ndcg10"].as_f64()?))).collect(),
    }).collect();
    line_plot(&run.file("valid_ndcg10.png"), "validation NDCG@10 (sampled) per evaluation", "step", &series)?;
    md.push_str(&format!("![validation NDCG@10](valid_ndcg10.png)\n\n{events} alternation-switch / unfreeze events are in metrics.jsonl.\n"));
    run.write("report.md", md.as_bytes())
}
