//! UR4Rec: SASRec and the preference retriever side by side, their input features, and the fused score
//! `0.5·softmax(SASRec) + 0.5·softmax(retriever)` over a user's candidates (the reference's fusion).
use crate::backend::Backend;
use crate::config::{Config, UserVectorSource};
use crate::data::features::mean_of_items;
use crate::data::{Dataset, Features, Split};
use crate::model::retriever::Retriever;
use crate::model::SasRec;
use crate::params::{ParamBuilder, ParamStore};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use anyhow::{bail, Result};

/// The frozen inputs of the retriever, as host tables indexed by dense id (row 0 = padding).
pub struct RetrieverInputs {
    pub item_text: Features,
    pub item_visual: Option<Features>,
    /// Per-user text input `[U+1, Dt]`.
    pub user_text: Features,
    /// Per-user visual input `[U+1, Dv]` (mean of the history's item visual features).
    pub user_visual: Option<Features>,
}

fn center(f: &mut Features, mean: &[f32]) {
    for (k, row) in f.rows.chunks_mut(f.dim).enumerate() {
        if f.present[k] {
            row.iter_mut().zip(mean).for_each(|(x, m)| *x -= m);
        }
    }
}

fn present_mean(f: &Features) -> Vec<f32> {
    let mut mean = vec![0.0f64; f.dim];
    let mut n = 0usize;
    for (k, row) in f.rows.chunks(f.dim).enumerate() {
        if f.present[k] {
            mean.iter_mut().zip(row).for_each(|(m, x)| *m += *x as f64);
            n += 1;
        }
    }
    mean.iter().map(|m| (*m / n.max(1) as f64) as f32).collect()
}

impl RetrieverInputs {
    /// Builds the inputs from the data set's features. User vectors pool the TRAINING history only, so no
    /// evaluation item leaks into them. With `center`, the item mean is subtracted from every input (the
    /// frozen MiniLM vectors share one dominant direction that otherwise collapses the projection).
    pub fn new(ds: &Dataset, split: &Split, source: UserVectorSource, center_features: bool) -> Result<RetrieverInputs> {
        let Some(item_text) = ds.item_text.clone() else {
            bail!("UR4Rec needs item text features: set ur4rec.features.item_text (and item_text_ids)");
        };
        let mut item_visual = ds.item_visual.clone();
        let mut user_text = match source {
            UserVectorSource::HistoryMean => mean_of_items(&item_text, &split.train),
            UserVectorSource::Provided => match &ds.user_text {
                Some(u) => u.clone(),
                None => bail!("ur4rec.user_vectors = provided, but the data set has no user text features"),
            },
        };
        let mut user_visual = item_visual.as_ref().map(|v| mean_of_items(v, &split.train));
        let mut item_text = item_text;
        if center_features {
            let m = present_mean(&item_text);
            center(&mut item_text, &m);
            if source == UserVectorSource::HistoryMean {
                center(&mut user_text, &m);
            } else {
                let mu = present_mean(&user_text);
                center(&mut user_text, &mu);
            }
            if let (Some(iv), Some(uv)) = (item_visual.as_mut(), user_visual.as_mut()) {
                let m = present_mean(iv);
                center(iv, &m);
                center(uv, &m);
            }
        }
        Ok(RetrieverInputs { item_text, item_visual, user_text, user_visual })
    }

    /// Host rows of the given users' text and visual inputs.
    pub fn user_rows(&self, users: &[u32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let take = |f: &Features| -> Vec<f32> {
            users.iter().flat_map(|&u| f.rows[u as usize * f.dim..(u as usize + 1) * f.dim].iter().copied()).collect()
        };
        (take(&self.user_text), self.user_visual.as_ref().map(take))
    }
}

pub struct Ur4Rec {
    pub sasrec: SasRec,
    pub retriever: Retriever,
    pub inputs: RetrieverInputs,
}

impl Ur4Rec {
    pub fn new(b: &mut ParamBuilder, cfg: &Config, ds: &Dataset, split: &Split, rng: &mut Rng) -> Result<Ur4Rec> {
        let inputs = RetrieverInputs::new(ds, split, cfg.ur4rec.user_vectors, cfg.ur4rec.center_features)?;
        let sasrec = SasRec::new(b, &cfg.sasrec, ds.num_items, rng);
        let retriever = Retriever::new(b, &cfg.ur4rec.retriever, ds.num_items, inputs.item_text.dim,
                                       inputs.item_visual.as_ref().map(|f| f.dim), rng);
        Ok(Ur4Rec { sasrec, retriever, inputs })
    }

    /// Initialises the retriever's item tables from the projected item features.
    pub fn init_item_tables<B: Backend>(&self, backend: &B, store: &mut ParamStore<B>) {
        self.retriever.init_item_tables(backend, store, &self.inputs.item_text, self.inputs.item_visual.as_ref());
    }

    /// The users' input rows as tape constants.
    pub fn user_inputs<B: Backend>(&self, tape: &mut Tape<B>, users: &[u32]) -> (Var, Option<Var>) {
        let (t, v) = self.inputs.user_rows(users);
        let tv = tape.constant(&[users.len(), self.inputs.user_text.dim], &t);
        let vv = v.map(|v| tape.constant(&[users.len(), self.inputs.user_visual.as_ref().unwrap().dim], &v));
        (tv, vv)
    }
}

/// `α·softmax(s) + (1−α)·softmax(r)` row by row on the host (evaluation only; the reference used α = 0.5).
pub fn fuse_scores(s: &[f32], r: &[f32], cols: usize, alpha: f32) -> Vec<f32> {
    let alpha = alpha as f64;
    let mut out = vec![0.0f32; s.len()];
    for ((o, s), r) in out.chunks_mut(cols).zip(s.chunks(cols)).zip(r.chunks(cols)) {
        let sm = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|v| (*v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect()
        };
        let (ps, pr) = (sm(s), sm(r));
        for i in 0..cols {
            o[i] = (alpha * ps[i] + (1.0 - alpha) * pr[i]) as f32;
        }
    }
    out
}
