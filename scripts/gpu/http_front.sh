#!/usr/bin/env bash
# Issue 13 item 3 on one GPU, one device call (< 10 min): raw compiled runtime vs HTTP for the single-process
# server (front_workers=0) and the split server (front_workers=N), 1- and 8-image JPEG requests, concurrency
# 32-256 (bench/http_front.py). Needs torch 2.11 + CUDA on the host; fastapi, uvicorn, httpx, pydantic-settings,
# python-multipart, prometheus-client (and whatever else `vqtok serve` imports that the host lacks) carried as
# wheels in .whl/ (git-ignored; as for scripts/gpu/ort_benches.sh); 256² JPEGs in .gpudata/photos256/val (carry it,
# a copy of ../shared/data/photos256/val). The first start compiles the kernels (≈ 2 min, cached in
# $VQTOK_CACHE/inductor for the server starts after it).
#   bash scripts/gpu/http_front.sh [FRONT_WORKERS]     # default FRONT_WORKERS=0,8; results in $OUT/http_front_gpu.json
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export VQTOK_CACHE=${VQTOK_CACHE:-/tmp/vqtok-cache}
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [ -d .whl ] && [ ! -f /tmp/site/.whl-done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.whl-done
fi
images=""
for d in .gpudata/photos256/val shared/data/photos256/val ../shared/data/photos256/val; do
  [ -d "$d" ] && images=$d && break
done
[ -n "$images" ] || { echo "no photos256/val: carry .gpudata/photos256/val" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
python3 -c 'import torch, fastapi, uvicorn; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__)'
python3 bench/http_front.py --model-repo models/pretrained --images "$images" --device cuda --runtime auto \
  --front-workers "${1:-0,8}" --concurrency 32,64,128,256 --images-per-request 1,8 --max-batch-size 64 \
  --client-procs 6 --decode-threads 4 --duration 6 --time-budget 540 --out "$out/http_front_gpu.json" 2>&1 \
  | grep --line-buffered -v -i "plugin EP\|warn" | tee "$out/http_front_gpu.log"
exit 0
