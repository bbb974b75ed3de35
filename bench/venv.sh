# Sourced by the benchmarks that measure a PyTorch peer: sets $venv to bench/.venv, creating
# it with torch + transformers + peft (and httpx, the serve benchmark's client) on first use
# (about 3 GB, once). Pinned: .ci/run checks real PEFT with it (tests/py/check_finetune_peft.py).
venv=bench/.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, peft, httpx" 2>/dev/null; then
  echo "creating $venv with torch + transformers + peft + httpx (about 3 GB, once)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.15.0 transformers==5.25.0 peft==0.21.2 httpx==0.29.0
fi
