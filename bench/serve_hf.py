#!/usr/bin/env python3
"""HF `generate` on a model folder: greedy, exactly NEW new tokens (min = max), with the KV
cache, after one warm-up call; prints {"tokens_per_s": ...} of the median of REPS calls.
Usage: serve_hf.py MODEL_DIR PROMPT NEW [REPS] [THREADS]"""
import json
import statistics
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
rates = []
with torch.inference_mode():
    for i in range(reps + 1):
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, use_cache=True,
                             pad_token_id=0)
        dt = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == new, out.shape
        if i > 0:
            rates.append(new / dt)
print(json.dumps({"impl": "hf", "tokens_per_s": statistics.median(rates), "torch": torch.__version__}))
