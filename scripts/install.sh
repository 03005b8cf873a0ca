#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with latentdub and its test tools.
# pip runs quietly, so each step says what it does first (the whole install takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "==> $*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv (with $PY)"
  "$PY" -m venv .venv
fi
step "updating pip"
.venv/bin/pip install -q -U pip
# torch first, pinned, so nothing pulls a different (CUDA-sized) build.
step "installing torch 2.13.0 (the largest download: a few minutes)…"
.venv/bin/pip install -q torch==2.13.0
step "installing latentdub and its dependencies and test tools (a minute or two)…"
.venv/bin/pip install -q -e ".[dev]"
echo "latentdub installed in $(pwd)/.venv  (run: .venv/bin/latentdub --help)"
