#!/usr/bin/env bash
# All-reduce bus bandwidth, 2 ranks on loopback: StackWise's TCP ring vs torch.distributed
# gloo, alternated in one invocation; prints the ratio per size (goal: >= 1.5x).
#   bash bench/allreduce.sh [ROUNDS]      (creates bench/.venv with torch if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
sizes="${SIZES:-1,16,64,256}"
source bench/venv.sh
cargo build --release --quiet -p stackwise-bench --bin allreduce
out=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  target/release/allreduce --world 2 --sizes-mib "$sizes" --iters 5 >> "$out"
  "$venv/bin/python" bench/allreduce_gloo.py --world 2 --sizes-mib "$sizes" --iters 5 2>/dev/null >> "$out"
done
"$venv/bin/python" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'MiB':>5} {'stackwise GB/s':>15} {'gloo GB/s':>10} {'ratio':>6}")
for mib in sorted({r["mib"] for r in rows}):
    bw = {k: statistics.median(r["busbw_gbps"] for r in rows if r["mib"] == mib and r["impl"] == k)
          for k in ("stackwise-ring", "torch-gloo")}
    print(f"{mib:>5} {bw['stackwise-ring']:>15.2f} {bw['torch-gloo']:>10.2f} {bw['stackwise-ring'] / bw['torch-gloo']:>5.2f}x")
PY
rm -f "$out"
