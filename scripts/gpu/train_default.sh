#!/usr/bin/env bash
# The default tokenizer's training on the GPU machine (issue 7), as the device calls ran it.
# The photos travel in .gpudata/photos256 (git-ignored copy of ../shared/data/photos256, carried).
#   bash scripts/gpu/train_default.sh pilot                 # SimVQ vs FSQ pilots, side by side
#   bash scripts/gpu/train_default.sh full PRESET STEPS MIN # one call of the full run (resumes)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
data=${VQTOK_GPU_DATA:-.gpudata/photos256}
runs=/tmp/runs
out=${OUT:-/tmp/out}
mkdir -p "$runs" "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

case "${1:?pilot or full}" in
pilot)
  minutes=${2:-4}
  for preset in f8-simvq-16k f8-fsq-64k; do
    python3 -m vqtok train --config configs/pilot.yaml --out "$runs/pilot-$preset" \
      model.preset="$preset" data.train="$data/train" data.val="$data/val" \
      time_budget_minutes="$minutes" > "$out/pilot-$preset.log" 2>&1 &
  done
  wait
  for preset in f8-simvq-16k f8-fsq-64k; do
    cp "$runs/pilot-$preset/metrics.jsonl" "$out/pilot-$preset.metrics.jsonl"
    echo "== $preset"; tail -c 600 "$out/pilot-$preset.log"; echo
    grep '"split": "val"' "$runs/pilot-$preset/metrics.jsonl" | tail -n 2
  done
  ;;
full)
  preset=${2:?preset}; steps=${3:?max steps}; minutes=${4:-9}; shift 4 || shift $#
  python3 -m vqtok train --config "configs/$preset.yaml" --out "$runs/full" --resume \
    model.preset="$preset" data.train="$data/train" data.val="$data/val" \
    max_steps="$steps" time_budget_minutes="$minutes" "$@" 2>&1 | tail -c 4000 | tee "$out/full.log"
  cp "$runs/full/metrics.jsonl" "$runs/full/summary.json" "$runs/full/train_config.json" "$out/"
  if [ -d "$runs/full/model" ]; then cp "$runs/full/model/config.json" "$runs/full/model/model.safetensors" "$out/"; fi
  grep '"split": "val"' "$runs/full/metrics.jsonl" | tail -n 3
  ;;
esac
