//! Reader of the files `reference/` writes (format `ur4rec-golden/1`): a model's weights under the engine's
//! parameter names, one explicit batch, the initial memory banks, and JSON metadata with the configuration.
//! `tests/golden_parity.rs` compares the engine with the PyTorch results stored beside them;
//! `benches/side_by_side.rs` times a training step on them. `reference/README.md` lists the tensors.
use crate::backend::{Backend, StoreFormat};
use crate::config::Config;
use crate::model::retriever::Retriever;
use crate::model::SasRec;
use crate::params::{ParamBuilder, ParamId, ParamStore};
use crate::rng::Rng;
use crate::train::explicit_batch::JointBatch;
use crate::train::strategies::{DeviceBank, MemoryBank};
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub const FORMAT: &str = "ur4rec-golden/1";

/// A golden / side-by-side file: its bytes and its metadata (the JSON under the key `golden`).
pub struct GoldenFile {
    bytes: Vec<u8>,
    pub meta: serde_json::Value,
}

impl GoldenFile {
    pub fn load(path: &std::path::Path) -> Result<GoldenFile> {
        let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
        let (_, m) = SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: safetensors header", path.display()))?;
        let Some(meta_str) = m.metadata().as_ref().and_then(|m| m.get("golden").cloned()) else {
            bail!("{}: no metadata key 'golden'", path.display());
        };
        let meta: serde_json::Value = serde_json::from_str(&meta_str).with_context(|| format!("{}: metadata", path.display()))?;
        ensure!(meta["format"] == FORMAT, "{}: format {}, expected {FORMAT}", path.display(), meta["format"]);
        Ok(GoldenFile { bytes, meta })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("checked at load")
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().cloned().collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.st().tensor(name).map_err(|_| anyhow::anyhow!("no tensor {name}"))?.shape().to_vec())
    }

    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| anyhow::anyhow!("no tensor {name}"))?;
        ensure!(t.dtype() == Dtype::F32, "{name}: dtype {:?}, expected F32", t.dtype());
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }

    /// An int64 tensor of ids.
    pub fn ids(&self, name: &str) -> Result<Vec<u32>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| anyhow::anyhow!("no tensor {name}"))?;
        ensure!(t.dtype() == Dtype::I64, "{name}: dtype {:?}, expected I64", t.dtype());
        t.data().chunks_exact(8).map(|c| {
            let v = i64::from_le_bytes(c.try_into().unwrap());
            u32::try_from(v).with_context(|| format!("{name}: id {v}"))
        }).collect()
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.meta[key].as_u64().map(|v| v as usize).with_context(|| format!("metadata key {key}"))
    }

    pub fn strings(v: &serde_json::Value) -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
    }

    /// The engine configuration: the defaults with the file's `engine_overrides`, then `extra`.
    pub fn config(&self, extra: &[String]) -> Result<Config> {
        let mut overrides = Self::strings(&self.meta["engine_overrides"]);
        overrides.extend_from_slice(extra);
        let mut cfg = Config::default();
        cfg.apply_overrides(&overrides).map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }

    /// SASRec and the retriever (with a visual branch), built as `Ur4Rec::new` builds them, every weight
    /// loaded from the file: each engine parameter must be there with its shape, and every `sasrec.*` /
    /// `retriever.*` tensor of the file must be an engine parameter.
    pub fn model<B: Backend>(&self, be: &B, cfg: &Config) -> Result<(SasRec, Retriever, ParamStore<B>)> {
        let (items, text, visual) = (self.usize("num_items")?, self.usize("text_dim")?, self.usize("visual_dim")?);
        let mut rng = Rng::new(0);
        let mut b = ParamBuilder::new();
        let sasrec = SasRec::new(&mut b, &cfg.sasrec, items, &mut rng);
        let retriever = Retriever::new(&mut b, &cfg.ur4rec.retriever, items, text, Some(visual), &mut rng);
        let mut store = b.build(be);
        for i in 0..store.infos.len() {
            let (name, shape) = (store.infos[i].name.clone(), store.infos[i].shape.clone());
            ensure!(self.shape(&name)? == shape, "weight {name}: shape {:?}, the engine's {shape:?}", self.shape(&name)?);
            store.set_values(be, ParamId(i), &self.f32s(&name)?);
        }
        for n in self.names().iter().filter(|n| n.starts_with("sasrec.") || n.starts_with("retriever.")) {
            ensure!(store.id(n).is_some(), "the file has weight {n}, which the engine does not define");
        }
        Ok((sasrec, retriever, store))
    }

    /// The batch (`batch.*`), SASRec inputs untruncated.
    pub fn batch(&self) -> Result<JointBatch> {
        let lens = self.ids("batch.seq_lens")?;
        let items = self.ids("batch.seq_items")?;
        ensure!(lens.iter().map(|&n| n as usize).sum::<usize>() == items.len(), "batch.seq_lens do not add up");
        let mut seqs = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &n in &lens {
            seqs.push(items[at..at + n as usize].to_vec());
            at += n as usize;
        }
        let j = self.shape("batch.cands")?[1];
        Ok(JointBatch {
            users: self.ids("batch.users")?,
            seqs,
            cands: self.ids("batch.cands")?,
            negatives: j - 1,
            user_text: self.f32s("batch.user_text")?,
            user_visual: if self.has("batch.user_visual") { Some(self.f32s("batch.user_visual")?) } else { None },
        })
    }

    /// The initial (text, visual) memory banks (`bank.*`), pointer at slot 0.
    /// The two memory banks the script started from, on `be` (f32 keys).
    pub fn banks<B: Backend>(&self, be: &B, dim: usize) -> Result<(DeviceBank<B>, DeviceBank<B>)> {
        let users = self.ids("bank.users")?;
        let bank = |keys: Vec<f32>| -> Result<MemoryBank> {
            ensure!(keys.len() == users.len() * dim, "bank keys: {} values for {} slots of {dim}", keys.len(), users.len());
            Ok(MemoryBank { size: users.len(), dim, keys, users: users.clone(), steps: vec![0; users.len()], ptr: 0, filled: 0 })
        };
        let (t, v) = (bank(self.f32s("bank.text.keys")?)?, bank(self.f32s("bank.visual.keys")?)?);
        Ok((DeviceBank::upload(be, t, StoreFormat::F32), DeviceBank::upload(be, v, StoreFormat::F32)))
    }
}
