"""The integrations are optional: importing them costs nothing until one is used."""

from __future__ import annotations

import subprocess
import sys

#: frameworks, and torch's DTensor module (0.6 s and sympy: no DTensor exists before it is
#: loaded, so the FSDP2 support looks it up only once it is)
HEAVY = (
    "transformers",
    "accelerate",
    "lightning",
    "torch._dynamo",
    "torch.distributed.tensor",
    "torch.distributed._tensor",
    "sympy",
)


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


def test_an_integration_without_its_framework_names_the_extra_to_install():
    out = run(
        "import sys\n"
        "sys.modules['transformers'] = sys.modules['lightning'] = None  # (not installed)\n"
        "for name in ('LineSearchTrainer', 'LineSearchCallback'):\n"
        "    try:\n"
        "        exec(f'from alsals.integrations import {name}')\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    hf, lightning = out.splitlines()
    assert "pip install 'alsals[hf]'" in hf and "transformers" in hf
    assert "pip install 'alsals[lightning]'" in lightning


def test_every_integration_name_resolves():
    out = run(
        "import alsals.integrations as i\n"
        "print(all(callable(getattr(i, name)) for name in i.__all__))\n"
        "print('line_search_step' in i.__all__, 'FollowStepSize' in i.__all__)"
    )
    assert out.split() == ["True", "True", "True"]
