#!/usr/bin/env bash
# LoRA fine-tuning tokens/s: StackWise vs PyTorch + PEFT on the 6-layer d=384 GPT-2 shape,
# r 16 (alpha 32) on c_attn, attn.c_proj and mlp.c_proj (PEFT's suffix match of c_proj), the
# base frozen at fp32, batch 8 x 256, AdamW, 2 threads; the two run alternately.
#   bash bench/lora.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash bench/train_throughput.sh "${1:-3}" --lora-r 16 --lora-targets c_attn,c_proj
