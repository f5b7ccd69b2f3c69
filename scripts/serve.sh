#!/usr/bin/env bash
# Sets up .venv (torch-free serving install; onnxruntime-gpu where an NVIDIA GPU is visible, else the CPU
# build) and serves the shipped default tokenizer.
# Extra arguments go to `vqtok serve` (e.g. --host 0.0.0.0 --port 8000); see `vqtok serve --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/vqtok ]; then
  bash scripts/setup.sh ort
fi
exec .venv/bin/vqtok serve "$@"
