#!/usr/bin/env bash
# The ring at more ranks: 2, 4 and 8 processes on this machine (links through shared memory;
# over loopback TCP with STACKWISE_RING_SHM=0), each size checked element by element against
# the exact sum, bus bandwidth per size.
#   bash bench/ring_scale.sh [WORLD ...]     (default: 2 4 8)
# With fewer cores than ranks the ranks time-share the CPU: the figures show that cost, they
# are not what a ring of machines reaches.
set -euo pipefail
cd "$(dirname "$0")/.."
worlds=("$@")
[ ${#worlds[@]} -gt 0 ] || worlds=(2 4 8)
sizes="${SIZES:-1,16,64}"
# The same build line as swarm.sh (same packages, same features: no rebuild of either).
cargo build --release --quiet -p stackwise -p stackwise-bench --bin stackwise --bin swarm --bin allreduce
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores" >&2
for w in "${worlds[@]}"; do
  target/release/allreduce --world "$w" --sizes-mib "$sizes" --iters 5 | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    ok = "sums exact" if r["sums_exact"] else "WRONG"
    print("ring world={} ({}) {:>3} MiB: {:8.1f} ms, busbw {:.2f} GB/s, {}".format(
        r["world"], r["transport"], r["mib"], r["seconds"] * 1e3, r["busbw_gbps"], ok))
'
done
