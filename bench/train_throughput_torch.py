#!/usr/bin/env python3
"""PyTorch eager peer of `stackwise bench train` (cli/src/cli/bench.rs): the same GPT-2-style shape
(transformers GPT2LMHeadModel, eager attention, fp32), one full AdamW step per iteration; with
--lora-r, of PEFT LoRA adapters on the frozen model (get_peft_model, as HF PEFT scripts do)."""
import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=6)
ap.add_argument("--d-model", type=int, default=384)
ap.add_argument("--heads", type=int, default=6)
ap.add_argument("--vocab", type=int, default=8192)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lora-r", type=int)
ap.add_argument("--lora-targets", default="c_attn,c_proj")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--autocast", default="off", choices=["off", "bf16"], help="torch.autocast(dtype=bfloat16) around forward + loss")
ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="transformers attention implementation")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(1)
cfg = GPT2Config(n_layer=a.layers, n_embd=a.d_model, n_head=a.heads, vocab_size=a.vocab, n_positions=a.seq, attn_implementation=a.attn,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(cfg).to(a.device).train()
if a.lora_r:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, fan_in_fan_out=True,
                                             target_modules=a.lora_targets.split(","))).train()
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
ids = torch.randint(0, a.vocab, (a.batch, a.seq)).to(a.device)
cast = torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.autocast == "bf16")
times, cpu_times = [], []
for i in range(a.steps + 1):
    t = time.perf_counter()
    c = time.process_time()
    opt.zero_grad(set_to_none=True)
    with cast:
        loss = model(ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    last = loss.item()  # waits for the step's kernels, as the StackWise peer does
    if i > 0:
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
times.sort()
cpu_times.sort()
median = times[len(times) // 2]
print(json.dumps({"impl": "pytorch", "device": a.device, "autocast": a.autocast, "attn": a.attn, "batch": a.batch, "seq": a.seq, "lora_r": a.lora_r, "s_per_step": median, "all_s_per_step": times,
                  "tokens_per_s": a.batch * a.seq / median, "cpu_s_per_step": cpu_times[len(cpu_times) // 2], "params": sum(p.numel() for p in trainable),
                  "torch": torch.__version__, "last_loss": last,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability() if a.device == "cpu" else None}))
