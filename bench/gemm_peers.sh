#!/usr/bin/env bash
# Matrix products of a training step: candle's gemm (target/release/matmul_shapes) vs MKL
# (PyTorch's x86-64 wheels) and OpenBLAS (NumPy's wheels) on the same shapes and layouts,
# alternated ROUNDS times; prints seconds per group (median over rounds) and each peer's time
# over candle's (above 1: candle is faster).
#   bash bench/gemm_peers.sh [ROUNDS]   (creates bench/.venv with torch if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
threads="${THREADS:-2}"
source bench/venv.sh
cargo build --release --quiet -p stackwise-bench --bin matmul_shapes
out=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  RAYON_NUM_THREADS=$threads target/release/matmul_shapes | sed 's/^{/{"lib":"candle-gemm",/' >> "$out"
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$venv/bin/python" bench/gemm_peers.py --lib mkl --threads "$threads" >> "$out"
  OPENBLAS_NUM_THREADS=$threads "$venv/bin/python" bench/gemm_peers.py --lib openblas --threads "$threads" >> "$out"
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|fma|avx512f' | sort -u | xargs)) | $threads threads"
"$venv/bin/python" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
libs = ["candle-gemm", "mkl", "openblas"]
keys = ["forward_linear_s", "backward_dx_s", "backward_dw_s", "head_forward_s", "head_backward_dx_s",
        "head_backward_dw_s", "attention_forward_s", "attention_backward_s", "total_forward_s", "total_backward_s"]
med = {l: {k: statistics.median(r[k] for r in rows if r["lib"] == l) for k in keys} for l in libs}
print(f"{'seconds (median)':22}" + "".join(f"{l:>13}" for l in libs) + "   mkl/candle  openblas/candle")
for k in keys:
    c = med["candle-gemm"][k]
    print(f"{k[:-2]:22}" + "".join(f"{med[l][k]:13.4f}" for l in libs) + f"   {med['mkl'][k] / c:10.2f}  {med['openblas'][k] / c:15.2f}")
PY
rm -f "$out"
