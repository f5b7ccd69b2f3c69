#!/usr/bin/env bash
# Issue 13 items 5 (last sentence) and 6 on one GPU, one step per device call (each < 10 min):
#   bash scripts/gpu/serving_rest.sh soak-start [MINUTES] [FRONT_WORKERS]  # bench/service_soak.py detached (setsid), then waits 540 s
#   bash scripts/gpu/serving_rest.sh soak-wait [SECONDS]                    # wait for it (at most SECONDS), collect its results
#   bash scripts/gpu/serving_rest.sh two-servers [SECONDS]                  # bench/two_servers.py: 2 servers x 2 models on GPU 0
# Defaults: a 10-minute soak of the split server (8 fronts + 1 inference process, compiled runtime) at 85 % of
# its saturation rate at concurrency 128, reloading both models at the midpoint; two-servers loads for 20 s.
# Needs torch + CUDA on the host; fastapi, uvicorn, pydantic-settings, python-multipart, … carried as wheels in
# .whl/ (git-ignored, as for scripts/gpu/http_front.sh); 256² JPEGs in .gpudata/photos256/val (carry it, a copy of
# ../shared/data/photos256/val). The model repository is models/pretrained (both shipped models, in the tree; where
# only one travelled, two-servers serves it under two names, symlinks to the same files).
# The first server start compiles the kernels (≈ 2-3 min for two models, cached in $VQTOK_CACHE/inductor; the
# reload and the later starts load them). The soak outlives its call: soak-wait collects it in the next call
# (its JSON is rewritten every 10 s, so a cut-off run still leaves data); run two-servers only after it finished.
# Everything is copied to $OUT: service_soak_gpu.json, soak.log, soak_server.log; two_servers_gpu.json, two_servers.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export VQTOK_CACHE=${VQTOK_CACHE:-/tmp/vqtok-cache}
out=${OUT:-/tmp/out}
res=/tmp/res-serving
# overrides for a dry run of the steps on a CPU host: DEVICE=cpu CONCURRENCY=4 CLIENT_PROCS=1 SAMPLE_S=2 WINDOW_S=10;
# SERVER_ENV=NAME=VALUE: one extra variable for the soaked server (e.g. MALLOC_ARENA_MAX=2)
device=${DEVICE:-cuda}
concurrency=${CONCURRENCY:-128}
client_procs=${CLIENT_PROCS:-6}
mkdir -p "$out" "$res"
if [ -d .whl ] && [ ! -f /tmp/site/.whl-done ] && ! python3 -c 'import fastapi, uvicorn, pydantic_settings' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.whl-done
fi
images=""
for d in .gpudata/photos256/val shared/data/photos256/val ../shared/data/photos256/val; do
  [ -d "$d" ] && images=$d && break
done
[ -n "$images" ] || { echo "no photos256/val: carry .gpudata/photos256/val" >&2; exit 2; }
soak_running() { [ -f "$res/soak.pid" ] && kill -0 "$(cat "$res/soak.pid")" 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null
case "${1:?step}" in
soak-start)
  minutes=${2:-10}
  fronts=${3:-8}
  if soak_running; then
    echo "a soak is running already (pid $(cat "$res/soak.pid")): soak-wait collects it" >&2
    exit 2
  fi
  python3 -c 'import torch, fastapi, uvicorn, httpx; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "fastapi", fastapi.__version__)'
  rm -f "$res/soak.done" "$res/soak.rc" "$res/service_soak_gpu.json"
  setsid nohup bash -c "python3 -m bench.service_soak --model-repo models/pretrained --images $images --device $device --runtime auto \
    --front-workers $fronts --concurrency $concurrency --saturation-seconds 8 --fraction 0.85 --minutes $minutes \
    --max-batch-size 64 --client-procs $client_procs --decode-threads 4 --window-s ${WINDOW_S:-60} --sample-s ${SAMPLE_S:-10} ${SERVER_ENV:+--server-env $SERVER_ENV} \
    ${REVISION:+--revision $REVISION} --out $res/service_soak_gpu.json --server-log $res/soak_server.log; echo \$? >$res/soak.rc; touch $res/soak.done" \
    >"$res/soak.log" 2>&1 </dev/null &
  echo $! >"$res/soak.pid"
  sleep 5
  set -- soak-wait 540
  ;&
soak-wait)
  limit=${2:-540}
  t=0
  while [ ! -f "$res/soak.done" ] && [ "$t" -lt "$limit" ]; do
    sleep 10
    t=$((t + 10))
    cp "$res/soak.log" "$res/service_soak_gpu.json" "$out/" 2>/dev/null
  done
  cp "$res/soak.log" "$res/service_soak_gpu.json" "$out/" 2>/dev/null
  tail -c 2000000 "$res/soak_server.log" >"$out/soak_server.log" 2>/dev/null
  if [ -f "$res/soak.done" ]; then echo "soak finished (exit $(cat "$res/soak.rc" 2>/dev/null))"; else echo "soak still going"; fi
  grep -v -i "plugin EP\|warn" "$res/soak.log" | tail -n 40
  ;;
two-servers)
  if soak_running; then
    echo "the soak is still running: collect it with soak-wait first (two more servers would disturb it)" >&2
    exit 2
  fi
  repo=models/pretrained
  if [ "$(ls models/pretrained/*/manifest.json 2>/dev/null | wc -l)" -lt 2 ]; then
    # one model travelled (the 64 MiB transfer limit): the same files under a second name give the second model
    repo=/tmp/two-models
    rm -rf "$repo" && mkdir -p "$repo"
    for m in models/pretrained/*/manifest.json; do
      d=$(dirname "$m")
      ln -s "$PWD/$d" "$repo/$(basename "$d")" && ln -s "$PWD/$d" "$repo/$(basename "$d")-twin"
    done
    echo "one model in models/pretrained: serving $(ls "$repo" | tr '\n' ' ')(symlinks to the same files)"
  fi
  python3 -m bench.two_servers --model-repo "$repo" --images "$images" --device "$device" --runtime auto \
    --servers 2 --seconds "${2:-20}" --connections 4 --max-batch-size 32 --decode-threads 4 --startup-timeout 480 \
    ${REVISION:+--revision "$REVISION"} --out "$out/two_servers_gpu.json" 2>&1 | grep --line-buffered -v -i "plugin EP\|warn" | tee "$out/two_servers.log"
  ;;
*)
  echo "unknown step $1" >&2
  exit 2
  ;;
esac
exit 0
