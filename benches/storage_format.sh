#!/usr/bin/env bash
# Effect of 16-bit storage on the test metrics: the memory bank (ur4rec.bank_format = bf16 | f16) and the
# item embedding tables (train.table_format = bf16 | f16), each against f32, on the "+ memory bank" variant
# of the ML-100K UR4Rec ablation (benches/configs/ml100k-ur4rec-ablation.toml), seeds 42-44, on the CPU
# backend (which rounds exactly as the GPU kernels do; tests/cuda_parity.rs). Prints one
# table row per format: mean test Hit@10 / NDCG@10 (fused, sampled protocol, as the ablation table) and the
# paired difference against f32 per seed, plus the full-ranking NDCG@10.
# Usage: bash benches/storage_format.sh [OUT_DIR]   (about 1.5 minutes per run on 2 cores; 15 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bank-format}
cargo build --release --quiet
mkdir -p "$out"
run() {  # run NAME SEED [OVERRIDE...]
  local dir="$out/$1-s$2"
  [ -f "$dir/summary.json" ] && return
  rm -rf "$dir"
  ./target/release/ur4rec-engine train --quiet --device cpu --config benches/configs/ml100k-ur4rec-ablation.toml \
    --seed "$2" --out "$dir" ur4rec.contrastive='"memory-bank"' "${@:3}" > "$dir.log" 2>&1
}
for seed in 42 43 44; do
  run f32 "$seed"
  for format in bf16 f16; do
    run "bank-$format" "$seed" ur4rec.bank_format="\"$format\""
    run "tables-$format" "$seed" train.table_format="\"$format\""
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
names = ["f32", "bank-bf16", "bank-f16", "tables-bf16", "tables-f16"]
runs = {f: {s: test(f, s) for s in seeds} for f in names}
se = lambda v: st.stdev(v) / len(v) ** 0.5
def cell(f, key):
    v = [runs[f][s][key] for s in seeds]
    d = [runs[f][s][key] - runs["f32"][s][key] for s in seeds]
    return f"{st.mean(v):.4f} ({st.mean(d):+.4f} ± {se(d):.4f})"
print("Test split, sampled protocol, mean over seeds 42-44 (paired difference against f32 ± standard error).")
print("| storage | fused Hit@10 | fused NDCG@10 | retriever Hit@10 | retriever NDCG@10 | fused full-ranking NDCG@10 | α per seed | wall (s) |")
print("|---|---|---|---|---|---|---|---|")
for f in names:
    alphas = "/".join(f"{runs[f][s]['alpha']:.1f}" for s in seeds)
    wall = st.mean(runs[f][s]["wall"] for s in seeds)
    print(f"| {f} | {cell(f, 'fused_hit')} | {cell(f, 'fused')} | {cell(f, 'retriever_hit')} | {cell(f, 'retriever')} | "
          f"{cell(f, 'full')} | {alphas} | {wall:.0f} |")
PY
