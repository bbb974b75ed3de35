#!/usr/bin/env bash
# Training tokens/s: StackWise vs PyTorch eager on the same GPT-2-style shape (6 layers, d=384,
# 6 heads, vocab 8192, batch 8 x 256, fp32, AdamW, 2 threads), run alternately in one
# invocation (a busy neighbour core skews absolute times; the ratio of interleaved runs holds).
#   bash bench/train_throughput.sh [ROUNDS] [ARGS...]   (creates bench/.venv with torch if missing)
# ARGS go to every peer, e.g. --lora-r 16 (bench/lora.sh). PyTorch runs twice a round: with
# transformers' eager attention and with its SDPA attention (torch's fused CPU kernel).
# ISA=avx2 measures an AVX2-only CPU on an AVX-512 one: StackWise built without its `avx512`
# feature (target/avx2), PyTorch with ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 and
# ONEDNN_MAX_CPU_ISA=AVX2, and the FMA peak of AVX2 chains.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
shift || true
threads="${THREADS:-2}"
isa="${ISA:-native}"
source bench/venv.sh
case "$isa" in
  native)
    cargo build --release --quiet -p stackwise --bin stackwise
    sw=target/release/stackwise
    peak_args=()
    torch_env=()
    ;;
  avx2)
    cargo build --release --quiet -p stackwise --bin stackwise --no-default-features --target-dir target/avx2
    sw=target/avx2/release/stackwise
    peak_args=(--avx2)
    torch_env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
    ;;
  *) echo "ISA is native or avx2, not $isa" >&2; exit 2 ;;
esac
cargo build --release --quiet -p stackwise-bench --bin fma_peak
peak=$(target/release/fma_peak --threads "$threads" "${peak_args[@]}")
out=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  RAYON_NUM_THREADS=$threads "$sw" bench train --steps 3 "$@" >> "$out"
  for attn in eager sdpa; do
    env "${torch_env[@]}" OMP_NUM_THREADS=$threads "$venv/bin/python" bench/train_throughput_torch.py \
      --steps 3 --threads "$threads" --attn "$attn" "$@" 2>/dev/null >> "$out"
  done
done
flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|fma|avx512f' | sort -u | xargs)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($flags) | ISA=$isa | $threads threads | ${*:-full training}"
"$venv/bin/python" - "$out" "$peak" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = json.loads(sys.argv[2])
for r in rows:
    r["peer"] = r["impl"] if r["impl"] == "stackwise" else f"pytorch-{r['attn']}"
peers = ("stackwise", "pytorch-eager", "pytorch-sdpa")
med = {k: statistics.median(r["tokens_per_s"] for r in rows if r["peer"] == k) for k in peers}
cpu = {k: statistics.median(r["cpu_s_per_step"] for r in rows if r["peer"] == k) for k in peers}
for k in peers:
    s = [round(r["s_per_step"], 3) for r in rows if r["peer"] == k]
    print(f"{k:13}: {med[k]:8.0f} tokens/s, CPU {cpu[k]:.2f} s/step  (s/step per round: {s})")
simd = next(r.get("simd", "?") for r in rows if r["peer"] == "stackwise")
torch_isa = next(r.get("cpu_capability", "?") for r in rows if r["peer"] != "stackwise")
print(f"StackWise's fused kernels ran at the {simd} vector level; PyTorch's at {torch_isa}")
for k in peers[1:]:
    print(f"ratio stackwise/{k}: {med['stackwise'] / med[k]:.2f}x "
          f"(CPU time per step, {k}/stackwise: {cpu[k] / cpu['stackwise']:.2f}x)")
sw = [r for r in rows if r["peer"] == "stackwise" and r.get("gflops")]
if sw:
    g = statistics.median(r["gflops"] for r in sw)
    print(f"FMA peak ({peak['isa']}, {peak['threads']} threads, measured by fma_peak): {peak['gflops']:.0f} GFLOP/s; "
          f"StackWise's step: {g:.0f} GFLOP/s of matrix products = {100 * g / peak['gflops']:.0f}% of peak")
PY
rm -f "$out"
