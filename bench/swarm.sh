#!/usr/bin/env bash
# The control plane at scale: the real `stackwise coordinator` process against N simulated
# workers (real gRPC clients with the real token, no model, no ring), in one process.
#   bash bench/swarm.sh [N ...]            (default: 64 256 1024)
# Each N: rendezvous, heartbeat and Status latency, coordinator CPU and peak RSS, 1 % of the
# workers lost (silent, then their streams closed), and a kill -9 + --resume restart of the
# coordinator while the workers reconnect with their backoff. The full figures are a JSON
# line per N on stderr; the last lines are the summary, one per N.
# Goals at N=1024: rendezvous < 2 s, heartbeat p99 < 50 ms, re-form < 5 s, reconnect
# < 10 s, coordinator RSS < 200 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(64 256 1024)
# One build line for swarm.sh and ring_scale.sh: the same packages, so the same features and
# no rebuild of the other.
cargo build --release --quiet -p stackwise -p stackwise-bench --bin stackwise --bin swarm --bin allreduce
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
echo "CPU: $cpu, $(nproc) cores; coordinator and the simulated workers share them" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()
for n in "${sizes[@]}"; do
  dir="$work/n$n"
  line=$(target/release/swarm --workers "$n" --stackwise target/release/stackwise --dir "$dir" ${SWARM_ARGS:-}) || {
    echo "swarm N=$n failed; coordinator logs:" >&2
    tail -n 20 "$dir"/coordinator-*.log >&2 || true
    exit 1
  }
  echo "$line" >&2
  summary+=("$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
hb = r["heartbeat_rtt"]["p99_ms"]
print("swarm N={}: rendezvous {:.2f} s, heartbeat p99 {:.1f} ms, re-form {:.2f} s, reconnect {:.2f} s, coordinator RSS {:.0f} MB".format(
    r["workers"], r["rendezvous_s"], hb, r["reform_s"], r["reconnect_s"], r["coordinator_peak_rss_mb"]))
' "$line")")
done
printf '%s\n' "${summary[@]}"
