"""alsals: Armijo line-search optimizers for PyTorch that pick the step size every step.

``ALSALS`` is the recommended optimizer: an Armijo line search (Kenneweg, Kenneweg & Hammer,
ACDSA 2024) over the step size of Schedule-Free AdamW's dynamics. ``MomentumALSALS`` is the
paper's ALSALS, searching along Adam's momentum direction (``ALSALS.paper(params)`` builds
its exact configuration); ``AdamSLS`` and ``SLS`` are the baselines it improves on.
"""

import warnings
from typing import Any

from alsals.line_search import LineSearchOptimizer, StepInfo
from alsals.optimizers import PAPER_ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.schedule_free import ALSALS

__all__ = [
    "ALSALS",
    "PAPER_ALSALS",
    "SLS",
    "AdamSLS",
    "LineSearchOptimizer",
    "MomentumALSALS",
    "StepInfo",
]
__version__ = "0.2.17"


def __getattr__(name: str) -> Any:
    if name == "ScheduleFreeALSALS":  # the name of ALSALS before 0.2.0
        warnings.warn(
            "alsals.ScheduleFreeALSALS is now alsals.ALSALS (the recommended optimizer)",
            DeprecationWarning,
            stacklevel=2,
        )
        return ALSALS
    raise AttributeError(f"module 'alsals' has no attribute {name!r}")
