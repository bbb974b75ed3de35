#!/usr/bin/env bash
# The GPU run: on a machine with an NVIDIA GPU, PyTorch + transformers (the device tool's
# nvidia-h200 kind has both, with NCCL) and the binary bench/gpu/build.sh made. No Rust and no
# network needed. Fits one 8-minute run; prints one JSON summary (also RESULTS/summary.json):
#   - the golden fixtures on cuda:0 (logits, gradients, 3 AdamW steps) at fp32 and bf16
#     tolerances, and a world-size-1 NCCL all-reduce (`stackwise selfcheck`);
#   - GPT-2 124M training tokens/s and MFU, fp32 and bf16 autocast, StackWise vs PyTorch
#     (eager attention, as StackWise's, and SDPA), same GPU, same run;
#   - generation tokens/s, greedy with the KV cache, vs HF generate on the same weights.
# Usage: bash bench/gpu/run.sh [BINARY] [RESULTS]  (default bench/gpu/bin/stackwise, /tmp/gpu-results)
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-bench/gpu/bin/stackwise}")
res="${2:-/tmp/gpu-results}"
mkdir -p "$res"
py=${PYTHON:-python3}
log="$res/run.log"
: > "$log"
step() { echo "== $(date +%T) $*" | tee -a "$log" >&2; }
# Every step gets its own time limit, cut to what is left of the run's (BUDGET_S, default 450 s),
# so a hung step costs its own figure, not the summary.
deadline=$(( $(date +%s) + ${BUDGET_S:-450} ))
limit() { local left=$(( deadline - $(date +%s) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

# cudarc opens libcuda, libcublas(Lt), libcurand, libnvrtc and libnccl at run time by name:
# point the loader at the CUDA wheels PyTorch brings; NCCL's soname is libnccl.so.2, which cudarc
# does not try, so a link named libnccl.so goes beside it.
site=$("$py" -c 'import os, nvidia; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)
libdirs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
mkdir -p /tmp/sw-cudalibs
nccl=$(find "$site/nvidia" -name 'libnccl.so*' | head -1)
[ -n "$nccl" ] && ln -sf "$nccl" /tmp/sw-cudalibs/libnccl.so
export LD_LIBRARY_PATH="/tmp/sw-cudalibs:${libdirs}${LD_LIBRARY_PATH:-}"

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >> "$log" 2>&1
"$py" - "$res/env.json" <<'PY' 2>>"$log"
import json, sys, torch, transformers
from transformers import GPT2Config, GPT2LMHeadModel
m = GPT2LMHeadModel(GPT2Config())
n = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()
m.save_pretrained("/tmp/gpt2-124m")
json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].split(":", 1)[1].strip(),
           "gpt2_params_without_wpe": n, "seq": 1024}, open(sys.argv[1], "w"))
PY
"$bin" --version >> "$log" 2>&1 || { step "the binary does not start"; tail -5 "$log"; }

step "matmul peak (torch, 8192^3, bf16 and fp32 without TF32)"
"$py" - > "$res/peak.json" 2>>"$log" <<'PY'
import json, torch
torch.backends.cuda.matmul.allow_tf32 = False
out = {}
for name, dt in (("bf16_tflops", torch.bfloat16), ("fp32_tflops", torch.float32)):
    a = torch.randn(8192, 8192, device="cuda", dtype=dt); b = torch.randn(8192, 8192, device="cuda", dtype=dt)
    for _ in range(3): a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 20 if dt == torch.bfloat16 else 5
    s.record()
    for _ in range(n): a @ b
    e.record(); torch.cuda.synchronize()
    out[name] = round(2 * 8192**3 * n / (s.elapsed_time(e) / 1e3) / 1e12, 1)
print(json.dumps(out))
PY

step "selfcheck: golden fixtures on cuda:0 (fp32, bf16) + NCCL world size 1"
for ac in fp32 bf16; do
  a=$([ $ac = fp32 ] && echo off || echo bf16)
  timeout "$(limit 120)" "$bin" selfcheck --fixtures tests/fixtures --device cuda:0 --autocast "$a" > "$res/selfcheck_$ac.json" 2>>"$log" \
    || echo "selfcheck $ac: exit $?" >> "$log"
done

shape=(--layers 12 --d-model 768 --heads 12 --vocab 50257 --seq 1024 --batch 8 --steps 5)
for ac in fp32 bf16; do
  a=$([ $ac = fp32 ] && echo off || echo bf16)
  step "train GPT-2 124M, batch 8 x 1024, $ac: StackWise"
  timeout "$(limit 150)" "$bin" bench train "${shape[@]}" --device cuda:0 --autocast "$a" > "$res/train_stackwise_$ac.json" 2>>"$log" \
    || echo "stackwise train $ac: exit $?" >> "$log"
  for attn in eager sdpa; do
    step "train GPT-2 124M, $ac: PyTorch ($attn attention)"
    timeout "$(limit 120)" "$py" bench/train_throughput_torch.py "${shape[@]}" --device cuda --autocast "$a" --attn $attn \
      > "$res/train_torch_${attn}_$ac.json" 2>>"$log" || echo "torch $attn $ac: exit $?" >> "$log"
  done
done

step "generate: GPT-2 124M, 16 prompt + 256 new tokens, greedy, fp32"
timeout "$(limit 120)" "$bin" bench generate --model /tmp/gpt2-124m --device cuda:0 --prompt-tokens 16 --new-tokens 256 \
  > "$res/generate_stackwise.json" 2>>"$log" || echo "stackwise generate: exit $?" >> "$log"
prompt=$("$py" -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt"])))' "$res/generate_stackwise.json" 2>>"$log")
timeout "$(limit 120)" "$py" bench/gpu/hf_generate.py --model /tmp/gpt2-124m --prompt "${prompt:-1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16}" \
  --new-tokens 256 > "$res/generate_hf.json" 2>>"$log" || echo "hf generate: exit $?" >> "$log"

step "summary"
"$py" bench/gpu/summary.py "$res" | tee "$res/summary.json"
