#!/usr/bin/env bash
# All-reduce bus bandwidth, 2 ranks on this machine: StackWise's ring (its shared-memory links,
# and over TCP with STACKWISE_RING_SHM=0) vs torch.distributed gloo, alternated in one
# invocation; prints the ratio per size (goal: >= 2x gloo).
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
  STACKWISE_RING_SHM=0 target/release/allreduce --world 2 --sizes-mib "$sizes" --iters 5 >> "$out"
  "$venv/bin/python" bench/allreduce_gloo.py --world 2 --sizes-mib "$sizes" --iters 5 2>/dev/null >> "$out"
done
flags=$(grep -m1 "^flags" /proc/cpuinfo | grep -o -w -E "avx2|fma|avx512f" | sort -u | xargs)
echo "CPU: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores ($flags) | 2 ranks on one machine, medians of $rounds rounds"
"$venv/bin/python" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    r["peer"] = f"{r['impl']}/{r['transport']}" if "transport" in r else r["impl"]
peers = ("stackwise-ring/shm", "stackwise-ring/tcp", "torch-gloo")
print(f"{'MiB':>5} {'shm GB/s':>9} {'tcp GB/s':>9} {'gloo GB/s':>10} {'shm/gloo':>9} {'tcp/gloo':>9}")
for mib in sorted({r["mib"] for r in rows}):
    bw = {k: statistics.median(r["busbw_gbps"] for r in rows if r["mib"] == mib and r["peer"] == k) for k in peers}
    g = bw["torch-gloo"]
    print(f"{mib:>5} {bw[peers[0]]:>9.2f} {bw[peers[1]]:>9.2f} {g:>10.2f} {bw[peers[0]] / g:>8.2f}x {bw[peers[1]] / g:>8.2f}x")
PY
rm -f "$out"
