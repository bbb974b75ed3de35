#!/usr/bin/env bash
# Training tokens/s of `stackwise launch` with 1 worker and with 2 workers (same global batch,
# same machine: the cores are shared, so this measures the cost of data parallelism: the ring
# all-reduce of every step and the split of the cores), alternated in one invocation.
#   bash bench/launch_throughput.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
cargo build --release --quiet -p stackwise
sw=target/release/stackwise
work=target/bench-launch
rm -rf "$work" && mkdir -p "$work"
$sw data prepare cli/assets/corpus/*.txt --out "$work/data" --train-tokenizer byte >/dev/null 2>&1
cat > "$work/bench.yaml" <<YAML
run: {name: bench, output: $PWD/$work/out, seed: 1}
model: {d_model: 256, n_layers: 4, n_heads: 4, seq_len: 128}
data: {path: $PWD/$work/data}
training: {steps: 20, batch_size: 16, lr: 1.0e-3, warmup_steps: 2, eval_every: 0, checkpoint_every: 0, log_every: 10}
YAML
cores=$(nproc)
out=$(mktemp)
for r in $(seq "$rounds"); do
  for w in 1 2; do
    echo "round $r/$rounds: $w worker(s)" >&2
    $sw launch "$work/bench.yaml" --workers $w --threads-per-worker $(( cores / w > 0 ? cores / w : 1 )) \
      --set run.name=r$r-w$w --json --no-progress 2>/dev/null >> "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tps = {w: statistics.median(r["tokens_per_s"] for r in rows if r["workers"] == w) for w in (1, 2)}
for w in (1, 2):
    print(f"{w} worker(s): {tps[w]:8.0f} tokens/s  (rounds: {[round(r['tokens_per_s']) for r in rows if r['workers'] == w]})")
print(f"ratio 2 workers / 1 worker: {tps[2] / tps[1]:.2f}x")
PY
rm -f "$out"
