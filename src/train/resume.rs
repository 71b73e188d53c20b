//! Resume checkpoints: everything a run depends on, in one file `RUN/resume.safetensors`.
//!
//! Layout (format `ur4rec-engine-resume`, version 1):
//! - safetensors metadata `format`, `version` and `header`: a JSON [`Header`] holding the resolved
//!   configuration, the data set's identity, the byte length of `metrics.jsonl` at the checkpoint and the
//!   trainer's scalar state (position in the run, best-so-far, strategy state, RNG state);
//! - tensors `param/NAME`, `adam_m/NAME`, `adam_v/NAME` (f32, the parameter's shape), `adam_steps` (u64, one
//!   per parameter), `trainable` (u8, one per parameter), and whatever arrays the trainer adds (the epoch's
//!   shuffled user order, memory-bank queues).
//!
//! Floats are stored bit for bit: tensors as raw little-endian bytes, header floats through serde_json's
//! `float_roundtrip` parser (exact for f32 and f64), so a resumed run repeats the straight run exactly.
//! The file is written atomically ([`crate::checkpoint::write_atomic`]): a crash while writing leaves the
//! previous checkpoint. Reading validates every name, dtype, shape and index against the model built from
//! the recorded configuration and names the file and tensor in every error.
use crate::backend::Backend;
use crate::checkpoint::write_atomic;
use crate::data::features::parse_safetensors;
use crate::config::Config;
use crate::params::ParamStore;
use crate::report::RunDir;
use crate::train::interrupt;
use crate::train::trainer::{PreparedData, RunOptions};
use crate::train::optim::AdamW;
use crate::train::strategies::MemoryBank;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The resume checkpoint's file name inside a run directory.
pub const RESUME_FILE: &str = "resume.safetensors";
pub const FORMAT: &str = "ur4rec-engine-resume";
/// Bumped whenever the layout or the meaning of a field changes; older engines refuse newer files.
pub const VERSION: u32 = 1;

/// What identifies the data a run was trained on (a resumed run must see the same).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub dataset: String,
    pub fingerprint: String,
    pub users: usize,
    pub items: usize,
    pub eval_negatives_fingerprint: String,
}

impl DataIdentity {
    pub fn of(data: &crate::train::trainer::PreparedData) -> DataIdentity {
        DataIdentity {
            dataset: data.dataset.name.clone(),
            fingerprint: data.dataset.fingerprint.clone(),
            users: data.dataset.num_users,
            items: data.dataset.num_items,
            eval_negatives_fingerprint: data.eval_negatives_fingerprint.clone(),
        }
    }
}

/// The JSON header; `S` is the trainer's own state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header<S> {
    /// `ur4rec` or `sasrec`.
    pub trainer: String,
    /// The resolved configuration (TOML), so `train --resume RUN` needs nothing else.
    pub config: String,
    pub data: DataIdentity,
    /// `metrics.jsonl` is truncated to this length on resume: records written after the checkpoint are
    /// written again by the resumed run.
    pub metrics_bytes: u64,
    /// Global step at the checkpoint (also inside `state`; here for messages).
    pub step: usize,
    pub state: S,
}

/// The header without the trainer's state: what every reader needs before it knows the state's type.
pub type HeaderInfo = Header<serde::de::IgnoredAny>;

/// A memory bank's scalars (its arrays are tensors).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankMeta {
    pub size: usize,
    pub dim: usize,
    pub ptr: usize,
    pub filled: usize,
}

/// Collects tensors, then writes the file atomically.
#[derive(Default)]
pub struct ResumeWriter {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl ResumeWriter {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.tensors.push((name.to_string(), dtype, shape.to_vec(), bytes));
    }

    pub fn f32(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        self.add(name, Dtype::F32, shape, bytemuck::cast_slice(v).to_vec());
    }

    pub fn u32(&mut self, name: &str, v: &[u32]) {
        self.add(name, Dtype::U32, &[v.len()], bytemuck::cast_slice(v).to_vec());
    }

    pub fn u64(&mut self, name: &str, v: &[u64]) {
        self.add(name, Dtype::U64, &[v.len()], bytemuck::cast_slice(v).to_vec());
    }

    pub fn u8(&mut self, name: &str, v: &[u8]) {
        self.add(name, Dtype::U8, &[v.len()], v.to_vec());
    }

    /// Weights, both AdamW moments, the per-parameter step counts and trainable flags.
    pub fn params<B: Backend>(&mut self, backend: &B, store: &ParamStore<B>, opt: &AdamW) {
        for (prefix, buf) in [("param", &store.values), ("adam_m", &store.m), ("adam_v", &store.v)] {
            let host = backend.to_host(buf);
            for p in &store.infos {
                self.f32(&format!("{prefix}/{}", p.name), &p.shape, &host[p.offset..p.offset + p.len]);
            }
        }
        self.u64("adam_steps", &opt.steps);
        let trainable: Vec<u8> = store.infos.iter().map(|p| p.trainable as u8).collect();
        self.u8("trainable", &trainable);
    }

    /// A memory bank's keys, users and write steps under `prefix`; returns its scalars for the header.
    pub fn bank(&mut self, prefix: &str, bank: &MemoryBank) -> BankMeta {
        self.f32(&format!("{prefix}/keys"), &[bank.size, bank.dim], &bank.keys);
        self.u32(&format!("{prefix}/users"), &bank.users);
        self.u64(&format!("{prefix}/steps"), &bank.steps);
        BankMeta { size: bank.size, dim: bank.dim, ptr: bank.ptr, filled: bank.filled }
    }

    /// Serialises the tensors and `header` and writes `path` atomically.
    pub fn write<S: Serialize>(self, path: &Path, header: &Header<S>) -> Result<()> {
        let json = serde_json::to_string(header).context("serialising the resume header")?;
        let meta = HashMap::from([("format".to_string(), FORMAT.to_string()), ("version".to_string(), VERSION.to_string()),
                                  ("header".to_string(), json)]);
        let views: Vec<(String, TensorView)> = self.tensors.iter()
            .map(|(n, t, s, b)| (n.clone(), TensorView::new(*t, s.clone(), b).expect("consistent view")))
            .collect();
        let bytes = safetensors::serialize(views, &Some(meta)).context("serialising the resume checkpoint")?;
        write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
    }
}

/// A resume checkpoint read from disk; every accessor validates before it returns.
pub struct ResumeFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    header: String,
    /// Each tensor's dtype, shape and byte range in `bytes`, from one parse at `open`.
    tensors: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
}

impl ResumeFile {
    /// Reads the file and checks its format and version.
    pub fn open(path: &Path) -> Result<ResumeFile> {
        let bytes = std::fs::read(path).with_context(|| format!("reading the resume checkpoint {}", path.display()))?;
        // The header and every tensor's span are checked before the safetensors crate reads them (it adds
        // declared offsets unchecked; see `features::parse_safetensors`), so a torn or hand-edited file fails
        // here, with its name, and not mid-run.
        let st = parse_safetensors(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
        let base = bytes.as_ptr() as usize;
        let tensors = st.tensors().into_iter().map(|(name, t)| {
            let start = t.data().as_ptr() as usize - base;
            (name, (t.dtype(), t.shape().to_vec(), start..start + t.data().len()))
        }).collect();
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{}: not a resume checkpoint (metadata format = {:?}, expected {FORMAT:?})", path.display(),
                  meta.get("format"));
        }
        let version: u32 = meta.get("version").and_then(|v| v.parse().ok())
            .with_context(|| format!("{}: metadata version missing or not an integer", path.display()))?;
        if version != VERSION {
            bail!("{}: resume format version {version}; this engine reads version {VERSION}", path.display());
        }
        let header = meta.get("header").cloned().with_context(|| format!("{}: metadata header missing", path.display()))?;
        Ok(ResumeFile { path: path.to_path_buf(), bytes, header, tensors })
    }

    fn file(&self) -> String {
        self.path.display().to_string()
    }

    pub fn info(&self) -> Result<HeaderInfo> {
        serde_json::from_str(&self.header).with_context(|| format!("{}: bad resume header", self.file()))
    }

    pub fn header<S: DeserializeOwned>(&self) -> Result<Header<S>> {
        serde_json::from_str(&self.header).with_context(|| format!("{}: bad resume header", self.file()))
    }

    /// The raw bytes of tensor `name`, which must have `dtype` and `shape`.
    fn raw(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&[u8]> {
        let (t, s, range) = self.tensors.get(name).with_context(|| format!("{}: tensor {name:?} missing", self.file()))?;
        if *t != dtype || s.as_slice() != shape {
            bail!("{}: tensor {name:?} is {t:?} {s:?}, expected {dtype:?} {shape:?}", self.file());
        }
        Ok(&self.bytes[range.clone()])
    }

    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.raw(name, Dtype::F32, shape)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn u32(&self, name: &str, len: usize) -> Result<Vec<u32>> {
        Ok(self.raw(name, Dtype::U32, &[len])?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn u64(&self, name: &str, len: usize) -> Result<Vec<u64>> {
        Ok(self.raw(name, Dtype::U64, &[len])?.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }

    pub fn u8(&self, name: &str, len: usize) -> Result<Vec<u8>> {
        self.raw(name, Dtype::U8, &[len]).map(<[u8]>::to_vec)
    }

    /// Restores weights, moments, AdamW step counts and trainable flags into a store built from the same
    /// configuration.
    pub fn restore_params<B: Backend>(&self, backend: &B, store: &mut ParamStore<B>, opt: &mut AdamW) -> Result<()> {
        let total: usize = store.infos.iter().map(|p| p.len).sum();
        for prefix in ["param", "adam_m", "adam_v"] {
            let mut host = vec![0f32; total];
            for p in &store.infos {
                let v = self.f32(&format!("{prefix}/{}", p.name), &p.shape)?;
                host[p.offset..p.offset + p.len].copy_from_slice(&v);
            }
            let buf = backend.from_host(&host);
            match prefix {
                "param" => store.values = buf,
                "adam_m" => store.m = buf,
                _ => store.v = buf,
            }
        }
        opt.steps = self.u64("adam_steps", store.infos.len())?;
        // The device keeps the counts as u32 (train::step_log): 2^32 steps is beyond any run.
        if let Some((p, s)) = store.infos.iter().zip(&opt.steps).find(|(_, &s)| s > u32::MAX as u64) {
            bail!("{}: tensor \"adam_steps\": step count {s} of parameter {:?} is beyond 2^32 - 1", self.file(), p.name);
        }
        let flags = self.u8("trainable", store.infos.len())?;
        for (p, &f) in store.infos.iter_mut().zip(&flags) {
            if f > 1 {
                bail!("{}: tensor \"trainable\": flag {f} of parameter {:?} is not 0 or 1", self.file(), p.name);
            }
            p.trainable = f == 1;
        }
        Ok(())
    }

    /// A memory bank under `prefix`, checked against `meta` and against the model's `dim` and user count.
    pub fn bank(&self, prefix: &str, meta: &BankMeta, dim: usize, num_users: usize) -> Result<MemoryBank> {
        let f = self.file();
        if meta.dim != dim || meta.size == 0 || meta.ptr >= meta.size || meta.filled > meta.size {
            bail!("{f}: memory bank {prefix:?}: size {}, dim {}, ptr {}, filled {} (expected dim {dim}, ptr < size, \
                   filled <= size)", meta.size, meta.dim, meta.ptr, meta.filled);
        }
        let users = self.u32(&format!("{prefix}/users"), meta.size)?;
        if let Some(u) = users.iter().find(|&&u| u as usize > num_users) {
            bail!("{f}: tensor \"{prefix}/users\": user id {u} beyond the data set's {num_users} users");
        }
        Ok(MemoryBank {
            size: meta.size,
            dim,
            keys: self.f32(&format!("{prefix}/keys"), &[meta.size, dim])?,
            users,
            steps: self.u64(&format!("{prefix}/steps"), meta.size)?,
            ptr: meta.ptr,
            filled: meta.filled,
        })
    }

    /// The epoch's user order under `name`: must be a permutation of `0..n`.
    pub fn permutation(&self, name: &str, n: usize) -> Result<Vec<usize>> {
        let v = self.u32(name, n)?;
        let mut seen = vec![false; n];
        for &x in &v {
            let x = x as usize;
            if x >= n || std::mem::replace(&mut seen[x], true) {
                bail!("{}: tensor {name:?} is not a permutation of 0..{n} (entry {x})", self.file());
            }
        }
        Ok(v.into_iter().map(|x| x as usize).collect())
    }

    /// Checks that the run being resumed is the one recorded: same trainer, configuration and data.
    pub fn check_matches(&self, trainer: &str, config_toml: &str, data: &DataIdentity) -> Result<HeaderInfo> {
        let info = self.info()?;
        let f = self.file();
        if info.trainer != trainer {
            bail!("{f}: a {} run's checkpoint; this is a {trainer} run", info.trainer);
        }
        if info.config != config_toml {
            bail!("{f}: the run was checkpointed under another configuration; resume it with the configuration \
                   recorded in the checkpoint (`ur4rec-engine train --resume RUN_DIR`)");
        }
        if &info.data != data {
            bail!("{f}: recorded data {:?} ({} users, {} items, fingerprint {}), found {:?} ({} users, {} items, \
                   fingerprint {})", info.data.dataset, info.data.users, info.data.items, info.data.fingerprint,
                  data.dataset, data.users, data.items, data.fingerprint);
        }
        Ok(info)
    }
}

/// A trainer's link to its run's resume checkpoint: when to write one, how to write it, when to stop.
pub struct Checkpointer<'r> {
    pub run: &'r mut RunDir,
    trainer: &'static str,
    config_toml: String,
    data: DataIdentity,
    /// `train.checkpoint_every` (0: only where the trainer always writes: epoch and stage ends).
    every: usize,
    stop_after: Option<usize>,
}

impl<'r> Checkpointer<'r> {
    pub fn new(run: &'r mut RunDir, trainer: &'static str, cfg: &Config, data: &PreparedData, opts: &RunOptions) -> Self {
        Checkpointer { run, trainer, config_toml: cfg.to_toml(), data: DataIdentity::of(data),
                       every: cfg.train.checkpoint_every, stop_after: opts.stop_after_steps }
    }

    pub fn path(&self) -> PathBuf {
        self.run.file(RESUME_FILE)
    }

    /// Opens the run's checkpoint and checks it belongs to this trainer, configuration and data.
    pub fn open_for_resume(&self) -> Result<ResumeFile> {
        let file = ResumeFile::open(&self.path())?;
        file.check_matches(self.trainer, &self.config_toml, &self.data)?;
        Ok(file)
    }

    /// Writes the checkpoint: `w`'s tensors and the trainer's `state` at global `step`.
    pub fn write<S: Serialize>(&mut self, w: ResumeWriter, step: usize, state: S) -> Result<()> {
        let header = Header { trainer: self.trainer.to_string(), config: self.config_toml.clone(), data: self.data.clone(),
                              metrics_bytes: self.run.metrics_bytes()?, step, state };
        w.write(&self.path(), &header)
    }

    /// Whether a step-boundary checkpoint is due after global step `step` (periodic, or a stop).
    pub fn due_after_step(&self, step: usize) -> bool {
        (self.every > 0 && step.is_multiple_of(self.every)) || self.stop_reason(Some(step)).is_some()
    }

    /// The stop asked for: a signal, or the step limit when `step` (a step just finished) reaches it.
    pub fn stop_reason(&self, step: Option<usize>) -> Option<StopReason> {
        if interrupt::requested() {
            Some(StopReason::Interrupted)
        } else if step.is_some() && self.stop_after == step {
            Some(StopReason::StepLimit)
        } else {
            None
        }
    }

    /// `Err(Stopped)` when a stop was asked for (call right after writing the checkpoint).
    pub fn stop_if_asked(&self, step: usize, just_finished_step: bool) -> Result<()> {
        match self.stop_reason(just_finished_step.then_some(step)) {
            Some(reason) => Err(Stopped { reason, step, checkpoint: self.path() }.into()),
            None => Ok(()),
        }
    }
}

/// Why a run stopped before finishing, with a checkpoint to resume from.
#[derive(Debug, thiserror::Error)]
#[error("{reason} at step {step}; checkpoint written to {}; continue with `ur4rec-engine train --resume {}`",
        checkpoint.display(), checkpoint.parent().map(|p| p.display().to_string()).unwrap_or_default())]
pub struct Stopped {
    pub reason: StopReason,
    pub step: usize,
    pub checkpoint: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT / SIGTERM.
    Interrupted,
    /// `RunOptions::stop_after_steps` was reached.
    StepLimit,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Interrupted => "interrupted",
            StopReason::StepLimit => "stopped at the requested step limit",
        })
    }
}

#[cfg(test)]
mod tests {
    /// Header floats must survive JSON bit for bit (the `float_roundtrip` feature of serde_json).
    #[test]
    fn header_floats_round_trip_exactly() {
        let mut rng = crate::rng::Rng::new(11);
        for _ in 0..200_000 {
            let bits = (rng.next_u64() >> 32) as u32;
            let x = f32::from_bits(bits);
            if !x.is_finite() {
                continue;
            }
            let y: f32 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(x.to_bits(), y.to_bits(), "{x:e}");
            let d = f64::from_bits(rng.next_u64());
            if d.is_finite() {
                let e: f64 = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
                assert_eq!(d.to_bits(), e.to_bits(), "{d:e}");
            }
        }
    }
}
