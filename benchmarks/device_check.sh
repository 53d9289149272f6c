#!/usr/bin/env bash
# On a lent GPU machine (torch there, no network): install the carried wheels beside its torch, run the
# GPU tests, then the GPU benchmark. Carry .whl (wheels, see docs/benchmarks.md) and .bench_photos.
#   bash benchmarks/device_check.sh COUNT DEVICE_SETS...     e.g.  bash benchmarks/device_check.sh 1200 0 0,1
# Environment: TESTS=0 skips the GPU tests; BENCH_ARGS adds arguments to benchmarks/gpu.py.
set -uo pipefail
count=${1:-1200}; shift; sets=${*:-0}
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD GLOG_minloglevel=2 PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
python3 -c "import torch, numpy, cv2, mediapipe, zmq, fpng, PIL, tqdm, matplotlib; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__, 'mediapipe', mediapipe.__version__, 'gpus', torch.cuda.device_count())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "from backend_server.render.rasterize_cuda import build_plugin; import time; t=time.time(); build_plugin(); print('nvdiffrast plugin ready in %.0f s' % (time.time()-t))"
[ "${TESTS:-1}" = 0 ] || python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "^W0000\|^I0000" | tee $out/gpu_tests.txt | tail -25
python3 benchmarks/gpu.py --photos .bench_photos --count "$count" --device-sets $sets --json $out/bench.json ${BENCH_ARGS:-} 2>&1 \
  | grep -v "^W0000\|^I0000\|INFO: Created\|absl::InitializeLog" | tail -80
