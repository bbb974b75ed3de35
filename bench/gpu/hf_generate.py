#!/usr/bin/env python3
"""HF `generate` peer of `stackwise bench generate`: greedy decoding with the KV cache from the
same model folder and the same prompt ids, timed the same way (median of --rounds after a short
warm-up). Prints one JSON line."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--prompt", required=True, help="token ids, comma-separated")
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--device", default="cuda")
a = ap.parse_args()
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(a.device).eval()
ids = torch.tensor([[int(t) for t in a.prompt.split(",")]], device=a.device)


def run(n):
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t


run(8)
rates, tokens = [], []
for _ in range(a.rounds):
    tokens, s = run(a.new_tokens)
    rates.append(len(tokens) / s)
rates_sorted = sorted(rates)
print(json.dumps({"impl": "hf_generate", "device": a.device, "new_tokens": len(tokens), "tokens": tokens,
                  "tokens_per_s": rates_sorted[len(rates) // 2], "all_tokens_per_s": rates, "torch": torch.__version__}))
