"""The optimizer-wide state of a line search: the step size, the averages of the test, counters.

It lives in ``optimizer.state[anchor]["line_search"]`` (the anchor: the first parameter
that requires grad, else the first) as a plain dict of numbers (the convention of
``torch.optim.LBFGS``), so that ``state_dict()`` carries it and
``torch.load(weights_only=True)`` reads it back. Inside a step it is a :class:`SearchState`:
typed, validated when read, and written back only when the step completes, so that an
exception leaves the stored state as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from alsals.polyak_cap import FLOOR_HITS
from alsals.rise_guard import LOSS_SMOOTHING, spread_from_squares

COUNTERS = (
    "step",
    "averaged",
    "searches",
    "steps_since_search",
    "forwards",
    "backwards",
    "trials",
    "failed_searches",
    "unresolved_searches",
    "unaccepted_in_a_row",
    "settled",
    "skipped_nonfinite",
    "skipped_zero_grad",
    "model_steps",
    "loss_samples",
    "floor_hits",
    "nonfinite_losses_in_a_row",
    "undone_updates",
    "kinks_passed",
    "kinks_in_a_row",
)


@dataclass
class SearchState:
    """What one step hands to the next (``docs/algorithms.md``, "Notation").

    ``step_size`` is ``eta``, the step size the next search starts from (before growth);
    ``decrease_avg`` and ``slope_avg`` are ``D`` and ``G`` of the smoothed test, ``averaged``
    the number of samples in them since their last reset; ``step`` counts updates taken;
    ``unaccepted_in_a_row`` counts the searches since the last accepted one (a step size no
    search accepted is never reused untested); ``settled`` is 1 when the last search, not
    the first, accepted its first trial (``search_interval="settled"``). The remaining
    counters are totals for logging. ``model_loss_avg``, ``model_anchor_avg`` and
    ``model_steps`` hold the momentum model of ``loss_floor``'s cap
    (:class:`alsals.polyak_cap.MomentumModel`). ``loss_avg``, ``loss_spread_avg``,
    ``loss_samples``, ``loss_lowest``, ``step_size_avg``, ``moves_avg``,
    ``step_size_at_lowest``, ``loss_error_at_lowest``, ``watch_from_start``,
    ``loss_start_mean`` and ``step_size_at_start`` hold ``loss_rise_guard``'s watch of the
    batch losses (:class:`alsals.rise_guard.LossWatch`), ``step_size_ceiling`` the ceiling
    it set on the step size (``inf``: none), ``ceiling_loss`` the lowest loss
    average before the rise (the ceiling is lifted once the loss falls measurably below it)
    and ``ceiling_rise`` the average that set it (lifted too once the lowest average since
    lies measurably above it: new data, not the step size, raised the loss).
    ``floor_hits`` counts the searches in a row whose trials showed the loss below the floor
    of ``loss_floor``'s cap and the Polyak start (:func:`alsals.polyak_cap.floor_word`);
    from ``FLOOR_HITS`` on the run no longer uses it (``floor_refuted``).
    ``untested_step_size`` is the step size of the last update when no evaluation tested
    where it landed (a step reusing its step size, AdamSLS's momentum update) and the update
    can be undone from the stored moments, 0 otherwise; ``nonfinite_losses_in_a_row`` counts
    the steps in a row skipped because the loss at their start was not finite,
    ``undone_updates`` the untested updates undone after two of them (``docs/algorithms.md``,
    phase 6). ``kinks_passed`` counts the searches whose trials contradicted their slope
    and which took a step with the slope the trials measured (phase 5.8), ``kinks_in_a_row``
    those since the last search that its own slope accepted (while it is not 0, the next
    contradiction is not stepped through, and every step searches). Only numbers:
    ``torch.optim``'s ``load_state_dict`` would mangle a string here.
    """

    step_size: float
    initial_step_size: float
    decrease_avg: float = 0.0
    slope_avg: float = 0.0
    step_size_fast: float = 0.0
    step_size_slow: float = 0.0
    step: int = 0
    averaged: int = 0
    searches: int = 0
    steps_since_search: int = 0
    forwards: int = 0
    backwards: int = 0
    trials: int = 0
    failed_searches: int = 0
    unresolved_searches: int = 0
    unaccepted_in_a_row: int = 0
    settled: int = 0
    skipped_nonfinite: int = 0
    skipped_zero_grad: int = 0
    model_loss_avg: float = 0.0
    model_anchor_avg: float = 0.0
    model_steps: int = 0
    loss_avg: float = 0.0
    loss_spread_avg: float = 0.0
    loss_samples: int = 0
    loss_lowest: float = 0.0
    step_size_avg: float = 0.0
    moves_avg: float = 0.0
    step_size_at_lowest: float = 0.0
    loss_error_at_lowest: float = 0.0
    watch_from_start: bool = True
    loss_start_mean: float = 0.0
    step_size_at_start: float = 0.0
    step_size_ceiling: float = math.inf
    ceiling_loss: float = 0.0
    ceiling_rise: float = math.inf
    floor_hits: int = 0
    untested_step_size: float = 0.0
    nonfinite_losses_in_a_row: int = 0
    undone_updates: int = 0
    kinks_passed: int = 0
    kinks_in_a_row: int = 0

    @property
    def floor_refuted(self) -> bool:
        """The run no longer uses the floor: ``FLOOR_HITS`` searches in a row said it is wrong."""
        return self.floor_hits >= FLOOR_HITS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchState:
        """Read and validate a stored state; a ``ValueError`` names the first bad entry.

        Entries missing from older checkpoints take their start values; the guard's EMA of
        the squared losses that checkpoints before 0.2.9 hold becomes its spread.
        """
        known = {f.name for f in fields(cls)} | {"loss_sq_avg"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown entries in the line_search state: {unknown}")
        for name in ("step_size", "initial_step_size"):
            if name not in values:
                raise ValueError(f"the line_search state has no {name!r}")
            _check_step_size(name, values[name])
        for name in (
            "decrease_avg",
            "slope_avg",
            "step_size_fast",
            "step_size_slow",
            "model_loss_avg",
            "model_anchor_avg",
            "loss_avg",
            "loss_spread_avg",
            "loss_sq_avg",
            "loss_lowest",
            "step_size_avg",
            "moves_avg",
            "step_size_at_lowest",
            "loss_error_at_lowest",
            "loss_start_mean",
            "step_size_at_start",
            "ceiling_loss",
            "untested_step_size",
        ):
            value = values.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"invalid line_search state {name!r}: {value!r} (not a number)")
            if not math.isfinite(value):
                raise ValueError(f"invalid line_search state {name!r}: {value!r} (not finite)")
        if "loss_sq_avg" in values and "loss_spread_avg" in values:
            raise ValueError(
                "the line_search state holds both 'loss_sq_avg' (the guard's statistics "
                "before alsals 0.2.9) and 'loss_spread_avg' (since): one of them, not both"
            )
        if not isinstance(values.get("watch_from_start", False), bool):
            raise ValueError(
                "invalid line_search state 'watch_from_start': "
                f"{values['watch_from_start']!r} (expected True or False)"
            )
        for name in ("untested_step_size", "loss_spread_avg", "loss_sq_avg"):
            if values.get(name, 0.0) < 0:
                raise ValueError(
                    f"invalid line_search state {name!r}: {values[name]!r} (expected a number >= 0)"
                )
        ceiling = values.get("step_size_ceiling", math.inf)
        if isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or not ceiling > 0:
            raise ValueError(
                f"invalid line_search state 'step_size_ceiling': {ceiling!r} (expected a "
                "number > 0, inf for none)"
            )
        rise = values.get("ceiling_rise", math.inf)
        if isinstance(rise, bool) or not isinstance(rise, (int, float)) or not rise > -math.inf:
            raise ValueError(
                f"invalid line_search state 'ceiling_rise': {rise!r} (expected a number, inf "
                "for none)"
            )
        for name in COUNTERS:
            value = values.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"invalid line_search state {name!r}: {value!r} (expected an integer >= 0)"
                )
        if "loss_sq_avg" in values:
            values = dict(values)
            values["loss_spread_avg"] = spread_from_squares(
                values.get("loss_avg", 0.0),
                values.pop("loss_sq_avg"),
                values.get("loss_samples", 0),
                LOSS_SMOOTHING,
            )
        # (a watch stored before 0.2.15 took no start level: it continues as it ran)
        values = {"watch_from_start": False, **values}
        state = cls(step_size=float(values["step_size"]), initial_step_size=0.0)
        return replace(state, **{k: v for k, v in values.items() if k != "step_size"})

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of numbers, as stored in ``state_dict``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_step_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid line_search state {name!r}: {value!r} (not a number)")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"invalid line_search state {name!r}: {value!r} (a step size must be finite and > 0)"
        )
