#!/usr/bin/env bash
# The GPU suite on a lent, bare GPU machine: install the carried wheels, then run it (~8 minutes).
#
#   here, once:  python -m benchmarks.gpu_wheels      # .whl/ (git-ignored): Ray, FastAPI, pydantic, ...
#   there:       bash benchmarks/gpu_suite.sh [gpu_suite options, e.g. --only synthesis_1b]
#                (device call: carry [".whl"], timeout_s 600; results in $OUT)
#
# The machine reaches no package registry and its python3 already holds PyTorch and transformers;
# this checkout is not pip-installed there (pyproject pins another torch than the machine's): it
# runs from the source tree on PYTHONPATH, and Ray's workers inherit that path.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu_suite}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
site=/tmp/janus-gpu-suite-site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_suite.sh: no .whl/: the ray_data and serve sections will fail (run python -m benchmarks.gpu_wheels here, carry .whl)" >&2
fi
export PYTHONPATH="$PWD:$PYTHONPATH"
# the device returns at most 8 files of $OUT: the sections' records go beside it, and summary.json
# (which holds them all) and the log into it
python3 -m benchmarks.gpu_suite --out /tmp/janus-gpu-suite-records --summary "$out/summary.json" "$@" 2>&1 \
  | tee "$out/suite.log"
