#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the CUDA tests, then the GPU step benchmark,
# recorded into benchmarks/RESULTS.md (and copied to $OUT when that is set, so a remote run
# brings it back). Needs torch, torchvision and pytest on the GPU machine; not Ray, MLflow or the
# project's virtualenv. Expected to take a few minutes on one H100 (not yet measured).
#
#     bash benchmarks/gpu_checks.sh [extra gpu_step.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
# --noconftest: the suite's conftest starts S3/MLflow services this machine need not have.
"$PY" -m pytest --noconftest -p no:cacheprovider -q -m gpu tests/test_cuda.py || status=$?
"$PY" benchmarks/gpu_step.py --record benchmarks/RESULTS.md "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/RESULTS.md "$OUT/"; fi
exit "$status"
