#!/usr/bin/env bash
# Builds a stripped `stackwise` release binary with `--features cuda` on a machine with no GPU and
# no CUDA installed, to carry to a GPU machine (bench/gpu/run.sh runs it there).
#
# - nvcc, the CUDA headers and libdevice come from PyPI's CUDA 13.0 wheels, in bench/gpu/.venv-nvcc.
#   candle-kernels compiles its kernels to PTX with it, for CUDA_COMPUTE_CAP (default 90, Hopper).
# - No CUDA library is a run-time link dependency: cudarc loads libcuda, cuBLAS, cuRAND, NVRTC and
#   NCCL when first used (`dynamic-loading`; third_party/README.md says how candle-core was patched
#   for it), and the CUDA runtime, which candle-kernels' MoE kernels call, is linked statically from
#   the wheel's libcudart_static.a. Nothing but that wheel is needed to link.
# - The binary lands in target/cuda/release/stackwise; the last line printed is its path.
#
# Usage: bash bench/gpu/build.sh        (CUDA_COMPUTE_CAP=80 for A100, 89 for L4/RTX 40xx)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=bench/gpu/.venv-nvcc
if [ ! -x "$venv/bin/nvcc-ok" ]; then
    echo "== nvcc from PyPI (CUDA 13.0 wheels) into $venv" >&2
    python3 -m venv "$venv"
    # nvvm is pinned: unpinned, pip pulls a newer nvvm whose libdevice nvcc 13.0 rejects.
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*"
    touch "$venv/bin/nvcc-ok"
fi
cuda_root=$(echo "$PWD/$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cuda_root/bin/nvcc" ] || { echo "no nvcc in $cuda_root/bin" >&2; exit 1; }
export PATH="$cuda_root/bin:$PATH"
export CUDA_ROOT="$cuda_root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
# candle-kernels' MoE / GGUF kernels are 32 MB of sm_90a code as nvcc packs it by default;
# zstd-packed (`size`), 4x smaller, which keeps the binary under 60 MB. The driver unpacks it
# when the binary starts.
export NVCC_APPEND_FLAGS="--compress-mode=size"
nvcc --version | tail -2 >&2

# candle-kernels' MoE and GGUF kernels are compiled code that calls the CUDA runtime, and ask for
# `-lcudart`. A libcudart.a naming the wheel's libcudart_static.a satisfies that at link time (the
# linker takes an archive where no .so is on its path): the runtime is then inside the binary
# and opens the driver (libcuda.so.1) itself when it starts. Passed to the final link only
# (`cargo rustc -- -L`), so the dependencies' builds do not change.
link_dir="$PWD/target/cuda/link"
mkdir -p "$link_dir"
ln -sf "$cuda_root/lib/libcudart_static.a" "$link_dir/libcudart.a"

echo "== cargo build --release --features cuda (compute capability $CUDA_COMPUTE_CAP)" >&2
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo rustc --release --locked --features cuda -p stackwise --bin stackwise --target-dir target/cuda \
    -- -L "native=$link_dir" >&2

bin=target/cuda/release/stackwise
# Nothing from CUDA may be a link-time dependency: the GPU machine's libraries are found at run time.
if ldd "$bin" | grep -Ei 'libcuda|libcublas|libcurand|libnvrtc|libnccl' >&2; then
    echo "error: $bin links CUDA libraries; it would not start on a machine without them" >&2
    exit 1
fi
size=$(stat -c %s "$bin")
echo "== $bin: $((size / 1024 / 1024)) MiB, stripped" >&2
if [ "$size" -ge $((60 * 1000 * 1000)) ]; then
    echo "error: $bin is $size bytes, over the 60 MB a GPU machine's carry allows" >&2
    exit 1
fi
echo "$PWD/$bin"
