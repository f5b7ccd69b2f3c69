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
