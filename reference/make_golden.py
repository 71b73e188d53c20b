"""Writes tests/golden/ur4rec_tiny.safetensors: a tiny UR4Rec's weights, one explicit batch, and what
PyTorch computes from them — every loss term, the scores, every trainable parameter's gradient, and the
losses over a few AdamW steps — for tests/golden_parity.rs (which needs no Python).

    /work/venv-torch/bin/python reference/make_golden.py            # from the repository root

Determinism: torch.manual_seed(SEED) draws the weights (float32, the engine's init rules); the batch comes
from a seeded numpy generator. The reference then runs in float64 from those float32 values, so the
golden numbers are the exact answer for the stored inputs up to float64 rounding, and the engine's float32
error is measured against them. The same scenarios are also run in float32 PyTorch and its own distance to
float64 is printed and stored in the metadata (`torch_f32_rel_err`), as the yardstick for the tolerances.

Dropout is off (sasrec.dropout = retriever.dropout = 0): the engine's masks come from its own counter
hash and are not reproducible here.

Scenarios (each from the same initial weights, a fresh AdamW, the initial memory bank):
  stage1      stage 1, every-position BCE (post-norm SASRec)                    trains: sasrec
  stage1_pre  stage 1, last-position BPR, pre-norm SASRec, √d-scaled embeddings  trains: sasrec
  stage4      stage 4, every term: SASRec BPR, retrieval softmax CE, consistency, memory-bank InfoNCE,
              LogDet diversity, distillation                                      trains: everything
  stage2_bce  stage 2, retrieval BCE, in-batch InfoNCE, consistency, diversity    trains: retriever, visual, fusion
"""
import copy
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ur4rec_ref as R  # noqa: E402

SEED = 20261130
STEPS = 4
NUM_ITEMS, TEXT_DIM, VISUAL_DIM, BANK = 30, 24, 20, 12
SEQ_LENGTHS = [2, 3, 5, 8, 12, 13, 16, 20]  # full training sequences; inputs longer than L = 12 get truncated
USERS = [3, 7, 1, 8, 2, 5, 4, 6]            # dense ids, not in order
BANK_USERS = [0, 3, 0, 7, 0, 0, 1, 0, 5, 0, 0, 2]  # some slots hold keys of batch users (masked)
LRS = {"sasrec": 1e-2, "retriever": 5e-3, "visual": 5e-3, "fusion": 5e-3}

# Engine configuration overrides (`section.key=value`) that give the same model and losses.
ENGINE_OVERRIDES = [
    "sasrec.hidden=32", "sasrec.blocks=2", "sasrec.heads=2", "sasrec.ffn=48", "sasrec.dropout=0.0", "sasrec.max_len=12",
    "sasrec.norm=\"post\"", "sasrec.scale_embedding=false", "sasrec.layer_norm_eps=1e-5",
    "ur4rec.retriever.hidden=40", "ur4rec.retriever.dim=16", "ur4rec.retriever.dropout=0.0", "ur4rec.retriever.tau=0.07",
    "ur4rec.retriever.raw_cosine=false", "ur4rec.retriever.fusion=\"concat\"", "ur4rec.retriever.layer_norm_eps=1e-5",
    "ur4rec.negatives=5", "ur4rec.retrieval_loss=\"softmax\"", "ur4rec.contrastive=\"memory-bank\"", "ur4rec.bank_size=12",
    "ur4rec.contrastive_tau=0.07", "ur4rec.diversity_eps=0.1", "ur4rec.weights=\"fixed\"",
    "ur4rec.sasrec_weight=1.0", "ur4rec.retrieval_weight=1.0",
    "ur4rec.distillation.enabled=true", "ur4rec.distillation.temperature=4.0", "ur4rec.distillation.weight=0.1",
    "ur4rec.distillation.stages=[3, 4]",
    "train.objective=\"every-position\"", "train.weight_decay=0.01", "train.beta1=0.9", "train.beta2=0.999",
    "train.adam_eps=1e-8", "train.clip_norm=1.0",
]

SCENARIOS = [
    {"name": "stage1", "stage": 1, "overrides": [], "trainable": ["sasrec"]},
    {"name": "stage1_pre", "stage": 1, "trainable": ["sasrec"],
     "overrides": ["sasrec.norm=\"pre\"", "sasrec.scale_embedding=true", "train.objective=\"last-bpr\""]},
    {"name": "stage4", "stage": 4, "overrides": [], "trainable": ["sasrec", "retriever", "visual", "fusion"]},
    {"name": "stage2_bce", "stage": 2, "trainable": ["retriever", "visual", "fusion"],
     "overrides": ["ur4rec.retrieval_loss=\"bce\"", "ur4rec.contrastive=\"in-batch\""]},
]


def config(overrides):
    """The reference's configuration dict for a list of engine overrides (only the keys used here)."""
    c = R.default_config()
    for o in ENGINE_OVERRIDES + overrides:
        key, raw = o.split("=", 1)
        value = json.loads(raw)
        parts = key.split(".")
        if key == "ur4rec.weights":
            continue  # "fixed": the reference's weights dict holds the fixed weights
        if parts[0] == "ur4rec" and parts[1] == "retriever":
            parts = parts[1:]
        d = c
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return c


def make_batch(rng, L):
    seqs = []
    for n in SEQ_LENGTHS:
        seqs.append([int(x) for x in rng.choice(np.arange(1, NUM_ITEMS + 1), size=n, replace=False)])
    inputs = [s[:-1] for s in seqs]
    k = 5
    cands = []
    pairs = []
    for s, inp in zip(seqs, inputs):
        outside = np.setdiff1d(np.arange(1, NUM_ITEMS + 1), s)
        cands.append([s[-1]] + [int(x) for x in rng.choice(outside, size=k, replace=False)])
        targets = s[1:]
        used = min(len(inp), L)
        for t in targets[len(targets) - used:]:
            pairs.append([t, int(rng.choice(outside))])
    user_text = rng.standard_normal((len(seqs), TEXT_DIM)).astype(np.float32)
    user_visual = rng.standard_normal((len(seqs), VISUAL_DIM)).astype(np.float32)
    bank_keys = []
    for _ in range(2):
        x = rng.standard_normal((BANK, 16)).astype(np.float32)
        bank_keys.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return {
        "inputs": inputs,
        "cands": np.array(cands, dtype=np.int64),
        "pairs": np.array(pairs, dtype=np.int64),
        "user_text": user_text,
        "user_visual": user_visual,
        "bank_text": bank_keys[0],
        "bank_visual": bank_keys[1],
    }


def run_scenario(sc, init_state, data, dtype):
    """Returns (losses [STEPS+1, 7], grads at step 0 {name: tensor}, scores dict, group norms [STEPS, G])."""
    cfg = config(sc["overrides"])
    model = R.UR4Rec(cfg, NUM_ITEMS, TEXT_DIM, VISUAL_DIM)
    model.load_state_dict(init_state)
    model = model.to(dtype)
    model.train()  # dropout is 0; train mode as in the engine's training step
    L = cfg["sasrec"]["max_len"]
    batch = {
        "users": torch.tensor(USERS, dtype=torch.long),
        "padded": R.left_pad(data["inputs"], L),
        "cands": torch.from_numpy(data["cands"]),
        "user_text": torch.from_numpy(data["user_text"]).to(dtype),
        "user_visual": torch.from_numpy(data["user_visual"]).to(dtype),
    }
    bank_on = cfg["ur4rec"]["contrastive"] == "memory-bank"
    banks = ([torch.from_numpy(data["bank_text"]).to(dtype).clone(), torch.tensor(BANK_USERS, dtype=torch.long)],
             [torch.from_numpy(data["bank_visual"]).to(dtype).clone(), torch.tensor(BANK_USERS, dtype=torch.long)])
    ptr = [0, 0]
    opt = R.make_optimizer(model, LRS, sc["trainable"], cfg["train"])
    trainable = {n for n, _ in model.named_parameters() if R.param_group(n) in sc["trainable"]}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    losses, norms, grads, scores = [], [], {}, {}
    for step in range(STEPS + 1):
        opt.zero_grad(set_to_none=True)
        if sc["stage"] == 1:
            obj = cfg["train"]["objective"]
            cands = batch["cands"]
            loss = R.sasrec_objective(model.sasrec, batch["padded"], obj, pairs=torch.from_numpy(data["pairs"]),
                                      pos=cands[:, 0], neg=cands[:, 1:])
            row = [loss, loss] + [torch.zeros(())] * 5
            total, keys = loss, None
        else:
            terms, s, r, keys = R.joint_losses(model, sc["stage"], batch, cfg,
                                               banks=(tuple(banks[0]), tuple(banks[1])) if bank_on else None)
            row = [terms[t] for t in R.TERMS]
            total = terms["total"]
            if step == 0:
                if s is not None:
                    scores["sasrec_scores"] = s.detach()
                    scores["fused_scores"] = (0.5 * torch.softmax(s, -1) + 0.5 * torch.softmax(r, -1)).detach()
                scores["retriever_scores"] = r.detach()
        losses.append([float(x.detach()) for x in row])
        if step == STEPS:
            break
        total.backward()
        if step == 0:
            grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                     for n, p in model.named_parameters() if n in trainable}
        gn = R.optimizer_step(opt, cfg["train"]["clip_norm"])
        norms.append([gn[g] for g in ["sasrec", "retriever", "visual", "fusion"] if g in gn])
        if bank_on and keys is not None:
            for b, key in zip(range(2), keys):
                ptr[b] = R.ring_enqueue(banks[b][0], banks[b][1], ptr[b], key.detach(), batch["users"])
    return np.array(losses), grads, scores, np.array(norms)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "tests", "golden", "ur4rec_tiny.safetensors")
    torch.manual_seed(SEED)
    cfg = config([])
    model = R.UR4Rec(cfg, NUM_ITEMS, TEXT_DIM, VISUAL_DIM)  # float32 weights, the engine's init rules
    init_state = copy.deepcopy(model.state_dict())
    data = make_batch(np.random.default_rng(SEED), cfg["sasrec"]["max_len"])

    tensors = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    lens = [len(s) for s in data["inputs"]]
    tensors["batch.users"] = torch.tensor(USERS, dtype=torch.int64)
    tensors["batch.seq_lens"] = torch.tensor(lens, dtype=torch.int64)
    tensors["batch.seq_items"] = torch.tensor([x for s in data["inputs"] for x in s], dtype=torch.int64)
    tensors["batch.cands"] = torch.from_numpy(data["cands"])
    tensors["batch.stage1_pairs"] = torch.from_numpy(data["pairs"])
    tensors["batch.user_text"] = torch.from_numpy(data["user_text"])
    tensors["batch.user_visual"] = torch.from_numpy(data["user_visual"])
    tensors["bank.text.keys"] = torch.from_numpy(data["bank_text"])
    tensors["bank.visual.keys"] = torch.from_numpy(data["bank_visual"])
    tensors["bank.users"] = torch.tensor(BANK_USERS, dtype=torch.int64)

    f32_err = {}
    for sc in SCENARIOS:
        losses, grads, scores, norms = run_scenario(sc, init_state, data, torch.float64)
        name = sc["name"]
        tensors[f"{name}.losses"] = torch.tensor(losses, dtype=torch.float32)
        tensors[f"{name}.grad_norms"] = torch.tensor(norms, dtype=torch.float32)
        for k, v in scores.items():
            tensors[f"{name}.{k}"] = v.to(torch.float32).contiguous()
        for n, g in grads.items():
            tensors[f"{name}.grad.{n}"] = g.to(torch.float32).contiguous()
        # PyTorch's own float32 against float64: the yardstick for the engine's tolerances.
        l32, g32, s32, _ = run_scenario(sc, init_state, data, torch.float32)
        nz = losses[0] != 0
        f32_err[name] = {
            "loss_step0": float(np.max(np.abs(l32[0][nz] - losses[0][nz]) / np.abs(losses[0][nz]))),
            "loss_all_steps": float(np.max(np.abs(l32[:, nz] - losses[:, nz]) / np.abs(losses[:, nz]))),
            "grad_max": max(rel(g32[n].numpy(), grads[n].numpy()) for n in grads),
            "scores_max": max([rel(s32[k].numpy(), scores[k].numpy()) for k in scores] or [0.0]),
        }
        print(f"{name}: losses step 0 {dict(zip(R.TERMS, np.round(losses[0], 6)))}")
        print(f"    total over steps {np.round(losses[:, 0], 6)}, group norms step 0 {np.round(norms[0], 4)}")
        print(f"    torch float32 vs float64: {f32_err[name]}")

    meta = {
        "format": "ur4rec-golden/1",
        "generator": "reference/make_golden.py",
        "torch": torch.__version__,
        "seed": str(SEED),
        "dtype": "float64 reference from float32 inputs",
        "num_items": NUM_ITEMS, "text_dim": TEXT_DIM, "visual_dim": VISUAL_DIM, "steps": STEPS,
        "engine_overrides": ENGINE_OVERRIDES,
        "scenarios": SCENARIOS,
        "lrs": LRS,
        "loss_terms": R.TERMS,
        "aux_weights": cfg["ur4rec"]["weights"],
        "torch_f32_rel_err": f32_err,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata={"golden": json.dumps(meta, sort_keys=True)})
    print(f"wrote {out} ({os.path.getsize(out)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
