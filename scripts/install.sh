#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with latentdub and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/pip install -q -U pip
# torch first, pinned, so nothing pulls a different (CUDA-sized) build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
echo "latentdub installed in $(pwd)/.venv  (run: .venv/bin/latentdub --help)"
