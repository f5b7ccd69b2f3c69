#!/usr/bin/env bash
# Issue 28 on one GPU: `vqtok codebook retrain` of the shipped v2 (16,384 -> 4,096 codes) with the command
# docs/codebook-retrain.md gives for a GPU, timed, then `vqtok eval --no-fid` of v2 and of the result on
# photos256/val; a second retrain adds the decoder fine-tune at a small learning rate (the command keeps
# whichever candidate scores best on the held-out photos). Runs detached (setsid), so it spans calls.
#   bash scripts/gpu/retrain.sh pack           # HERE: .gpudata/p0, p1 (photos256 train+val, v2's weights, LPIPS-Alex)
#   bash scripts/gpu/retrain.sh keep           # THERE, call 1 (carry .gpudata/p0): keep part 0 in /tmp/parts
#   bash scripts/gpu/retrain.sh start          # THERE, call 2 (carry .gpudata/p1): join, unpack, start
#   bash scripts/gpu/retrain.sh wait SECONDS   # THERE: wait (at most SECONDS, or until done); results into $OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
d=/tmp/retrain/d
r=/tmp/retrain/res

case "${1:-}" in
  pack)
    rm -rf .gpudata/p0 .gpudata/p1 .gpudata/d && mkdir -p .gpudata/d/p256 .gpudata/d/v2 .gpudata/d/w/lpips
    cp -r ../shared/data/photos256/train ../shared/data/photos256/val .gpudata/d/p256/
    cp models/pretrained/photo-f8-simvq-16k-v2/config.json models/pretrained/photo-f8-simvq-16k-v2/model.safetensors .gpudata/d/v2/
    cp "$(.venv/bin/python -c 'from training.lpips import weights_path; print(weights_path("alex"))')" .gpudata/d/w/lpips/
    tar -cf .gpudata/all.tar -C .gpudata d && rm -rf .gpudata/d
    split -n 2 -d -a 1 .gpudata/all.tar .gpudata/part && rm .gpudata/all.tar
    for i in 0 1; do mkdir -p ".gpudata/p$i" && mv ".gpudata/part$i" ".gpudata/p$i/part"; done
    du -sh .gpudata/p*
    ;;
  keep)
    mkdir -p /tmp/parts && cp .gpudata/p0/part /tmp/parts/part0 && ls -la /tmp/parts
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    ;;
  start)
    mkdir -p /tmp/retrain "$r"
    cat /tmp/parts/part0 .gpudata/p1/part | tar -xf - -C /tmp/retrain
    printf '%6d train, %d val photos\n' "$(ls $d/p256/train | wc -l)" "$(ls $d/p256/val | wc -l)"
    # SMOKE=1: the same steps, tiny, on the CPU (checks this script here)
    dev=cuda size="--max-latents 2097152 --kmeans-iters 30 --steps 1000 --batch-size 32" ft="--decoder-steps 500"
    if [ "${SMOKE:-}" = 1 ]; then
      dev=cpu size="--max-latents 4096 --kmeans-iters 2 --steps 4 --batch-size 4" ft="--decoder-steps 2"
      find $d/p256/val -type f | tail -n +5 | while read -r f; do rm -- "$f"; done; find $d/p256/train -type f | tail -n +17 | while read -r f; do rm -- "$f"; done
    fi
    setsid nohup bash -c "
      export VQTOK_CACHE=$d/w OMP_NUM_THREADS=4
      s0=\$SECONDS
      python3 -m vqtok codebook retrain --model $d/v2 --data $d/p256/train --heldout $d/p256/val --out $r/v2-4096 \
        --codebook-size 4096 $size --device $dev --no-progress > $r/retrain.log 2>&1
      echo \"exit \$? wall_s \$((SECONDS - s0))\" >> $r/retrain.log
      for m in v2 v2-4096; do
        [ \$m = v2 ] && md=$d/v2 || md=$r/v2-4096
        python3 -m vqtok eval --model \$md --data $d/p256/val --no-fid --device $dev --batch-size 32 --no-progress --out $r/eval_\$m.json > $r/eval_\$m.log 2>&1
      done
      s0=\$SECONDS
      python3 -m vqtok codebook retrain --model $d/v2 --data $d/p256/train --heldout $d/p256/val --out $r/v2-4096-ft \
        --codebook-size 4096 $size --device $dev --no-progress --finetune-decoder $ft --decoder-lr 2e-5 > $r/retrain_ft.log 2>&1
      echo \"exit \$? wall_s \$((SECONDS - s0))\" >> $r/retrain_ft.log
      touch $r/all.done" >/tmp/retrain/driver.log 2>&1 </dev/null &
    sleep 20
    tail -n 5 $r/retrain.log || true
    ;;
  wait)
    limit=${2:-60}
    t0=$SECONDS
    while [ ! -f $r/all.done ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
    for f in retrain.log eval_v2.log eval_v2-4096.log retrain_ft.log; do
      [ -f "$r/$f" ] && { echo "== $f"; grep -v -i "warn" "$r/$f" | tail -n 40; }
    done
    tar -czf "$out/retrain_results.tar.gz" --exclude='*.safetensors' --exclude='*.onnx' --exclude='*.npz' -C "$r" . || true
    ls -la "$out"
    ;;
  *)
    sed -n 2,10p "$0"
    exit 2
    ;;
esac
