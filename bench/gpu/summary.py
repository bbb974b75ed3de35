#!/usr/bin/env python3
"""Folds the outputs of bench/gpu/run.sh (one file per measurement in DIR) into one JSON summary:
golden checks on the GPU, training tokens/s and MFU of StackWise and PyTorch in fp32 and bf16,
generation tokens/s against HF generate, and the NCCL smoke test."""
import json
import os
import sys

d = sys.argv[1]


def load(name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return {"error": f"{name}: not produced (see the log)"}
    text = open(p).read().strip()
    try:
        return json.loads(text)
    except ValueError:
        # a JSON line after log lines
        for line in reversed(text.splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return {"error": f"{name}: no JSON in it", "tail": text[-2000:]}


env = load("env.json")
peak = load("peak.json")
n_params = env.get("gpt2_params_without_wpe")
L, dm, T = 12, 768, env.get("seq", 1024)
# nanoGPT / PaLM: 6 N per token for the dense work plus 12 L d T for attention scores and mixing.
flops_per_token = 6 * n_params + 12 * L * dm * T if n_params else None
datasheet = {"bf16": 989.4e12, "fp32": 66.9e12}  # H100/H200 SXM dense, NVIDIA datasheet


def train(name, dtype):
    r = load(name)
    if "tokens_per_s" in r and flops_per_token:
        achieved = r["tokens_per_s"] * flops_per_token
        r["achieved_tflops"] = round(achieved / 1e12, 2)
        r["mfu_datasheet"] = round(achieved / datasheet[dtype], 4)
        key = "bf16_tflops" if dtype == "bf16" else "fp32_tflops"
        if peak.get(key):
            r["mfu_measured_peak"] = round(achieved / (peak[key] * 1e12), 4)
    return r


training = {}
for dtype in ("fp32", "bf16"):
    sw = train(f"train_stackwise_{dtype}.json", dtype)
    eager = train(f"train_torch_eager_{dtype}.json", dtype)
    sdpa = train(f"train_torch_sdpa_{dtype}.json", dtype)
    row = {"stackwise": sw, "pytorch_eager": eager, "pytorch_sdpa": sdpa}
    for peer in ("pytorch_eager", "pytorch_sdpa"):
        if "tokens_per_s" in sw and "tokens_per_s" in row[peer]:
            row[f"ratio_vs_{peer}"] = round(sw["tokens_per_s"] / row[peer]["tokens_per_s"], 3)
    training[dtype] = row

gen_sw, gen_hf = load("generate_stackwise.json"), load("generate_hf.json")
generation = {"stackwise": gen_sw, "hf_generate": gen_hf}
if "tokens_per_s" in gen_sw and "tokens_per_s" in gen_hf:
    generation["ratio"] = round(gen_sw["tokens_per_s"] / gen_hf["tokens_per_s"], 3)
    a, b = gen_sw.get("tokens", []), gen_hf.get("tokens", [])
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    generation["greedy_tokens_equal_prefix"] = same
for g in (gen_sw, gen_hf):
    g.pop("tokens", None)
    g.pop("prompt", None)

golden = {k: load(f"selfcheck_{k}.json") for k in ("fp32", "bf16")}
summary = {
    "env": env,
    "matmul_peak": peak,
    "flops_per_token": flops_per_token,
    "golden": {k: {"ok": v.get("ok"), "tolerances": v.get("tolerances"), "fixtures": v.get("fixtures"), "error": v.get("error")}
               for k, v in golden.items()},
    "nccl_world_size_1": golden["fp32"].get("nccl"),
    "training_gpt2_124m": training,
    "generation_gpt2_124m": generation,
}
print(json.dumps(summary, indent=1))
