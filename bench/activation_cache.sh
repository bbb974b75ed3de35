#!/usr/bin/env bash
# Layer-wise training (6 layers, d_model 256, seq_len 128, batch 16, 45 steps per layer = 3
# epochs of a 30 kB text, static masks) with the frozen prefix computed on the fly vs read
# from the activation cache in memory and on disk: wall time, tokens/s per stage, peak memory,
# and the final loss (equal in all three: the cache changes speed, not results).
#   bash bench/activation_cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p stackwise
sw=$PWD/target/release/stackwise
work=$PWD/target/bench-actcache
rm -rf "$work" && mkdir -p "$work"
head -c 30000 cli/assets/corpus/macbeth.txt > "$work/m.txt"
$sw data prepare "$work/m.txt" --out "$work/data" --train-tokenizer byte >/dev/null 2>&1
for c in none memory disk; do
  cat > "$work/$c.yaml" <<YAML
run: {name: $c, output: $work/out, seed: 1}
model: {d_model: 256, n_layers: 6, n_heads: 4, seq_len: 128}
data: {path: $work/data}
training: {mode: layerwise, objective: diffusion, time_step_masking: true, mask_seeds: 1, activation_cache: $c, activation_cache_dir: $work/cache, steps_per_stage: 45, batch_size: 16, lr: 1.0e-3, warmup_steps: 2, eval_every: 0, checkpoint_every: 0, log_every: 1}
YAML
  echo "training with activation_cache: $c" >&2
  start=$(date +%s%N)
  $sw train "$work/$c.yaml" --no-progress --json > "$work/$c.json" 2>/dev/null
  echo "$(( ($(date +%s%N) - start) / 1000000 ))" > "$work/$c.ms"
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
base = None
for c in ["none", "memory", "disk"]:
    rs = [json.loads(l) for l in open(f"{work}/out/runs/{c}/metrics.jsonl") if l.strip()]
    by = {}
    for r in rs:
        if "tokens_per_s" in r:
            by.setdefault(r["stage"], []).append(r["tokens_per_s"])
    tps = {k: sum(v[1:]) / max(1, len(v) - 1) for k, v in by.items()}
    secs = float(open(f"{work}/{c}.ms").read()) / 1000
    peak = max(r.get("peak_rss_bytes") or 0 for r in rs) / 2**20
    base = base or secs
    print(f"{c:>6}: {secs:5.1f} s ({base / secs:.2f}x) | tokens/s by stage "
          + " ".join(f"{tps[k]:.0f}" for k in sorted(tps))
          + f" | peak {peak:.0f} MiB | final loss {rs[-1]['loss']:.6f}")
PY
