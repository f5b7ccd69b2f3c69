#!/usr/bin/env bash
# Issue 30 on one GPU: the f16 tokenizers (256 tokens at 256²), VQ and FSQ, each at two widths of the new
# coarsest level, trained side by side; the narrower or wider pair is stopped once the validation curves and
# images/s say which to keep, and the kept pair trains on alone. Runs are detached (setsid), checkpoint every
# 250 steps and resume when started again, so one run spans several device calls.
#   bash scripts/gpu/budgets.sh pack [PARTS] [extra] # HERE: .gpudata/p0..p{PARTS-1} (default 4), one tar of the data
#                                                    # split for transfer; photos-extra only with `extra`
#   bash scripts/gpu/budgets.sh stage                # THERE: join and unpack the parts into .gpudata/d
#   bash scripts/gpu/budgets.sh start [RUN...]       # start (or resume) vq-n vq-w fsq-n fsq-w (default: all four)
#   bash scripts/gpu/budgets.sh watch SECONDS        # wait (at most SECONDS, or until every run ended), report;
#                                                    # $OUT/progress.tar.gz: every run's metrics, summary and log
#   bash scripts/gpu/budgets.sh stop RUN...          # SIGTERM: the run stops after its step, checkpoints, exports
#   bash scripts/gpu/budgets.sh collect RUN...       # $OUT: the run's model (EMA weights) in parts of < 16 MiB
# Widths: *-n keeps 96 channels at the new level (channel_mult 1,1,2,2,2), *-w has the preset's 192 (1,1,2,2,4).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-runs/out}
d=.gpudata/d

config_of() { case $1 in vq-*) echo configs/f16-simvq-16k.yaml ;; fsq-*) echo configs/f16-fsq-64k.yaml ;; esac; }
width_of() { case $1 in *-n) echo "model.overrides.channel_mult=[1,1,2,2,2]" ;; *-w) echo "model.overrides.channel_mult=[1,1,2,2,4]" ;; esac; }

start() {
  local name=$1
  mkdir -p runs/logs
  if [ -f "runs/logs/$name.pid" ] && kill -0 "$(cat "runs/logs/$name.pid")" 2>/dev/null; then
    echo "$name is running already"
    return
  fi
  local extra=("data.extra_train=[]" "data.train_weights=[]")  # photos256/train alone where photos-extra did not travel
  [ -d $d/extra ] && extra=("data.extra_train=[$d/extra/*]")
  VQTOK_CACHE=$PWD/$d/w setsid nohup python3 -m vqtok train --config "$(config_of "$name")" --out "runs/$name" --resume \
    "$(width_of "$name")" data.train=$d/p256/train "${extra[@]}" data.val=$d/p256/val \
    model.init_from=$d/v2 >>"runs/logs/$name.log" 2>&1 </dev/null &
  echo $! >"runs/logs/$name.pid"
  echo "started $name (pid $!)"
}

running() { [ -f "runs/logs/$1.pid" ] && kill -0 "$(cat "runs/logs/$1.pid")" 2>/dev/null; }

report() {
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
  for pidfile in runs/logs/*.pid; do
    [ -f "$pidfile" ] || continue
    local name
    name=$(basename "$pidfile" .pid)
    printf '%s (%s): ' "$name" "$(running "$name" && echo running || echo ended)"
    if [ -f "runs/$name/metrics.jsonl" ]; then
      python3 - "runs/$name/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r.get("split") == "train"]
val = [r for r in rows if r.get("split") == "val"]
t = train[-1] if train else {}
curve = " ".join(f"{r['step']}:{r.get('psnr', float('nan')):.2f}/{r.get('usage', float('nan')):.2f}" for r in val[-6:])
print(f"step {t.get('step')} img/s {t.get('images_per_s')} | val psnr/usage {curve}")
PY
    else
      tail -n 2 "runs/logs/$name.log" | tr '\n' ' '
      echo
    fi
    grep -E "Error|error:|Traceback" "runs/logs/$name.log" | tail -n 3 || true
  done
}

case "${1:-}" in
  pack)
    parts=${2:-4}
    rm -rf .gpudata && mkdir -p .gpudata/d/p256 .gpudata/d/v2 .gpudata/d/w/lpips
    cp -r ../shared/data/photos256/train ../shared/data/photos256/val .gpudata/d/p256/
    if [ "${3:-}" = extra ]; then
      mkdir -p .gpudata/d/extra
      for g in clothing houses pets scenes; do cp -r "../shared/data/photos-extra/$g" .gpudata/d/extra/; done
    fi
    cp models/pretrained/photo-f8-simvq-16k-v2/config.json models/pretrained/photo-f8-simvq-16k-v2/model.safetensors .gpudata/d/v2/
    # LPIPS-VGG in float16 for the transfer (half the bytes); loading casts it back to the float32 parameters
    .venv/bin/python -c "
from safetensors.torch import load_file, save_file
from training.lpips import weights_path
save_file({k: v.half() for k, v in load_file(str(weights_path('vgg'))).items()}, '.gpudata/d/w/lpips/lpips_vgg.safetensors')"
    tar -cf .gpudata/all.tar -C .gpudata d && rm -rf .gpudata/d
    split -n "$parts" -d -a 1 .gpudata/all.tar .gpudata/part && rm .gpudata/all.tar
    for ((i = 0; i < parts; i++)); do mkdir -p ".gpudata/p$i" && mv ".gpudata/part$i" ".gpudata/p$i/part"; done
    du -sh .gpudata/p*
    ;;
  stage)
    if [ ! -d $d ]; then
      cat .gpudata/p[0-9]/part | tar -xf - -C .gpudata
    fi
    for x in $d/p256/train $d/p256/val $d/extra/*; do
      if [ -d "$x" ]; then printf '%6d images  %s\n' "$(find "$x" -name '*.jpg' | wc -l)" "$x"; fi
    done
    ls -la $d/v2 $d/w/lpips
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    python3 -c 'import torch; print("torch", torch.__version__)'
    ;;
  start)
    shift
    for name in "${@:-vq-n vq-w fsq-n fsq-w}"; do for n in $name; do start "$n"; done; done
    ;;
  watch)
    limit=${2:-60}
    t0=$SECONDS
    while [ $((SECONDS - t0)) -lt "$limit" ]; do
      any=0
      for pidfile in runs/logs/*.pid; do running "$(basename "$pidfile" .pid)" && any=1; done
      [ "$any" = 0 ] && break
      sleep 10
      if [ $(((SECONDS - t0) % 120)) -lt 10 ]; then report; fi
    done
    report
    tar -czf "$out/progress.tar.gz" runs/logs $(ls runs/*/metrics.jsonl runs/*/summary.json runs/*/train_config.json 2>/dev/null)
    ;;
  stop)
    shift
    for name in "$@"; do running "$name" && kill -TERM "$(cat "runs/logs/$name.pid")" && echo "asked $name to stop"; done
    for name in "$@"; do
      for _ in $(seq 120); do running "$name" || break; sleep 1; done
      tail -n 3 "runs/logs/$name.log"
    done
    ;;
  collect)
    shift
    for name in "$@"; do
      tar -cf "/tmp/$name.tar" "runs/$name/model" "runs/$name/metrics.jsonl" "runs/$name/summary.json" "runs/$name/train_config.json" "runs/logs/$name.log"
      split -b 15M -d -a 1 "/tmp/$name.tar" "$out/$name.tar.part"
    done
    ls -la "$out"
    ;;
  *)
    sed -n 2,14p "$0"
    exit 2
    ;;
esac
