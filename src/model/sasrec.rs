//! SASRec (Kang & McAuley 2018) as mission.md §3 defines it, on packed sequences.
//!
//! Forward, `post` norm placement (UR4Rec reference):
//! ```text
//! x = Dropout(E_item[s]·(√d if scaled) + E_pos[p])
//! per block:  a = Attn(x)            x = LN1(x + Dropout(a))
//!             f = Dropout(W2·Dropout(ReLU(W1·x)))   x = LN2(x + Dropout(f))
//! H = LN_final(x)
//! ```
//! `pre` placement follows Kang's SASRec code exactly: `q = LN1(x)`, `x = q + Attn(q; keys/values x)`,
//! `f = LN2(x)`, `x = f + FFN(f)`. Padded positions do not exist in the packed layout, which is the
//! reference's "zero the padded rows" without the NaN (reference-model.md §3.4). Scores are dot products
//! with the (shared) item embedding.
use crate::backend::Backend;
use crate::config::{NormPlacement, SasRecConfig};
use crate::params::{Init, ParamBuilder, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tape::{Tape, Var};
use crate::train::batch::SeqBatch;

struct LayerNormIds {
    weight: ParamId,
    bias: ParamId,
}

struct LinearIds {
    weight: ParamId,
    bias: ParamId,
}

struct BlockIds {
    attn_norm: LayerNormIds,
    q: LinearIds,
    kv: LinearIds,
    out: LinearIds,
    ffn_norm: LayerNormIds,
    fc1: LinearIds,
    fc2: LinearIds,
}

pub struct SasRec {
    pub cfg: SasRecConfig,
    pub num_items: usize,
    item_embedding: ParamId,
    position_embedding: ParamId,
    blocks: Vec<BlockIds>,
    final_norm: LayerNormIds,
}

/// Xavier-normal standard deviation (Glorot & Bengio), as Kang's and pmixer's SASRec initialise.
fn xavier(fan_in: usize, fan_out: usize) -> f32 {
    (2.0 / (fan_in + fan_out) as f32).sqrt()
}

fn layer_norm(b: &mut ParamBuilder, name: &str, d: usize, rng: &mut Rng) -> LayerNormIds {
    LayerNormIds {
        weight: b.add("sasrec", &format!("{name}.weight"), &[d], Init::Ones, rng),
        bias: b.add("sasrec", &format!("{name}.bias"), &[d], Init::Zeros, rng),
    }
}

fn linear(b: &mut ParamBuilder, name: &str, out: usize, inp: usize, rng: &mut Rng) -> LinearIds {
    LinearIds {
        weight: b.add("sasrec", &format!("{name}.weight"), &[out, inp], Init::Normal(xavier(inp, out)), rng),
        bias: b.add("sasrec", &format!("{name}.bias"), &[out], Init::Zeros, rng),
    }
}

/// The parameters of one step, bound to a tape once so shared tensors (the item table) sum their gradients.
pub struct SasRecVars {
    pub item_table: Var,
    position_table: Var,
    blocks: Vec<BlockVars>,
    final_norm: (Var, Var),
}

struct BlockVars {
    attn_norm: (Var, Var),
    q: (Var, Var),
    kv: (Var, Var),
    out: (Var, Var),
    ffn_norm: (Var, Var),
    fc1: (Var, Var),
    fc2: (Var, Var),
}

impl SasRec {
    pub fn new(b: &mut ParamBuilder, cfg: &SasRecConfig, num_items: usize, rng: &mut Rng) -> Self {
        let d = cfg.hidden;
        assert!(d.is_multiple_of(cfg.heads), "hidden {} must be divisible by heads {}", d, cfg.heads);
        let item_embedding = b.add("sasrec", "sasrec.item_embedding", &[num_items + 1, d],
                                   Init::NormalPadded(xavier(num_items + 1, d)), rng);
        b.mark_table(item_embedding);
        let position_embedding = b.add("sasrec", "sasrec.position_embedding", &[cfg.max_len, d],
                                       Init::Normal(xavier(cfg.max_len, d)), rng);
        let blocks = (0..cfg.blocks).map(|i| {
            let p = format!("sasrec.blocks.{i}");
            BlockIds {
                attn_norm: layer_norm(b, &format!("{p}.attn_norm"), d, rng),
                q: linear(b, &format!("{p}.attn.q"), d, d, rng),
                kv: linear(b, &format!("{p}.attn.kv"), 2 * d, d, rng),
                out: linear(b, &format!("{p}.attn.out"), d, d, rng),
                ffn_norm: layer_norm(b, &format!("{p}.ffn_norm"), d, rng),
                fc1: linear(b, &format!("{p}.ffn.fc1"), cfg.ffn, d, rng),
                fc2: linear(b, &format!("{p}.ffn.fc2"), d, cfg.ffn, rng),
            }
        }).collect();
        let final_norm = layer_norm(b, "sasrec.final_norm", d, rng);
        SasRec { cfg: cfg.clone(), num_items, item_embedding, position_embedding, blocks, final_norm }
    }

    pub fn item_embedding_id(&self) -> ParamId {
        self.item_embedding
    }

    pub fn bind<B: Backend>(&self, tape: &mut Tape<B>, store: &ParamStore<B>) -> SasRecVars {
        let mut pair = |ids: (ParamId, ParamId)| (tape.param(store, ids.0), tape.param(store, ids.1));
        let blocks = self.blocks.iter().map(|b| BlockVars {
            attn_norm: pair((b.attn_norm.weight, b.attn_norm.bias)),
            q: pair((b.q.weight, b.q.bias)),
            kv: pair((b.kv.weight, b.kv.bias)),
            out: pair((b.out.weight, b.out.bias)),
            ffn_norm: pair((b.ffn_norm.weight, b.ffn_norm.bias)),
            fc1: pair((b.fc1.weight, b.fc1.bias)),
            fc2: pair((b.fc2.weight, b.fc2.bias)),
        }).collect();
        let final_norm = pair((self.final_norm.weight, self.final_norm.bias));
        SasRecVars {
            item_table: tape.param(store, self.item_embedding),
            position_table: tape.param(store, self.position_embedding),
            blocks,
            final_norm,
        }
    }

    /// Hidden states `H: [T, d]` of every packed token.
    pub fn encode<B: Backend>(&self, tape: &mut Tape<B>, v: &SasRecVars, batch: &SeqBatch<B>) -> Var {
        let c = &self.cfg;
        let eps = c.layer_norm_eps;
        let mut x = tape.embedding(v.item_table, &batch.items);
        if c.scale_embedding {
            x = tape.scale(x, (c.hidden as f32).sqrt());
        }
        let pos = tape.gather_rows(v.position_table, &batch.positions, None);
        x = tape.add(x, pos);
        x = tape.dropout(x, c.dropout);
        for b in &v.blocks {
            x = match c.norm {
                NormPlacement::Post => {
                    let a = self.attention(tape, b, x, x, batch);
                    let a = tape.dropout(a, c.dropout);
                    let r = tape.add(x, a);
                    let x1 = tape.layer_norm(r, b.attn_norm.0, b.attn_norm.1, eps);
                    let f = self.ffn(tape, b, x1);
                    let f = tape.dropout(f, c.dropout);
                    let r = tape.add(x1, f);
                    tape.layer_norm(r, b.ffn_norm.0, b.ffn_norm.1, eps)
                }
                NormPlacement::Pre => {
                    let q = tape.layer_norm(x, b.attn_norm.0, b.attn_norm.1, eps);
                    let a = self.attention(tape, b, q, x, batch);
                    let r = tape.add(q, a);
                    let f_in = tape.layer_norm(r, b.ffn_norm.0, b.ffn_norm.1, eps);
                    let f = self.ffn(tape, b, f_in);
                    tape.add(f_in, f)
                }
            };
        }
        tape.layer_norm(x, v.final_norm.0, v.final_norm.1, eps)
    }

    /// Multi-head attention with queries from `q_in` and keys/values from `kv_in`, then the output projection.
    fn attention<B: Backend>(&self, tape: &mut Tape<B>, b: &BlockVars, q_in: Var, kv_in: Var, batch: &SeqBatch<B>) -> Var {
        let q = tape.linear(q_in, b.q.0, Some(b.q.1));
        let kv = tape.linear(kv_in, b.kv.0, Some(b.kv.1));
        let qkv = tape.concat_cols(q, kv);
        let a = tape.attention(qkv, &batch.layout, self.cfg.heads, self.cfg.dropout);
        tape.linear(a, b.out.0, Some(b.out.1))
    }

    /// Position-wise feed-forward: `Dropout(W2 · ReLU(Dropout(W1 x)))`.
    fn ffn<B: Backend>(&self, tape: &mut Tape<B>, b: &BlockVars, x: Var) -> Var {
        let h = tape.linear(x, b.fc1.0, Some(b.fc1.1));
        let h = tape.dropout(h, self.cfg.dropout);
        let h = tape.relu(h);
        let o = tape.linear(h, b.fc2.0, Some(b.fc2.1));
        tape.dropout(o, self.cfg.dropout)
    }

    /// User vectors: the hidden state of each sequence's last item, `[S, d]`.
    pub fn user_vectors<B: Backend>(&self, tape: &mut Tape<B>, v: &SasRecVars, batch: &SeqBatch<B>) -> Var {
        let h = self.encode(tape, v, batch);
        tape.gather_rows(h, &batch.last_rows, None)
    }
}
