#!/usr/bin/env bash
# Kernel (linear) attention: the linear form's forward + backward time at T = 256, 1024, 4096
# against the quadratic form measured in the same run. Prints the CPU it ran on.
#   bash bench/kernel_attention.sh [extra flags of target/release/kernel_attention]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p stackwise-bench --bin kernel_attention
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), threads ${RAYON_NUM_THREADS:-all}"
target/release/kernel_attention "$@"
