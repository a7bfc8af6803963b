#!/usr/bin/env bash
# The GPU suite in one call (see benchmarks/gpu_suite.py): installs what the GPU image lacks from the
# wheels carried in .whl/ (no registry is reachable there), then runs every part and writes the report
# to $OUT (default: ./gpu_suite_out).
#
#   bash benchmarks/gpu_suite.sh               # on the GPU machine (about 9 minutes)
#   bash benchmarks/gpu_suite.sh --cpu-smoke   # every part on tiny nets on the CPU (< 1 minute)
#   bash benchmarks/gpu_suite.sh --parts fashion,throughput   # some parts, in this order
#
# Parts run in order of value (fashion, throughput, sampling, likelihood, correctness, ddp; digits on
# request) and the report is rewritten after each, so a run cut short keeps what it finished.
#
# The Fashion-MNIST part needs the four idx .gz files (about 30 MB). The GPU machine has no apt and no
# network: carry them in the working tree, e.g.
#   mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
# and name `.data` (and `.whl`) in the device call's `carry`; this script passes
# --fashion-root .data/fashion-mnist when that folder exists.
#
# Preparing the wheels on a machine with a registry (Python 3.12 for the GPU image):
#   pip download --dest .whl --python-version 3.12 --only-binary=:all: torchsde hydra-core safetensors \
#       torchdiffeq scikit-learn trampoline antlr4-python3-runtime omegaconf --no-deps
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT"
missing=$("${PYTHON:-python3}" - <<'PY'
import importlib.util
need = ["torchsde", "torchdiffeq", "hydra", "omegaconf", "safetensors", "sklearn", "scipy", "tqdm", "matplotlib"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -d .whl ]; then
    echo "gpu_suite: installing from .whl/: $missing"
    "${PYTHON:-python3}" -m pip install --quiet --no-index --find-links .whl torchsde hydra-core || true
  else
    echo "gpu_suite: missing $missing and no .whl/ folder of wheels; the parts that need them will fail"
  fi
fi
# sdediff itself from this tree, without touching the image's torch
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
extra=()
if [ -d .data/fashion-mnist ]; then extra=(--fashion-root .data/fashion-mnist); fi
"${PYTHON:-python3}" benchmarks/gpu_suite.py --out "$OUT" "${extra[@]}" "$@"
