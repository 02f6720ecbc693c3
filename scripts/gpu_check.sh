#!/usr/bin/env bash
# The one command a GPU owner runs: every CUDA path of tinygemma end to end, a summary table at the end, every
# output under one folder (scripts/gpu_check.py says what each step does). `--device cpu` runs the same steps
# with the tiny preset on the CPU.
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--only STEP,STEP]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" scripts/gpu_check.py "$@"
