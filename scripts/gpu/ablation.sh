#!/usr/bin/env bash
# The recipe ablation of issue 14 on one GPU: L1 only / + LPIPS-VGG / + LPIPS-VGG + PatchGAN (adaptive),
# on one budget (configs/ablation-*.yaml: same data, 2,400 steps of 32, schedule, EMA), each arm trained
# and then evaluated on photos256/val (200 images) and Kodak (24, full size).
#   bash scripts/gpu/ablation.sh l1                 # one arm per device call: ~4 min training + compile + eval
#   bash scripts/gpu/ablation.sh lpips
#   bash scripts/gpu/ablation.sh lpips-gan
#   bash scripts/gpu/ablation.sh all                # the three one after another (~20 min: more than one call)
#   NPROC=4 bash scripts/gpu/ablation.sh lpips-gan  # under torchrun on 4 GPUs (global batch 128, same steps)
#   EVAL=0 bash scripts/gpu/ablation.sh l1          # train only (evaluate later, e.g. on CPU from the copied model)
# Environment: VQTOK_DATA (default ../shared/data) holds photos256/{train,val}, photos-extra/<folders> and kodak;
# LPIPS weights come from $VQTOK_CACHE/lpips (a carried .gpudata/lpips is used when there); RUNS (default
# runs) holds the run directories; each arm's model, metrics and eval reports are copied to $OUT/<arm>/.
# A run that stops at its time budget resumes where it stopped when the same arm is started again.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
data=${VQTOK_DATA:-../shared/data}
runs=${RUNS:-runs}
out=${OUT:-$runs/ablation-results}
nproc=${NPROC:-1}
if [ -z "${VQTOK_CACHE:-}" ] && [ -d .gpudata/lpips ]; then export VQTOK_CACHE=$PWD/.gpudata; fi
mkdir -p "$runs" "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

train_arm() {
  local arm=$1
  local launcher=(python3 -m vqtok)
  if [ "$nproc" -gt 1 ]; then launcher=(torchrun --standalone --nproc-per-node "$nproc" -m vqtok); fi
  "${launcher[@]}" train --config "configs/ablation-$arm.yaml" --out "$runs/ablation-$arm" --resume \
    data.train="$data/photos256/train" "data.extra_train=[$data/photos-extra/*]" data.val="$data/photos256/val" \
    2>&1 | tee "$out/$arm.train.log" | grep -v Warning | tail -n 20
}

eval_arm() {
  local arm=$1 model=$runs/ablation-$1/model
  python3 -m vqtok eval --model "$model" --data "$data/photos256/val" --limit 200 --out "$out/$arm/val.json" 2>&1 | tail -n 25
  python3 -m vqtok eval --model "$model" --data "$data/kodak" --out "$out/$arm/kodak.json" 2>&1 | tail -n 25
}

run_arm() {
  local arm=$1
  [ -f "configs/ablation-$arm.yaml" ] || { echo "unknown arm $arm (l1, lpips, lpips-gan)" >&2; exit 2; }
  echo "== ablation-$arm"
  train_arm "$arm"
  mkdir -p "$out/$arm"
  cp "$runs/ablation-$arm/metrics.jsonl" "$runs/ablation-$arm/summary.json" "$runs/ablation-$arm/train_config.json" "$out/$arm/"
  if [ -f "$runs/ablation-$arm/model/model.safetensors" ]; then
    cp "$runs/ablation-$arm/model/config.json" "$runs/ablation-$arm/model/model.safetensors" "$out/$arm/"
  fi
  grep '"split": "val"' "$runs/ablation-$arm/metrics.jsonl" | tail -n 2
  if [ "${EVAL:-1}" = 1 ] && python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["finished"] else 1)' \
      "$runs/ablation-$arm/summary.json"; then
    eval_arm "$arm"
  elif [ "${EVAL:-1}" = 1 ]; then
    echo "ablation-$arm stopped before max_steps (time budget): run the same arm again to resume, then it is evaluated"
  fi
}

arms=("$@")
if [ "${#arms[@]}" -eq 0 ] || [ "${arms[0]}" = all ]; then arms=(l1 lpips lpips-gan); fi
for arm in "${arms[@]}"; do run_arm "$arm"; done
