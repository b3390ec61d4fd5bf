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


#: a finder that makes the frameworks look uninstalled (as pip uninstall would)
UNINSTALLED = (
    "import sys\n"
    "class Uninstalled:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('transformers', 'lightning'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Uninstalled())\n"
)


def test_an_integration_without_its_framework_names_the_extra_to_install():
    out = run(
        UNINSTALLED + "for name in ('LineSearchTrainer', 'LineSearchCallback'):\n"
        "    try:\n"
        "        exec(f'from alsals.integrations import {name}')\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    hf, lightning = out.splitlines()
    assert "pip install 'alsals[hf]'" in hf and "transformers" in hf
    assert "pip install 'alsals[lightning]'" in lightning


def test_a_module_that_shadows_the_framework_keeps_its_own_error(tmp_path):
    """A user's own ``transformers.py`` beside the script (or a broken installation) is no
    missing framework: its error passes through as it was, and is not its own cause."""
    (tmp_path / "transformers.py").write_text("x = 1\n")
    out = run(
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "try:\n"
        "    from alsals.integrations import LineSearchTrainer\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "    print(error.__cause__ is error)\n"
    )
    message, own_cause = out.splitlines()
    assert "cannot import name 'Trainer'" in message and "alsals[hf]" not in message
    assert own_cause == "False"


def test_every_integration_name_resolves():
    out = run(
        "import alsals.integrations as i\n"
        "print(all(callable(getattr(i, name)) for name in i.__all__))\n"
        "print('line_search_step' in i.__all__, 'FollowStepSize' in i.__all__)"
    )
    assert out.split() == ["True", "True", "True"]


def test_the_dtensor_lookup_holds_on_torch_2_4s_layout():
    """torch 2.4 has ``torch.distributed.tensor`` without ``DTensor`` (it lives in
    ``torch.distributed._tensor``; the package is the parent of ``.parallel``): loaded, it
    must not be taken for DTensor's module, or every step of a plain model fails."""
    out = run(
        "import sys, types, torch, torch.distributed._tensor\n"
        "sys.modules['torch.distributed.tensor'] = types.ModuleType('torch.distributed.tensor')\n"
        "import alsals\n"
        "from alsals.distributed import local_shard, shard_count\n"
        "model = torch.nn.Linear(4, 1)\n"
        "x, y = torch.randn(16, 4), torch.randn(16, 1)\n"
        "for cls in (alsals.ALSALS, alsals.MomentumALSALS, alsals.SLS):\n"
        "    opt = cls(model.parameters())\n"
        "    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))\n"
        "    print(opt.last_step.kind != 'nonfinite')\n"
        "w = model.weight\n"
        "print(local_shard(w) is w, shard_count(w))\n"
    )
    assert out.split() == ["True", "True", "True", "True", "1"]
