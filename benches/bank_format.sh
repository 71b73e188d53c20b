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
def test(fmt, seed):
    s = json.load(open(f"{out}/{fmt}-s{seed}/summary.json"))
    t = s["test"]["fused"]
    return t["sampled"]["hit10"], t["sampled"]["ndcg10"], s["wall_seconds"], t["full"]["ndcg10"]
seeds = [42, 43, 44]
print("| bank format | test Hit@10 | test NDCG@10 | ΔHit@10 vs f32 (± s.e.) | ΔNDCG@10 vs f32 (± s.e.) | full-ranking NDCG@10 | wall (s) |")
print("|---|---|---|---|---|---|---|")
base = {s: test("f32", s) for s in seeds}
for fmt in ["f32", "bf16", "f16"]:
    r = {s: test(fmt, s) for s in seeds}
    h = [r[s][0] for s in seeds]; n = [r[s][1] for s in seeds]
    dh = [r[s][0] - base[s][0] for s in seeds]; dn = [r[s][1] - base[s][1] for s in seeds]
    se = lambda v: st.stdev(v) / len(v) ** 0.5
    print(f"| {fmt} | {st.mean(h):.4f} | {st.mean(n):.4f} | {st.mean(dh):+.4f} ± {se(dh):.4f} | {st.mean(dn):+.4f} ± {se(dn):.4f} | {st.mean(r[s][3] for s in seeds):.4f} | {st.mean(r[s][2] for s in seeds):.0f} |")
PY
