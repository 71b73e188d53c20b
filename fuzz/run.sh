#!/usr/bin/env bash
# Runs fuzz targets one after another (never in parallel: a 2-core machine shared with builds) and prints,
# per target, libFuzzer's final statistics. Usage: fuzz/run.sh SECONDS TARGET... (from anywhere).
# Logs go to fuzz/logs/TARGET.log, new corpus entries to fuzz/corpus/TARGET, crashes to fuzz/artifacts/TARGET
# (all three ignored by git); fuzz/seeds/TARGET is read as a second corpus directory.
set -uo pipefail
cd "$(dirname "$0")/.."
secs="$1"; shift
mkdir -p fuzz/logs
for t in "$@"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t: $(date -u +%FT%TZ), ${secs}s"
  # -s none: the readers and their dependencies are safe Rust, so AddressSanitizer would find nothing a
  # bounds check does not already turn into a panic, at half the speed. -a: overflow checks and debug
  # assertions on, so an arithmetic overflow is a crash rather than a silent wrap.
  # -max_len=4096: headers, lines and TOML tables fit many times over; the sizes worth testing are
  # declared sizes, which cost no input bytes. -timeout=10: a reader that takes seconds on 4 KB is a bug.
  cargo +nightly fuzz run -s none -a -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096 -timeout=10 -print_final_stats=1 \
    > "fuzz/logs/$t.log" 2>&1
  echo "exit status $?"
  grep -E "^#[0-9]+[[:space:]]+(DONE|pulse|NEW)" "fuzz/logs/$t.log" | tail -1
  grep -E "^stat::|^==[0-9]+== ERROR|^SUMMARY|panicked at|Test unit written" "fuzz/logs/$t.log"
done
