#!/usr/bin/env bash
# Every GPU-only check and benchmark of dfmpc-deploy in one prepared run (a few minutes on one GPU).
#
#   bash scripts/gpu_check.sh --prepare   # here (CPU, ../shared beside the checkout, PyPI reachable): puts the
#                                         # pytorchcv wheel in .whl/ and ResNet-20/56 weights + 2,000 CIFAR-10 test
#                                         # images in .gpu_data/ (both git-ignored, a few MB), for a machine that has
#                                         # neither the shared data nor an internet connection
#   bash scripts/gpu_check.sh             # on the GPU machine (device tool: carry .whl and .gpu_data): GPU tests,
#                                         # compensation on CUDA vs CPU, torch-cuda latency, a weight-stripped
#                                         # engine refit from the .dfmpc codes; writes results/gpu/*.json
#                                         # (and $OUT/*.json when OUT is set). Without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p .whl .gpu_data/cifar10/test
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl pytorchcv==0.0.74
  cp ../shared/data/weights/akamaster_cifar10/resnet20-12fca82f.th ../shared/data/weights/akamaster_cifar10/resnet56-4bfd9763.th .gpu_data/
  for d in ../shared/data/cifar10-test-jpg/test/*/; do   # 200 images of each of the 10 classes, label order kept
    c=$(basename "$d"); mkdir -p ".gpu_data/cifar10/test/$c"
    ls "$d" | sort | head -200 | while read -r f; do cp "$d/$f" ".gpu_data/cifar10/test/$c/"; done
  done
  du -sh .whl .gpu_data
  exit 0
fi
if [ -d .whl ] && ! "$PY" -c "import pytorchcv" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
dest=${OUT:-results/gpu}
mkdir -p "$dest"
"$PY" scripts/gpu_check.py --out "$dest" --data .gpu_data
status=$?
[ -n "${OUT:-}" ] && mkdir -p results/gpu && cp "$dest"/*.json results/gpu/ 2>/dev/null
exit $status
