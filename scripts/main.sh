#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: ALSALS against Adam on built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/digits.py "$@"
