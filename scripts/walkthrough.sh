#!/usr/bin/env bash
# The newcomer's path through vqtok, on a CPU, in a few minutes: train a small VQ tokenizer (SimVQ +
# rotation trick, configs/cpu-quickstart.yaml), evaluate it on Kodak, export it to ONNX, retrain its
# codebook on other photos, serve it, encode and decode one photo over HTTP, and tokenize a folder
# through the server. Run it after scripts/setup.sh, from anywhere in a checkout. Each command is
# printed before it runs ("$ ..."), as you would type it from the repository root with .venv active.
#
# Writes runs/quickstart (the run), runs/quickstart-retrained, runs/served/quickstart (a link: the
# model repository the server is started on, so the model is served as "quickstart") and
# runs/quickstart-tokens; these are replaced on every run. Environment: PORT (default 8765),
# VQTOK_RUNS (default runs; the tests point it at a temporary folder), OMP_NUM_THREADS (default 1, below).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/vqtok ]; then
  echo "walkthrough: .venv/bin/vqtok not found; run scripts/setup.sh first" >&2
  exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
port=${PORT:-8765}
runs=${VQTOK_RUNS:-runs}
data=../shared/data
url=http://127.0.0.1:$port
for d in "$data/photos256/train" "$data/photos256/val" "$data/kodak"; do
  [ -d "$d" ] || { echo "walkthrough: $d is missing (the shared data sets, see ../shared/data/README.md)" >&2; exit 1; }
done

quoted() { # the arguments as you would type them (single quotes where the shell needs them)
  local a out=
  for a in "$@"; do
    if [[ $a =~ ^[][A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=" $a"; else out+=" '$a'"; fi
  done
  printf '%s' "${out# }"
}

# torch on one thread unless told otherwise: this model's steps are small, and on a 2-core machine that is
# busy with anything else two threads that wait for each other are several times slower than one
# (on the 2-core build machine with other jobs running: 635 s for the whole walkthrough with torch's
# default of 2 threads, 134 s with 1).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  printf '$ export OMP_NUM_THREADS=1\n'
  export OMP_NUM_THREADS=1
fi

step() { # print the command, run it, print how long it took
  printf '\n$ %s\n' "$(quoted "$@")"
  local t0=$SECONDS
  "$@"
  printf '# (%d s)\n' $((SECONDS - t0))
}

server_pid=
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=
}
trap stop_server EXIT

start=$SECONDS
rm -rf "$runs/quickstart" "$runs/quickstart-retrained" "$runs/served" "$runs/quickstart-tokens" "$runs/quickstart-photo".*
mkdir -p "$runs"

# 1. Train (photos256/train, 32×32 crops; the final model directory is $runs/quickstart/model).
step vqtok train --config configs/cpu-quickstart.yaml --out "$runs/quickstart"

# 2. Evaluate on 4 Kodak images at full resolution (PSNR, SSIM, MS-SSIM, codebook usage, bpp).
step vqtok eval --model "$runs/quickstart/model" --data "$data/kodak" --limit 4

# 3. Export to ONNX (the quantizer inside the graph); refuses if ONNX Runtime disagrees with torch.
step vqtok export --model "$runs/quickstart/model"

# 4. Re-initialise the codebook by k-means over encoder latents of other photos, then train it 50 steps.
step vqtok codebook retrain --model "$runs/quickstart/model" --data "$data/photos256/val" \
  --out "$runs/quickstart-retrained" --init kmeans --steps 50

# 5. Serve it. A model repository is a folder of model directories, each served under its folder's
#    name; a link named quickstart to the run's model directory serves it as "quickstart".
step mkdir -p "$runs/served"
step ln -s ../quickstart/model "$runs/served/quickstart"
printf '\n$ vqtok serve --model-repo %s --port %s > %s 2>&1 &\n' "$runs/served" "$port" "$runs/served/serve.log"
t0=$SECONDS
vqtok serve --model-repo "$runs/served" --port "$port" >"$runs/served/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 240); do # /readyz answers 200 once the model is loaded and warm
  if curl -sf "$url/readyz" >/dev/null; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "walkthrough: the server exited; its log:" >&2
    tail -n 30 "$runs/served/serve.log" >&2
    exit 1
  fi
  sleep 0.5
done
curl -sf "$url/readyz" >/dev/null || { echo "walkthrough: the server was not ready after 120 s" >&2; tail -n 30 "$runs/served/serve.log" >&2; exit 1; }
printf '# (ready after %d s: GET /readyz answers 200)\n' $((SECONDS - t0))

step curl -sS --fail-with-body -w '\n' "$url/v1/models"

# 6. One photo to tokens (int32 npy, 64×64 ids for a 256×256 photo at f = 4) and back to pixels.
photo=$data/photos256/val/imagenet_800_n04243546_slot.jpg
step curl -sS --fail-with-body -H 'Accept: application/x-npy' -F "images=@$photo" -F resize=none \
  "$url/v1/encode" -o "$runs/quickstart-photo.npy"
step curl -sS --fail-with-body -H 'Content-Type: application/x-npy' -H 'Accept: image/png' \
  --data-binary "@$runs/quickstart-photo.npy" "$url/v1/decode" -o "$runs/quickstart-photo.png"
step python - "$photo" "$runs/quickstart-photo.npy" "$runs/quickstart-photo.png" <<'EOF'
import sys

import numpy as np
from PIL import Image

original, tokens, decoded = sys.argv[1:]
t = np.load(tokens)
a = np.asarray(Image.open(original).convert("RGB"), dtype=np.float64)
b = np.asarray(Image.open(decoded).convert("RGB"), dtype=np.float64)
psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
print(f"tokens {t.dtype} {t.shape}, ids {t.min()}..{t.max()}; decoded {b.shape[1]}×{b.shape[0]} PNG, PSNR {psnr:.2f} dB")
EOF

# 7. Tokenize a folder through the server (200 photos -> parquet shards of token ids).
step vqtok tokenize --input "$data/photos256/val" --output "$runs/quickstart-tokens" --engine server \
  --server "$url" --resize none
step python - "$runs/quickstart-tokens" <<'EOF'
import sys

import pyarrow.dataset as ds

table = ds.dataset(sys.argv[1], format="parquet").to_table()
row = table.slice(0, 1).to_pylist()[0]
print(f"{table.num_rows} rows; columns {', '.join(table.column_names)}")
print(f"first row: {row['key']}, grid {row['grid_h']}×{row['grid_w']}, tokens {row['tokens'][:8]}...")
EOF

# 8. Stop the server.
printf '\n$ kill %s   # the server\n' "$server_pid"
stop_server
printf '\nwalkthrough finished in %d s\n' $((SECONDS - start))
