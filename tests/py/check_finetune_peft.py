#!/usr/bin/env python3
"""Check that adapters `stackwise finetune` trains (lora, butterfly, butterfly_block) load in real PEFT.

    bench/.venv/bin/python tests/py/check_finetune_peft.py path/to/stackwise TEXT_FILE [--steps 30]

For a GPT-2 (Conv1D, fan_in_fan_out) and a LLaMA-GQA model built and saved by transformers
(sizes unlike the test fixtures), with a byte-level BPE tokenizer.json: prepares TEXT with that
tokenizer, runs `stackwise finetune` with LoRA on both and the butterfly modes on LLaMA (PEFT's BOFT
wraps nn.Linear only), then
- loads the newest checkpoint's `adapter/` with `PeftModel.from_pretrained` and computes the
  loss over TEXT (non-overlapping blocks, as `stackwise eval` does);
- compares it with `stackwise eval --model BASE --adapter ADAPTER` and with `stackwise eval
  --model RUN` (the base found through the manifest's reference);
- compares `stackwise adapter merge` with PEFT's `merge_and_unload` weights.
Exits non-zero when a loss differs by more than 1e-4 (relative) or a merged weight by more than 1e-5.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "fixtures")]
from check_eval_vs_hf import hf_loss, tokenizer  # noqa: E402
from make_fixtures import pure_torch_block_diag  # noqa: E402


def sw(bin_, *args):
    out = subprocess.run([bin_, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"stackwise {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def eval_loss(bin_, model, text, n, adapter=None):
    args = ["eval", "--model", model, "--data", text, "--seq-len", str(n), "--json"]
    if adapter:
        args += ["--adapter", adapter]
    return json.loads(sw(bin_, *args))["loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stackwise")
    ap.add_argument("text")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    torch.manual_seed(0)
    # PEFT's BOFT without its CUDA extension forces one butterfly factor; the fixtures' pure-torch
    # block diagonal gives it the real ones.
    pure_torch_block_diag()
    gpt2 = lambda v: GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=96, n_head=6, n_positions=128, vocab_size=v,
                                                initializer_range=0.1))
    llama = lambda v: LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=96, intermediate_size=192,
                                                   num_attention_heads=6, num_key_value_heads=2, vocab_size=v,
                                                   max_position_embeddings=128, rope_theta=5000.0,
                                                   initializer_range=0.1))
    cases = {
        "gpt2-3l-96d lora": (gpt2, False, "c_attn,c_proj", ["--mode", "lora", "--lora-r", "4", "--lora-alpha", "8"]),
        "llama-3l-96d-gqa lora": (llama, True, "q_proj,v_proj,down_proj",
                                  ["--mode", "lora", "--lora-r", "4", "--lora-alpha", "8"]),
        # 2x2 blocks, 5 butterfly stages (the most 96 = 2^5 * 3 allows).
        "llama-3l-96d-gqa butterfly": (llama, True, "q_proj,v_proj,down_proj", ["--mode", "butterfly"]),
        "llama-3l-96d-gqa butterfly_block": (llama, True, "q_proj,v_proj,down_proj",
                                             ["--mode", "butterfly_block", "--butterfly-block-size", "32"]),
    }
    ok = True
    for name, (build, bos, targets, mode) in cases.items():
        tok = tokenizer(text, 700, bos)
        with tempfile.TemporaryDirectory() as d:
            base = os.path.join(d, "base")
            build(len(tok)).eval().save_pretrained(base, safe_serialization=True)
            tok.save_pretrained(base)
            sw(a.stackwise, "data", "prepare", a.text, "--out", f"{d}/data", "--tokenizer", f"{base}/tokenizer.json")
            sw(a.stackwise, "finetune", "--model", base, "--data", f"{d}/data", *mode, "--out", f"{d}/out",
               "--steps", str(a.steps), "--batch-size", "4", "--seq-len", str(a.seq_len), "--lr", "5e-3",
               "--warmup-steps", "2", "--eval-every", "0",
               "--checkpoint-every", str(a.steps), "--target-modules", targets, "--no-progress")
            run = f"{d}/out/runs/finetune"
            adapter = f"{run}/checkpoints/step-{a.steps:08d}/adapter"
            plain = AutoModelForCausalLM.from_pretrained(base).eval()
            plain_weights = {k: v.clone() for k, v in plain.state_dict().items()}
            ids = tok(text)["input_ids"]
            base_loss, _ = hf_loss(plain, ids, a.seq_len)
            peft_model = PeftModel.from_pretrained(plain, adapter).eval()
            want, _ = hf_loss(peft_model, ids, a.seq_len)
            got_adapter = eval_loss(a.stackwise, base, a.text, a.seq_len, adapter)
            got_run = eval_loss(a.stackwise, run, a.text, a.seq_len)
            rel = max(abs(got_adapter - want), abs(got_run - want)) / want
            ok &= rel <= 1e-4 and want < base_loss
            print(f"{name}: base {base_loss:.6f} | PEFT with the trained adapter {want:.6f} | stackwise eval "
                  f"--adapter {got_adapter:.6f} | on the run {got_run:.6f} | rel diff {rel:.2e}")
            merged = f"{d}/merged"
            sw(a.stackwise, "adapter", "merge", "--model", base, "--adapter", adapter, "--out", merged)
            ref = peft_model.merge_and_unload().state_dict()
            ours = load_file(f"{merged}/model.safetensors")
            shared = [k for k in ours if k in ref]
            adapted = [k for k in shared if k.endswith(".weight") and any(t in k for t in targets.split(","))]
            worst = max((ours[k] - ref[k]).abs().max().item() for k in shared)
            moved = min((ref[k] - plain_weights[k]).abs().max().item() for k in adapted)
            ok &= worst <= 1e-5 and len(shared) == len(ours) and moved > 0
            print(f"{name}: adapter merge vs PEFT merge_and_unload: max |diff| {worst:.2e} over {len(shared)} tensors, "
                  f"{len(adapted)} of them adapted (the least moved by {moved:.2e} from the base)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
