//! The preference retriever (mission.md §3): a projection of frozen text (and optionally visual) features
//! into a 256-d preference space, free item tables initialised from the projected item features, modality
//! fusion, and cosine scores scaled by 1/τ.
//!
//! ```text
//! proj(u) = LN(W2 · Dropout(ReLU(W1 u + b1)) + b2)           384 → 512 → 256 (visual: Dv → 512 → 256)
//! p_text  = normalize(proj_text(u_text))     p_vis = normalize(proj_vis(u_vis))
//! p       = normalize(Fusion(p_text, p_vis))  (p_text when there is no visual branch)
//! item c  = normalize(Fusion(E_text[c], E_vis[c]))   (normalize(E_text[c]) without visual)
//! r[b, c] = cos(p_b, item_c) / τ              (raw cosine when `raw_cosine`, as the reference)
//! Fusion: concat → LN(W_b·Dropout(ReLU(W_a [t; v]))) ; add → LN(t + v) ; gated → W_o(g∘t + (1−g)∘v), g = σ(W_g [t; v])
//! ```
use crate::backend::Backend;
use crate::params::{Init, ParamBuilder, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FusionKind {
    Concat,
    Add,
    Gated,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrieverConfig {
    pub hidden: usize,
    pub dim: usize,
    pub dropout: f32,
    pub tau: f32,
    /// Score with raw cosines (the reference code) instead of cosine / τ.
    pub raw_cosine: bool,
    pub fusion: FusionKind,
    pub layer_norm_eps: f32,
}

impl Default for RetrieverConfig {
    fn default() -> Self {
        RetrieverConfig { hidden: 512, dim: 256, dropout: 0.1, tau: 0.07, raw_cosine: false, fusion: FusionKind::Concat,
                          layer_norm_eps: 1e-5 }
    }
}

struct Projection {
    fc1: (ParamId, ParamId),
    fc2: (ParamId, ParamId),
    norm: (ParamId, ParamId),
}

struct Fusion {
    a: (ParamId, ParamId),
    b: (ParamId, ParamId),
    norm: (ParamId, ParamId),
}

pub struct Retriever {
    pub cfg: RetrieverConfig,
    pub num_items: usize,
    text_proj: Projection,
    pub item_text: ParamId,
    visual: Option<(Projection, ParamId, Fusion)>,
}

fn xavier(fan_in: usize, fan_out: usize) -> f32 {
    (2.0 / (fan_in + fan_out) as f32).sqrt()
}

fn linear(b: &mut ParamBuilder, group: &str, name: &str, out: usize, inp: usize, rng: &mut Rng) -> (ParamId, ParamId) {
    // PyTorch's nn.Linear default: U(±1/√fan_in) for weight and bias (the reference's projections).
    let bound = 1.0 / (inp as f32).sqrt();
    (b.add(group, &format!("{name}.weight"), &[out, inp], Init::Uniform(bound), rng),
     b.add(group, &format!("{name}.bias"), &[out], Init::Uniform(bound), rng))
}

fn norm(b: &mut ParamBuilder, group: &str, name: &str, d: usize, rng: &mut Rng) -> (ParamId, ParamId) {
    (b.add(group, &format!("{name}.weight"), &[d], Init::Ones, rng), b.add(group, &format!("{name}.bias"), &[d], Init::Zeros, rng))
}

fn projection(b: &mut ParamBuilder, group: &str, name: &str, input: usize, cfg: &RetrieverConfig, rng: &mut Rng) -> Projection {
    Projection {
        fc1: linear(b, group, &format!("{name}.fc1"), cfg.hidden, input, rng),
        fc2: linear(b, group, &format!("{name}.fc2"), cfg.dim, cfg.hidden, rng),
        norm: norm(b, group, &format!("{name}.norm"), cfg.dim, rng),
    }
}

/// One projection's parameters bound to a tape.
struct ProjVars {
    fc1: (Var, Var),
    fc2: (Var, Var),
    norm: (Var, Var),
}

pub struct RetrieverVars {
    text: ProjVars,
    pub item_text: Var,
    visual: Option<(ProjVars, Var, ProjVars)>,
}

fn bind_pair<B: Backend>(tape: &mut Tape<B>, store: &ParamStore<B>, p: (ParamId, ParamId)) -> (Var, Var) {
    (tape.param(store, p.0), tape.param(store, p.1))
}

fn bind_proj<B: Backend>(tape: &mut Tape<B>, store: &ParamStore<B>, p: &Projection) -> ProjVars {
    ProjVars { fc1: bind_pair(tape, store, p.fc1), fc2: bind_pair(tape, store, p.fc2), norm: bind_pair(tape, store, p.norm) }
}

/// The user-side outputs of one forward pass.
pub struct UserVectors {
    /// Normalised text preference `[B, dim]`.
    pub text: Var,
    /// Normalised visual preference `[B, dim]` (when there is a visual branch).
    pub visual: Option<Var>,
    /// Normalised fused preference `[B, dim]` (= text without a visual branch).
    pub fused: Var,
}

impl Retriever {
    /// `text_dim` / `visual_dim`: input feature sizes (`visual_dim = None`: no visual branch).
    pub fn new(b: &mut ParamBuilder, cfg: &RetrieverConfig, num_items: usize, text_dim: usize, visual_dim: Option<usize>,
               rng: &mut Rng) -> Self {
        let text_proj = projection(b, "retriever", "retriever.text_proj", text_dim, cfg, rng);
        let item_text = b.add("retriever", "retriever.item_text", &[num_items + 1, cfg.dim],
                              Init::NormalPadded(xavier(num_items, cfg.dim)), rng);
        b.mark_table(item_text);
        let visual = visual_dim.map(|dv| {
            let proj = projection(b, "visual", "retriever.visual_proj", dv, cfg, rng);
            let table = b.add("visual", "retriever.item_visual", &[num_items + 1, cfg.dim],
                              Init::NormalPadded(xavier(num_items, cfg.dim)), rng);
            b.mark_table(table);
            let d = cfg.dim;
            let fusion = match cfg.fusion {
                FusionKind::Concat => Fusion {
                    a: linear(b, "fusion", "retriever.fusion.fc1", 2 * d, 2 * d, rng),
                    b: linear(b, "fusion", "retriever.fusion.fc2", d, 2 * d, rng),
                    norm: norm(b, "fusion", "retriever.fusion.norm", d, rng),
                },
                FusionKind::Add => Fusion {
                    // Unused weights are not created for `add`: only the layer norm is real.
                    a: (ParamId(usize::MAX), ParamId(usize::MAX)),
                    b: (ParamId(usize::MAX), ParamId(usize::MAX)),
                    norm: norm(b, "fusion", "retriever.fusion.norm", d, rng),
                },
                FusionKind::Gated => Fusion {
                    a: linear(b, "fusion", "retriever.fusion.gate", d, 2 * d, rng),
                    b: linear(b, "fusion", "retriever.fusion.out", d, d, rng),
                    norm: (ParamId(usize::MAX), ParamId(usize::MAX)),
                },
            };
            (proj, table, fusion)
        });
        Retriever { cfg: cfg.clone(), num_items, text_proj, item_text, visual }
    }

    pub fn has_visual(&self) -> bool {
        self.visual.is_some()
    }

    pub fn item_visual_id(&self) -> Option<ParamId> {
        self.visual.as_ref().map(|v| v.1)
    }

    pub fn bind<B: Backend>(&self, tape: &mut Tape<B>, store: &ParamStore<B>) -> RetrieverVars {
        let text = bind_proj(tape, store, &self.text_proj);
        let item_text = tape.param(store, self.item_text);
        let visual = self.visual.as_ref().map(|(p, t, f)| {
            let pv = bind_proj(tape, store, p);
            let tv = tape.param(store, *t);
            let valid = |id: ParamId| id.0 != usize::MAX;
            let pair = |tape: &mut Tape<B>, p: (ParamId, ParamId)| {
                if valid(p.0) { bind_pair(tape, store, p) } else { let z = tape.constant(&[1], &[0.0]); (z, z) }
            };
            let fv = ProjVars { fc1: pair(tape, f.a), fc2: pair(tape, f.b), norm: pair(tape, f.norm) };
            (pv, tv, fv)
        });
        RetrieverVars { text, item_text, visual }
    }

    fn project<B: Backend>(&self, tape: &mut Tape<B>, p: &ProjVars, x: Var) -> Var {
        let h = tape.linear(x, p.fc1.0, Some(p.fc1.1));
        let h = tape.relu(h);
        let h = tape.dropout(h, self.cfg.dropout);
        let o = tape.linear(h, p.fc2.0, Some(p.fc2.1));
        tape.layer_norm(o, p.norm.0, p.norm.1, self.cfg.layer_norm_eps)
    }

    fn fuse<B: Backend>(&self, tape: &mut Tape<B>, f: &ProjVars, t: Var, v: Var) -> Var {
        match self.cfg.fusion {
            FusionKind::Concat => {
                let x = tape.concat_cols(t, v);
                let h = tape.linear(x, f.fc1.0, Some(f.fc1.1));
                let h = tape.relu(h);
                let h = tape.dropout(h, self.cfg.dropout);
                let o = tape.linear(h, f.fc2.0, Some(f.fc2.1));
                tape.layer_norm(o, f.norm.0, f.norm.1, self.cfg.layer_norm_eps)
            }
            FusionKind::Add => {
                let s = tape.add(t, v);
                tape.layer_norm(s, f.norm.0, f.norm.1, self.cfg.layer_norm_eps)
            }
            FusionKind::Gated => {
                let x = tape.concat_cols(t, v);
                let gl = tape.linear(x, f.fc1.0, Some(f.fc1.1));
                // g∘t + (1−g)∘v = v + g∘(t − v).
                let g = tape.sigmoid(gl);
                let diff = tape.sub(t, v);
                let gd = tape.mul(g, diff);
                let m = tape.add(v, gd);
                tape.linear(m, f.fc2.0, Some(f.fc2.1))
            }
        }
    }

    /// User preference vectors from the users' input features (`text_in: [B, Dt]`, `visual_in: [B, Dv]`).
    pub fn users<B: Backend>(&self, tape: &mut Tape<B>, v: &RetrieverVars, text_in: Var, visual_in: Option<Var>) -> UserVectors {
        let t = self.project(tape, &v.text, text_in);
        let text = tape.l2_normalize(t, 1e-12);
        match (&v.visual, visual_in) {
            (Some((pv, _, fv)), Some(vi)) => {
                let u = self.project(tape, pv, vi);
                let visual = tape.l2_normalize(u, 1e-12);
                let f = self.fuse(tape, fv, text, visual);
                let fused = tape.l2_normalize(f, 1e-12);
                UserVectors { text, visual: Some(visual), fused }
            }
            _ => UserVectors { text, visual: None, fused: text },
        }
    }

    /// Normalised item vectors of the given ids, `[ids.len(), dim]`.
    pub fn items<B: Backend>(&self, tape: &mut Tape<B>, v: &RetrieverVars, ids: &[u32]) -> Var {
        let t = tape.gather_rows(v.item_text, ids, Some(0));
        match &v.visual {
            Some((_, tv, fv)) => {
                let vis = tape.gather_rows(*tv, ids, Some(0));
                let f = self.fuse(tape, fv, t, vis);
                tape.l2_normalize(f, 1e-12)
            }
            None => tape.l2_normalize(t, 1e-12),
        }
    }

    /// Retriever logits `[B, C]` of each user's `C` candidates (`cands: [B·C]`).
    pub fn score<B: Backend>(&self, tape: &mut Tape<B>, v: &RetrieverVars, user: Var, cands: &[u32], c: usize) -> Var {
        let b = cands.len() / c;
        let items = self.items(tape, v, cands);
        let rep: Vec<u32> = (0..b as u32).flat_map(|i| std::iter::repeat_n(i, c)).collect();
        let users = tape.gather_rows(user, &rep, None);
        let cos = tape.row_dot(users, items);
        let cos = tape.reshape(cos, &[b, c]);
        if self.cfg.raw_cosine { cos } else { tape.scale(cos, 1.0 / self.cfg.tau) }
    }

    /// The logit scale applied to cosines (1/τ, or 1 for raw cosines).
    pub fn logit_scale(&self) -> f32 {
        if self.cfg.raw_cosine { 1.0 } else { 1.0 / self.cfg.tau }
    }

    /// Initialises the item tables from the projected item features (evaluation mode: no dropout), as the
    /// reference's `update_item_embeddings` meant to (it ran with dropout on). Rows whose features are
    /// missing keep their random initialisation. `item_text: [N+1, Dt]`.
    pub fn init_item_tables<B: Backend>(&self, backend: &B, store: &mut ParamStore<B>, item_text: &crate::data::Features,
                                        item_visual: Option<&crate::data::Features>) {
        let mut fill = |proj: &Projection, table: ParamId, feats: &crate::data::Features| {
            let n = self.num_items + 1;
            let new_rows = {
                let mut tape = Tape::inference(backend);
                let pv = bind_proj(&mut tape, store, proj);
                let x = tape.constant(&[n, feats.dim], &feats.rows);
                let y = self.project(&mut tape, &pv, x);
                let y = tape.l2_normalize(y, 1e-12);
                tape.to_host(y)
            };
            let mut values = store.values_of(backend, table);
            let d = self.cfg.dim;
            for i in 1..n {
                if feats.present[i] {
                    values[i * d..(i + 1) * d].copy_from_slice(&new_rows[i * d..(i + 1) * d]);
                }
            }
            store.set_values(backend, table, &values);
        };
        fill(&self.text_proj, self.item_text, item_text);
        if let (Some((proj, table, _)), Some(f)) = (&self.visual, item_visual) {
            fill(proj, *table, f);
        }
    }
}
