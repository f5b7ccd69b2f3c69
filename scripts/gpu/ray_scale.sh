#!/usr/bin/env bash
# Does `vqtok tokenize --engine ray` scale? bench/ray_scale.py on the 4-GPU machine (nvidia-h100-x4 or
# nvidia-h200-x4), one step per device call. Ray is not installed there and one call carries at most
# 64 MiB of working tree, so Ray (76 MiB wheel) travels split in two parts, in calls that carry
# neither model (deleted tracked files do not travel). Make the calls back to back on one warm machine
# (/tmp/site and /tmp/vqtok-cache live only as long as it does).
#
# Here first (once): .raywhl/a and .raywhl/b (git-ignored) hold the parts, .gpudata/photos256/val the
# photos (cp -r ../shared/data/photos256/val .gpudata/photos256/). Sizes: tracked files without the
# models 2.8 MiB; .raywhl/a 46.0 MiB (raypart00: ray-2.60.0 cp312 manylinux2014 bytes 0-46 MiB);
# .raywhl/b 45.1 MiB (raypart01 and ray.sha256, plus what Ray Data needs that gpu.md does not list:
# pandas, python-dateutil, tzdata, fsspec, click, filelock, jsonschema (+ attrs, referencing,
# jsonschema-specifications, rpds-py), msgpack, protobuf, pyyaml, requests (+ certifi,
# charset-normalizer, idna, urllib3), packaging, typing-extensions); .gpudata 6.0 MiB;
# models/pretrained/photo-f8-simvq-16k-v2 45.8 MiB; models/pretrained/photo-f8-simvq-16k 45.8 MiB.
#
#   before calls 1-2, move both models out of the tree:
#       mv models/pretrained/photo-f8-simvq-16k models/pretrained/photo-f8-simvq-16k-v2 /tmp/held-models/
#   1. carry [".raywhl/a"]  (48.8 MiB)   bash scripts/gpu/ray_scale.sh ray-part-a
#   2. carry [".raywhl/b"]  (47.9 MiB)   bash scripts/gpu/ray_scale.sh ray-install
#   then put v2 back (v1 stays out until the end):
#       mv /tmp/held-models/photo-f8-simvq-16k-v2 models/pretrained/
#   3. carry [".gpudata"]   (54.7 MiB)   bash scripts/gpu/ray_scale.sh warm        # compiles the encoder (≈ 3 min cold)
#   4. carry [".gpudata"]   (54.7 MiB)   VQTOK_REVISION=<sha> bash scripts/gpu/ray_scale.sh bench
#   afterwards: mv /tmp/held-models/photo-f8-simvq-16k models/pretrained/
# Steps 3 and 4 may be one call (`bench` compiles what `warm` did not, inside its 500 s limit, and
# skips the engines that no longer fit). Every step writes its log (and bench its JSON, after each
# engine) under $OUT as it goes, so a step cut short still returns data.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VQTOK_DATA=$PWD/.gpudata VQTOK_CACHE=/tmp/vqtok-cache NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/out}
model=models/pretrained/photo-f8-simvq-16k-v2
mkdir -p "$out" /tmp/rayparts "$VQTOK_CACHE"
case "${1:?step: ray-part-a | ray-install | warm | bench}" in
ray-part-a)
  cp .raywhl/a/* /tmp/rayparts/ && ls -la /tmp/rayparts | tee "$out/ray-part-a.log"
  ;;
ray-install)
  cp .raywhl/b/* /tmp/rayparts/
  whl=/tmp/rayparts/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
  cat /tmp/rayparts/raypart00 /tmp/rayparts/raypart01 >"$whl"
  echo "$(cat /tmp/rayparts/ray.sha256)  $whl" | sha256sum -c - || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/rayparts/*.whl 2>&1 | tail -5
  python3 -c 'import ray, ray.data, pandas, numpy; print("ray", ray.__version__, "pandas", pandas.__version__, "numpy", numpy.__version__)' 2>&1 |
    tee "$out/ray-install.log"
  ;;
warm)
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader | tee "$out/warm.log"
  python3 - "$model" 2>&1 <<'EOF' | tee -a "$out/warm.log"
import sys, time
t = time.perf_counter()
from clients.tokenize.encoders import load_encoder_runtime
rt = load_encoder_runtime(sys.argv[1], runtime="auto", device="cuda", batch_size=64, resize="crop")
print(f"{rt.runtime_name} on {rt.providers}: loaded and warmed in {time.perf_counter() - t:.1f} s", flush=True)
EOF
  du -sh "$VQTOK_CACHE" | tee -a "$out/warm.log"
  ;;
bench)
  {
    nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader
    nproc
    df -h /dev/shm /tmp | tail -2
    python3 -c 'import ray; print("ray", ray.__version__)'
  } 2>&1 | tee "$out/bench.log"
  # OMP_NUM_THREADS=1 for the driver (64 cores: torch's default threads slowed a one-process run 2.4x);
  # Ray's workers inherit it (the decoders are single-threaded Pillow; the GPU actors need no CPU threads)
  OMP_NUM_THREADS=1 timeout 550 python3 -m bench.ray_scale --model "$model" --batch-size 64 --seconds 22 --max-images 400000 --time-limit 500 \
    --revision "${VQTOK_REVISION:-unknown}" --out "$out/ray_scale_gpu.json" 2>&1 |
    grep --line-buffered -v "plugin EP\|RayDeprecationWarning\|warnings.warn\|ds = ds.map_batches" | tee -a "$out/bench.log"
  ;;
*)
  echo "unknown step $1" >&2
  exit 2
  ;;
esac
