"""PyTorch reference of ur4rec-engine's SASRec and UR4Rec, exactly as the engine defines them.

Same parameter names and shapes as the engine's checkpoints (`ur4rec-engine info --params`; a module's
`named_parameters()` are the engine's names, in the engine's order), same masks, same losses. It loads an
engine safetensors checkpoint with `load_engine_checkpoint`. The formulas, with the engine file that
defines each:

SASRec (src/model/sasrec.rs), on left-padded [B, L] windows (the engine packs real tokens only; padding
never influences a real token here either: keys that are padding are masked, and the engine's positions
are absolute positions in the left-padded window, the last item at L-1):
    x = E_item[s] (* sqrt(d) if scale_embedding) + E_pos[p]                    (dropout)
    post: x = LN1(x + Attn(x; x)),  x = LN2(x + FFN(x))
    pre:  q = LN1(x), r = q + Attn(q; x), f = LN2(r), x = f + FFN(f)
    H = LN_final(x);  Attn: q = W_q x_q + b, [k | v] = W_kv x_kv + b, causal softmax(q k^T / sqrt(d_h)) v,
    heads are consecutive column blocks, then W_out;  FFN(x) = W2 relu(W1 x + b1) + b2
    user vector = H[:, L-1];  score(c) = h . E_item[c]
Retriever (src/model/retriever.rs):
    proj(u) = LN(W2 relu(W1 u + b1) + b2);  text = normalize(proj_text(u_t)), visual = normalize(proj_vis(u_v))
    fused = normalize(Fusion(text, visual));  item c = normalize(Fusion(E_text[c], E_vis[c]))
    Fusion concat: LN(W_b relu(W_a [t; v] + a) + b);  add: LN(t + v);  gated: W_o(v + g (t - v)), g = sigmoid(W_g [t; v])
    r[b, c] = cos(fused_b, item_c) / tau  (raw cosine with raw_cosine)
Losses (src/train/objective.rs, src/train/explicit_batch.rs): see `sasrec_objective` and `joint_losses`.
AdamW (src/train/optim.rs): torch.optim.AdamW per group, after clipping each group to its own norm
(clip_grad_norm_, whose min(1, clip / (norm + 1e-6)) is the engine's rule).
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def default_config():
    """The engine's defaults for the keys this reference reads (src/config.rs, src/model/retriever.rs)."""
    return {
        "sasrec": {"hidden": 256, "blocks": 2, "heads": 4, "ffn": 256, "dropout": 0.1, "max_len": 50, "norm": "post",
                   "scale_embedding": False, "layer_norm_eps": 1e-5},
        "retriever": {"hidden": 512, "dim": 256, "dropout": 0.1, "tau": 0.07, "raw_cosine": False, "fusion": "concat",
                      "layer_norm_eps": 1e-5},
        "ur4rec": {"negatives": 5, "retrieval_loss": "softmax", "contrastive": "in-batch", "contrastive_tau": 0.07,
                   "diversity_eps": 0.1, "sasrec_weight": 1.0, "retrieval_weight": 1.0,
                   "weights": {"consistency": 0.1, "contrastive": 0.1, "diversity": 0.01},
                   "distillation": {"enabled": False, "temperature": 4.0, "weight": 0.1, "stages": [3, 4],
                                    "retriever_logit_scale": 1.0 / 0.07}},
        "train": {"objective": "every-position", "weight_decay": 1e-5, "beta1": 0.9, "beta2": 0.999, "adam_eps": 1e-8,
                  "clip_norm": 1.0},
    }


def config_from_engine_toml(path):
    """The reference's configuration from an engine run's resolved `config.toml` (run directories hold one).
    Loss weights: the fixed ones (a curriculum is not reproduced here)."""
    import tomllib
    with open(path, "rb") as f:
        t = tomllib.load(f)
    c = default_config()
    for k in c["sasrec"]:
        c["sasrec"][k] = t["sasrec"].get(k, c["sasrec"][k])
    for k in c["retriever"]:
        c["retriever"][k] = t["ur4rec"]["retriever"].get(k, c["retriever"][k])
    for k in c["ur4rec"]:
        if k not in ("weights", "distillation") and k in t["ur4rec"]:
            c["ur4rec"][k] = t["ur4rec"][k]
    for k in c["ur4rec"]["distillation"]:
        c["ur4rec"]["distillation"][k] = t["ur4rec"]["distillation"].get(k, c["ur4rec"]["distillation"][k])
    for k in c["train"]:
        c["train"][k] = t["train"].get(k, c["train"][k])
    return c


def xavier_std(fan_in, fan_out):
    return math.sqrt(2.0 / (fan_in + fan_out))


class LinearInit(nn.Linear):
    """nn.Linear whose weight is Xavier-normal and bias zero (the engine's SASRec linears)."""

    def __init__(self, inp, out):
        super().__init__(inp, out)
        with torch.no_grad():
            self.weight.normal_(0.0, xavier_std(inp, out))
            self.bias.zero_()


class Attention(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.q = LinearInit(d, d)
        self.kv = LinearInit(d, 2 * d)
        self.out = LinearInit(d, d)
        self.d, self.heads, self.dropout = d, heads, dropout

    def forward(self, q_in, kv_in, mask):
        b, l, d = q_in.shape
        h, dh = self.heads, d // self.heads
        q = self.q(q_in).view(b, l, h, dh).transpose(1, 2)
        k, v = self.kv(kv_in).split(d, dim=-1)
        k = k.reshape(b, l, h, dh).transpose(1, 2)
        v = v.reshape(b, l, h, dh).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(o.transpose(1, 2).reshape(b, l, d))


class Ffn(nn.Module):
    def __init__(self, d, ffn, dropout):
        super().__init__()
        self.fc1 = LinearInit(d, ffn)
        self.fc2 = LinearInit(ffn, d)
        self.dropout = dropout

    def forward(self, x):
        # The engine: Dropout(W2 . ReLU(Dropout(W1 x))).
        h = F.dropout(self.fc1(x), self.dropout, self.training)
        return F.dropout(self.fc2(F.relu(h)), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, eps = c["hidden"], c["layer_norm_eps"]
        # Registration order = the engine's parameter order.
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, c["heads"], c["dropout"])
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.ffn = Ffn(d, c["ffn"], c["dropout"])


class SASRec(nn.Module):
    def __init__(self, c, num_items):
        super().__init__()
        self.c = c
        d, L = c["hidden"], c["max_len"]
        self.item_embedding = nn.Parameter(torch.randn(num_items + 1, d) * xavier_std(num_items + 1, d))
        with torch.no_grad():
            self.item_embedding[0].zero_()
        self.position_embedding = nn.Parameter(torch.randn(L, d) * xavier_std(L, d))
        self.blocks = nn.ModuleList([Block(c) for _ in range(c["blocks"])])
        self.final_norm = nn.LayerNorm(d, eps=c["layer_norm_eps"])

    @staticmethod
    def attention_mask(seqs):
        """[B, 1, L, L] bool, True = may attend: causal and key not padding. A padding query row attends to
        itself only (its output is never read; this only keeps softmax finite)."""
        b, L = seqs.shape
        valid = seqs != 0
        causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
        m = causal[None] & valid[:, None, :]
        eye = torch.eye(L, dtype=torch.bool, device=seqs.device)[None]
        m = m | (eye & ~valid[:, :, None])
        return m[:, None]

    def encode(self, seqs):
        """H [B, L, d] of left-padded item ids `seqs` [B, L] (0 = padding)."""
        c = self.c
        drop = c["dropout"]
        x = F.embedding(seqs, self.item_embedding, padding_idx=0)
        if c["scale_embedding"]:
            x = x * math.sqrt(c["hidden"])
        x = x + self.position_embedding[None, : seqs.shape[1]]
        x = F.dropout(x, drop, self.training)
        mask = self.attention_mask(seqs)
        for blk in self.blocks:
            if c["norm"] == "post":
                a = F.dropout(blk.attn(x, x, mask), drop, self.training)
                x1 = blk.attn_norm(x + a)
                f = F.dropout(blk.ffn(x1), drop, self.training)
                x = blk.ffn_norm(x1 + f)
            else:
                q = blk.attn_norm(x)
                r = q + blk.attn(q, x, mask)
                f_in = blk.ffn_norm(r)
                x = f_in + blk.ffn(f_in)
        return self.final_norm(x)

    def scores(self, h, cands):
        """h [B, d] . E_item[cands [B, J]] -> [B, J]."""
        return torch.einsum("bd,bjd->bj", h, self.item_embedding[cands])


class Projection(nn.Module):
    def __init__(self, inp, c):
        super().__init__()
        self.fc1 = nn.Linear(inp, c["hidden"])  # PyTorch's default init, as the engine's retriever linears
        self.fc2 = nn.Linear(c["hidden"], c["dim"])
        self.norm = nn.LayerNorm(c["dim"], eps=c["layer_norm_eps"])
        self.dropout = c["dropout"]

    def forward(self, x):
        h = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.norm(self.fc2(h))


class Fusion(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["dim"]
        self.kind = c["fusion"]
        self.dropout = c["dropout"]
        if self.kind == "concat":
            self.fc1 = nn.Linear(2 * d, 2 * d)
            self.fc2 = nn.Linear(2 * d, d)
            self.norm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        elif self.kind == "add":
            self.norm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        else:
            self.gate = nn.Linear(2 * d, d)
            self.out = nn.Linear(d, d)

    def forward(self, t, v):
        if self.kind == "concat":
            h = F.dropout(F.relu(self.fc1(torch.cat([t, v], -1))), self.dropout, self.training)
            return self.norm(self.fc2(h))
        if self.kind == "add":
            return self.norm(t + v)
        g = torch.sigmoid(self.gate(torch.cat([t, v], -1)))
        return self.out(v + g * (t - v))


class Retriever(nn.Module):
    def __init__(self, c, num_items, text_dim, visual_dim):
        super().__init__()
        self.c = c
        d = c["dim"]
        self.text_proj = Projection(text_dim, c)
        std = xavier_std(num_items, d)
        self.item_text = nn.Parameter(torch.randn(num_items + 1, d) * std)
        self.has_visual = visual_dim is not None
        if self.has_visual:
            self.visual_proj = Projection(visual_dim, c)
            self.item_visual = nn.Parameter(torch.randn(num_items + 1, d) * std)
            self.fusion = Fusion(c)
        with torch.no_grad():
            self.item_text[0].zero_()
            if self.has_visual:
                self.item_visual[0].zero_()

    def users(self, u_text, u_visual):
        """(text, visual, fused), each normalised [B, dim] (visual None without a visual branch)."""
        text = F.normalize(self.text_proj(u_text), dim=-1, eps=1e-12)
        if not self.has_visual:
            return text, None, text
        visual = F.normalize(self.visual_proj(u_visual), dim=-1, eps=1e-12)
        fused = F.normalize(self.fusion(text, visual), dim=-1, eps=1e-12)
        return text, visual, fused

    def items(self, ids):
        t = self.item_text[ids]
        if not self.has_visual:
            return F.normalize(t, dim=-1, eps=1e-12)
        return F.normalize(self.fusion(t, self.item_visual[ids]), dim=-1, eps=1e-12)

    def logit_scale(self):
        return 1.0 if self.c["raw_cosine"] else 1.0 / self.c["tau"]

    def scores(self, user, cands):
        """Logits [B, J] of candidates `cands` [B, J]."""
        cos = torch.einsum("bd,bjd->bj", user, self.items(cands))
        return cos if self.c["raw_cosine"] else cos / self.c["tau"]


class UR4Rec(nn.Module):
    """`named_parameters()` are the engine's names: sasrec.* then retriever.*."""

    def __init__(self, cfg, num_items, text_dim, visual_dim):
        super().__init__()
        self.cfg = cfg
        self.sasrec = SASRec(cfg["sasrec"], num_items)
        self.retriever = Retriever(cfg["retriever"], num_items, text_dim, visual_dim)


def param_group(name):
    """The engine's parameter group of a parameter name (src/model/*.rs)."""
    if name.startswith("sasrec."):
        return "sasrec"
    if name.startswith("retriever.visual_proj.") or name == "retriever.item_visual":
        return "visual"
    if name.startswith("retriever.fusion."):
        return "fusion"
    return "retriever"


def load_engine_checkpoint(model, path):
    """Loads an engine safetensors checkpoint (one f32 tensor per parameter name) into `model` (UR4Rec or,
    for a `pipeline = "sasrec"` checkpoint, SASRec). Every name must match; returns the metadata."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if isinstance(model, SASRec):
        state = {k[len("sasrec."):]: v for k, v in state.items()}
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    if missing or unknown:
        raise ValueError(f"{path}: missing {missing}, unknown {unknown}")
    with torch.no_grad():
        for k, p in own.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[k].to(p.dtype))
    return meta


# ---- batches and losses -------------------------------------------------------------------------------

def left_pad(seqs, L, device=None):
    """The last L items of each sequence, left-padded with 0, as a LongTensor [B, L]."""
    out = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = list(s)[-L:]
        if t:
            out[i, L - len(t):] = torch.tensor(t, dtype=torch.long)
    return out.to(device) if device is not None else out


def sasrec_objective(sasrec, padded, objective, pairs=None, pos=None, neg=None):
    """Stage 1 (src/train/objective.rs). `padded` [B, L] left-padded inputs.
    every-position: `pairs` [T, 2] = [target, negative] per real token, tokens in row-major order of `padded`;
        loss = mean BCE-with-logits over the 2T logits (labels 1, 0).
    last-bpr: `pos` [B], `neg` [B, k]; loss = mean softplus(s_neg - s_pos)."""
    H = sasrec.encode(padded)
    if objective == "every-position":
        h = H[padded != 0]  # [T, d], row-major: sequence by sequence, oldest first (the engine's packing)
        logits = torch.einsum("td,tjd->tj", h, sasrec.item_embedding[pairs])
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels)
    h = H[:, -1]
    s_pos = sasrec.scores(h, pos[:, None])
    s_neg = sasrec.scores(h, neg)
    return F.softplus(s_neg - s_pos).mean()


def infonce_bank(q, k, bank, bank_users, users, tau):
    """InfoNCE of q_i against k_i, the other rows of k, and the bank's keys (slots written for the query's
    own user masked; user 0 never masked). src/backend/cpu_infonce.rs."""
    pos = (q * k).sum(-1) / tau
    inb = q @ k.T / tau
    eye = torch.eye(q.shape[0], dtype=torch.bool, device=q.device)
    inb = inb.masked_fill(eye, float("-inf"))
    parts = [pos[:, None], inb]
    if bank is not None and bank.shape[0] > 0:
        bl = q @ bank.T / tau
        same = (bank_users[None, :] != 0) & (bank_users[None, :] == users[:, None])
        parts.append(bl.masked_fill(same, float("-inf")))
    logits = torch.cat(parts, 1)
    return (torch.logsumexp(logits, 1) - pos).mean()


def kl_batchmean(logits, teacher):
    """KL(teacher || softmax(logits)), summed over candidates, divided by rows."""
    return (teacher * (teacher.log() - F.log_softmax(logits, -1))).sum() / logits.shape[0]


TERMS = ["total", "sasrec", "retrieval", "consistency", "contrastive", "diversity", "distillation"]


def joint_losses(model, stage, batch, cfg, banks=None):
    """Stages 2-4 (src/train/explicit_batch.rs). `batch`: dict with users [B] long, padded [B, L] long
    (stages 3-4), cands [B, J] long (column 0 the positive), user_text [B, Dt], user_visual [B, Dv].
    `banks`: ((keys, users), (keys, users)) for text and visual, or None (in-batch InfoNCE).
    Returns (terms dict incl. 'total', sasrec scores or None, retriever logits, (text, visual) vectors)."""
    u = cfg["ur4rec"]
    w = u["weights"]
    cands = batch["cands"]
    n, j = cands.shape
    terms = {t: torch.zeros((), dtype=batch["user_text"].dtype) for t in TERMS}
    total = []
    s = None
    if stage >= 3:
        H = model.sasrec.encode(batch["padded"])
        s = model.sasrec.scores(H[:, -1], cands)
        bpr = F.softplus(s[:, 1:] - s[:, :1]).mean()
        terms["sasrec"] = bpr
        total.append(bpr * u["sasrec_weight"])
    text, visual, fused = model.retriever.users(batch["user_text"], batch.get("user_visual"))
    r = model.retriever.scores(fused, cands)
    if u["retrieval_loss"] == "bce":
        labels = torch.zeros_like(r)
        labels[:, 0] = 1.0
        ret = F.binary_cross_entropy_with_logits(r, labels)
    else:
        ret = F.cross_entropy(r, torch.zeros(n, dtype=torch.long, device=r.device))
    terms["retrieval"] = ret
    total.append(ret * u["retrieval_weight"])
    if visual is not None:
        cons = ((text - visual) ** 2).mean()
        (bt, but), (bv, buv) = banks if banks is not None else ((None, None), (None, None))
        tau = u["contrastive_tau"]
        ctr = 0.5 * (infonce_bank(text, visual, bv, buv, batch["users"], tau)
                     + infonce_bank(visual, text, bt, but, batch["users"], tau))
        eye = torch.eye(n, dtype=fused.dtype, device=fused.device)
        div = -torch.logdet(fused @ fused.T + u["diversity_eps"] * eye)
        terms.update(consistency=cons, contrastive=ctr, diversity=div)
        if w["consistency"] > 0:
            total.append(cons * w["consistency"])
        if w["contrastive"] > 0:
            total.append(ctr * w["contrastive"])
        if w["diversity"] > 0:
            total.append(div * w["diversity"])
    kd = u["distillation"]
    if kd["enabled"] and stage in kd["stages"] and s is not None:
        t = kd["temperature"]
        r_scale = kd["retriever_logit_scale"] if model.retriever.c["raw_cosine"] else 1.0
        st, rt = s / t, r * r_scale / t
        ps, pr = F.softmax(st, -1).detach(), F.softmax(rt, -1).detach()
        kdl = (0.5 * kl_batchmean(st, pr) + 0.5 * kl_batchmean(rt, ps)) * t * t
        terms["distillation"] = kdl
        total.append(kdl * kd["weight"])
    tot = total[0]
    for x in total[1:]:
        tot = tot + x
    terms["total"] = tot
    return terms, s, r, (text, visual)


def ring_enqueue(keys, users, ptr, new_keys, new_users):
    """The engine's MemoryBank::enqueue (src/train/strategies/memory_bank.rs): rows wrap around; a batch
    larger than the ring leaves its last `size` rows. Returns the new pointer."""
    size, b = keys.shape[0], new_keys.shape[0]
    skip = max(0, b - size)
    ptr = (ptr + skip) % size
    for row in range(skip, b):
        keys[ptr] = new_keys[row]
        users[ptr] = new_users[row]
        ptr = (ptr + 1) % size
    return ptr


def make_optimizer(model, lrs, trainable_groups, tc):
    """torch.optim.AdamW with one parameter group per trainable engine group, in the engine's group order."""
    groups = {}
    for name, p in model.named_parameters():
        g = param_group(name)
        if g in trainable_groups:
            groups.setdefault(g, []).append(p)
    order = [g for g in ["sasrec", "retriever", "visual", "fusion"] if g in groups]
    opt = torch.optim.AdamW([{"params": groups[g], "lr": lrs[g], "name": g} for g in order],
                            betas=(tc["beta1"], tc["beta2"]), eps=tc["adam_eps"], weight_decay=tc["weight_decay"],
                            foreach=False)
    return opt


def optimizer_step(opt, clip):
    """Per-group clipping to `clip` (0: off) on the group's own norm, then AdamW. Every parameter of a
    trainable group steps (a parameter the loss did not reach gets a zero gradient, as in the engine's flat
    buffer). Returns the group norms before clipping."""
    norms = {}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if clip > 0:
            norms[g["name"]] = float(torch.nn.utils.clip_grad_norm_(g["params"], clip))
        else:
            norms[g["name"]] = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in g["params"])))
    opt.step()
    opt.zero_grad(set_to_none=False)
    return norms


def dumps(obj):
    return json.dumps(obj, sort_keys=True)
