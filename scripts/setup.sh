#!/usr/bin/env bash
# Create .venv with dfmpc-deploy and everything its tests use, from nothing but Python 3.10+ and PyPI.
# torch is pinned to the machine's CPU build (constraints.txt) so that no dependency can pull another torch,
# and pytorchcv is installed without its torchvision requirement (we import its constructors directly).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[test,ort,ui,sweep]'
"${pip[@]}" requests
# TensorRT-RTX builds real engines on a CPU (NVIDIA's full TensorRT needs its own index and a GPU).
"${pip[@]}" tensorrt-rtx || echo "setup: tensorrt-rtx could not be installed; TensorRT tests will be skipped"
# Last, so that no later install re-checks its (unneeded) torchvision requirement.
"${pip[@]}" --no-deps pytorchcv
.venv/bin/python - <<'PY'
import importlib.util, torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed (it breaks this torch)"
print(f"setup: ok (torch {torch.__version__})")
PY
