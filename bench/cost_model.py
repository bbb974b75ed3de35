#!/usr/bin/env python3
"""A cost model, on paper, of one data-parallel training step (README: "What scales").

    python3 bench/cost_model.py        (standard library only; prints Markdown tables)

Every input is a constant below with where it comes from. Nothing here is measured on this
machine except where the README says so; the model is checked against published figures in
the README, not against StackWise runs on GPUs (none were available).
"""
import math

# --- hardware (published) -------------------------------------------------------------
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 FLOP/s (NVIDIA datasheet)
MFU = 0.40  # torchtitan reports 33-39 % for Llama 3.1 8B FSDP on 8 H100; llm.c ~60 % for 124M
GPUS_PER_NODE = 8
# nccl-tests all_reduce_perf bus bandwidth at large messages:
BUS_NVLINK = 450e9  # 8x H100 SXM NVLink 4: 460-480 GB/s published; 450 GB/s taken
BUS_IB = 360e9  # 8x 400 Gb/s NDR per node = 400 GB/s line rate; 90 % of it taken
ALPHA_NVLINK = 1e-6  # per ring hop inside a node (assumption)
ALPHA_IB = 5e-6  # per hop between nodes (assumption: IB ~1-2 us + NCCL protocol)
BUCKET = 25 * 2**20  # bytes per gradient bucket (PyTorch DDP's default 25 MiB)
SW_BUCKET = 4 * 2**20  # StackWise's bucket (worker/src/train/grad_sync.rs: BUCKET_FLOATS fp32)

# --- models: (name, parameters, layers, d_model, sequence length) ---------------------
MODELS = [
    ("GPT-2 124M", 124e6, 12, 768, 1024),
    ("1.3B", 1.3e9, 24, 2048, 2048),
    ("7B", 6.7e9, 32, 4096, 4096),
]
TOKENS_PER_GPU = 16384  # per step (weak scaling: the global batch grows with the GPUs)
WORLDS = [8, 64, 256, 1024]


def flops_per_token(p, layers, d, s):
    # 6 N for the dense layers (forward + backward) plus attention scores, 12 L d s.
    return 6 * p + 12 * layers * d * s


def allreduce(nbytes, n, algo):
    """Seconds for one all-reduce of `nbytes` over n GPUs (alpha-beta)."""
    nodes = max(1, n // GPUS_PER_NODE)
    bw = BUS_NVLINK if nodes == 1 else BUS_IB
    beta = 2 * (n - 1) / n * nbytes / bw  # what nccl-tests' busbw is defined against
    if algo == "ring":
        # 2(n-1) steps around one ring: n - nodes hops on NVLink, `nodes` hops on IB.
        hops_ib = nodes if nodes > 1 else 0
        alpha = 2 * ((n - hops_ib) * ALPHA_NVLINK + hops_ib * ALPHA_IB)
    else:
        # NCCL's double binary tree between nodes, a chain inside each node.
        alpha = 2 * (math.ceil(math.log2(nodes)) * ALPHA_IB + (GPUS_PER_NODE - 1) * ALPHA_NVLINK)
    return alpha + beta


def step(model, n, algo):
    name, p, layers, d, s = model
    compute = flops_per_token(p, layers, d, s) * TOKENS_PER_GPU / (PEAK_BF16 * MFU)
    backward = compute * 2 / 3
    grad_bytes = 2 * p  # bf16 gradients
    buckets = math.ceil(grad_bytes / BUCKET)
    comm = buckets * allreduce(min(BUCKET, grad_bytes), n, algo)
    # Buckets are reduced while the backward pass goes on; the last one cannot overlap.
    last = allreduce(min(BUCKET, grad_bytes), n, algo)
    exposed = max(0.0, comm - backward) + last
    return compute, comm, exposed


def step_stackwise(model, n):
    """StackWise: fp32 gradients in 4 MiB buckets (worker/src/train/grad_sync.rs), reduced
    while the backward pass runs, the last one after it; NCCL picks ring or tree itself."""
    name, p, layers, d, s = model
    compute = flops_per_token(p, layers, d, s) * TOKENS_PER_GPU / (PEAK_BF16 * MFU)
    grad_bytes, bucket = 4 * p, SW_BUCKET
    one = min(allreduce(min(bucket, grad_bytes), n, a) for a in ("ring", "tree"))
    comm = math.ceil(grad_bytes / bucket) * one
    return compute + max(0.0, comm - compute * 2 / 3) + one


def main():
    print(f"Inputs: {PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 x MFU {MFU:.0%}, {TOKENS_PER_GPU} tokens per GPU per step, "
          f"bf16 gradients in {BUCKET >> 20} MiB buckets, busbw {BUS_NVLINK / 1e9:.0f} GB/s NVLink / "
          f"{BUS_IB / 1e9:.0f} GB/s IB, alpha {ALPHA_NVLINK * 1e6:.0f} us / {ALPHA_IB * 1e6:.0f} us per hop.\n")
    print("| model | GPUs | compute ms | all-reduce ms, ring | all-reduce ms, tree | step ms, overlapped | exposed comm | tokens/s/GPU | step ms, StackWise |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        for n in WORLDS:
            compute, ring, ring_exposed = step(m, n, "ring")
            _, tree, tree_exposed = step(m, n, "tree")
            exposed = min(ring_exposed, tree_exposed)
            t = compute + exposed
            print(f"| {m[0]} | {n} | {compute * 1e3:.1f} | {ring * 1e3:.1f} | {tree * 1e3:.1f} | {t * 1e3:.1f} | "
                  f"{exposed / t:.0%} | {TOKENS_PER_GPU / t:,.0f} | {step_stackwise(m, n) * 1e3:.1f} |")
    print("\nChecks against published runs (same formulas, their inputs):\n")
    # torchtitan docs/performance.md: Llama 3.1 8B, FSDP, 8 H100, seq 8192, 33-39 % MFU,
    # 5,762 tokens/s/GPU measured.
    f8b = flops_per_token(8.0e9, 32, 4096, 8192)
    print(f"- Llama 3.1 8B at 36 % MFU: {PEAK_BF16 * 0.36 / f8b:,.0f} tokens/s/GPU predicted, 5,762 measured by torchtitan.")
    # llm.c (karpathy/llm.c discussion #481): GPT-2 124M, 10B tokens in ~90 min on 8 A100.
    f124 = flops_per_token(124e6, 12, 768, 1024)
    measured = 10e9 / (90 * 60) / 8
    print(f"- GPT-2 124M on A100 (312 TFLOP/s): llm.c's {measured:,.0f} tokens/s/GPU is "
          f"{measured * f124 / 312e12:.0%} MFU by this FLOP count.")
    print("\nOne 25 MiB bucket, ring vs tree (ms):\n")
    print("| GPUs | ring | tree |")
    print("|---:|---:|---:|")
    for n in [8, 16, 64, 256, 1024]:
        print(f"| {n} | {allreduce(BUCKET, n, 'ring') * 1e3:.3f} | {allreduce(BUCKET, n, 'tree') * 1e3:.3f} |")


def cpu_ring():
    """Up to which world size the CPU ring pays: GPT-2 124M, fp32 gradients in StackWise's
    4 MiB buckets, a fixed global batch of 64 Ki tokens (strong scaling), CPU nodes of
    0.5 TFLOP/s sustained (assumption), 10 GbE at 1.1 GB/s and 50 us per TCP hop
    (assumptions). The buckets are reduced during the backward pass (2/3 of the compute);
    what does not fit under it, and the last bucket, is exposed."""
    p, bw, alpha, cpu = 124e6, 1.1e9, 50e-6, 0.5e12
    f = flops_per_token(p, 12, 768, 1024)
    grad, bucket = 4 * p, SW_BUCKET
    print("\nThe CPU ring (GPT-2 124M, 64 Ki tokens per step in all, 0.5 TFLOP/s nodes, 10 GbE):\n")
    print("| nodes | compute s | all-reduce s | exposed s | exposed share of the step |")
    print("|---:|---:|---:|---:|---:|")
    for n in [2, 4, 8, 16, 32, 64, 128]:
        compute = f * 64 * 1024 / n / cpu
        one = 2 * (n - 1) / n * bucket / bw + 2 * (n - 1) * alpha
        comm = 2 * (n - 1) / n * grad / bw + math.ceil(grad / bucket) * 2 * (n - 1) * alpha
        exposed = max(0.0, comm - compute * 2 / 3) + one
        print(f"| {n} | {compute:.1f} | {comm:.2f} | {exposed:.2f} | {exposed / (compute + exposed):.0%} |")


if __name__ == "__main__":
    main()
    cpu_ring()
