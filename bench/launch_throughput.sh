#!/usr/bin/env bash
# Training tokens/s of `stackwise launch` with 1 worker and with 2 workers (same global batch,
# same machine: the cores are shared, so this measures the cost of data parallelism: the ring
# all-reduce of every step and the split of the cores), alternated in one invocation. Two
# workers run twice: with the gradient all-reduce overlapped with the backward pass (the
# default) and with training.overlap_comm=false (reduced after it). From rank 0's metrics.jsonl it
# prints the all-reduce seconds per step and how much of them the backward pass hid.
#   bash bench/launch_throughput.sh [ROUNDS] [ARGS...]
# ARGS go to every launch, e.g. --set training.gradient_checkpointing=true.
# The two workers share this machine, so their ring links go through shared memory.
# LINK_RATE=1gbit instead puts them on TCP (STACKWISE_RING_SHM=0) over the loopback interface
# shaped to that rate (tc tbf; needs root or CAP_NET_ADMIN), so the ring's transfers wait on a
# wire as between machines; the shaping is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
shift || true
cargo build --release --quiet -p stackwise
sw=target/release/stackwise
work=target/bench-launch
rm -rf "$work" && mkdir -p "$work"
flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|fma|avx512f' | sort -u | xargs)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores ($flags)"
$sw data prepare cli/assets/corpus/*.txt --out "$work/data" --train-tokenizer byte >/dev/null 2>&1
cat > "$work/bench.yaml" <<YAML
run: {name: bench, output: $PWD/$work/out, seed: 1}
model: {d_model: 256, n_layers: 4, n_heads: 4, seq_len: 128}
data: {path: $PWD/$work/data}
training: {steps: 20, batch_size: 16, lr: 1.0e-3, warmup_steps: 2, eval_every: 0, checkpoint_every: 0, log_every: 1}
YAML
if [ -n "${LINK_RATE:-}" ]; then
  tc qdisc replace dev lo root tbf rate "$LINK_RATE" burst 2mb latency 100ms
  trap 'tc qdisc del dev lo root 2>/dev/null || true' EXIT
  export STACKWISE_RING_SHM=0
  echo "ring over TCP, loopback shaped to $LINK_RATE (all ranks' traffic shares it)"
fi
cores=$(nproc)
out=$(mktemp)
for r in $(seq "$rounds"); do
  for mode in w1 w2 w2-after; do
    w=${mode:1:1}
    overlap=true
    [ "$mode" = w2-after ] && overlap=false
    echo "round $r/$rounds: $mode" >&2
    $sw launch "$work/bench.yaml" --workers "$w" --set training.overlap_comm=$overlap \
      --threads-per-worker $(( cores / w > 0 ? cores / w : 1 )) \
      --set run.name="r$r-$mode" "$@" --json --no-progress 2>/dev/null \
      | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['mode']='$mode'; print(json.dumps(r))" >> "$out"
  done
done
python3 - "$out" "$work/out" <<'PY'
import glob, json, os, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: statistics.median(xs)
tps = {}
for mode, label in (("w1", "1 worker"), ("w2", "2 workers, overlapped"), ("w2-after", "2 workers, reduced after the backward")):
    rs = [r["tokens_per_s"] for r in rows if r["mode"] == mode]
    tps[mode] = med(rs)
    line = f"{label:40s} {tps[mode]:8.0f} tokens/s  (rounds: {[round(x) for x in rs]})"
    if mode != "w1":
        # Rank 0's step records after the first two steps (warm-up).
        recs = [json.loads(l) for f in glob.glob(os.path.join(sys.argv[2], "runs", f"r*-{mode}", "metrics.jsonl"))
                for l in open(f) if '"allreduce_s"' in l]
        recs = [x for x in recs if x["step"] > 2]
        ar = med([x["allreduce_s"] for x in recs])
        ex = med([x["allreduce_exposed_s"] for x in recs])
        line += f"; all-reduce {ar * 1e3:.0f} ms/step, exposed {ex * 1e3:.0f} ms (median of {len(recs)} steps)"
        if mode == "w2":
            line += f", {1 - ex / ar:.0%} hidden"
    print(line)
print(f"ratio 2 workers / 1 worker: {tps['w2'] / tps['w1']:.2f}x overlapped, {tps['w2-after'] / tps['w1']:.2f}x reduced after the backward")
print(f"overlapped / reduced after: {tps['w2'] / tps['w2-after']:.2f}x")
PY
rm -f "$out"
