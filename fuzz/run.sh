#!/usr/bin/env bash
# Run each fuzz target for SECONDS (all of them, or those named), then print executions and
# crashes per target. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   bash fuzz/run.sh 120              # every target, 120 s each
#   bash fuzz/run.sh 30 config proto  # two of them
# A crash leaves its input in fuzz/artifacts/TARGET/; reproduce it with
#   cargo +nightly fuzz run -O TARGET fuzz/artifacts/TARGET/crash-…
set -uo pipefail
cd "$(dirname "$0")"
SECS=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
cargo +nightly fuzz build -O 2>&1 | tail -1
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(cargo +nightly fuzz list)
[ -d corpus/config ] || bash make_seeds.sh
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; ${SECS} s per target"
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  log="artifacts/$t.log"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$SECS" -print_final_stats=1 -max_len=65536 -rss_limit_mb=4096 \
    > "$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -1)
  crashes=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
  printf '%-14s %12s executions  %d crash(es)  exit %d\n' "$t" "${execs:-?}" "$crashes" "$rc"
  if [ "$crashes" -gt 0 ] || [ "$rc" -ne 0 ]; then
    status=1
    grep -m3 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | sed 's/^/    /'
  fi
done
exit $status
