#!/usr/bin/env bash
# Train the general neural detector on a GPU machine (16 CPU cores simulate the training
# stacks, the GPU trains) in about 6 minutes, then score it on held-out simulated stacks.
#
#   PYTHONPATH=. OUT=/some/dir bash benchmarks/train_gpu.sh [extra `difftrack train` options]
#
# Writes $OUT/detector.npz (copy it to difftrack/weights/detector.npz to ship it) and
# $OUT/train.log. Extra options override the defaults below, e.g. a smoke test on a CPU:
#   PYTHONPATH=. OUT=/tmp/gpu_smoke bash benchmarks/train_gpu.sh --steps 5 --batch 2 \
#       --crop 32 --vol 40 --workers 1 --calibrate 1 --time-limit 600 && \
#       python benchmarks/detector.py --weights /tmp/gpu_smoke/detector.npz --sim --quick
set -euo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
NCPU=$(nproc)
WORKERS=$(( NCPU > 3 ? NCPU - 2 : 1 ))
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true) | tee "$OUT/train.log"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/train.log"
"$PY" -m difftrack.training --steps 8000 --batch 16 --crop 48 --vol 64 --fresh 0.25 \
    --buffer 256 --workers "$WORKERS" --lr 3e-3 --time-limit 320 --calibrate 12 --seed 0 \
    -o "$OUT/detector.npz" --log "$OUT/train.log" --no-progress "$@"
"$PY" benchmarks/detector.py --weights "$OUT/detector.npz" --sim --quick 2>&1 | tee -a "$OUT/train.log"
