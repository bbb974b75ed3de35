#!/usr/bin/env bash
# Chaos run (issue 15; by hand, not in CI): under --on-worker-loss recover,
#   1. N runs of `stackwise launch --workers 2`, each with one worker SIGKILLed at a random
#      moment (the launcher restarts it; the group re-forms from the last checkpoint);
#   2. one run of `stackwise coordinator` + 2 `stackwise worker` processes whose coordinator is
#      SIGKILLed mid-run and restarted with --resume (the workers reconnect with backoff);
# and reports how many ended with final weights bitwise equal to an undisturbed run.
#   bash tests/chaos.sh [N]        (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
cargo build --release --quiet -p stackwise
sw="$PWD/target/release/stackwise"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; work dir $work"

head -c 60000 cli/assets/corpus/macbeth.txt > "$work/corpus.txt"
"$sw" data prepare "$work/corpus.txt" --out "$work/data" --train-tokenizer byte > /dev/null 2>&1
cat > "$work/job.yaml" <<YAML
run: {name: job, output: $work/out, seed: 7}
model: {d_model: 64, n_layers: 2, n_heads: 2, seq_len: 64}
data: {path: $work/data}
training: {steps: 200, batch_size: 8, lr: 1.0e-3, warmup_steps: 4, eval_every: 0, checkpoint_every: 10, keep_last: 3, log_every: 1}
YAML
final_sha() { sha256sum "$work/out/runs/$1/checkpoints/step-00000200/model.safetensors" | cut -d' ' -f1; }

"$sw" launch "$work/job.yaml" --workers 2 --no-progress --set run.name=clean > /dev/null 2>&1
want=$(final_sha clean)
echo "undisturbed run: final weights sha256 ${want:0:16}"

equal=0
hit=0
for i in $(seq "$n"); do
  name="kill$i"
  log="$work/$name.log"
  "$sw" launch "$work/job.yaml" --workers 2 --no-progress --on-worker-loss recover --max-restarts 3 \
    --lease-ms 3000 --set run.name="$name" > "$log" 2>&1 &
  launcher=$!
  # A random moment after training started: after step 3..180 of 200.
  at=$(( 3 + RANDOM % 178 ))
  while ! grep -q "step *$at/" "$log" 2>/dev/null; do
    kill -0 "$launcher" 2>/dev/null || break
    sleep 0.05
  done
  victim=$(( RANDOM % 2 ))
  pid=$(grep -o "started worker local-$victim (pid [0-9]*" "$log" | tail -1 | grep -o '[0-9]*$' || true)
  if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
  # A run that does not end within 10 minutes counts as not equal (a re-formation that never
  # settles is a failure too).
  ( sleep 600; kill "$launcher" 2>/dev/null ) & guard=$!
  if wait "$launcher" && [ "$(final_sha "$name" 2>/dev/null)" = "$want" ]; then
    equal=$((equal + 1)); verdict="bitwise equal"
  else
    verdict="DIFFERENT or unfinished (log: $log)"; trap - EXIT
  fi
  kill "$guard" 2>/dev/null || true
  # The kill must have hit a running worker: the launcher restarted it and the group re-formed.
  if grep -q "restarting it" "$log"; then
    from=$(grep -o 'resuming from step-[0-9]*' "$log" | tail -1 | cut -d' ' -f3 || true)
    hit=$((hit + 1)); how="restarted, resumed from ${from:-the start}"
  else
    how="the kill missed (no restart)"
  fi
  echo "run $i: killed worker local-$victim (pid ${pid:-none}) after step $at; $how: $verdict"
done

# The coordinator killed once and restarted with --resume.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export STACKWISE_TOKEN=chaos-token
coordinator() {
  exec "$sw" coordinator --config "$work/job.yaml" --bind "127.0.0.1:$port" --min-workers 2 \
    --rendezvous-grace-ms 0 --lease-ms 3000 --heartbeat-ms 300 --on-worker-loss recover \
    --set run.name=restarted "$@" >> "$work/coordinator.log" 2>&1
}
coordinator & coord=$!
workers=()
for w in 0 1; do
  "$sw" --threads 1 worker --coordinator "http://127.0.0.1:$port" --name "w$w" \
    --rejoin-timeout-s 60 --advertise-host 127.0.0.1 > "$work/worker$w.log" 2>&1 &
  workers+=($!)
done
at=$(( 20 + 10 * (RANDOM % 12) ))
while [ ! -f "$work/out/runs/restarted/checkpoints/step-$(printf %08d "$at")/MANIFEST.json" ]; do sleep 0.05; done
kill -9 "$coord"; wait "$coord" 2>/dev/null || true
coordinator --resume & coord=$!
ok=0
if wait "$coord" && wait "${workers[@]}" && [ "$(final_sha restarted)" = "$want" ]; then
  ok=1; verdict="bitwise equal"
else
  verdict="DIFFERENT (logs in $work)"; trap - EXIT
fi
echo "coordinator killed after checkpoint step-$at and restarted with --resume: $verdict"
echo "chaos: $equal/$n worker-kill runs ($hit of them with the worker restarted mid-run) and $ok/1 coordinator restart ended bitwise equal to the undisturbed run"
[ "$equal" = "$n" ] && [ "$hit" = "$n" ] && [ "$ok" = 1 ]
