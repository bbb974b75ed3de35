#!/usr/bin/env python3
"""Check `stackwise eval --json` against transformers on HF model folders it has never seen.

    .venv/bin/python tests/py/check_eval_vs_hf.py path/to/stackwise TEXT_FILE [--seq-len 64]

Builds a GPT-2 and a LLaMA-GQA model (sizes unlike the test fixtures; seeded init with a
large initializer_range so logits are far from uniform), each with a byte-level BPE
tokenizer.json trained by HF `tokenizers` (the LLaMA one adds a BOS token, as LLaMA's does),
computes the run_clm-style loss with transformers (consecutive non-overlapping blocks of N
tokens of `tokenizer(text)["input_ids"]`, incomplete last block dropped), runs stackwise
eval on the same folder and prints both. Exits non-zero if they differ by > 1e-4 relative.
"""
import argparse
import json
import subprocess
import sys
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)


def tokenizer(text, vocab, bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<s>"] if bos else [])
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>" if bos else None)


def hf_loss(model, ids, n):
    blocks = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            x = torch.tensor([b])
            out = model(x, labels=x)
            total += out.loss.double().item() * (n - 1)
            count += n - 1
    return total / count, len(blocks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stackwise")
    ap.add_argument("text")
    ap.add_argument("--seq-len", type=int, default=64)
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    torch.manual_seed(0)
    cases = {
        "gpt2-3l-96d": (lambda v: GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=96, n_head=6, n_positions=128,
                                                               vocab_size=v, initializer_range=0.1)), False),
        "llama-3l-96d-gqa": (lambda v: LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=96,
                                                                    intermediate_size=200, num_attention_heads=6,
                                                                    num_key_value_heads=2, vocab_size=v,
                                                                    max_position_embeddings=128, rope_theta=5000.0,
                                                                    initializer_range=0.1)), True),
    }
    ok = True
    for name, (build, bos) in cases.items():
        tok = tokenizer(text, 700, bos)
        model = build(len(tok)).eval()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)
            ids = tok(text)["input_ids"]
            want, blocks = hf_loss(model, ids, a.seq_len)
            out = subprocess.run([a.stackwise, "eval", "--model", d, "--data", a.text, "--seq-len", str(a.seq_len),
                                  "--json"], capture_output=True, text=True, check=True)
            got = json.loads(out.stdout)
            rel = abs(got["loss"] - want) / want
            ok &= rel <= 1e-4 and got["blocks"] == blocks
            print(f"{name}: transformers {want:.6f} | stackwise {got['loss']:.6f} | rel diff {rel:.2e} | "
                  f"blocks {blocks} vs {got['blocks']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
