#!/usr/bin/env python3
"""The matrix products of one training step (6 layers, d=384, vocab 8192, 2048 tokens), in the
layouts a backward pass hands them (transposed views), timed with PyTorch's BLAS (MKL in the
x86-64 wheels) and NumPy's (OpenBLAS 0.3, DYNAMIC_ARCH). Prints the same JSON keys as
target/release/matmul_shapes (candle's gemm) so bench/gemm_peers.sh can compare them."""
import argparse
import json
import time

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--lib", choices=["mkl", "openblas"], required=True)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
rng = np.random.default_rng(0)


def tensor(*shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(x) if a.lib == "mkl" else x


def mm(x, y):
    return torch.matmul(x, y) if a.lib == "mkl" else np.matmul(x, y)


def t(x):  # a transposed view of the last two dims, as candle's backward passes them
    return x.transpose(-1, -2) if a.lib == "mkl" else np.swapaxes(x, -1, -2)


def timed(f):
    f()
    start = time.perf_counter()
    for _ in range(3):
        f()
    return (time.perf_counter() - start) / 3


n, d, v, layers = 2048, 384, 8192, 6
fwd = bwd_x = bwd_w = 0.0
for i, o in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]:
    x, w, g = tensor(n, i), tensor(i, o), tensor(n, o)
    fwd += layers * timed(lambda: mm(x, w))
    bwd_x += layers * timed(lambda: mm(g, t(w)))
    bwd_w += layers * timed(lambda: mm(t(x), g))
h, wte, gl = tensor(n, d), tensor(v, d), tensor(n, v)
head_f = timed(lambda: mm(h, t(wte)))
head_bx = timed(lambda: mm(gl, wte))
head_bw = timed(lambda: mm(t(gl), h))
q, k, p = tensor(8, 6, 256, 64), tensor(8, 6, 256, 64), tensor(8, 6, 256, 256)
att_f = layers * (timed(lambda: mm(q, t(k))) + timed(lambda: mm(p, k)))
att_b = layers * (timed(lambda: mm(p, k)) + timed(lambda: mm(t(p), q)) + timed(lambda: mm(p, k)) + timed(lambda: mm(q, t(k))))
print(json.dumps({
    "lib": a.lib, "forward_linear_s": fwd, "backward_dx_s": bwd_x, "backward_dw_s": bwd_w,
    "head_forward_s": head_f, "head_backward_dx_s": head_bx, "head_backward_dw_s": head_bw,
    "attention_forward_s": att_f, "attention_backward_s": att_b,
    "total_forward_s": fwd + head_f + att_f, "total_backward_s": bwd_x + bwd_w + head_bx + head_bw + att_b,
}))
