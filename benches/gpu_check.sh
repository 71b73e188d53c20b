#!/usr/bin/env bash
# One-shot GPU check (H200 device machine), also runnable on a CPU-only machine (GPU parts skip with a reason).
#
#   bash benches/gpu_check.sh              build (cargo), CUDA-vs-CPU parity tests, NVRTC compile test, the
#                                          kernels and step benches; a summary table last. Exit status non-zero
#                                          if the build failed or any parity test failed (or timed out).
#   bash benches/gpu_check.sh --stage [DIR]
#                                          here: build and copy the four executables to DIR (default
#                                          target/gpu-bin) so they can be carried to a machine without cargo;
#                                          there, `UR4REC_GPU_BIN=DIR bash benches/gpu_check.sh` runs them
#                                          (used automatically when cargo is missing and DIR holds them).
#
# Total time is capped (GPU_CHECK_BUDGET_S, default 420 s): each step's timeout is the smaller of its own cap
# and what is left. Logs go to $OUT (the device runner's output folder) or target/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-420}
BIN=${UR4REC_GPU_BIN:-target/gpu-bin}
LOG=${OUT:-target/gpu-check}
mkdir -p "$LOG"

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

# CUDA libraries (libnvrtc, libcublas) and headers: the toolkit on the GPU machine; on a CPU-only machine
# the NVRTC wheels cached by .ci/run, if present, so the NVRTC compile test still compiles every kernel.
if [ -d /usr/local/cuda/lib64 ]; then
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export UR4REC_CUDA_INCLUDE=/usr/local/cuda/include
else
  NV="${XDG_CACHE_HOME:-$HOME/.cache}/ur4rec-nvrtc-13.0.88"
  if [ -f "$NV/lib/libnvrtc.so.13" ]; then
    export LD_LIBRARY_PATH="$NV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export UR4REC_CUDA_INCLUDE="$NV/include"
  else
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export UR4REC_CUDA_INCLUDE=/usr/local/cuda/include
  fi
fi

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# cap SECONDS -> min(cap, time left), at least 1
tmo() { local l; l=$(left); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }

if [ "${1:-}" = "--stage" ]; then
  DIR=${2:-$BIN}
  mkdir -p "$DIR"
  set -e
  for t in cuda_parity cuda_training nvrtc_compile; do
    exe=$(cargo test --release --no-run --test "$t" 2>&1 | grep -o "target/release/deps/${t}-[0-9a-f]*" | tail -1)
    cp "$exe" "$DIR/$t"
  done
  for b in kernels step; do
    exe=$(cargo bench --no-run --bench "$b" 2>&1 | grep -o "target/release/deps/${b}-[0-9a-f]*" | tail -1)
    cp "$exe" "$DIR/$b"
  done
  strip "$DIR"/* 2>/dev/null || true
  ls -la "$DIR"
  exit 0
fi

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | head -3
else
  echo "nvidia-smi: not found (no GPU driver on this machine)"
fi
if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH  UR4REC_CUDA_INCLUDE=$UR4REC_CUDA_INCLUDE  cores=$(nproc)"

BUILD=ok
if command -v cargo >/dev/null 2>&1; then
  MODE=cargo
  echo "== build (cargo $(cargo --version | cut -d' ' -f2), release)"
  if ! timeout "$(tmo 240)" cargo build --release --tests --benches >"$LOG/build.log" 2>&1; then
    BUILD=FAILED; tail -30 "$LOG/build.log"
  else
    tail -1 "$LOG/build.log"
  fi
elif [ -x "$BIN/cuda_parity" ]; then
  MODE=staged
  echo "== cargo not found: running the staged executables in $BIN"
else
  echo "== cargo not found and no staged executables in $BIN (run --stage on a build machine and carry them)"
  BUILD=FAILED; MODE=none
fi

# run NAME CAP CMD... : runs with a timeout, tees to $LOG/NAME.log, records the exit status in RC_NAME
run() {
  local name=$1 cap=$2; shift 2
  local t; t=$(tmo "$cap")
  echo "== $name (timeout ${t}s)"
  timeout "$t" "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  eval "RC_$name=$rc"
  [ "$rc" = 124 ] && echo "!! $name timed out after ${t}s"
}

RC_cuda_parity=-1; RC_cuda_training=-1; RC_nvrtc_compile=-1; RC_kernels=-1; RC_step=-1
if [ "$BUILD" = ok ]; then
  if [ "$MODE" = cargo ]; then
    run cuda_parity 90 cargo test --release --test cuda_parity -- --nocapture
    run cuda_training 90 cargo test --release --test cuda_training -- --nocapture --test-threads 1
    run nvrtc_compile 60 cargo test --release --test nvrtc_compile -- --nocapture
    run kernels 100 cargo bench --bench kernels
    run step 150 cargo bench --bench step
  else
    run cuda_parity 90 "$BIN/cuda_parity" --nocapture
    run cuda_training 90 "$BIN/cuda_training" --nocapture --test-threads 1
    run nvrtc_compile 60 "$BIN/nvrtc_compile" --nocapture
    run kernels 100 "$BIN/kernels" --bench
    run step 150 "$BIN/step" --bench
  fi
fi

# ---- summary --------------------------------------------------------------------------------------------
counts() { # passed failed from libtest's "test result:" line
  local f=$LOG/$1.log
  [ -f "$f" ] || { echo "- -"; return; }
  local p fl
  p=$(grep -o '[0-9]* passed' "$f" | awk '{s+=$1} END {print s+0}')
  fl=$(grep -o '[0-9]* failed' "$f" | awk '{s+=$1} END {print s+0}')
  echo "$p $fl"
}
echo
echo "================ gpu_check summary ($(( $(date +%s) - T0 )) s) ================"
echo "build: $BUILD ($MODE)"
read -r pp pf < <(counts cuda_parity)
skips=$(grep -c 'skipped: no GPU' "$LOG/cuda_parity.log" 2>/dev/null || true)
printf '%-14s rc=%-4s passed=%-4s failed=%-4s %s\n' cuda_parity "$RC_cuda_parity" "$pp" "$pf" \
  "$([ "${skips:-0}" -gt 0 ] && echo "(${skips} tests skipped: no GPU)")"
grep -E '^test .* FAILED|relative error' "$LOG/cuda_parity.log" 2>/dev/null | head -20
read -r tp tf < <(counts cuda_training)
printf '%-14s rc=%-4s passed=%-4s failed=%-4s\n' cuda_training "$RC_cuda_training" "$tp" "$tf"
grep -E '^test .* FAILED|relative error|Hit@10 cpu|device memory|device-to-host reads' "$LOG/cuda_training.log" 2>/dev/null | head -24
read -r np nf < <(counts nvrtc_compile)
printf '%-14s rc=%-4s passed=%-4s failed=%-4s %s\n' nvrtc_compile "$RC_nvrtc_compile" "$np" "$nf" \
  "$(grep -m1 -o 'skipped: libnvrtc not found' "$LOG/nvrtc_compile.log" 2>/dev/null)"
echo "kernels bench  rc=$RC_kernels   (median ms, GB/s, TFLOP/s, binding ceiling %)"
grep -E '^(GPU|CPU ceilings)' "$LOG/kernels.log" 2>/dev/null | cut -c1-160
grep -E '^(gpu|gpu-det) ' "$LOG/kernels.log" 2>/dev/null
grep -E '^cpu +(attention|infonce|gemm)' "$LOG/kernels.log" 2>/dev/null
echo "step bench     rc=$RC_step   (sequences/s)"
grep -E '^(GPU|model|sasrec|ur4rec) ' "$LOG/step.log" 2>/dev/null

STATUS=0
[ "$BUILD" = ok ] || STATUS=1
if [ "$RC_cuda_parity" != 0 ] || [ "${pf:-0}" != 0 ]; then STATUS=1; fi
if [ "$RC_cuda_training" != 0 ] || [ "${tf:-0}" != 0 ]; then STATUS=1; fi
echo "gpu_check: $([ $STATUS = 0 ] && echo PASS || echo FAIL)"
exit $STATUS
