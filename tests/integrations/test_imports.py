"""The integrations are optional: importing them costs nothing until one is used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "accelerate", "lightning", "torch._dynamo")


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_alsals_and_its_integrations_imports_no_framework():
    out = run(
        "import sys, alsals, alsals.integrations\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(sorted(alsals.integrations.__all__))"
    )
    loaded, names = out.splitlines()
    assert loaded == "[]"
    assert "LineSearchTrainer" in names and "step_with_scaler" in names


def test_names_resolve_on_first_use():
    out = run(
        "import sys\n"
        "from alsals.integrations import step_with_scaler, autocast_closure\n"
        "print('transformers' in sys.modules, callable(step_with_scaler))"
    )
    assert out.split() == ["False", "True"]
