"""alsals: Armijo line-search optimizers for PyTorch that pick the step size every step.

``ALSALS`` (Kenneweg, Kenneweg & Hammer, ACDSA 2024) searches along Adam's momentum
direction; ``AdamSLS`` and ``SLS`` are the baselines it improves on. ``ScheduleFreeALSALS``
sets the step size of Schedule-Free AdamW by the same kind of search.
"""

from alsals.line_search import LineSearchOptimizer, StepInfo
from alsals.optimizers import ALSALS, PAPER_ALSALS, SLS, AdamSLS
from alsals.schedule_free import ScheduleFreeALSALS

__all__ = [
    "ALSALS",
    "PAPER_ALSALS",
    "SLS",
    "AdamSLS",
    "LineSearchOptimizer",
    "ScheduleFreeALSALS",
    "StepInfo",
]
__version__ = "0.1.0"
