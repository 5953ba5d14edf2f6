#!/usr/bin/env bash
# Train the propagation weights on a CUDA machine (used for the shipped models/propagation
# weights). Usage: bash scripts/gpu_train.sh OUTDIR STEPS_SMALL STEPS_DEFAULT [DATA_ROOT]
# Runs the "small" (CPU network, 256 px) and "default" (ResNet-50 key encoder) variants side
# by side on one GPU. SimpleITK must be importable; DATA_ROOT holds totalseg_example/.
set -euo pipefail
out=${1:?out dir}; s_small=${2:?steps}; s_def=${3:?steps}; root=${4:-../shared/data}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" -m napari_propseg train propagation models/propagation/train_default.yaml --variant small \
  --device cuda --steps "$s_small" --data-root "$root" --out "$out/small" > "$out/small.log" 2>&1 &
p1=$!
if [ "$s_def" -gt 0 ]; then
  "$py" -m napari_propseg train propagation models/propagation/train_default.yaml \
    --device cuda --steps "$s_def" --data-root "$root" --out "$out/default" > "$out/default.log" 2>&1 &
  p2=$!
fi
wait $p1; rc1=$?
[ "$s_def" -gt 0 ] && { wait $p2 || true; }
exit $rc1
