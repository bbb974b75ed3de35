#!/usr/bin/env bash
# Fine-tuning modes on one model: peak memory (RSS) and step time of baseline, lora, qlora,
# butterfly and butterfly_block, without and with gradient checkpointing, each
# `stackwise finetune` in its own process, on the
# 6-layer d=384 GPT-2 shape (6 heads, vocab 4096 BPE of Macbeth, batch 8 x 256, 2 threads),
# and the butterfly modes' step-time overhead over LoRA measured in the same run.
#   bash bench/finetune_modes.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-6}"
threads="${THREADS:-2}"
cargo build --release --quiet -p stackwise
sw=target/release/stackwise
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$sw data prepare cli/assets/corpus/macbeth.txt --out "$work/data" --train-tokenizer bpe --vocab-size 4096 >/dev/null 2>&1
cat > "$work/base.yaml" <<YAML
run: {name: base, output: $work}
model: {family: gpt2, d_model: 384, n_layers: 6, n_heads: 6, seq_len: 256}
data: {path: $work/data}
training: {steps: 1, batch_size: 8, warmup_steps: 0, eval_every: 0, checkpoint_every: 1}
YAML
RAYON_NUM_THREADS=$threads $sw train "$work/base.yaml" --no-progress >/dev/null 2>&1
base="$work/runs/base/checkpoints/step-00000001"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) | $threads threads | $steps steps a mode"
printf '%-16s %4s %12s %12s %14s %12s\n' mode gc trainable peak_MiB s/step tokens/s
for gc in off on; do
for mode in baseline lora qlora butterfly butterfly_block; do
  extra=()
  case $mode in
    lora|qlora) extra=(--lora-r 16 --lora-alpha 32 --target-modules c_attn,c_proj) ;;
    butterfly) extra=(--target-modules c_attn,c_proj) ;;
    butterfly_block) extra=(--target-modules c_attn,c_proj --butterfly-block-size 128) ;;
  esac
  [ "$gc" = on ] && extra+=(--gradient-checkpointing)
  RAYON_NUM_THREADS=$threads $sw finetune --model "$base" --data "$work/data" --mode "$mode" --out "$work/$mode-$gc" \
    --steps "$steps" --batch-size 8 --seq-len 256 --warmup-steps 0 --eval-every 0 --checkpoint-every 100000 \
    --set training.log_every=1 "${extra[@]}" --no-progress > "$work/$mode-$gc.log" 2>&1
  python3 - "$work/$mode-$gc/runs/finetune/metrics.jsonl" "$work/$mode-$gc.log" "$mode" "$gc" <<'PY' | tee -a "$work/table"
import json, re, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
log = open(sys.argv[2]).read()
trainable = re.search(r"trainable (\d+) of", log).group(1)
steady = rows[1:] or rows  # the first step includes building the model
tps = statistics.median(r["tokens_per_s"] for r in steady)
peak = max(r["peak_rss_bytes"] for r in rows) / 2**20
print(f"{sys.argv[3]:<16} {sys.argv[4]:>4} {trainable:>12} {peak:>12.0f} {8 * 256 / tps:>14.3f} {tps:>12.0f}")
PY
done
done
python3 - "$work/table" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
t = {(r[0], r[1]): (float(r[3]), float(r[4])) for r in rows}
for m in ("butterfly", "butterfly_block"):
    print(f"{m} step time / lora step time: {t[(m, 'off')][1] / t[('lora', 'off')][1]:.2f}x")
for m in ("baseline", "lora", "qlora", "butterfly", "butterfly_block"):
    (p0, s0), (p1, s1) = t[(m, "off")], t[(m, "on")]
    print(f"{m}: gradient checkpointing peak {p0:.0f} -> {p1:.0f} MiB ({p1 - p0:+.0f}), step {s0:.2f} -> {s1:.2f} s")
PY
