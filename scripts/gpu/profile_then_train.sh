#!/usr/bin/env bash
# First call of the default model's full run (issue 7): measure training-step options, pick the
# fastest, size the cosine schedule to the planned minutes, and train for the rest of this call.
#   bash scripts/gpu/profile_then_train.sh PRESET TOTAL_TRAIN_MINUTES THIS_CALL_MINUTES
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
preset=${1:?preset}; total=${2:?total minutes}; now=${3:?minutes for this call}
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m bench.train_step_profile --preset "$preset" --batch 32 --steps 15 \
  --variants eager channels_last compile+channels_last --out "$out/train_step_profile.json" 2>&1 | grep -v Warning | tail -n 30
read -r flags steps < <(python3 - "$out/train_step_profile.json" "$total" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
best = max(rows, key=lambda r: r["images_per_s"])
flags = f"channels_last={'true' if 'channels_last' in best['variant'] else 'false'} compile={'true' if 'compile' in best['variant'] else 'false'}"
# 85 %: evaluation, checkpoints and the compile/warm-up of each call come out of the same minutes
steps = int(best["images_per_s"] * float(sys.argv[2]) * 60 * 0.85 / 32)
print(flags.replace(" ", ","), steps)
PY
)
echo "chosen: ${flags} max_steps=${steps}" | tee "$out/chosen.txt"
echo "${flags} ${steps}" > /tmp/chosen_train_options
bash scripts/gpu/train_default.sh full "$preset" "$steps" "$now" ${flags//,/ }
