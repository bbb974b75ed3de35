#!/usr/bin/env bash
# Training tokens/s: StackWise vs PyTorch eager on the same GPT-2-style shape (6 layers, d=384,
# 6 heads, vocab 8192, batch 8 x 256, fp32, AdamW, 2 threads), run alternately in one
# invocation (a busy neighbour core skews absolute times; the ratio of interleaved runs holds).
#   bash bench/train_throughput.sh [ROUNDS] [ARGS...]   (creates bench/.venv with torch if missing)
# ARGS go to both peers, e.g. --lora-r 16 (bench/lora.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
shift || true
threads="${THREADS:-2}"
source bench/venv.sh
cargo build --release --quiet -p stackwise --bin stackwise
cargo build --release --quiet -p stackwise-bench --bin fma_peak
peak=$(target/release/fma_peak --threads "$threads")
out=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  RAYON_NUM_THREADS=$threads target/release/stackwise bench train --steps 3 "$@" >> "$out"
  OMP_NUM_THREADS=$threads "$venv/bin/python" bench/train_throughput_torch.py --steps 3 --threads "$threads" "$@" 2>/dev/null >> "$out"
done
flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|fma|avx512f' | sort -u | xargs)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($flags) | $threads threads | ${*:-full training}"
"$venv/bin/python" - "$out" "$peak" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = json.loads(sys.argv[2])
med = {k: statistics.median(r["tokens_per_s"] for r in rows if r["impl"] == k) for k in ("stackwise", "pytorch")}
for k in ("stackwise", "pytorch"):
    s = [round(r["s_per_step"], 3) for r in rows if r["impl"] == k]
    print(f"{k:9}: {med[k]:8.0f} tokens/s  (s/step per round: {s})")
simd = next(r.get("simd", "?") for r in rows if r["impl"] == "stackwise")
print(f"StackWise's fused kernels ran at the {simd} vector level")
print(f"ratio stackwise/pytorch: {med['stackwise'] / med['pytorch']:.2f}x")
cpu = {k: statistics.median(r["cpu_s_per_step"] for r in rows if r["impl"] == k) for k in ("stackwise", "pytorch")}
print(f"CPU time per step (all threads, user + system): stackwise {cpu['stackwise']:.2f} s, pytorch {cpu['pytorch']:.2f} s; "
      f"ratio pytorch/stackwise: {cpu['pytorch'] / cpu['stackwise']:.2f}x")
sw = [r for r in rows if r["impl"] == "stackwise" and r.get("gflops")]
if sw:
    g = statistics.median(r["gflops"] for r in sw)
    print(f"FMA peak ({peak['isa']}, {peak['threads']} threads, measured by fma_peak): {peak['gflops']:.0f} GFLOP/s; "
          f"StackWise's step: {g:.0f} GFLOP/s of matrix products = {100 * g / peak['gflops']:.0f}% of peak")
PY
rm -f "$out"
