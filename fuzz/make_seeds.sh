#!/usr/bin/env bash
# Seed corpora for the fuzz targets, made with the product itself (a real prepared dataset,
# checkpoint, manifest and tokenizer), so each target starts from inputs that pass its
# parser.   fuzz/make_seeds.sh [STACKWISE_BINARY]    (default: builds target/release/stackwise)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/stackwise}
[ -x "$BIN" ] || cargo build --release -q -p stackwise
C=fuzz/corpus
SEP=$'\n--8<--\n'
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p $C/{config,dataset,manifest,hf_folder,proto,tokenizer,prepare_jsonl}

# config: each example, with an environment line and a --set line.
for f in examples/*.yaml; do
  { cat "$f"; printf '%s' "$SEP"; echo 'TRAINING__STEPS=7'; printf '%s' "$SEP"; echo 'training.lr=0.01'; } \
    > "$C/config/$(basename "$f" .yaml)"
done

# prepare_jsonl: the three record shapes.
printf '%s\n' '{"text": "To be, or not to be"}' \
  '{"prompt": "Who is there?", "completion": " Nay, answer me."}' \
  '{"text": "### Instruction: speak\n### Response: I will."}' > $C/prepare_jsonl/records

# dataset: a real prepared dataset, one shard per split.
head -c 3000 cli/assets/corpus/macbeth.txt > "$W/m.txt"
"$BIN" data prepare "$W/m.txt" --out "$W/data" --train-tokenizer byte --val-fraction 0.1 >/dev/null 2>&1
stem=$(python3 -c "import json;print(json.load(open('$W/data/index.json'))['train']['shards'][0]['stem'])")
python3 - "$W/data" "$stem" "$C/dataset/prepared" <<'PY'
import json, sys
d, stem, out = sys.argv[1:]
idx = json.load(open(f"{d}/index.json"))
# The target writes the shard files as train-00000.*; point the index there.
idx["train"]["shards"] = [dict(idx["train"]["shards"][0], stem="train-00000")]
idx["validation"] = {"tokens": 0, "docs": 0, "shards": []}
idx["train"]["tokens"] = idx["train"]["shards"][0]["tokens"]
idx["train"]["docs"] = idx["train"]["shards"][0]["docs"]
sep = b"\n--8<--\n"
parts = [json.dumps(idx).encode()] + [open(f"{d}/{stem}.{e}", "rb").read() for e in ("bin", "mask", "docs")]
open(out, "wb").write(sep.join(parts))
PY

# hf_folder + manifest + tokenizer: a tiny trained checkpoint (an HF folder with a manifest).
cat > "$W/tiny.yaml" <<YAML
run: {name: tiny, output: $W/out, seed: 1}
model: {d_model: 8, n_layers: 1, n_heads: 1, seq_len: 8}
data: {path: $W/data}
training: {steps: 2, warmup_steps: 0, batch_size: 2, checkpoint_every: 2, eval_every: 2, eval_batches: 1}
YAML
"$BIN" train "$W/tiny.yaml" --no-progress >/dev/null 2>&1
ck=$(ls -d "$W"/out/runs/tiny/checkpoints/step-* | tail -1)
{ cat "$ck/config.json"; printf '%s' "$SEP"; cat "$ck/model.safetensors"; } > $C/hf_folder/gpt2-tiny
{ cat "$ck/MANIFEST.json"; printf '%s' "$SEP"; cat "$ck/model.safetensors"; } > $C/manifest/checkpoint
{ printf '\x00'; cat "$ck/tokenizer.json"; printf '%s' "$SEP"; echo 'Fair is foul'; } > $C/tokenizer/byte-json

# proto: a RegisterRequest (version 2, name "w"), a WorkerMessage hello, a RunStage.
printf '\x03\x08\x02\x12\x01w\x22\x0e127.0.0.1:7000' > $C/proto/register
printf '\x00\x0a\x01r\x10\x01\x1a\x02w1\x52\x00' > $C/proto/hello
printf '\x02\x08\x00\x10\x01\x22\x05local\x3a\x0cdata: {a: 1}' > $C/proto/run_stage
echo "seeds in $C: $(find $C -type f | wc -l) files"
