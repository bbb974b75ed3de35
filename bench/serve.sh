#!/usr/bin/env bash
# Serving benchmarks, loopback only, on one model (GPT-2, 6 layers, d 384, a BPE vocabulary
# trained on Macbeth, seeded random weights, bench/serve_model.py) and one prompt, 128 new
# greedy tokens:
#   1. single-stream decode with the KV cache: `stackwise generate` (contiguous and --paged)
#      vs HF transformers `generate`;                                        goal >= 1.5x
#   2. the same vs StackWise without a cache (--no-cache);                   goal >= 5x
#   3. `stackwise serve`, aggregate tokens/s with 16 concurrent clients vs 1, p50/p99 time to
#      first token (httpx, bench/serve_load.py, bounded: 16 x 2 requests).  goal >= 4x
# Rounds alternate the peers (a busy neighbour core skews absolute times; ratios of medians hold).
#   bash bench/serve.sh [ROUNDS]   (creates bench/.venv with torch + transformers if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
threads="${THREADS:-2}"
new=128
prompt="KING. Speak, what news? The battle"
source bench/venv.sh
cargo build --release --quiet -p stackwise
bin=target/release/stackwise
work=target/bench-serve
model=$work/model
if [ ! -f "$model/model.safetensors" ]; then
  mkdir -p "$work"
  "$bin" tokenizer train cli/assets/corpus/macbeth.txt --vocab-size 8192 --out "$work/tokenizer.json"
  "$venv/bin/python" bench/serve_model.py "$work/tokenizer.json" "$model"
fi
out=$(mktemp)
gen() { RAYON_NUM_THREADS=$threads "$bin" generate --model "$model" --prompt "$prompt" --greedy \
  --max-new-tokens $new --min-new-tokens $new --json "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])'; }
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  echo "{\"impl\": \"cached\", \"tokens_per_s\": $(gen)}" >> "$out"
  echo "{\"impl\": \"paged\", \"tokens_per_s\": $(gen --paged --page-size 64 --max-pages 6)}" >> "$out"
  "$venv/bin/python" bench/serve_hf.py "$model" "$prompt" $new 3 "$threads" 2>/dev/null >> "$out"
  echo "{\"impl\": \"no_cache\", \"tokens_per_s\": $(gen --no-cache)}" >> "$out"
done
RAYON_NUM_THREADS=$threads "$venv/bin/python" bench/serve_load.py "$bin" "$model" 16 2 $new "$prompt" | tee -a "$out"
vocab=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$model/config.json")
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) | $threads threads | GPT-2 6 x 384, vocab $vocab, $new new tokens, greedy"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
med = {k: statistics.median(r["tokens_per_s"] for r in rows if r["impl"] == k)
       for k in ("cached", "paged", "hf", "no_cache")}
for k, label in [("cached", "stackwise generate (KV cache)"), ("paged", "stackwise generate --paged"),
                 ("hf", "HF transformers generate"), ("no_cache", "stackwise generate --no-cache")]:
    runs = [round(r["tokens_per_s"]) for r in rows if r["impl"] == k]
    print(f"{label:32}: {med[k]:7.0f} tok/s  (rounds: {runs})")
serve = next(r for r in rows if r["impl"] == "serve")
one, many = serve["levels"]
print(f"ratio cached / HF generate          : {med['cached'] / med['hf']:.2f}x  (paged: {med['paged'] / med['hf']:.2f}x; goal >= 1.5x)")
print(f"ratio cached / no cache             : {med['cached'] / med['no_cache']:.2f}x  (paged: {med['paged'] / med['no_cache']:.2f}x; goal >= 5x)")
print(f"ratio serve 16 clients / 1 client   : {serve['ratio']:.2f}x  ({many['tokens_per_s']:.0f} vs {one['tokens_per_s']:.0f} tok/s; "
      f"TTFT p50/p99 {one['ttft_p50_ms']:.0f}/{one['ttft_p99_ms']:.0f} ms at 1, {many['ttft_p50_ms']:.0f}/{many['ttft_p99_ms']:.0f} ms at 16; goal >= 4x)")
PY
rm -f "$out"
