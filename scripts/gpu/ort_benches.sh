#!/usr/bin/env bash
# GPU benchmarks that need onnxruntime-gpu (installed to /tmp/site by the ort-gpu-parts calls) and
# the wheels in .whl (fastapi, uvicorn, …, vector-quantize-pytorch for the CIFAR peers).
#   bash scripts/gpu/ort_benches.sh throughput|cifar|serve
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ -d .whl ] && [ ! -f /tmp/site/.whl-done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && touch /tmp/site/.whl-done
fi
python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'
case "${1:?}" in
throughput)
  python3 bench/gpu_throughput.py --min-seconds 0.4 --out "$out/gpu_throughput.json" 2>&1 | grep -v -i "warn\|onnx_ir\|torch.onnx\|^ *$" | tail -n 75
  ;;
cifar)
  python3 bench/quantizers_cifar10.py --data .gpudata/cifar10 --time-per-run 22 --out "$out/cifar" 2>&1 | grep -v -i warn | tail -n 40
  cp "$out"/cifar/* "$out"/ 2>/dev/null || true
  ;;
serve)
  mkdir -p ../shared/data && ln -sfn "$PWD/.gpudata/photos256" ../shared/data/photos256
  python3 bench/service_load.py --model-repo models/pretrained --images .gpudata/photos256/val --device cuda \
    --concurrency 1,8,32,128 --duration 8 --client-procs 6 --decode-threads 8 --max-batch-size 64 \
    --batch-workers 2 --time-budget 200 --out "$out/service_load_gpu.json" 2>&1 | grep -v -i warn | tail -n 25
  python3 bench/tokenize_throughput.py --model models/pretrained/photo-f8-simvq-16k --batch-size 64 --engines local,server \
    --device cuda --time-limit 150 --out "$out/tokenize_throughput_gpu.json" 2>&1 | grep -v -i warn | tail -n 15
  ;;
esac
