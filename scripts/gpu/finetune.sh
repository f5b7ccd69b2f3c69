#!/usr/bin/env bash
# Issue 14 on one GPU: the recipe ablation (three arms fine-tuning v1, concurrently) and the v2 default model.
# Training runs in the background (setsid), so it outlives one device call; `watch` waits and reports.
#   bash scripts/gpu/finetune.sh stage              # check the data, link photos-extra's parts into one folder
#   bash scripts/gpu/finetune.sh ablation           # start l1, lpips and lpips-gan (configs/ablation-*.yaml) at once
#   bash scripts/gpu/finetune.sh v2 [KEY=VALUE...]  # start configs/v2-f8-simvq-16k.yaml (overrides e.g. max_steps=4400)
#   bash scripts/gpu/finetune.sh wide [KEY=VALUE...]  # start configs/v2-wide-decoder.yaml (v1's encoder, a wider decoder)
#   bash scripts/gpu/finetune.sh watch SECONDS      # wait (until every started run ended, at most SECONDS), report;
#                                                   # $OUT/progress.tar.gz: every run's metrics, summary and log
#   bash scripts/gpu/finetune.sh collect RUN...     # $OUT/RUN.tar: the run's model (EMA weights), metrics, summary, log
# Data: .gpudata/ when present (a device copy, carried in parts: p256/{train,val}, xa/ and xb/ with photos-extra's
# folders, v1/ = the v1 model's config + weights, w/lpips/ = the LPIPS weights), else ../shared/data and the repo's
# models/pretrained. Runs live in runs/<name>/ (resumable: starting a run again resumes it).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-runs/out}
mkdir -p runs/logs "$out"

if [ -d .gpudata/p256 ]; then
  train=.gpudata/p256/train val=.gpudata/p256/val extra=.gpudata/extra v1=.gpudata/v1
  export VQTOK_CACHE=$PWD/.gpudata/w
else
  train=../shared/data/photos256/train val=../shared/data/photos256/val extra=../shared/data/photos-extra
  v1=models/pretrained/photo-f8-simvq-16k
fi
data_args=(data.train="$train" "data.extra_train=[$extra/*]" data.val="$val" model.init_from="$v1")

start() {  # start NAME CONFIG [OVERRIDES...]: one training process, detached from this call
  local name=$1 config=$2
  shift 2
  if [ -f "runs/logs/$name.pid" ] && kill -0 "$(cat "runs/logs/$name.pid")" 2>/dev/null; then
    echo "$name is running already (pid $(cat "runs/logs/$name.pid"))"
    return
  fi
  setsid nohup python3 -m vqtok train --config "$config" --out "runs/$name" --resume "${data_args[@]}" "$@" \
    >>"runs/logs/$name.log" 2>&1 </dev/null &
  echo $! >"runs/logs/$name.pid"
  echo "started $name (pid $!): $config $*"
}

report() {
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
  for pidfile in runs/logs/*.pid; do
    [ -f "$pidfile" ] || continue
    local name state
    name=$(basename "$pidfile" .pid)
    state=ended
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then state=running; fi
    printf '%s (%s): ' "$name" "$state"
    if [ -f "runs/$name/metrics.jsonl" ]; then
      python3 - "runs/$name/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r.get("split") == "train"]
val = [r for r in rows if r.get("split") == "val"]
t = train[-1] if train else {}
v = val[-1] if val else {}
print(f"step {t.get('step')} img/s {t.get('images_per_s')} loss {t.get('loss')} | val step {v.get('step')} psnr {v.get('psnr')} usage {v.get('usage')}")
EOF
    else
      tail -n 2 "runs/logs/$name.log" | tr '\n' ' '
      echo
    fi
    [ "$state" = ended ] && grep -E "^(finished|stopped)|Error|error:" "runs/logs/$name.log" | tail -n 3 || true
  done
}

case "${1:-}" in
  stage)
    if [ -d .gpudata/xa ]; then
      mkdir -p .gpudata/extra
      for d in .gpudata/xa/* .gpudata/xb/*; do ln -sfn "$PWD/$d" ".gpudata/extra/$(basename "$d")"; done
    fi
    for d in "$train" "$val" "$extra"/*; do printf '%6d images  %s\n' "$(find -L "$d" -name '*.jpg' | wc -l)" "$d"; done
    ls -la "$v1" "${VQTOK_CACHE:-$HOME/.cache/vqtok}/lpips" || true
    python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
    ;;
  ablation)
    for arm in l1 lpips lpips-gan; do start "ablation-$arm" "configs/ablation-$arm.yaml"; done
    ;;
  v2)
    shift
    start v2 configs/v2-f8-simvq-16k.yaml "$@"
    ;;
  wide)
    shift
    start v2-wide configs/v2-wide-decoder.yaml "$@"
    ;;
  watch)
    limit=${2:-60}
    t0=$SECONDS
    while [ $((SECONDS - t0)) -lt "$limit" ]; do
      running=0
      for pidfile in runs/logs/*.pid; do
        [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && running=1
      done
      [ "$running" = 0 ] && break
      sleep 15
      if [ $(((SECONDS - t0) % 120)) -lt 15 ]; then report; fi
    done
    report
    # one file back (the device returns at most 8): every run's metrics, summary and log
    tar -czf "$out/progress.tar.gz" runs/logs $(ls runs/*/metrics.jsonl runs/*/summary.json runs/*/train_config.json 2>/dev/null)
    ;;
  collect)
    shift
    for name in "$@"; do  # one tar a run (< 16 MiB: 15 MB of weights, the rest small)
      tar -cf "$out/$name.tar" "runs/$name/model/config.json" "runs/$name/model/model.safetensors" \
        "runs/$name/metrics.jsonl" "runs/$name/summary.json" "runs/$name/train_config.json" "runs/logs/$name.log"
    done
    ls -la "$out"
    ;;
  *)
    sed -n 2,13p "$0"
    exit 2
    ;;
esac
