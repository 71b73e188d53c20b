//! Run configuration: TOML on disk, presets, `key=value` overrides; the resolved configuration is
//! written into every run directory.
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where SASRec's layer norms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormPlacement {
    /// After each residual add (the UR4Rec reference code, PyTorch `TransformerEncoderLayer` style).
    Post,
    /// Kang & McAuley's SASRec code: queries and the FFN input are normalised, keys/values are not, and the
    /// residuals start from the normalised tensors.
    Pre,
}

/// What SASRec is trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Standard SASRec: at every position, BCE on the next item against one sampled negative.
    EveryPosition,
    /// The UR4Rec reference: BPR of the last training item against `negatives` samples, last position only.
    LastBpr,
}

/// Learning-rate schedule within a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// Linear warmup over `warmup_steps`, then cosine decay to 0 over the rest of the stage.
    WarmupCosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `synthetic` or a path to a data file / directory.
    pub source: String,
    /// Reader format; picked from the file name when empty.
    pub format: String,
    /// Keep ratings >= this (where the format has ratings); negative = keep all.
    pub min_rating: f32,
    pub min_items_per_user: usize,
    /// Synthetic data set size.
    pub synthetic_users: usize,
    pub synthetic_items: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { source: "synthetic".into(), format: String::new(), min_rating: 4.0, min_items_per_user: 5,
                     synthetic_users: 1000, synthetic_items: 500 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SasRecConfig {
    pub hidden: usize,
    pub blocks: usize,
    pub heads: usize,
    /// Inner dimension of the position-wise feed-forward network.
    pub ffn: usize,
    pub dropout: f32,
    pub max_len: usize,
    pub norm: NormPlacement,
    /// Multiply item embeddings by √hidden (Kang's SASRec code does; the UR4Rec reference does not).
    pub scale_embedding: bool,
    pub layer_norm_eps: f32,
}

impl Default for SasRecConfig {
    fn default() -> Self {
        SasRecConfig { hidden: 256, blocks: 2, heads: 4, ffn: 256, dropout: 0.1, max_len: 50, norm: NormPlacement::Post,
                       scale_embedding: false, layer_norm_eps: 1e-5 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub objective: Objective,
    /// Negatives per user for the last-position BPR objective.
    pub negatives: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Per-group gradient-norm clip (0 = off).
    pub clip_norm: f32,
    /// Evaluate on validation every this many epochs (and at the last epoch).
    pub eval_every: usize,
    /// Stop after this many evaluations without a better validation NDCG@10 (0 = never).
    pub patience: usize,
    /// Write a metrics line every this many steps (1: every step; 0: none).
    pub log_every: usize,
    /// Steps between two reads of the device-side step log (`train::step_log`: losses, gradient norms,
    /// skipped steps; on the GPU each read is a host synchronisation, so a step reads nothing back). 0: at
    /// least 16 steps and at least `log_every`; at most 1,024. The logs are read before every evaluation and
    /// checkpoint too, and the interval changes no result (tests/reliability.rs) — only how soon records and
    /// skipped-step reports appear.
    pub readback_every: usize,
    /// A step whose loss or gradient is non-finite is skipped (no optimizer update) and logged; this many
    /// consecutive skipped steps stop the run with an error (see `train::guard`).
    pub max_bad_steps: usize,
    /// Write the resume checkpoint (`RUN/resume.safetensors`) every this many steps (0: only at epoch and
    /// stage ends, where it is always written).
    pub checkpoint_every: usize,
    /// Deterministic mode. On the CPU results never depend on the thread count (fixed row blocks,
    /// fixed-order reductions; tested in `tests/reliability.rs`), so this changes nothing there; on the GPU
    /// it selects the kernels without float atomics, so two runs give bit-identical losses.
    pub deterministic: bool,
    /// GPU only: cuBLAS's plain matrix products in TF32 on the tensor cores (inputs rounded to 10 mantissa
    /// bits, f32 accumulation), several times faster at some accuracy. Off: full f32 (cuBLAS's default math).
    /// No effect on the CPU backend or on the engine's own kernels.
    pub tf32: bool,
    /// How the forward reads the item embedding tables (SASRec's, the retriever's text and visual ones):
    /// "f32", or "bf16" / "f16" — the values as 16-bit storage holds them (rounded to nearest even). The f32
    /// master weights take the gradients and the AdamW updates unchanged (mixed precision, mission.md §9).
    pub table_format: crate::backend::StoreFormat,
    /// Testing aid: multiplies the loss by NaN at this global step (the step is then skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inject_nan_at_step: Option<usize>,
    /// Testing aid: multiplies the loss by NaN at this global step and every later one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inject_nan_from_step: Option<usize>,
}

impl TrainConfig {
    /// Steps between two reads of the step log (see `readback_every`).
    pub fn readback_interval(&self) -> usize {
        let n = match (self.readback_every, self.log_every) {
            (0, 0) => 64,
            (0, log) => log.max(16),
            (n, _) => n,
        };
        n.min(1024)
    }

    /// Whether the testing aids `inject_nan_*` poison the loss at global step `step`.
    pub fn inject_nan(&self, step: usize) -> bool {
        self.inject_nan_at_step == Some(step) || self.inject_nan_from_step.is_some_and(|s| step >= s)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { epochs: 20, batch_size: 128, objective: Objective::EveryPosition, negatives: 5, lr: 1e-3,
                      weight_decay: 1e-5, beta1: 0.9, beta2: 0.999, adam_eps: 1e-8, schedule: Schedule::WarmupCosine,
                      warmup_steps: 100, clip_norm: 1.0, eval_every: 1, patience: 5, log_every: 1, readback_every: 0,
                      max_bad_steps: 10, checkpoint_every: 500, deterministic: false, tf32: false,
                      table_format: crate::backend::StoreFormat::F32, inject_nan_at_step: None, inject_nan_from_step: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Sampled negatives per user (drawn once, outside the whole history).
    pub negatives: usize,
    /// Also rank against every item (history masked).
    pub full_ranking: bool,
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { negatives: 99, full_ranking: true, batch_size: 256 }
    }
}

/// Which model the `train` command trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pipeline {
    /// SASRec alone (one stage).
    Sasrec,
    /// The four-stage UR4Rec pipeline.
    Ur4rec,
}

/// Side-feature files (`.npy` rows + `.ids.npy` original ids). Empty paths: none (synthetic data brings its own).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureFiles {
    pub item_text: String,
    pub item_text_ids: String,
    /// The second item modality ("visual"; for ML-100K a title+genre text view stands in).
    pub item_visual: String,
    pub item_visual_ids: String,
    pub user_text: String,
    pub user_text_ids: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserVectorSource {
    /// Mean of the item text (and visual) features of the user's training history.
    HistoryMean,
    /// The user-text feature file (may leak evaluation items, e.g. ML-100K's LLM summaries).
    Provided,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageSelection {
    /// Select on the fused ranking (the reference).
    Fused,
    /// Select stage 2 on the retriever's own ranking (mission.md §10 fix).
    OwnTower,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlternationKind {
    Parity,
    Adaptive,
    /// The seed's raw rule (plateau on raw per-batch losses), kept to show it switches on noise.
    AdaptiveFaithful,
}

/// The retriever's main loss over `[positive | negatives]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetrievalLoss {
    /// Binary cross-entropy with logits per candidate (the reference). With cos/τ logits its degenerate
    /// minimum pushes every candidate away (loss → ≈ 14/6), which ranks nothing.
    Bce,
    /// Cross-entropy of the positive among the candidates (sampled softmax): only relative scores matter.
    Softmax,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightsKind {
    Fixed,
    Curriculum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContrastiveKind {
    InBatch,
    MemoryBank,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ur4RecConfig {
    pub retriever: crate::model::retriever::RetrieverConfig,
    pub features: FeatureFiles,
    pub user_vectors: UserVectorSource,
    /// Centre the frozen input features (subtract the item mean) before projecting (mission.md §10 fix).
    pub center_features: bool,
    /// Epochs of stages 1–4.
    pub stage_epochs: [usize; 4],
    /// Learning-rate multiplier per stage (mission.md §10: 0.1 for stages 3–4 keeps SASRec from being damaged).
    pub stage_lr_scale: [f32; 4],
    /// Count a stage's starting weights as a selection candidate, so no stage ends worse than it began.
    pub keep_start_if_better: bool,
    pub stage2_selection: StageSelection,
    pub retriever_lr: f32,
    pub negatives: usize,
    pub alternation: AlternationKind,
    pub weights: WeightsKind,
    pub contrastive: ContrastiveKind,
    /// Memory-bank slots (0: min(65536, a power of two above the number of users)).
    pub bank_size: usize,
    /// Storage of the memory-bank keys: "f32", or "bf16" / "f16" (half the bytes the InfoNCE streams; values
    /// rounded once when enqueued, widened to f32 when read, every sum in f32/f64).
    pub bank_format: crate::backend::StoreFormat,
    pub contrastive_tau: f32,
    pub diversity_eps: f32,
    pub distillation: crate::train::strategies::DistillConfig,
    /// Progressive unfreezing in stage 4: entries `"step:prefix,prefix"` (steps counted within stage 4).
    pub unfreeze: Vec<String>,
    pub retrieval_loss: RetrievalLoss,
    /// SASRec's weight α in the fused score α·softmax(SASRec) + (1−α)·softmax(retriever) (reference 0.5).
    pub fusion_alpha: f32,
    /// Refit α on validation after every stage over {0, 0.1, …, 1} (mission.md §10: a confident but weaker
    /// retriever otherwise drags the fused ranking below SASRec's own).
    pub calibrate_fusion: bool,
    /// Weights of the SASRec BPR and retrieval terms.
    pub sasrec_weight: f32,
    pub retrieval_weight: f32,
}

impl Default for Ur4RecConfig {
    fn default() -> Self {
        Ur4RecConfig {
            retriever: Default::default(),
            features: FeatureFiles::default(),
            user_vectors: UserVectorSource::HistoryMean,
            center_features: true,
            stage_epochs: [10, 10, 10, 10],
            stage_lr_scale: [1.0, 1.0, 0.1, 0.1],
            keep_start_if_better: true,
            stage2_selection: StageSelection::OwnTower,
            retriever_lr: 1e-4,
            negatives: 5,
            alternation: AlternationKind::Parity,
            weights: WeightsKind::Fixed,
            contrastive: ContrastiveKind::InBatch,
            bank_size: 0,
            bank_format: crate::backend::StoreFormat::F32,
            contrastive_tau: 0.07,
            diversity_eps: 0.1,
            distillation: Default::default(),
            unfreeze: Vec::new(),
            retrieval_loss: RetrievalLoss::Softmax,
            fusion_alpha: 0.5,
            calibrate_fusion: true,
            sasrec_weight: 1.0,
            retrieval_weight: 1.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub seed: u64,
    pub pipeline: Pipeline,
    pub data: DataConfig,
    pub sasrec: SasRecConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub ur4rec: Ur4RecConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config::preset("default").unwrap()
    }
}

impl Config {
    pub const PRESETS: &'static [&'static str] = &["default", "sasrec", "ur4rec", "sasrec-paper"];

    /// - `default`: the four-stage UR4Rec pipeline sized for the built-in synthetic data (under a minute on 2
    ///   cores); the synthetic user-text features are noisy projections of the users' factors (no leakage), so
    ///   they are used directly, with a retriever learning rate of 1e-3.
    /// - `sasrec`: SASRec alone, sized for the synthetic data.
    /// - `ur4rec`: the UR4Rec reference configuration (reference-model.md §2): d 256, 2 blocks, 4 heads,
    ///   dropout 0.1, L 50, post-LN, AdamW 1e-3 / wd 1e-5, warmup 100 + cosine, clip 1.0, batch 32.
    /// - `sasrec-paper`: Kang & McAuley's setting: d 50, 2 blocks, 1 head, dropout 0.2, L 200, batch 128,
    ///   Adam lr 1e-3 (β₂ 0.98), constant lr, no clipping, every-position BCE, all ratings kept.
    pub fn preset(name: &str) -> Result<Config, String> {
        let mut c = Config { seed: 42, pipeline: Pipeline::Sasrec, data: DataConfig::default(), sasrec: SasRecConfig::default(),
                             train: TrainConfig::default(), eval: EvalConfig::default(), ur4rec: Ur4RecConfig::default() };
        match name {
            "default" | "sasrec" => {
                kang_sasrec(&mut c, 64, 2, 50);
                c.train.epochs = 30;
                c.train.eval_every = 5;
                if name == "default" {
                    c.pipeline = Pipeline::Ur4rec;
                    c.train.batch_size = 64;
                    c.train.warmup_steps = 20;
                    c.train.schedule = Schedule::WarmupCosine;
                    c.train.patience = 3;
                    c.ur4rec.retriever.hidden = 128;
                    c.ur4rec.retriever.dim = 64;
                    c.ur4rec.stage_epochs = [20, 10, 5, 5];
                    c.ur4rec.user_vectors = UserVectorSource::Provided;
                    c.ur4rec.retriever_lr = 1e-3;
                }
            }
            "ur4rec" => {
                c.pipeline = Pipeline::Ur4rec;
                c.train.batch_size = 32;
                c.train.epochs = 10;
                c.data.min_rating = 4.0;
                c.eval.batch_size = 64;
            }
            "sasrec-paper" => {
                kang_sasrec(&mut c, 50, 1, 200);
                c.data.min_rating = -1.0;
                c.train.epochs = 200;
                c.train.eval_every = 20;
            }
            other => return Err(format!("unknown preset {other:?}; choose one of {:?}", Self::PRESETS)),
        }
        Ok(c)
    }

    /// Reads a TOML file over a base preset: the file's own `preset = "..."` key if it has one, else
    /// `default_preset`; then the file's values.
    pub fn from_file(path: &Path, default_preset: &str) -> Result<Config, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let before = &bytes[..e.valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.len() - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
            format!("{}: line {line}, column {column}: invalid UTF-8 (byte 0x{:02x}); expected UTF-8 TOML text",
                    path.display(), bytes[e.valid_up_to()])
        })?;
        let mut table: toml::Table = text.parse().map_err(|e| format!("{}: {e}", path.display()))?;
        let base = match table.remove("preset") {
            Some(toml::Value::String(p)) => Config::preset(&p).map_err(|e| format!("{}: {e}", path.display()))?,
            Some(v) => return Err(format!("{}: preset must be a string, found {v}", path.display())),
            None => Config::preset(default_preset)?,
        };
        let base = toml::Value::try_from(&base).map_err(|e| e.to_string())?;
        let mut merged = base.clone();
        merge(&mut merged, toml::Value::Table(table.clone()));
        merged.try_into().map_err(|e: toml::de::Error| {
            // serde's message names the field but not where it sits ("unknown field `epochs`"); say which key.
            match culprit(&base, &table) {
                Some(key) => format!("{}: key `{key}`: {}", path.display(), e.message()),
                None => format!("{}: {}", path.display(), e.message()),
            }
        })
    }

    /// Applies `section.key=value` overrides (TOML syntax for the value; bare words are strings).
    pub fn apply_overrides(&mut self, overrides: &[String]) -> Result<(), String> {
        let mut merged = toml::Value::try_from(&*self).map_err(|e| e.to_string())?;
        for o in overrides {
            let (key, raw) = o.split_once('=').ok_or_else(|| format!("override {o:?}: expected key=value"))?;
            let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
                Ok(mut t) => t.remove("v").unwrap(),
                Err(_) => toml::Value::String(raw.to_string()),
            };
            let mut patch = value;
            for part in key.trim().split('.').rev() {
                let mut t = toml::Table::new();
                t.insert(part.to_string(), patch);
                patch = toml::Value::Table(t);
            }
            merge(&mut merged, patch);
            // Checked after each one so that the error names the override at fault.
            if let Err(e) = merged.clone().try_into::<Config>() {
                return Err(format!("override {o:?}: {}", e.message()));
            }
        }
        *self = merged.try_into().map_err(|e: toml::de::Error| format!("override: {}", e.message()))?;
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Kang & McAuley's SASRec settings (their code and pmixer's): pre-LN as in their code, √d embedding scale,
/// FFN width d, dropout 0.2, batch 128, Adam with β₂ 0.98 at a constant rate, no decay, no clipping.
fn kang_sasrec(c: &mut Config, hidden: usize, heads: usize, max_len: usize) {
    c.sasrec = SasRecConfig { hidden, blocks: 2, heads, ffn: hidden, dropout: 0.2, max_len, norm: NormPlacement::Pre,
                              scale_embedding: true, layer_norm_eps: 1e-8 };
    c.train.batch_size = 128;
    c.train.schedule = Schedule::Constant;
    c.train.warmup_steps = 0;
    c.train.beta2 = 0.98;
    c.train.weight_decay = 0.0;
    c.train.clip_norm = 0.0;
    c.train.patience = 0;
}

/// The dotted key of `file` whose value the configuration rejects: each key is merged onto `base` alone,
/// descending into a table of the configuration while it alone still fails (an unknown table is itself the
/// culprit). `None` when no single key fails on its own.
fn culprit(base: &toml::Value, file: &toml::Table) -> Option<String> {
    let fails = |path: &[String], value: &toml::Value| {
        let mut patch = value.clone();
        for part in path.iter().rev() {
            let mut t = toml::Table::new();
            t.insert(part.clone(), patch);
            patch = toml::Value::Table(t);
        }
        let mut v = base.clone();
        merge(&mut v, patch);
        v.try_into::<Config>().is_err()
    };
    let known_table = |path: &[String]| {
        let mut v = base;
        for part in path {
            match v.get(part) {
                Some(next) => v = next,
                None => return false,
            }
        }
        v.is_table()
    };
    let mut path: Vec<String> = Vec::new();
    let mut table = file;
    'descend: loop {
        for (k, v) in table {
            path.push(k.clone());
            if fails(&path, v) {
                match v {
                    toml::Value::Table(t) if !t.is_empty() && known_table(&path) => {
                        table = t;
                        continue 'descend;
                    }
                    _ => return Some(path.join(".")),
                }
            }
            path.pop();
        }
        return if path.is_empty() { None } else { Some(path.join(".")) };
    }
}

fn merge(base: &mut toml::Value, patch: toml::Value) {
    match (base, patch) {
        (toml::Value::Table(b), toml::Value::Table(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, p) => *b = p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_and_overrides_apply() {
        for p in Config::PRESETS {
            Config::preset(p).unwrap();
        }
        let mut c = Config::preset("sasrec-paper").unwrap();
        assert_eq!(c.sasrec.hidden, 50);
        c.apply_overrides(&["train.epochs=3".into(), "sasrec.norm=post".into(), "data.source=foo/bar".into()]).unwrap();
        assert_eq!(c.train.epochs, 3);
        assert_eq!(c.sasrec.norm, NormPlacement::Post);
        assert_eq!(c.data.source, "foo/bar");
        assert!(c.apply_overrides(&["train.epochz=3".into()]).unwrap_err().contains("epochz"));
        // The error names the override at fault, and a failed call changes nothing.
        let before = c.clone();
        let e = c.apply_overrides(&["train.epochs=4".into(), "sasrec.norm=middle".into()]).unwrap_err();
        assert!(e.starts_with("override \"sasrec.norm=middle\": unknown variant `middle`"), "{e}");
        assert_eq!(c, before);
    }

    #[test]
    fn toml_round_trip_and_unknown_keys_rejected() {
        let c = Config::preset("ur4rec").unwrap();
        let dir = std::env::temp_dir().join(format!("ur4rec-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, c.to_toml()).unwrap();
        assert_eq!(Config::from_file(&p, "default").unwrap(), c);
        std::fs::write(&p, "preset = \"sasrec-paper\"\n[train]\nepochs = 7\nbogus = 1\n").unwrap();
        let e = Config::from_file(&p, "default").unwrap_err();
        assert!(e.contains("bogus") && e.contains("c.toml"), "{e}");
    }
}
