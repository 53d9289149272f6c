#!/usr/bin/env bash
# On a lent GPU machine: calibrate the installed models to MediaPipe on the GPU (renders on the GPU,
# detection in one process per core), then the calibrated fit's speed. Carry .whl (wheels, see
# docs/benchmarks.md); the models dir in FACERECON_MODELS (ICT-FaceKit + .whl exceed one 64 MiB carry,
# so copy the models to /tmp in a first call). Writes each calibration.npz and the log to $OUT.
#   FACERECON_MODELS=/tmp/models_keep RENDERS=4000 bash benchmarks/device_calibrate.sh sfm ict-facekit
set -uo pipefail
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD GLOG_minloglevel=2 PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
for name in "$@"; do
  timeout "${STEP_S:-280}" python3 -m backend_server.cli.backend models calibrate "$name" --renders "${RENDERS:-4000}" \
    --device cuda:0 --workers "$(nproc)" > "$out/calibrate_$name.log" 2>&1
  tr '\r' '\n' < "$out/calibrate_$name.log" | grep -v "^W0000\|^I0000\|INFO: Created\|absl::InitializeLog" | awk 'NR % 40 == 1 || /calibrated|rror/' | tail -6
  mkdir -p "$out/$name" && cp "$FACERECON_MODELS/$name/calibration.npz" "$out/$name/" 2>/dev/null
done
mkdir -p "$out/builtin" && cp "$FACERECON_MODELS/builtin/calibration.npz" "$out/builtin/" 2>/dev/null  # last model's
python3 benchmarks/fit_models.py --device cuda:0 --batches 1 16 64 256 2>&1 | tail -12
python3 benchmarks/fit_models.py --device cpu --batches 1 16 2>&1 | tail -8
