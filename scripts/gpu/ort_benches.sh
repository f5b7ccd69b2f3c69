#!/usr/bin/env bash
# GPU benchmarks, one step per device call (each well inside the 10-minute call limit). Needs
# onnxruntime-gpu in /tmp/site (the ort-gpu-parts calls) and, carried in .whl, fastapi, uvicorn, … and
# vector-quantize-pytorch (CIFAR peers). Data and the served model travel in .gpudata/ (git-ignored):
#   .gpudata/models/photo-f8-simvq-16k   the shipped model without its safetensors (ONNX + manifest)
#   .gpudata/photos256/val               ../shared/data/photos256/val
#   .gpudata/cifar10                     ../shared/data/cifar10
# Every step writes its log and JSON under $OUT as it goes, so a step cut short still returns data.
#   bash scripts/gpu/ort_benches.sh throughput PRESET   # bench/gpu_throughput.py, one preset, torch.compile included
#   bash scripts/gpu/ort_benches.sh serve               # shape probe, then HTTP against raw (bench.http_front, ONNX Runtime)
#   bash scripts/gpu/ort_benches.sh soak-start MINUTES  # bench.service_soak at 80 % of saturation (ONNX Runtime), detached from the call
#   bash scripts/gpu/ort_benches.sh soak-wait SECONDS   # wait for it (at most SECONDS), collect its results
#   bash scripts/gpu/ort_benches.sh ray-install         # join and install Ray (carried as .raywhl/a, .raywhl/b parts)
#   bash scripts/gpu/ort_benches.sh sweep               # bench/tokenize_local_sweep.py: local-engine settings
#   bash scripts/gpu/ort_benches.sh tokenize [POOL] [ENGINES]  # bench/tokenize_throughput.py (default: auto, host,local,ray,server)
#   bash scripts/gpu/ort_benches.sh cifar               # bench/quantizers_cifar10.py
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VQTOK_DATA=$PWD/.gpudata
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/res
if [ -d .whl ] && [ ! -f /tmp/site/.whl-done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.whl-done
fi
python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
case "${1:?step}" in
throughput)
  preset=${2:?preset}
  python3 -m bench.gpu_throughput --presets "$preset" --min-seconds 0.4 --time-budget 470 \
    --out "$out/gpu_throughput_$preset.json" 2>&1 | grep --line-buffered -v -i "warn\|onnx_ir\|torch.onnx\|^ *$" | tee "$out/throughput_$preset.log"
  ;;
serve)
  # first runs after warm-up per batch size (0.6-1 s each without per-shape sessions)
  python3 -m bench.ort_profile --shape-probe --probe-settings served --model .gpudata/models/photo-f8-simvq-16k --out "$out/shape_probe.json" 2>&1 | grep -v "plugin EP"
  python3 -m bench.http_front --model-repo .gpudata/models --images .gpudata/photos256/val --device cuda --runtime onnxruntime \
    --front-workers 0 --images-per-request 1 --concurrency 1,8,32,128 --duration 6 --client-procs 6 --decode-threads 8 --max-batch-size 32 \
    --batch-workers 1 --time-budget 280 --out "$out/http_front_ort_gpu.json" 2>&1 | grep --line-buffered -v "plugin EP" | tee "$out/serve.log"
  ;;
soak-start)
  # one level at concurrency 128, then MINUTES at 80 % of its rate, detached from this call
  minutes=${2:-10}
  rm -f /tmp/res/soak.done
  setsid nohup bash -c "python3 -m bench.service_soak --model-repo .gpudata/models --images .gpudata/photos256/val --device cuda \
    --runtime onnxruntime --front-workers 0 --concurrency 128 --saturation-seconds 8 --fraction 0.8 --minutes $minutes \
    --client-procs 6 --decode-threads 8 --max-batch-size 32 --out /tmp/res/service_soak_gpu.json --server-log /tmp/res/server.log; touch /tmp/res/soak.done" \
    >/tmp/res/soak.log 2>&1 </dev/null &
  sleep 5
  set -- soak-wait 560
  ;&
soak-wait)
  limit=${2:-560}
  t=0
  while [ ! -f /tmp/res/soak.done ] && [ "$t" -lt "$limit" ]; do
    sleep 10
    t=$((t + 10))
    cp /tmp/res/soak.log "$out/soak.log" 2>/dev/null
  done
  cp /tmp/res/soak.log /tmp/res/service_soak_gpu.json "$out/" 2>/dev/null
  tail -c 2000000 /tmp/res/server.log >"$out/server.log" 2>/dev/null
  [ -f /tmp/res/soak.done ] && echo "soak finished" || echo "soak still going"
  grep -v "plugin EP" /tmp/res/soak.log | tail -n 30
  ;;
ray-install)
  # Ray (80 MB) travels in two calls: `mkdir -p /tmp/rayparts && cp .raywhl/a/* /tmp/rayparts/`, then this
  # step carrying .raywhl/b; the wheels of its pure-Python dependencies and pandas come with the parts
  mkdir -p /tmp/rayparts && cp .raywhl/b/* /tmp/rayparts/
  cat /tmp/rayparts/raypart* >/tmp/rayparts/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/rayparts/*.whl
  python3 -c 'import ray, ray.data, pandas; print("ray", ray.__version__, "pandas", pandas.__version__)'
  ;;
sweep)
  model=${MODEL:-.gpudata/fp16only/photo-f8-simvq-16k}
  python3 -m bench.tokenize_local_sweep --model "$model" --device cuda --batch-size 64 --images 10000 --time-limit 420 \
    --variants host:thread,host:process,local:thread:c1,local:thread:c2,local:process:c1,local:process:c2,local:thread:c2:t1,local:process:c2:t1,local:thread:c2:w8 \
    --out "$out/tokenize_local_sweep_gpu.json" 2>&1 | grep --line-buffered -v -i warn | tee "$out/sweep.log"
  ;;
tokenize)
  model=${MODEL:-.gpudata/fp16only/photo-f8-simvq-16k}
  python3 -m bench.tokenize_throughput --model "$model" --batch-size 64 --engines "${3:-host,local,ray,server}" --images 20000 \
    --decode-pool "${2:-auto}" --device cuda --time-limit 420 --out "$out/tokenize_throughput_gpu.json" 2>&1 \
    | grep --line-buffered -v -i warn | tee "$out/tokenize.log"
  ;;
cifar)
  python3 -m bench.quantizers_cifar10 --data .gpudata/cifar10 --time-per-run 22 --out "$out" 2>&1 \
    | grep --line-buffered -v -i warn | tee "$out/cifar.log"
  ;;
*)
  echo "unknown step $1" >&2
  exit 2
  ;;
esac
