"""ALSALS's search state: the step size, the rules' ceilings and watches, counters.

It lives in ``optimizer.state[anchor][STATE_KEY]`` (the anchor: the first parameter that
requires grad, else the first) as a plain dict of numbers, so that ``state_dict()``
carries it and ``torch.load(weights_only=True)`` reads it back.
Inside a step it is a :class:`SearchState`, typed; a state from outside (a checkpoint, a
load) is validated entry by entry before anything is loaded, so that a hand-edited or
foreign entry is refused with its name instead of misleading the search later.
(:mod:`alsals.search_state` is the counterpart of ``LineSearchOptimizer``: SLS, AdamSLS,
MomentumALSALS.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from alsals.rise_guard import LossWatch, StartWatch

#: The key of the search state in the first trainable parameter's ``state``.
STATE_KEY = "schedule_free_search"
#: The per-parameter entries a step writes (:mod:`alsals.state_placeholders`).
PLACEHOLDER_KEYS = ("z", "exp_avg_sq", "step", STATE_KEY)


@dataclass
class SearchState:
    """The search's scalars, stored in ``state`` so that ``state_dict`` round-trips."""

    step_size: float
    initial_step_size: float = math.nan  # lr as the run began: warm-up's peak
    resume: float = 0.0  # where the search after one that accepted nothing starts (0: none)
    # the last search found no step the loss's rounding lets it judge (a rejected trial and
    # moves it hides below, or only such moves): until the next search at the cadence, steps
    # take the averaging move alone
    idle: bool = False
    untested_write: bool = False  # the step size is a written lr no search has run from yet
    nonfinite_in_a_row: int = 0  # steps skipped in a row for a non-finite loss at y
    steps: int = 0  # steps that moved the weights
    searches: int = 0
    steps_since_search: int = 0
    kept: int = 0  # searches whose averaging move alone failed the test
    first_phase_over: bool = False  # the searches of the first steps have ended early
    exhausted: int = 0  # searches that ran out of trials
    restarts: int = 0  # restarts of z at x: rise_restart's, and after non-finite losses at y
    first_loss: float = math.nan  # the run's first finite batch loss
    edits: int = 0  # steps that found the weights written since the last (z restarted there)
    skipped_nonfinite: int = 0
    skipped_zero_grad: int = 0
    trials: int = 0
    forwards: int = 0
    backwards: int = 0
    step_size_ceiling: float = math.inf  # loss_rise_guard's
    ceiling_loss: float = 0.0
    ceiling_rise: float = math.inf  # the loss average that set the ceiling
    watch: dict[str, float] | None = None  # loss_rise_guard's LossWatch
    loss_followed: bool = False  # a step a search took lowered the loss (it follows the weights)
    leading: int = 0  # steps since the last search whose batch found z downhill of y
    trailing: int = 0  # ... and uphill
    kept_in_a_row: int = 0  # searches in a row whose averaging move alone failed the test
    retry_from: float = 0.0  # cut_retry, late_retry: the start of a search that cut
    # regrowth: the last search's first trial passed as the linear model promised, and the
    # largest step size a search of the run has set (reset by a written lr, lowered by the
    # ceilings and by kept_rule's and lead_rule's shrinks)
    regrow: bool = False
    peak_step_size: float = 0.0
    start_ceiling: float = math.inf  # start_rise's
    start_watch: dict[str, float] | None = None  # start_rise's StartWatch
    # a gradient near the largest float was seen: Adam's bias correction divides the
    # square root of v', not v' itself (which may overflow)
    root_first: bool = False

    def ceiling(self) -> float:
        """The step size's ceiling: ``loss_rise_guard``'s and ``start_rise``'s."""
        return min(self.step_size_ceiling, self.start_ceiling)

    def drop_start_watch(self) -> None:
        """``start_rise``'s ceiling lifted and its statistics dropped (the start level is
        taken afresh from the next losses)."""
        self.start_ceiling, self.start_watch = math.inf, None

    def drop_watches(self) -> None:
        """Both rules' ceilings lifted and their statistics dropped: nothing they saw
        applies any more (a written ``lr``, the guard written off)."""
        self.step_size_ceiling, self.ceiling_loss, self.watch = math.inf, 0.0, None
        self.ceiling_rise = math.inf
        self.drop_start_watch()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a new dict (the watches' flat dicts copied; a watch not yet filled
        left out, as ``from_dict`` reads it: ``torch.distributed.checkpoint`` flattens
        numbers and dicts, not ``None``): ``asdict``'s recursive copy, for the same result,
        cost some 0.2 ms a step."""
        stored = dict(vars(self))
        for name in ("watch", "start_watch"):
            if stored[name] is None:
                del stored[name]
            else:
                stored[name] = dict(stored[name])
        return stored

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> SearchState:
        """The state ``to_dict`` stored (entries of older versions' that no longer shape
        the run dropped); ``check_stored`` validates one from outside first."""
        return cls(**{k: v for k, v in stored.items() if k not in RETIRED_STATE_ENTRIES})

    @staticmethod
    def check_stored(stored: Any) -> None:
        """Refuse a stored state that no run can have written (a checkpoint edited by
        hand, another optimizer's entry): a ``ValueError`` naming the first bad entry,
        before anything is loaded (a ceiling of -1 collapsed every later step size to
        the smallest float, silently)."""
        if not isinstance(stored, dict):
            raise ValueError(f"invalid ALSALS state {STATE_KEY!r}: {stored!r} (not a dict)")
        names = {f.name for f in fields(SearchState)}
        unknown = sorted(set(stored) - names - RETIRED_STATE_ENTRIES)
        if unknown:
            raise ValueError(f"unknown entries in the ALSALS state {STATE_KEY!r}: {unknown}")
        if "step_size" not in stored:
            raise ValueError(f"the ALSALS state {STATE_KEY!r} has no 'step_size'")
        for name, value in stored.items():
            if name in RETIRED_STATE_ENTRIES:
                continue
            expected = _STATE_ENTRY_RANGES.get(name)
            if name in ("watch", "start_watch"):
                _check_watch(name, value)
            elif expected is None:  # a flag
                if not isinstance(value, bool):
                    raise ValueError(_invalid_entry(name, value, "True or False"))
            elif expected == "count":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(_invalid_entry(name, value, "an integer >= 0"))
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(_invalid_entry(name, value, f"a number, {expected}"))
            elif not _in_stored_range(value, expected):
                raise ValueError(_invalid_entry(name, value, expected))


#: Entries of the search state that earlier versions stored and none reads any more.
RETIRED_STATE_ENTRIES = frozenset({"last_kept", "linear"})
#: What each numeric entry of the search state may hold ("count": an integer >= 0).
_STATE_ENTRY_RANGES = {
    "step_size": "finite and > 0",
    "initial_step_size": "finite and > 0, or nan",
    "resume": "finite and >= 0",
    "first_loss": "finite, or nan",
    "step_size_ceiling": "> 0 (inf: none)",
    "ceiling_loss": "finite",
    "ceiling_rise": "finite, or inf",
    "retry_from": "finite and >= 0",
    "peak_step_size": "finite and >= 0",
    "start_ceiling": "> 0 (inf: none)",
    **{
        name: "count"
        for name in (
            "nonfinite_in_a_row",
            "steps",
            "searches",
            "steps_since_search",
            "kept",
            "exhausted",
            "restarts",
            "edits",
            "skipped_nonfinite",
            "skipped_zero_grad",
            "trials",
            "forwards",
            "backwards",
            "leading",
            "trailing",
            "kept_in_a_row",
        )
    },
}


def _in_stored_range(value: float, expected: str) -> bool:
    """Whether a stored number lies in the range ``_STATE_ENTRY_RANGES`` describes."""
    if math.isnan(value):
        return expected.endswith("or nan")
    if math.isinf(value):
        return value > 0 and expected.endswith(("(inf: none)", "or inf"))
    if "> 0" in expected:
        return value > 0
    return value >= 0 if ">= 0" in expected else True


def _invalid_entry(name: str, value: Any, expected: str) -> str:
    return f"invalid ALSALS state {name!r}: {value!r} (expected {expected})"


def _check_watch(name: str, value: Any) -> None:
    """A stored watch: the fields of ``LossWatch`` (``"watch"``, also as stored before
    0.2.9) or of ``StartWatch`` (``"start_watch"``), each a number."""
    kind = LossWatch if name == "watch" else StartWatch
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(_invalid_entry(name, value, f"a dict of {kind.__name__}'s fields"))
    known = {f.name for f in fields(kind)} | ({"loss_sq_avg"} if kind is LossWatch else set())
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown entries in the ALSALS state {name!r}: {unknown}")
    for key, entry in value.items():
        if isinstance(entry, bool) != (key in ("armed", "from_start")) or not isinstance(
            entry, (int, float)
        ):
            raise ValueError(_invalid_entry(f"{name}.{key}", entry, "a number"))
