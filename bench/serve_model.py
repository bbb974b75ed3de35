#!/usr/bin/env python3
"""The serve benchmark's model: a GPT-2 of 6 layers, d 384, 6 heads, 512 positions, seeded
random weights (transformers' own init), saved as an HF folder with the tokenizer given, so
StackWise and HF `generate` load the very same files.
Usage: serve_model.py TOKENIZER_JSON OUT_DIR"""
import json
import shutil
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

tok_path, out = sys.argv[1], sys.argv[2]
vocab = len(json.load(open(tok_path))["model"]["vocab"])
torch.manual_seed(0)
cfg = GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=512, vocab_size=vocab,
                 bos_token_id=0, eos_token_id=0)
GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
shutil.copy(tok_path, f"{out}/tokenizer.json")
print(f"{out}: GPT-2 6 x 384, vocab {vocab}")
