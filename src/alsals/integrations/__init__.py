"""Integrations with training stacks: Hugging Face ``Trainer``, Lightning, mixed precision.

Each integration lives in its own submodule and imports its framework only when that
submodule is imported, so ``import alsals.integrations`` costs nothing and the core package
keeps depending on torch alone:

* :mod:`alsals.integrations.hf`: ``LineSearchTrainer``, a ``transformers.Trainer`` whose
  optimizer step drives the line search (extra ``alsals[hf]``).
* :mod:`alsals.integrations.lightning`: ``LineSearchCallback`` for the manual-optimization
  pattern (extra ``alsals[lightning]``).
* :mod:`alsals.integrations.amp`: ``step_with_scaler`` (fp16 with ``torch.amp.GradScaler``)
  and ``autocast_closure`` (bf16/fp16 autocast with float32 loss values); torch only.

``docs/integrations.md`` has one recipe per stack (also DDP, FSDP2 and ``torch.compile``).
The names below resolve lazily: ``from alsals.integrations import LineSearchTrainer`` imports
``transformers`` at that moment, not before.
"""

from __future__ import annotations

import importlib
from typing import Any, NoReturn

from alsals.line_search import LineSearchOptimizer
from alsals.schedule_free import ALSALS

#: The optimizers every integration drives: ALSALS and the three of the line-search engine.
DRIVEN = (LineSearchOptimizer, ALSALS)

_LAZY = {
    "FollowStepSize": "alsals.integrations.hf",
    "LineSearchTrainer": "alsals.integrations.hf",
    "LineSearchTrainerMixin": "alsals.integrations.hf",
    "LineSearchCallback": "alsals.integrations.lightning",
    "line_search_step": "alsals.integrations.lightning",
    "step_with_scaler": "alsals.integrations.amp",
    "autocast_closure": "alsals.integrations.amp",
}

__all__ = sorted(_LAZY)


def _raise_import_error(error: ImportError, framework: str, extra: str) -> NoReturn:
    """For an integration's import of ``framework`` that failed with ``error``: where the
    framework is not installed, an ``ImportError`` that says which extra installs it; any
    other failure (a broken installation, a module of the user's that shadows it) as it
    was."""
    if not (isinstance(error, ModuleNotFoundError) and error.name == framework):
        raise error
    raise ImportError(
        f"this integration needs {framework}, which is not installed: "
        f"pip install 'alsals[{extra}]' (or {framework})"
    ) from error


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'alsals.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
