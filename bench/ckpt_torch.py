"""The peer of bench/src/bin/ckpt_bench.rs: torch.save / torch.load of the same state (a
124M-parameter fp32 GPT-2-small state dict plus AdamW's two moments) to local disk."""
import argparse, json, os, tempfile, time

import torch

p = argparse.ArgumentParser()
p.add_argument("--dir", default=None)
a = p.parse_args()
torch.manual_seed(0)
from transformers import GPT2Config, GPT2LMHeadModel

model = GPT2LMHeadModel(GPT2Config())
params = [p for p in model.parameters()]
opt = torch.optim.AdamW(params, lr=1e-4)
for p_ in params:
    p_.grad = torch.randn_like(p_) * 1e-3
opt.step()
state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
n = sum(p_.numel() for p_ in params)
d = tempfile.mkdtemp(dir=a.dir)
path = os.path.join(d, "ckpt.pt")
t = time.perf_counter()
torch.save(state, path)
os.sync()
save = time.perf_counter() - t
size = os.path.getsize(path)
t = time.perf_counter()
torch.load(path, weights_only=True)
load = time.perf_counter() - t
os.remove(path)
print(json.dumps({"impl": "torch.save", "params": n, "bytes": size, "save_s": save, "load_s": load,
                  "save_gbps": size / save / 1e9, "load_gbps": size / load / 1e9}))
