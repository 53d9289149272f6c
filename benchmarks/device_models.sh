#!/usr/bin/env bash
# On a lent GPU machine: the morphable-model GPU test and the fit/bake speed benchmark. Needs no
# landmark detector: carry .whl_min (the nvdiffrast, fpng and pyzmq wheels) and .bench_models (an
# installed models dir: facerecon-backend models install ... --models-dir .bench_models).
#   bash benchmarks/device_models.sh
set -uo pipefail
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_min/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD FACERECON_MODELS=$PWD/.bench_models PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "from backend_server.render.rasterize_cuda import build_plugin; build_plugin(); print('nvdiffrast plugin ready')"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k model 2>&1 | tail -5
python3 benchmarks/fit_models.py --device cuda:0 --batches 1 16 64 256 --bake 2>&1 | tail -20
python3 benchmarks/fit_models.py --device cpu --batches 1 16 2>&1 | tail -8
