#!/usr/bin/env bash
# Checkpoint save/load of a 124M-parameter fp32 model + AdamW state: StackWise to a local
# S3-compatible server (s3s-fs, started here) vs torch.save / torch.load to local disk, in the
# same invocation; and the training stall per checkpoint (goal: <= 10 % of the save time).
#   bash bench/ckpt.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
source bench/venv.sh
[ -x target/s3s/bin/s3s-fs ] || cargo install s3s-fs@0.14.1 --features binary --locked --root target/s3s
cargo build --release --quiet -p stackwise-bench --bin ckpt_bench
root=$(mktemp -d -p "$PWD/target")
mkdir -p "$root/bench"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/s3s/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$root" >/dev/null 2>&1 &
s3pid=$!
trap 'kill $s3pid 2>/dev/null; rm -rf "$root"' EXIT
sleep 1
out=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret \
    target/release/ckpt_bench --uri s3://bench/ckpt >> "$out"
  "$venv/bin/python" bench/ckpt_torch.py --dir "$PWD/target" 2>/dev/null >> "$out"
done
"$venv/bin/python" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
m = lambda k, f: statistics.median(r[f] for r in rows if r["impl"] == k)
s, t = "stackwise", "torch.save"
print(f"state: {rows[0]['params']/1e6:.1f}M parameters + AdamW moments, {m(s,'bytes')/1e9:.2f} GB")
print(f"save: stackwise -> S3 {m(s,'save_gbps'):.2f} GB/s ({m(s,'save_s'):.2f} s) | torch.save -> disk {m(t,'save_gbps'):.2f} GB/s ({m(t,'save_s'):.2f} s) | ratio {m(s,'save_gbps')/m(t,'save_gbps'):.2f}x")
print(f"load: stackwise <- S3 {m(s,'load_gbps'):.2f} GB/s ({m(s,'load_s'):.2f} s, sha256-verified) | torch.load <- disk {m(t,'load_gbps'):.2f} GB/s ({m(t,'load_s'):.2f} s) | ratio {m(s,'load_gbps')/m(t,'load_gbps'):.2f}x")
print(f"training stall per checkpoint: {m(s,'stall_s'):.2f} s = {100*m(s,'stall_over_save'):.1f} % of the save time (first checkpoint of a process: {m(s,'first_stall_s'):.2f} s)")
PY
rm -f "$out"
