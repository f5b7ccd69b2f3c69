#!/usr/bin/env bash
# Issue 13 on one GPU: the served runtime against torch (256² and 512²), then the HTTP sweep, one step per
# device call (each < 10 min; results under $OUT as they come, and kept in /tmp/res between calls).
# The host: Python 3.12 with torch 2.11 + CUDA; fastapi, uvicorn, pydantic, simplejpeg, ... travel as wheels
# in .whl/ (git-ignored; cp312 manylinux: `pip download --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 --no-deps -d .whl PKG`); 256² JPEGs as .gpudata/photos256/val (a copy of
# ../shared/data/photos256/val). The tracked tree is ~99 MB (two shipped models) and one call carries at most
# 64 MiB, so move models/pretrained/photo-f8-simvq-16k (v1) out of the tree for these calls: the default (v2)
# is what is measured.
# With v1 out, the tree is ~51 MiB and .whl ~11 MiB (pytest included, for the check step): carry at most 90 of
# the 150 photos (2.9 MiB), or the call is refused as larger than 64 MiB. The first runtime start compiles its kernels (≈ 2-3 min cold; cached in $VQTOK_CACHE).
#   bash scripts/gpu/serving.sh setup      # carry .whl: installs it into /tmp/site
#   bash scripts/gpu/serving.sh check      # the compiled runtime's CUDA-only tests (threads at once give the tokens of one at a time)
#   bash scripts/gpu/serving.sh runtime    # carry .gpudata/photos256: served runtime, cold then warm start (RUNTIME_BATCHES, RUNTIME_SIZES)
#   bash scripts/gpu/serving.sh torch      # torch eager fp32 and torch.compile bf16 (TORCH_MODES, one per call) at the same shapes
#   bash scripts/gpu/serving.sh http [0,8] # bench/http_front.py: raw vs HTTP, fronts 0 and 8, c 32-256, 1 and 8 img/request
#                                          # (HTTP_CONCURRENCY, HTTP_IMAGES, HTTP_BUDGET, HTTP_CLIENT_PROCS, HTTP_BATCH_WORKERS (1,2: a
#                                          # server each; 0, the default: the server's), HTTP_DELAY_MS (the batcher's); HTTP_NAME names the files)
#   bash scripts/gpu/serving.sh reload     # bench/reload_memory.py: what a closed version leaves on the GPU (buckets to 8)
#   bash scripts/gpu/serving.sh all        # runtime then torch in one process (one run: the same-run ratios)
#   bash scripts/gpu/serving.sh local      # bench/ray_scale.py --engines local: the local tokenize engine vs raw
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export VQTOK_CACHE=${VQTOK_CACHE:-/tmp/vqtok-cache}
out=${OUT:-/tmp/out}
rev=${REVISION:-$(git rev-parse --short HEAD 2>/dev/null)}
mkdir -p "$out" /tmp/res
images=.gpudata/photos256/val
quiet() { grep --line-buffered -v -i "plugin EP\|warn"; }
case "${1:?step}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.whl-done
  python3 -c 'import torch, fastapi, uvicorn, simplejpeg; print("torch", torch.__version__, torch.cuda.get_device_name(0), "fastapi", fastapi.__version__, "simplejpeg", simplejpeg.__version__)'
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
  nproc
  ;;
check)
  VQTOK_DATA=$PWD/.gpudata python3 -m pytest -q -p no:cacheprovider tests/service/test_compiled_cuda.py 2>&1 | quiet | tee "$out/check.log"
  exit "${PIPESTATUS[0]}"
  ;;
runtime)
  # cold: an empty Inductor cache; then warm: a second process on the cache the first one left
  rm -rf "$VQTOK_CACHE"
  python3 -m bench.serving_gpu --images "$images" --part runtime ${RUNTIME_BATCHES:+--batches "$RUNTIME_BATCHES"} ${RUNTIME_SIZES:+--sizes "$RUNTIME_SIZES"} --revision "$rev" --out /tmp/res/serving_gpu_cold.json 2>&1 | quiet | tee "$out/runtime_cold.log"
  cp /tmp/res/serving_gpu_cold.json "$out/"
  python3 -m bench.serving_gpu --images "$images" --part runtime ${RUNTIME_BATCHES:+--batches "$RUNTIME_BATCHES"} ${RUNTIME_SIZES:+--sizes "$RUNTIME_SIZES"} --revision "$rev" --out /tmp/res/serving_gpu.json 2>&1 | quiet | tee "$out/runtime.log"
  cp /tmp/res/serving_gpu.json "$out/"
  ;;
torch)
  # one mode per call fits (twelve cold compiles a mode: ≈ 5 min): TORCH_MODES=default, then TORCH_MODES=reduce-overhead;
  # each call adds its rows to /tmp/res/serving_gpu.json (the runtime step's file on this machine)
  # max-autotune-no-cudagraphs did not finish one shape's encode+decode in 490 s (H100, 797bc95): time it alone with
  # TORCH_MODES=max-autotune-no-cudagraphs TORCH_OPS=decode TORCH_SIZES=256 TORCH_BATCHES=64; a second call resumes its tuning
  timeout "${TORCH_TIMEOUT:-560}" python3 -m bench.serving_gpu --images "$images" --part torch --torch-modes "${TORCH_MODES:-default}" \
    ${TORCH_OPS:+--torch-ops "$TORCH_OPS"} ${TORCH_SIZES:+--sizes "$TORCH_SIZES"} ${TORCH_BATCHES:+--batches "$TORCH_BATCHES"} \
    --revision "$rev" --out /tmp/res/serving_gpu.json 2>&1 | quiet | tee "$out/torch.log"
  cp /tmp/res/serving_gpu.json "$out/"
  ;;
reload)
  python3 -m bench.reload_memory --cycles 3 --max-batch-size 8 --sites --out "$out/reload_memory_gpu.json" 2>&1 | quiet | tee "$out/reload_memory.log"
  ;;
all)
  # on a warm Inductor cache only: cold, the runtime's warm-up (≈ 190 s) and the torch compiles do not fit one call
  # COMPILE_MODE=max-autotune: the served runtime autotuned too (≈ 200 s a shape and part on an empty cache: with
  # RUNTIME_BATCHES=64 TORCH_OPS=decode TORCH_MODES=max-autotune-no-cudagraphs, two calls; the second resumes from the cache)
  timeout "${ALL_TIMEOUT:-540}" python3 -m bench.serving_gpu --images "$images" --part all --torch-modes "${TORCH_MODES:-default,reduce-overhead}" \
    ${RUNTIME_BATCHES:+--batches "$RUNTIME_BATCHES"} ${RUNTIME_SIZES:+--sizes "$RUNTIME_SIZES"} ${TORCH_OPS:+--torch-ops "$TORCH_OPS"} \
    ${COMPILE_MODE:+--compile-mode "$COMPILE_MODE"} --revision "$rev" --out /tmp/res/serving_gpu.json 2>&1 | quiet | tee "$out/serving_all.log"
  cp /tmp/res/serving_gpu.json "$out/"
  ;;
local)
  OMP_NUM_THREADS=1 VQTOK_DATA=$PWD/.gpudata timeout "${LOCAL_TIMEOUT:-300}" python3 -m bench.ray_scale --model models/pretrained/photo-f8-simvq-16k-v2 \
    --engines local --batch-size 64 --seconds 22 --time-limit 280 --revision "$rev" --out "$out/local_engine_gpu.json" 2>&1 | quiet | tee "$out/local_engine.log"
  ;;
http)
  # a cold Inductor cache: the in-process runtime and every server start would compile first (≈ 200 s), which the
  # sweep's time budget does not cover (measured: 797bc95's sweep lost its 8-image and 12-front levels to it)
  # (or torch's default folder: up to 797bc95 the compiled runtime's kernels landed there)
  # (COMPILE_MODE=max-autotune: tune the cache with the `all` step first; tuning every bucket here does not fit a call)
  [ -n "${HTTP_COLD:-}" ] || [ -d "$VQTOK_CACHE/inductor" ] || [ -d "/tmp/torchinductor_$(whoami)" ] || { echo "cold Inductor cache: run 'serving.sh runtime' first" >&2; exit 2; }
  python3 -m bench.http_front --model-repo models/pretrained --images "$images" --device cuda --runtime auto \
    --front-workers "${2:-0,8}" --concurrency "${HTTP_CONCURRENCY:-32,64,128,256}" --images-per-request "${HTTP_IMAGES:-1,8}" --max-batch-size 64 --batch-workers "${HTTP_BATCH_WORKERS:-0}" \
    --max-batch-delay-ms "${HTTP_DELAY_MS:-2}" ${COMPILE_MODE:+--compile-mode "$COMPILE_MODE"} \
    --client-procs "${HTTP_CLIENT_PROCS:-6}" --decode-threads 4 --duration 5 --time-budget "${HTTP_BUDGET:-420}" --revision "$rev" \
    --out "$out/${HTTP_NAME:-http_front_gpu}.json" 2>&1 | quiet | tee "$out/${HTTP_NAME:-http_front_gpu}.log"
  ;;
*)
  echo "unknown step $1" >&2
  exit 2
  ;;
esac
exit 0
