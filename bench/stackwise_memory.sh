#!/usr/bin/env bash
# The StackWise method against end-to-end training of the same 12-layer model (d_model 256,
# seq_len 128, global batch 16, mask-diffusion, byte tokenizer), on the same token budget:
#   - peak memory (VmHWM) of the process: a layer-wise run (its largest stage) vs end-to-end;
#   - tokens/s of the first and last layer-wise stage and of end-to-end training;
#   - masked-token loss and accuracy on a held-out play at mask fractions 0.15, 0.5, 0.9.
#   bash bench/stackwise_memory.sh [STEPS_PER_LAYER]   (default 2: 24 steps each)
set -euo pipefail
cd "$(dirname "$0")/.."
per_layer="${1:-2}"
total=$(( per_layer * 12 ))
cargo build --release --quiet -p stackwise
sw=target/release/stackwise
work=target/bench-stackwise
rm -rf "$work" && mkdir -p "$work"
$sw data prepare cli/assets/corpus/macbeth.txt cli/assets/corpus/comedy_of_errors.txt \
  --out "$work/data" --train-tokenizer byte >/dev/null 2>&1
base() {
cat <<YAML
run: {name: $1, output: $PWD/$work/out, seed: 1}
model: {d_model: 256, n_layers: 12, n_heads: 4, seq_len: 128}
data: {path: $PWD/$work/data}
YAML
}
{ base layerwise; echo "training: {mode: layerwise, objective: diffusion, time_step_masking: true, steps_per_stage: $per_layer, batch_size: 16, lr: 1.0e-3, warmup_steps: 1, eval_every: 0, checkpoint_every: 0, log_every: 1}"; } > "$work/layerwise.yaml"
{ base end_to_end; echo "training: {mode: end_to_end, objective: diffusion, steps: $total, batch_size: 16, lr: 1.0e-3, warmup_steps: 1, eval_every: 0, checkpoint_every: 0, log_every: 1}"; } > "$work/end_to_end.yaml"
for m in end_to_end layerwise; do
  echo "training $m ($total steps)" >&2
  $sw train "$work/$m.yaml" --no-progress --json > "$work/$m.summary.json" 2> "$work/$m.log"
  $sw eval --model "$work/out/runs/$m" --data cli/assets/corpus/midsummer_nights_dream.txt \
    --seq-len 128 --batch 8 --mask-fractions 0.15,0.5,0.9 --json > "$work/$m.eval.json" 2>/dev/null
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def metrics(m):
    return [json.loads(l) for l in open(f"{work}/out/runs/{m}/metrics.jsonl") if l.strip()]
def peak(m):
    return max(r.get("peak_rss_bytes") or 0 for r in metrics(m)) / 2**20
def tps(m, stage=None):
    rs = [r for r in metrics(m) if "tokens_per_s" in r and (stage is None or r.get("stage") == stage)]
    rs = rs[1:] or rs  # the first step of a stage includes its setup
    return sum(r["tokens_per_s"] for r in rs) / len(rs)
ev = {m: json.load(open(f"{work}/{m}.eval.json"))["masked"] for m in ("end_to_end", "layerwise")}
pe, pl = peak("end_to_end"), peak("layerwise")
print(f"peak memory  end-to-end {pe:7.0f} MiB | layer-wise {pl:7.0f} MiB | ratio {pl / pe:.2f} (goal <= 0.40)")
print(f"tokens/s     end-to-end {tps('end_to_end'):7.0f}     | layer-wise stage 1 {tps('layerwise', 0):7.0f}, stage 12 {tps('layerwise', 11):7.0f}, all {tps('layerwise'):7.0f}")
for a, b in zip(ev["end_to_end"], ev["layerwise"]):
    print(f"held-out masked loss at {a['mask_fraction']:.2f}: end-to-end {a['loss']:.4f} (acc {a['accuracy']:.3f}) | layer-wise {b['loss']:.4f} (acc {b['accuracy']:.3f})")
PY
