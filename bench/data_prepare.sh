#!/usr/bin/env bash
# `stackwise data prepare` on a large corpus (default 1024 MB: the 38 Shakespeare plays
# repeated, in 16 files) vs a small one (SMALL_MB, default 16): throughput (MB/s) and peak RSS
# of each, then a short training run on each dataset and its peak RSS. The peer is HF
# `tokenizers` (Python, encode_batch) tokenizing the large corpus with the same tokenizer.json.
# Goals: prepare peak RSS < 512 MB; training peak RSS on the large dataset ~ the small one.
#   bash bench/data_prepare.sh [SIZE_MB]      (creates bench/.venv-tokenizers if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb="${1:-1024}"
small_mb="${SMALL_MB:-16}"
work=$PWD/target/bench-data
mkdir -p "$work"
cargo build --release --quiet -p stackwise
sw=$PWD/target/release/stackwise
venv=bench/.venv-tokenizers
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import tokenizers" 2>/dev/null; then
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet tokenizers
fi
[ -d "$work/plays" ] || bash examples/get-shakespeare.sh "$work/plays" >&2

# A corpus of $2 MB in 16 files of whole plays.
corpus() {
  local dir=$1 mb=$2
  [ -f "$dir/.done-$mb" ] && return
  rm -rf "$dir" && mkdir -p "$dir"
  local per=$(( mb * 1048576 / 16 ))
  for i in $(seq -w 0 15); do
    while [ "$(stat -c %s "$dir/part-$i.txt" 2>/dev/null || echo 0)" -lt "$per" ]; do
      cat "$work"/plays/*.txt >> "$dir/part-$i.txt"
    done
    truncate -s "$per" "$dir/part-$i.txt"
    # Cut back to the last whole line (truncation may split a UTF-8 character).
    python3 - "$dir/part-$i.txt" <<'PY'
import sys
p = sys.argv[1]
b = open(p, "rb").read()
open(p, "wb").write(b[: b.rfind(b"\n") + 1])
PY
  done
  touch "$dir/.done-$mb"
}
corpus "$work/small" "$small_mb"
corpus "$work/large" "$size_mb"

# Runs "$@" under /usr/bin/time; prints "seconds peak_kb".
measure() {
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
  cat "$work/time"
}
echo "preparing $small_mb MB and $size_mb MB..." >&2
read -r s_secs s_kb < <(measure "$sw" data prepare "$work/small" --out "$work/ds-small" --vocab-size 4096)
read -r l_secs l_kb < <(measure "$sw" data prepare "$work/large" --out "$work/ds-large" --vocab-size 4096)
echo "HF tokenizers on $size_mb MB..." >&2
read -r p_secs p_kb < <(measure "$venv/bin/python" - "$work/ds-large/tokenizer.json" "$work/large" <<'PY'
import array, os, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
out = open(os.devnull, "wb")
for name in sorted(os.listdir(sys.argv[2])):
    if not name.endswith(".txt"):
        continue
    with open(os.path.join(sys.argv[2], name), encoding="utf-8") as f:
        while True:
            lines = f.readlines(1 << 20)
            if not lines:
                break
            for e in tok.encode_batch(lines, add_special_tokens=False):
                out.write(array.array("I", e.ids).tobytes())
PY
)

for c in small large; do
  cat > "$work/train-$c.yaml" <<YAML
run: {name: $c, output: $work/out, seed: 1}
model: {d_model: 64, n_layers: 2, n_heads: 2, seq_len: 128}
data: {path: $work/ds-$c}
training: {steps: 30, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, eval_every: 15, eval_batches: 4, checkpoint_every: 0, log_every: 10}
YAML
done
echo "training 30 steps on each..." >&2
rm -rf "$work/out"
read -r ts_secs ts_kb < <(measure "$sw" train "$work/train-small.yaml" --no-progress)
read -r tl_secs tl_kb < <(measure "$sw" train "$work/train-large.yaml" --no-progress)

python3 - "$small_mb" "$size_mb" "$s_secs" "$s_kb" "$l_secs" "$l_kb" "$p_secs" "$p_kb" \
  "$ts_secs" "$ts_kb" "$tl_secs" "$tl_kb" "$work" <<'PY'
import json, sys
a = sys.argv[1:]
small_mb, size_mb = float(a[0]), float(a[1])
s_secs, s_kb, l_secs, l_kb, p_secs, p_kb = map(float, a[2:8])
ts_secs, ts_kb, tl_secs, tl_kb = map(float, a[8:12])
idx = json.load(open(f"{a[12]}/ds-large/index.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mb = lambda kb: kb / 1024
print(f"CPU: {cpu}")
print(f"prepare {small_mb:.0f} MB: {s_secs:.1f} s ({small_mb * 1.048576 / s_secs:.1f} MB/s), peak RSS {mb(s_kb):.0f} MiB")
print(f"prepare {size_mb:.0f} MB: {l_secs:.1f} s ({size_mb * 1.048576 / l_secs:.1f} MB/s, tokenizer training included), "
      f"peak RSS {mb(l_kb):.0f} MiB (goal < 512), {idx['train']['tokens'] + idx['validation']['tokens']} tokens "
      f"in {len(idx['train']['shards'])} + {len(idx['validation']['shards'])} shards")
print(f"HF tokenizers encode_batch, {size_mb:.0f} MB: {p_secs:.1f} s ({size_mb * 1.048576 / p_secs:.1f} MB/s), peak RSS {mb(p_kb):.0f} MiB")
print(f"prepare throughput vs HF tokenizers: {p_secs / l_secs:.2f}x")
print(f"train 30 steps: {small_mb:.0f} MB dataset peak RSS {mb(ts_kb):.0f} MiB, {size_mb:.0f} MB dataset {mb(tl_kb):.0f} MiB "
      f"(ratio {tl_kb / ts_kb:.2f}; goal ~1)")
PY
