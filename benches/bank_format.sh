#!/usr/bin/env bash
# Effect of the memory-bank storage format (ur4rec.bank_format = f32 | bf16 | f16) on the test metrics:
# the "+ memory bank" variant of the ML-100K UR4Rec ablation (benches/configs/ml100k-ur4rec-ablation.toml),
# seeds 42-44, on the CPU backend (which rounds the stored keys exactly as the GPU kernels do). Prints one
# table row per format: mean test Hit@10 / NDCG@10 (fused, sampled protocol, as the ablation table) and the
# paired difference against f32 per seed, plus the full-ranking NDCG@10.
# Usage: bash benches/bank_format.sh [OUT_DIR]   (about 2 minutes per run on 2 cores; 9 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bank-format}
cargo build --release --quiet
mkdir -p "$out"
for seed in 42 43 44; do
  for format in f32 bf16 f16; do
    dir="$out/$format-s$seed"
    [ -f "$dir/summary.json" ] && continue
    rm -rf "$dir"
    ./target/release/ur4rec-engine train --quiet --device cpu --config benches/configs/ml100k-ur4rec-ablation.toml \
      --seed "$seed" --out "$dir" ur4rec.contrastive='"memory-bank"' ur4rec.bank_format="\"$format\"" > "$dir.log" 2>&1
  done
done
python3 - "$out" <<'PY'
import json, sys, statistics as st
out = sys.argv[1]
seeds = [42, 43, 44]
def test(fmt, seed):
    s = json.load(open(f"{out}/{fmt}-s{seed}/summary.json"))
    t = s["test"]
    return {"fused": t["fused"]["sampled"]["ndcg10"], "fused_hit": t["fused"]["sampled"]["hit10"],
            "retriever": t["retriever"]["sampled"]["ndcg10"], "retriever_hit": t["retriever"]["sampled"]["hit10"],
            "full": t["fused"]["full"]["ndcg10"], "alpha": t["alpha"], "wall": s["wall_seconds"]}
runs = {f: {s: test(f, s) for s in seeds} for f in ["f32", "bf16", "f16"]}
se = lambda v: st.stdev(v) / len(v) ** 0.5
def cell(f, key):
    v = [runs[f][s][key] for s in seeds]
    d = [runs[f][s][key] - runs["f32"][s][key] for s in seeds]
    return f"{st.mean(v):.4f} ({st.mean(d):+.4f} ± {se(d):.4f})"
print("Test split, sampled protocol, mean over seeds 42-44 (paired difference against f32 ± standard error).")
print("| bank format | fused Hit@10 | fused NDCG@10 | retriever Hit@10 | retriever NDCG@10 | fused full-ranking NDCG@10 | α per seed | wall (s) |")
print("|---|---|---|---|---|---|---|---|")
for f in ["f32", "bf16", "f16"]:
    alphas = "/".join(f"{runs[f][s]['alpha']:.1f}" for s in seeds)
    wall = st.mean(runs[f][s]["wall"] for s in seeds)
    print(f"| {f} | {cell(f, 'fused_hit')} | {cell(f, 'fused')} | {cell(f, 'retriever_hit')} | {cell(f, 'retriever')} | "
          f"{cell(f, 'full')} | {alphas} | {wall:.0f} |")
PY
