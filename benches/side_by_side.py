"""Side-by-side: one UR4Rec stage-4 training step in PyTorch eager, torch.compile and the engine, on the same
configuration, weights, batch and memory banks, in one run; prints ms/step and the ratios.

    /work/venv-torch/bin/python benches/side_by_side.py [--threads N] [--steps 10] [--device cpu|cuda] [--dropout 0.1]

The step (all three): forward of every stage-4 term (SASRec BPR over 5 negatives, retrieval softmax CE,
consistency, memory-bank InfoNCE, LogDet diversity, distillation), backward, per-group gradient clipping,
AdamW over every parameter, memory-bank enqueue. PyTorch runs `reference/ur4rec_ref.py` (the engine's model
written in PyTorch; left-padded [B, L] tensors and SDPA attention with a causal + key-padding mask; AdamW
with PyTorch's defaults, which on the CPU means no foreach); torch.compile compiles the forward and losses (the backward
through AOTAutograd), the optimizer stays eager. The engine runs `benches/side_by_side.rs` through
`cargo bench` on a file this script writes (format of tests/golden, see reference/README.md). Both use the
same number of CPU threads (torch.set_num_threads / a rayon pool of that size).

Configuration (the engine's overrides are printed): SASRec d = 64, 2 blocks, 2 heads, FFN 64, L = 50;
retriever hidden 256, dim 64, text 384 / visual 512 features, concat fusion; 3,000 items, batch 256 users
(sequence lengths 3..80, so inputs are truncated at 50), 5 negatives, a 1,024-slot memory bank, dropout
0.1 (the masks differ between the two, the work does not). With `--dropout 0` the step-0 losses of PyTorch
and the engine are also compared (they must agree to 1e-4).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "reference"))
import ur4rec_ref as R  # noqa: E402

ITEMS, USERS, BATCH, TEXT, VISUAL, BANK, NEG = 3000, 1000, 256, 384, 512, 1024, 5
LRS = {"sasrec": 1e-3, "retriever": 1e-4, "visual": 1e-4, "fusion": 1e-4}


def overrides(dropout):
    return [
        "sasrec.hidden=64", "sasrec.blocks=2", "sasrec.heads=2", "sasrec.ffn=64", f"sasrec.dropout={dropout}",
        "sasrec.max_len=50", "sasrec.norm=\"post\"", "sasrec.scale_embedding=false",
        "ur4rec.retriever.hidden=256", "ur4rec.retriever.dim=64", f"ur4rec.retriever.dropout={dropout}",
        "ur4rec.retriever.fusion=\"concat\"", "ur4rec.negatives=5", "ur4rec.retrieval_loss=\"softmax\"",
        "ur4rec.contrastive=\"memory-bank\"", f"ur4rec.bank_size={BANK}", "ur4rec.weights=\"fixed\"",
        "ur4rec.distillation.enabled=true", "train.weight_decay=1e-5", "train.clip_norm=1.0",
    ]


def config(dropout):
    c = R.default_config()
    for o in overrides(dropout):
        key, raw = o.split("=", 1)
        if key == "ur4rec.weights":
            continue
        parts = key.split(".")
        if parts[:2] == ["ur4rec", "retriever"]:
            parts = parts[1:]
        d = c
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = json.loads(raw)
    return c


def make_inputs(cfg, seed=7):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = R.UR4Rec(cfg, ITEMS, TEXT, VISUAL)
    users = rng.choice(np.arange(1, USERS + 1), size=BATCH, replace=False)
    seqs = [list(rng.integers(1, ITEMS + 1, size=int(rng.integers(3, 81)))) for _ in range(BATCH)]
    inputs = [s[:-1] for s in seqs]
    cands = np.array([[s[-1]] + list(rng.integers(1, ITEMS + 1, size=NEG)) for s in seqs], dtype=np.int64)
    bank = [rng.standard_normal((BANK, 64)).astype(np.float32) for _ in range(2)]
    bank = [b / np.linalg.norm(b, axis=1, keepdims=True) for b in bank]
    bank_users = rng.choice(np.arange(0, USERS + 1), size=BANK).astype(np.int64)
    data = {
        "users": users.astype(np.int64), "inputs": inputs, "cands": cands,
        "user_text": rng.standard_normal((BATCH, TEXT)).astype(np.float32),
        "user_visual": rng.standard_normal((BATCH, VISUAL)).astype(np.float32),
        "bank_text": bank[0], "bank_visual": bank[1], "bank_users": bank_users,
    }
    return model, data


def write_file(path, model, data, dropout):
    t = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    t["batch.users"] = torch.from_numpy(data["users"])
    t["batch.seq_lens"] = torch.tensor([len(s) for s in data["inputs"]], dtype=torch.int64)
    t["batch.seq_items"] = torch.tensor([int(x) for s in data["inputs"] for x in s], dtype=torch.int64)
    t["batch.cands"] = torch.from_numpy(data["cands"])
    t["batch.user_text"] = torch.from_numpy(data["user_text"])
    t["batch.user_visual"] = torch.from_numpy(data["user_visual"])
    t["bank.text.keys"] = torch.from_numpy(data["bank_text"])
    t["bank.visual.keys"] = torch.from_numpy(data["bank_visual"])
    t["bank.users"] = torch.from_numpy(data["bank_users"])
    meta = {"format": "ur4rec-golden/1", "generator": "benches/side_by_side.py", "num_items": ITEMS, "text_dim": TEXT,
            "visual_dim": VISUAL, "engine_overrides": overrides(dropout), "lrs": LRS}
    save_file(t, path, metadata={"golden": json.dumps(meta)})


def enqueue(keys, users, ptr, new_keys, new_users):
    """Vectorised ring write (same result as R.ring_enqueue for a batch no larger than the ring)."""
    idx = (ptr + torch.arange(new_keys.shape[0], device=keys.device)) % keys.shape[0]
    keys[idx] = new_keys
    users[idx] = new_users
    return (ptr + new_keys.shape[0]) % keys.shape[0]


def time_torch(model, data, cfg, device, steps, warmup, compiled):
    model = model.to(device)
    model.train()
    L = cfg["sasrec"]["max_len"]
    batch = {
        "users": torch.from_numpy(data["users"]).to(device),
        "padded": R.left_pad(data["inputs"], L).to(device),
        "cands": torch.from_numpy(data["cands"]).to(device),
        "user_text": torch.from_numpy(data["user_text"]).to(device),
        "user_visual": torch.from_numpy(data["user_visual"]).to(device),
    }
    bank_users = torch.from_numpy(data["bank_users"]).to(device)
    banks = [[torch.from_numpy(data["bank_text"]).to(device).clone(), bank_users.clone()],
             [torch.from_numpy(data["bank_visual"]).to(device).clone(), bank_users.clone()]]
    ptr = [0, 0]
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if R.param_group(n) == g], "lr": LRS[g],
                              "name": g} for g in ["sasrec", "retriever", "visual", "fusion"]],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["train"]["weight_decay"])

    def losses(b, bt, but, bv, buv):
        terms, _, _, keys = R.joint_losses(model, 4, b, cfg, banks=((bt, but), (bv, buv)))
        return terms, keys

    fn = torch.compile(losses) if compiled else losses
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    first = None
    t0 = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        terms, keys = fn(batch, banks[0][0], banks[0][1], banks[1][0], banks[1][1])
        terms["total"].backward()
        if step == 0:
            first = [float(terms[k].detach()) for k in R.TERMS]
        for g in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], cfg["train"]["clip_norm"])
        opt.step()
        with torch.no_grad():
            for b, key in enumerate(keys):
                ptr[b] = enqueue(banks[b][0], banks[b][1], ptr[b], key.detach(), batch["users"])
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = config(a.dropout)
    model, data = make_inputs(cfg)
    print(f"side-by-side: UR4Rec stage-4 step, batch {BATCH}, {ITEMS} items, d=64 L=50, bank {BANK}, dropout {a.dropout}, "
          f"device {a.device}, {a.threads} threads, {a.warmup} warm-up + {a.steps} timed steps; torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "side_by_side.safetensors")
        write_file(path, model, data, a.dropout)
        import copy
        results["torch eager"] = time_torch(copy.deepcopy(model), data, cfg, a.device, a.steps, a.warmup, False)
        print(f"  torch eager     {results['torch eager'][0]:9.1f} ms/step", flush=True)
        if not a.no_compile:
            try:
                t0 = time.perf_counter()
                results["torch.compile"] = time_torch(copy.deepcopy(model), data, cfg, a.device, a.steps, a.warmup, True)
                print(f"  torch.compile   {results['torch.compile'][0]:9.1f} ms/step  (warm-up incl. compile "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  torch.compile   failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        dev = "cpu" if a.device == "cpu" else "cuda"
        cmd = ["cargo", "bench", "--quiet", "--bench", "side_by_side", "--", "--file", path, "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--threads", str(a.threads), "--device", dev]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"engine failed:\n{out.stderr[-3000:]}")
        eng = json.loads(out.stdout.strip().splitlines()[-1])
        results["engine"] = (eng["engine_ms_per_step"], eng["step0_losses"])
        print(f"  engine          {eng['engine_ms_per_step']:9.1f} ms/step  ({eng['device']})")
    e = results["engine"][0]
    for k in ["torch eager", "torch.compile"]:
        if k in results:
            print(f"  {k} / engine = {results[k][0] / e:.2f}x  (engine {results[k][0] / e:.2f}x {'faster' if results[k][0] > e else 'slower'})")
    print("  step-0 losses (total, sasrec, retrieval, consistency, contrastive, diversity, distillation):")
    for k, (_, first) in results.items():
        print(f"    {k:<14} {np.round(first, 5).tolist()}")
    if a.dropout == 0:
        ref, got = np.array(results["torch eager"][1]), np.array(results["engine"][1])
        err = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-6)))
        print(f"  engine vs torch eager, step-0 losses: max relative difference {err:.1e}")
        assert err < 1e-4, "the engine and PyTorch do not compute the same step"
    print(json.dumps({k: v[0] for k, v in results.items()}))


if __name__ == "__main__":
    main()
