#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the benchmark's embedded default (a small
# CNN on scikit-learn digits; the paper's ALSALS, Adam + SLS and Adam, and the recommended
# ALSALS(params); 3 seeds; quick budget) and its
# report. Extra arguments go to `alsals-bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/alsals-bench "$@"
