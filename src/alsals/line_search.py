"""One line-search engine behind SLS, Adam + SLS and MomentumALSALS.

The three optimizers of the paper differ in four choices only: the direction searched along,
the direction the accepted step is applied along, how the slope on the right-hand side of
the Armijo test is obtained, and the test itself (``c``, smoothing).
``LineSearchOptimizer`` runs the shared procedure; the public classes in
:mod:`alsals.optimizers` pick the choices.

``step`` runs the phases of ``docs/algorithms.md`` in order, one method each, under the same
names as ``tests/reference.py``:

0. ``_adopt_written_lr``  a step size written into ``param_groups[i]["lr"]`` since the
   last step sets where the search starts (0: this step takes no update).
1. ``_evaluate``          the loss and the gradients at the starting weights ``w0``.
2. ``_check``             skip the step (a non-finite loss, gradient or moment; an all-zero
   gradient), with the same collectives on every rank.
3. ``_plan``              warm-up, search, reuse of the step size, or no update.
4. ``_directions``        the search direction of this step (Adam's moments are not
   touched yet).
5. ``_search``            the slope, then trials at ``w0 + eta d``: grow, backtrack, accept.
6. ``_commit``            Adam's moments, the update with decoupled weight decay, the
   search state and every group's ``lr``.

Nothing is written before phase 6: an exception raised anywhere in a step (by the closure
included) leaves the weights, the moments, the counters and the search state exactly as they
were, and the random state and protected buffers as they were before the step.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from alsals.acceptance import (
    FIRM_RISE,
    RESOLUTION_ULPS,
    ArmijoTest,
    SearchTest,
    loss_resolution,
    measured_slope,
    overstated_fraction,
)
from alsals.backtracking import MIN_STEP_SIZE, Backtracking
from alsals.closure import (
    Closure,
    ClosureEvaluator,
    LeftGradients,
    checked_buffers,
    left_by_a_step,
)
from alsals.directions import (
    Direction,
    GroupStep,
    StepDirection,
    analytic_slope,
    build_direction,
    commit_moments,
    committed_denominators,
    committed_momentum_direction,
    denominators_after,
    detached_copies,
    float64_vector,
    largest_representable,
    scaled,
    second_moments_after,
    wide_norms,
)
from alsals.distributed import (
    any_not_finite,
    checked_process_group,
    local_shard,
    mean_to_host,
    shard_count,
)
from alsals.hyperparameters import (
    ADAPTIVE_CADENCES,
    GROUP_KEYS,
    MAX_STEP_SIZE,
    SEARCH_KEYS,
    TORCH_GROUP_KEYS,
    check_group,
    checked_search,
    in_range,
    real,
)
from alsals.messages import (
    BUFFERS_MOVED_HINT,
    BUFFERS_WARNING,
    COMPLEX_PARAMETERS,
    CONTRADICTED_WARNING,
    DISCONNECTED_WARNING,
    DROPPED_GRADIENTS_WARNING,
    FAILED_SEARCHES_WARNING,
    FROZEN_GROUP_ADVICE,
    HIDDEN_PROBE_SEARCHES,
    HIDDEN_PROBE_WARNING,
    LOSS_CULPRIT,
    NO_BACKWARD_WARNING,
    NO_GRAD_NONFINITE,
    PARTIAL_MODEL_WARNING,
    SCHEDULE_WARNING,
    STALE_BUFFERS_HINT,
    STALL_WARNING_STEPS,
    UNBOUNDED_LOSS_HINT,
    UNCHANGED_LOSS_WARNING,
    UNDONE_WARNING,
    UNRESOLVED_WARNING,
    not_replayed_message,
    overstated_message,
)
from alsals.polyak_cap import FLOOR_HITS, ModelTerms, MomentumModel, floor_word, model_terms
from alsals.rise_guard import LossWatch
from alsals.search_state import SearchState
from alsals.searching_optimizer import SearchingOptimizer
from alsals.state_placeholders import (
    is_state_initialisation,
    state_dict_without_placeholders,
)
from alsals.torch_optim_boundary import (
    FOREIGN_GROUP_KEYS,
    SCHEDULE_WARNING_STEPS,
    check_eps,
    check_state_dict_form,
    drop_foreign_keys,
    group_params,
    groups_with_one_lr,
    refuse_maximize,
    schedule_suspected,
    split_shown_lr,
    warn_about_other_settings,
    written_lr,
)
from alsals.touched_buffers import TouchedBuffers

#: The per-parameter entries a step writes (:mod:`alsals.state_placeholders`).
PLACEHOLDER_KEYS = ("step", "exp_avg", "exp_avg_sq", "line_search")

ADAPTIVE_MIN_SEARCHES = 10  # SaLSa: always search during the first 10 steps
ADAPTIVE_MAX_INTERVAL = 10  # ... and at least every 10 steps afterwards
#: The first search of an optimizer is reported at WARNING level from this many trials.
FIRST_SEARCH_WARNING_TRIALS = 20
#: After this many trials in a row with a non-finite loss, a search evaluates the loss again
#: at its starting weights (one forward pass, once): if that is not finite either, the
#: closure's evaluations without gradient fail whatever the step, and the step is skipped
#: (instead of ``max_trials`` passes per step). A step too large to evaluate does not pay it
#: unless its loss stays non-finite for this many backtracking trials.
NONFINITE_TRIALS_BEFORE_CHECK = 2
SEARCH_KINDS = ("search", "failed", "unresolved")
LOGGER = logging.getLogger("alsals")


@dataclass(frozen=True)
class StepInfo:
    """What the last call to ``step`` did, for logging.

    ``kind`` is ``"search"`` (a trial was accepted), ``"reuse"`` (cadence: the previous
    step size was reused), ``"zero_lr"`` (``lr`` 0 was written: no update),
    ``"failed"`` (no trial passed: weights unchanged), ``"unresolved"`` (the trials that
    passed were below the resolution of the weights or the loss: weights unchanged),
    ``"nonfinite"`` (loss, gradient, moment or slope not finite: step skipped) or
    ``"zero_grad"`` (no gradient, or all zero); ``ALSALS`` has ``"kept"`` and
    ``"exhausted"`` in place of ``"failed"`` and ``"unresolved"`` (what each does is in
    its docstring). ``trials``, ``forwards`` and ``backwards`` count this step's (the
    run's totals are in ``search_state``). ``step_size`` is the ``eta`` applied (0 when
    the weights did not move), ``slope`` the slope estimate (``nan`` when none was computed)
    and ``loss_decrease`` is ``f(w0) - f(w0 + eta d)`` at the accepted trial (``nan`` if
    none, or if the step size was taken untested, ``trust_interpolation``). ``grad_norm``
    is the gradient norm before clipping (with ``max_grad_norm``; else ``nan``).
    ``capped`` says that ``loss_floor``'s Polyak cap made ``step_size`` smaller than the
    step size the search found (or reused), which stays the optimizer's ``lr``; the
    ``loss_decrease`` measured at the larger one is then not reported (``nan``).
    ``loss_rose`` says that ``loss_rise_guard`` found the batch losses' average climbing at
    this step while the step size grew, and set a ceiling on the step size (in the search
    state, ``step_size_ceiling``): its average when the loss was lowest (``ALSALS``: or,
    with ``rise_restart``, found it climbing whatever the step size did, and restarted
    ``z`` at the average; or, with ``start_rise``, found it measurably above its level over
    the run's first 10 steps and halved the step size: ``start_ceiling``).
    """

    kind: str
    step_size: float
    loss: float
    trials: int
    forwards: int
    backwards: int
    slope: float
    loss_decrease: float
    grad_norm: float = math.nan
    capped: bool = False
    loss_rose: bool = False


@dataclass
class Outcome:
    """What phases 2-5 decided; phase 6 writes it."""

    kind: str
    step_size: float = 0.0
    trials: int = 0
    slope: float = math.nan
    loss_decrease: float = math.nan
    next_step_size: float | None = None  # eta for the next search, where it changes
    tested: bool = True  # False: the step size was taken on the model's word
    decrease_avg: float | None = None  # D and G to store (accepted searches)
    slope_avg: float | None = None
    reset_averages: bool = False
    warning: str | None = None
    capped: bool = False  # loss_floor's cap made step_size smaller (next_step_size is set)
    loss_rose: bool = False  # loss_rise_guard fired: the ceiling is cut in phase 6
    # every trial gave exactly L0, one of them a move as large as the weights (5.5)
    loss_unchanged: bool = False
    # a second non-finite skip in a row after an untested update: phase 6 undoes the update
    undo: bool = False
    # the trials contradicted the slope; the step was judged with the one they measured (5.8)
    slope_measured: bool = False
    # ... and once more before a search accepted by its own slope: no step (5.8)
    contradicted_again: bool = False
    # a search without a step whose trials fell short of a slope the gradient overstates:
    # the fraction of it they measured (acceptance.overstated_fraction)
    overstated: float = math.nan

    @property
    def loss_not_finite(self) -> bool:
        """Skipped because the loss at ``w0`` is not finite (with gradient, or as the trials
        evaluate it): the weights may be outside the loss's domain. A non-finite gradient
        with a finite loss (GradScaler's overflows) or slope is not this."""
        return self.kind == "nonfinite" and self.warning in (LOSS_CULPRIT, NO_GRAD_NONFINITE)

    @classmethod
    def accepted(cls, test: SearchTest, eta: float, trials: int, averaged: bool) -> Outcome:
        """A search whose trial at ``eta`` passed: ``D'`` and ``G'`` are to be stored
        (``averaged``; not during warm-up)."""
        return cls(
            "search",
            step_size=eta,
            trials=trials,
            slope=test.slope,
            loss_decrease=test.decrease,
            next_step_size=eta,
            decrease_avg=test.decrease_now if averaged else None,
            slope_avg=test.slope_now if averaged else None,
        )

    @classmethod
    def trusted(cls, test: SearchTest, eta: float, trials: int) -> Outcome:
        """A search whose last trial lowered the loss measurably but failed the test, taking
        the step size ``eta`` that the quadratic through that trial predicts will pass,
        untested: the averages store the decrease the quadratic predicts at ``eta``."""
        return cls(
            "search",
            step_size=eta,
            trials=trials,
            slope=test.slope,
            next_step_size=eta,
            decrease_avg=test.test.average(test.decrease_average, test.predicted_decrease(eta)),
            slope_avg=test.slope_now,
            tested=False,
        )


@dataclass
class StepPreview:
    """The step ``optimizer.preview(closure)`` would take, without taking it."""

    info: StepInfo
    params: list[Tensor]  # the parameters that take part (grad set)
    # the direction d the step searches along (a step that reuses its step size: the one it
    # moves along), one tensor per parameter; empty if the step takes no update
    direction: list[Tensor]
    state: SearchState  # the search state before the step


def _check_one_beta1(
    loss_floor: float | None, group: dict[str, Any], first: dict[str, Any]
) -> None:
    """A ``ValueError`` where ``loss_floor``'s cap is on and ``group``'s ``beta1`` differs
    from the first group's: the model of the loss averages all parameters with one factor."""
    if loss_floor is not None and "betas" in group and group["betas"][0] != first["betas"][0]:
        raise ValueError(
            "betas[0] differs from the first group's: loss_floor's model of the loss averages "
            "all parameters with one beta1 (pass the same beta1 to every group, or "
            "loss_floor=None)"
        )


def _largest_magnitude(grads: list[Tensor], device: torch.device) -> Tensor:
    """``max |g|`` over all the tensors (NaN if one holds a NaN), as a float64 device
    scalar: no host sync. None may be empty (``aminmax`` refuses an empty tensor).

    On CPU the infinity-norm kernel behind ``torch._foreach_norm(..., inf)`` is not
    vectorised and takes about 20 times as long as ``aminmax``, which also reads each tensor
    once; on other devices the fused multi-tensor norm is the fastest.
    """
    if all(g.device.type == "cpu" for g in grads):
        extremes = torch.stack([e for g in grads for e in torch.aminmax(g)]).abs().max()
        return extremes.to(device, torch.float64)
    return float64_vector(torch._foreach_norm(grads, math.inf), device).max()


class _TrialPoint:
    """The weights during a search: ``w0`` kept in one buffer, trial points set in place.

    The buffer is allocated at the first trial, after the analytic slope's temporaries are
    gone, so the search never holds more than it.
    """

    def __init__(self, steps: list[GroupStep], directions: list[StepDirection]) -> None:
        self.steps = steps
        self.directions = directions
        self.origins: list[list[Tensor]] = []
        self.at_origin = True

    def place(self, eta: float) -> None:
        """Set the weights to ``w0 + eta d``."""
        if not self.origins:
            self.origins = [detached_copies(step.weights) for step in self.steps]
        if not self.at_origin:
            self.restore()
        for step, d in zip(self.steps, self.directions, strict=True):
            d.add_to(step.weights, eta)
        self.at_origin = False

    def update_as_large_as_weights(self, group: dist.ProcessGroup | None) -> float:
        """The step size ``eta`` with ``||eta d|| = max(||w0||, 1)`` (norms over all
        parameters and shards, in float64: a float32 norm of entries below about 1e-23 is 0,
        and the ceiling was then lost; one synchronisation): the ceiling of climbs (5.5)."""
        w_terms: list[Tensor] = []
        d_terms: list[Tensor] = []
        device = self.origins[0][0].device if self.origins else torch.device("cpu")
        wide = torch.float64
        for step, d, origin in zip(self.steps, self.directions, self.origins, strict=True):
            if d.divisors is None:
                norms = [n * abs(d.scales[0]) for n in wide_norms(d.tensors, wide)]
            else:
                norms = [
                    wide_norms([t / q], wide)[0] * abs(s)
                    for t, q, s in zip(d.tensors, d.divisors, d.scales, strict=True)
                ]
            for w, n, k in zip(wide_norms(origin, wide), norms, step.shard_counts, strict=True):
                w_terms.append(w.to(device, torch.float64).square() * k)
                d_terms.append(n.to(device, torch.float64).square() * k)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        weights, direction = mean_to_host(
            [torch.stack(w_terms).sum() if w_terms else zero,
             torch.stack(d_terms).sum() if d_terms else zero],
            group,
        )  # fmt: skip
        if not direction > 0.0:
            return math.inf
        return max(math.sqrt(weights), 1.0) / math.sqrt(direction)

    def restore(self) -> None:
        """Set the weights back to ``w0`` exactly."""
        for step, origin in zip(self.steps, self.origins, strict=False):
            torch._foreach_copy_(step.weights, origin)
        self.at_origin = True


@dataclass
class _Run:
    """What phases 1-5 of one step built, for phase 6 (and ``preview``)."""

    steps: list[GroupStep] = field(default_factory=list)
    directions: list[StepDirection] = field(default_factory=list)
    denominators: list[list[Tensor] | None] = field(default_factory=list)
    trial: _TrialPoint | None = None
    first_search: bool = False  # no search has run before this step
    start_step_size: float = math.nan  # eta after phase 0
    model: MomentumModel | None = None  # loss_floor's model with this batch (phase 5.6)
    watch: LossWatch | None = None  # loss_rise_guard's watch with this batch (phase 5.7)
    # loss_rise_guard's ceiling and the loss it guards, where they change (phase 5.7)
    ceiling: tuple[float, float, float] | None = None
    rise: tuple[float, float, float, float] | None = None  # the rise it saw, for the log
    floor_hit: bool | None = None  # what the search's trials said of the floor (5.2)
    # every parameter that holds Adam moments takes part in this step (``grad`` set)
    all_moments_take_part: bool = True


class LineSearchOptimizer(SearchingOptimizer):
    """Base class: an Armijo line search along a configurable direction.

    Subclasses set ``search_directions`` (the directions they may search along, the first
    their default; the ``search_direction`` setting picks one) and ``update_direction``. See
    :mod:`alsals.optimizers` for the parameters. ``param_groups[i]["lr"]`` always shows the
    searched step size for group ``i`` (``eta * lr_scale``; an update that ``loss_floor``'s
    Polyak cap cut took less, ``last_step.step_size``); writing to it between steps sets
    the step size the next search starts from, and writing 0 makes the next step take no
    update.
    """

    search_directions: tuple[Direction, ...]
    update_direction: Direction

    STATE_KEY = "line_search"
    PLACEHOLDER_KEYS = PLACEHOLDER_KEYS
    SEARCH_STATE = SearchState

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if isinstance(params, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the parameters, not the module: pass "
                "model.parameters() (or a list of parameter groups)"
            )
        self._buffers = checked_buffers(buffers)
        self._process_group = checked_process_group(process_group)
        self.__dict__.update(self._fresh_bookkeeping())
        params, lr = groups_with_one_lr(params, defaults["lr"])
        defaults = {"search_direction": self.search_directions[0].value, **defaults, "lr": lr}
        super().__init__(params, self._checked_direction(checked_search(defaults)))

    # ------------------------------------------------------------------ torch.optim protocol

    @classmethod
    def _fresh_bookkeeping(cls) -> dict[str, Any]:
        return {
            **super()._fresh_bookkeeping(),
            "_probe_hidden": None,  # this step's finite-difference probe within the rounding
            "_clip_factor": 1.0,  # max_grad_norm's factor on the gradients this step
            "_replay_loss": None,  # the replay check's loss at the first search of a run
            "_model_terms": None,  # the search's model of the loss along the step (ModelTerms)
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_buffers", [])
        self.__dict__.setdefault("_process_group", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._refuse_in_step("add_param_group()")
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        param_group = {**param_group, "params": group_params(param_group)}
        self._drop_foreign_keys(param_group)
        for key in SEARCH_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key!r} cannot differ between parameter groups: the line search takes one "
                    "decision for all parameters (per-group settings: "
                    f"{', '.join(GROUP_KEYS)})"
                )
        if "lr" in param_group:
            lr = real("lr", param_group["lr"])
            shown = self._stored_search_state().step_size * param_group.get("lr_scale", 1.0)
            if lr not in (self.defaults["lr"], shown):  # shown: a copy of another group
                raise ValueError(
                    f"a per-group 'lr' ({lr!r}, the optimizer's is {self.defaults['lr']!r}) is not "
                    "supported: the line search picks one step size for all parameters. Pass "
                    "one base lr to the optimizer (where the search starts, e.g. the first "
                    "group's) and give each group lr_scale = its lr / that base lr instead"
                    + (f"; {FROZEN_GROUP_ADVICE}" if lr == 0 else "")
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            if any(torch.is_complex(p) for p in group["params"]):
                raise ValueError(COMPLEX_PARAMETERS)
            _check_one_beta1(self.defaults.get("loss_floor"), group, self.param_groups[0])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._show_new_group(group)

    def _drop_foreign_keys(self, param_group: dict[str, Any]) -> None:
        known = {*SEARCH_KEYS, *GROUP_KEYS, *TORCH_GROUP_KEYS, "param_names"}
        drop_foreign_keys(type(self).__name__, param_group, known, GROUP_KEYS)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``, validated first: a ``ValueError`` names the
        first bad entry and nothing is loaded. A state saved with other search settings (by
        another class, or another configuration) warns: as in ``torch.optim``, the saved
        settings replace this optimizer's. A state of another optimizer (AdamW) warns and
        lends its moments, ``lr`` and the per-group settings both share (``betas``, ``eps``,
        ``weight_decay``); its other settings are dropped."""
        self._refuse_in_step("load_state_dict()")
        check_state_dict_form(type(self).__name__, state_dict)
        saved_groups = state_dict.get("param_groups", [])
        if any("weight_sum" in g and "lr_max" in g for g in saved_groups):
            raise ValueError(
                f"the state loaded into {type(self).__name__} was saved by ALSALS: a "
                "Schedule-Free run (its model holds the average x, its state z and no Adam "
                "momentum) cannot continue as this optimizer's; load it into ALSALS"
            )
        state_dict, shown = split_shown_lr(state_dict)
        state_dict = state_dict_without_placeholders(state_dict, PLACEHOLDER_KEYS)
        state_dict = self._without_foreign_settings(state_dict)
        self._validate_state(state_dict)
        groups = state_dict.get("param_groups", [])
        if groups:
            saved = self._checked_settings(groups[0])
            warn_about_other_settings(type(self).__name__, saved, self.defaults, SEARCH_KEYS)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(self._checked_settings(group))
        for entries in self.state.values():  # torch.optim's step counts are tensors: read
            if isinstance(entries.get("step"), Tensor):  # them once here, not every step
                entries["step"] = int(entries["step"].item())
        if self.param_groups:  # groups added later get the loaded settings, not the old ones
            self.defaults.update({k: self.param_groups[0][k] for k in SEARCH_KEYS})
        self._shown_lr = shown
        self._placeholders, self._signature = False, None  # (the loaded state holds none)

    def _without_foreign_settings(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state of another optimizer, minus that optimizer's settings (with a warning)."""
        groups = state_dict.get("param_groups", [])
        refuse_maximize(type(self).__name__, groups)
        foreign = sorted({k for g in groups for k in g if k in FOREIGN_GROUP_KEYS})
        if not groups or (not foreign and any(k in groups[0] for k in SEARCH_KEYS)):
            return state_dict
        kept = [{k: v for k, v in g.items() if k not in FOREIGN_GROUP_KEYS} for g in groups]
        saved = state_dict.get("state", {})
        if any(isinstance(e, dict) and self.STATE_KEY in e for e in saved.values()):
            # an alsals state that something added another optimizer's keys to (a tool, a
            # hand): its own, the search state with it; only those keys go
            warnings.warn(
                f"the state loaded into {type(self).__name__} holds keys of another "
                f"optimizer's parameter groups, {foreign}: dropped",
                UserWarning,
                stacklevel=3,
            )
            return {**state_dict, "param_groups": kept}
        rates = [g.get("lr") for g in kept]
        frozen = [i for i, r in enumerate(rates) if r == 0]
        if frozen and len(frozen) < len(rates):  # (one lr 0 for all: nothing moves)
            raise ValueError(
                f"the state loaded into {type(self).__name__} has lr 0 in param_groups"
                f"{frozen}, where the other groups train: {FROZEN_GROUP_ADVICE}, then load "
                "the state with those groups' lr set to the others'"
            )
        layer_wise = len(set(rates)) > 1 and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates
        )
        if layer_wise:  # one step size for all: the groups' rates become its multiples
            kept = [{**g, "lr_scale": r / rates[0]} for g, r in zip(kept, rates, strict=True)]
        # per parameter, Adam's moments and step count where this optimizer uses them; the
        # rest (SGD's momentum_buffer, RMSprop's square_avg, Adagrad's sum) would be carried
        # unused into every later checkpoint
        used = {"exp_avg", "exp_avg_sq", "step"} if self.uses_moments else set()
        entries = {  # (a step count without Adam's moments counts another optimizer's steps)
            index: {k: v for k, v in e.items() if k in used}
            for index, e in saved.items()
            if used and "exp_avg" in e
        }
        kept_keys = {k for e in entries.values() for k in e}
        dropped = sorted({k for e in saved.values() for k in e} - kept_keys)
        warnings.warn(
            f"the state loaded into {type(self).__name__} was not saved by an alsals "
            f"optimizer (its groups hold {foreign or 'no search settings'}): "
            + ("its Adam moments, " if entries else "")  # (each entry holds them)
            + "lr (the start of the search) and the per-group settings both share (betas, "
            "eps, weight_decay) are used"
            + (f"; its per-parameter state {dropped} is dropped" if dropped else "")
            + (
                f"; its groups' different lrs ({', '.join(f'{r:g}' for r in rates)}) become "
                "lr_scale = each group's lr / the first group's"
                if layer_wise
                else ""
            )
            + "; the other optimizer's settings are dropped",
            UserWarning,
            stacklevel=3,
        )
        return {**state_dict, "state": entries, "param_groups": kept}

    def _validate_state(self, state_dict: dict[str, Any]) -> None:
        """Raise a ``ValueError`` naming the first bad entry of ``state_dict``."""
        try:
            self._check_groups(state_dict.get("param_groups", []))
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid state_dict: {error}") from None
        for index, entries in state_dict.get("state", {}).items():
            if "line_search" in entries:
                try:
                    SearchState.from_dict(entries["line_search"])
                except ValueError as error:
                    raise ValueError(f"invalid state_dict: state[{index}]: {error}") from None

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Raise an error naming the first bad setting of ``groups``: a value out of range,
        or a search setting that differs from the first group's."""
        first: dict[str, Any] | None = None
        for index, group in enumerate(groups):
            try:
                settings = self._checked_settings(group)
                first = settings if first is None else first
                differing = [k for k in SEARCH_KEYS if settings[k] != first[k]]
                if differing:
                    raise ValueError(
                        f"{differing[0]!r} differs from the first group's: the line search "
                        "takes one decision for all parameters"
                    )
                _check_one_beta1(settings["loss_floor"], settings, first)
            except (TypeError, ValueError) as error:
                raise type(error)(f"param_groups[{index}]: {error}") from None

    def _checked_settings(self, group: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters of a (saved) group, validated, missing ones from ``defaults``."""
        merged = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        # (a group's lr is any finite number >= 0, the step size a step showed included,
        # which may reach MAX_STEP_SIZE times lr_scale; the constructor's lr stays below it)
        lr = in_range("lr", merged["lr"], 0.0, closed_low=True)
        settings = checked_search({**merged, "lr": self.defaults["lr"]})
        check_group(merged)
        out = {key: settings[key] for key in SEARCH_KEYS}
        out.update({key: merged[key] for key in GROUP_KEYS if key in merged})
        out["lr"] = lr
        return self._checked_direction(out)

    def _checked_direction(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings``, after checking that this class can search along its direction."""
        allowed = [d.value for d in self.search_directions]
        if settings["search_direction"] not in allowed:
            raise ValueError(
                f"{type(self).__name__} cannot search along {settings['search_direction']!r} "
                f"(search_direction: one of {allowed})"
            )
        return settings

    # ------------------------------------------------------------------------ public surface

    @property
    def search_direction(self) -> Direction:
        """The direction the search evaluates its trials along."""
        return Direction(self._settings["search_direction"])

    @property
    def uses_moments(self) -> bool:
        """Whether the directions need Adam's moments (AdamSLS, MomentumALSALS)."""
        return self.search_direction.uses_moments or self.update_direction.uses_moments

    @property
    def _settings(self) -> dict[str, Any]:
        """The search hyperparameters: equal in every group, read from the first."""
        return self.param_groups[0]

    @property
    def search_state(self) -> SearchState:
        """A copy of the search state (step size, averages, counters); read-only."""
        return self._stored_search_state()

    def params(self) -> list[Tensor]:
        """Every parameter of every group, in group order."""
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, closure_runs_backward: bool | None = None
    ) -> Tensor:
        """Take one step; returns the loss at the starting weights (from the first evaluation).

        ``closure`` is required: see :mod:`alsals.closure` for the two forms it may take. The
        form is read from its signature; ``closure_runs_backward=True`` declares a closure
        without arguments that runs backward itself while autograd is enabled (for wrappers
        that hide the signature).
        """
        if is_state_initialisation(self.state, self.param_groups, closure):  # a tool's
            if not self._in_step:  # (a tool reading the state inside the closure: a read)
                self._create_placeholders()
            return None  # type: ignore[return-value]  # (no closure, no loss: torch's None)
        with self._running_closure():
            return self._step(closure, commit=True, runs_backward=closure_runs_backward)[0]

    @torch.no_grad()
    def preview(self, closure: Closure) -> StepPreview:
        """The step ``step(closure)`` would take now, without taking it.

        Evaluates the closure and runs the search as ``step`` would, then puts everything
        back: weights, gradients, optimizer state, buffers and the random state. Calling
        ``step(closure)`` afterwards takes exactly the step previewed. The buffers put back
        are those given as ``buffers=`` and every buffer of the modules the closure runs
        (:class:`alsals.touched_buffers.TouchedBuffers`; where ``torch.compile`` has run it
        cannot watch those modules, and only ``buffers=`` are put back).
        """
        params = self.params()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        left = (
            self._left_grads is not None and self._left_grads.untouched(params)
        ) or left_by_a_step(params)
        before = self.search_state
        try:
            # (TouchedBuffers: the buffers not given as buffers=, BatchNorm's running
            # statistics, which the preview's forward passes would otherwise leave moved)
            with self._running_closure("preview()"), TouchedBuffers():
                _, info, run = self._step(closure, commit=False)
            directions = run.directions
            if info.kind == "reuse":
                # A step that reuses its step size searches nothing: its update direction.
                moments = self.update_direction.uses_moments
                directions = [
                    build_direction(
                        step, self.update_direction, denominators_after(step) if moments else None
                    )
                    for step in run.steps
                ]
            direction = [t for d in directions for t in d.materialize()]
            taking_part = [p for step in run.steps for p in step.params]
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            if left:  # still the previous step's gradients, as copies
                self._left_grads = LeftGradients.at_step_end(params)
        return StepPreview(info=info, params=taking_part, direction=direction, state=before)

    # ------------------------------------------------------------------------------ the step

    def _step(
        self, closure: Closure | None, commit: bool, runs_backward: bool | None = None
    ) -> tuple[Tensor, StepInfo, _Run]:
        """Phases 0-6 (6 only with ``commit``); an exception undoes everything."""
        self._check_state(type(self).__name__)
        self._check_groups(self.param_groups)  # settings written since the last step
        self._check_ranks(type(self).__name__)
        evaluator = ClosureEvaluator(
            closure,  # type: ignore[arg-type]
            self.params(),
            self._buffers,
            runs_backward=runs_backward,
            left=self._left_grads,
            own_grads_only=not commit,
            watch_dropped=not self._dropped_looked,
            trials_with_grad=self._trials_with_grad,
        )
        search = self._stored_search_state()
        before = search.step_size
        written = self._adopt_written_lr(search)
        lr_cut = written == "zero" or (written is not None and search.step_size < before)
        self._grad_norm, self._replay_loss, self._model_terms = math.nan, None, None
        self._clip_factor = 1.0  # max_grad_norm's factor on the gradients this step
        self._probe_hidden = None
        run = _Run(first_search=search.searches == 0, start_step_size=search.step_size)
        try:
            loss, loss0, outcome = self._phases_1_to_5(search, written, evaluator, run)
            if commit:
                # Before anything is written: a warning turned into an error (-W error)
                # undoes the step like any other exception.
                refutes = run.floor_hit is True and search.floor_hits == FLOOR_HITS - 1
                self._warn_about(outcome, evaluator, written, lr_cut, loss0, refutes)
                # (some parameters took part: where none did, the closure gave no gradient
                # at all, a forgotten backward, which its own warning names)
                some = any(step.params for step in run.steps)
                if not run.all_moments_take_part and some and self._cap_on(search):
                    message = PARTIAL_MODEL_WARNING.format(name=type(self).__name__)
                    self._warn_once("partial_model", message, UserWarning)
                self._commit(search, run, outcome)
            elif run.trial is not None:
                run.trial.restore()
        except BaseException:
            if run.trial is not None:
                run.trial.restore()
            evaluator.abort()
            if commit and not evaluator.grads_as_found():
                # a retry must not add this attempt's gradients to its own
                self._left_grads = LeftGradients.at_step_end(evaluator.params)
            raise
        info = StepInfo(
            kind=outcome.kind,
            step_size=outcome.step_size,
            loss=loss0,
            trials=outcome.trials,
            forwards=evaluator.forwards,
            backwards=evaluator.backwards,
            slope=outcome.slope,
            loss_decrease=outcome.loss_decrease,
            grad_norm=self._grad_norm,
            capped=outcome.capped,
            loss_rose=outcome.loss_rose,
        )
        if commit:
            self._left_grads = LeftGradients.at_step_end(evaluator.params)
            self._finish(search, outcome, evaluator, info)
            if run.first_search and outcome.kind in SEARCH_KINDS:
                self._report_first_search(outcome, evaluator, run.start_step_size)
            if run.rise is not None:
                self._report_loss_rise(run.rise)
        else:
            evaluator.abort()
        return loss, info, run

    def _phases_1_to_5(
        self, search: SearchState, written: str | None, evaluator: ClosureEvaluator, run: _Run
    ) -> tuple[Tensor, float, Outcome]:
        loss = self._evaluate(evaluator)
        run.steps, run.all_moments_take_part = self._gather()
        loss0, outcome = self._check(run.steps, loss, evaluator, self._cap_on(search))
        if outcome is None:
            run.model = self._model(search, loss0)
            plan = self._plan(search, written)
            run.directions, run.denominators = self._directions(run.steps, plan)
            if plan != "search":
                outcome = Outcome(plan, step_size=self._planned_step_size(search, plan))
            else:
                run.trial = _TrialPoint(run.steps, run.directions)
                outcome = self._search(search, run, loss0, evaluator)
            searched = outcome.step_size  # (the guard judges the search's, not the cap's)
            outcome = self._capped(search, run, outcome, loss0)
            self._watch_loss(search, run, outcome, searched, loss0, evaluator.loss_dtype)
        # 6: the weights are where an untested update put them, and the loss there is not
        # finite on a second step in a row: that update is to blame
        outcome.undo = (
            outcome.loss_not_finite
            and search.untested_step_size > 0
            and search.nonfinite_losses_in_a_row >= 1
        )
        return loss, loss0, outcome

    def _finish(
        self, search: SearchState, outcome: Outcome, evaluator: ClosureEvaluator, info: StepInfo
    ) -> None:
        """After a committed step: the random stream, the stored state, logs."""
        evaluator.finish()
        self._trials_with_grad = evaluator.trials_with_grad
        self._record(search, outcome, evaluator)
        self.last_step = info

    # -- 0 -----------------------------------------------------------------------------------

    def _adopt_written_lr(self, search: SearchState) -> str | None:
        """Phase 0: a group ``lr`` that differs from the one the last step showed
        (``eta * lr_scale``) sets ``eta`` (the first such group): returns ``"set"``, or
        ``"zero"`` for a written 0 in any group (this step takes no update and ``eta`` is
        kept), or
        ``None`` when nothing was written. A changed ``lr_scale`` alone is not a write."""
        written = written_lr(self.param_groups, self._shown_lr, search.step_size)
        if written is None:
            return None
        lr, group = written
        if lr == 0.0:
            return "zero"
        search.step_size = max(lr / group["lr_scale"], MIN_STEP_SIZE)
        # the user's step size: loss_rise_guard's ceiling and watch start afresh
        search.step_size_ceiling, search.ceiling_loss = math.inf, 0.0
        search.ceiling_rise = math.inf
        self._store_watch(search, LossWatch())
        return "set"

    # -- 1 -----------------------------------------------------------------------------------

    def _evaluate(self, evaluator: ClosureEvaluator) -> Tensor:
        """Phase 1: ``L0 = f(w0)`` and the gradients ``g`` (one forward, one backward)."""
        return evaluator.evaluate_with_grad()

    def _gather(self) -> tuple[list[GroupStep], bool]:
        """The tensors taking part in this step (``grad`` set), group by group, and whether
        every parameter that holds Adam moments is among them.

        Parameters without Adam state get fresh zero moments here; they are stored in
        ``state`` only when the step commits.
        """
        steps = []
        all_take_part = True
        for group in self.param_groups:
            step = GroupStep(group=group)
            for p in group["params"]:
                if p.grad is None:
                    if all_take_part and self.uses_moments:
                        all_take_part = "exp_avg" not in self.state.get(p, {})
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        "(e.g. nn.Embedding(sparse=True)); use dense gradients"
                    )
                step.params.append(p)
                step.weights.append(local_shard(p))
                step.grads.append(local_shard(p.grad))
                step.shard_counts.append(shard_count(p))
                if self.uses_moments:
                    state = self.state.get(p, {})
                    if "exp_avg" in state:
                        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                    else:
                        m = torch.zeros_like(p, memory_format=torch.preserve_format)
                        v = torch.zeros_like(p, memory_format=torch.preserve_format)
                        t = 0
                    step.exp_avgs.append(local_shard(m))
                    step.exp_avg_sqs.append(local_shard(v))
                    step.steps.append(int(t) + 1)
            if step.params:
                if self.uses_moments:
                    self._check_eps(group["eps"], step.params)
                steps.append(step)
        return steps, all_take_part

    def _check_eps(self, eps: float, params: list[Tensor]) -> None:
        check_eps(type(self).__name__, eps, params)

    # -- 2 -----------------------------------------------------------------------------------

    def _check(
        self, steps: list[GroupStep], loss: Tensor, evaluator: ClosureEvaluator, cap_on: bool
    ) -> tuple[float, Outcome | None]:
        """Phase 2: the loss at ``w0`` (mean over ranks), whether to skip the step, and
        gradient clipping (``max_grad_norm``); with ``cap_on``, the Polyak cap's sums.

        Every rank issues the same collectives whatever its local state: one with the loss,
        the largest gradient entry, whether Adam's second moment could overflow here and the
        squared gradient norm, and, only where one rank says the moment could overflow, a
        second one with the exact verdict.
        """
        grads = [g for step in steps for g in step.grads if g.numel()]
        # Reduce where the gradients are: a loss returned on the host (a Python number, a
        # CPU loss of a GPU model) then costs one copy, not one per gradient tensor.
        device = grads[0].device if grads else loss.device
        zero = torch.zeros((), device=device, dtype=torch.float64)
        largest = _largest_magnitude(grads, device) if grads else zero
        risk = zero
        if self.uses_moments and grads:
            threshold = min(math.sqrt(torch.finfo(t).max) for t in {g.dtype for g in grads})
            risk = (largest > threshold / 2).to(torch.float64)
        clip = self._settings["max_grad_norm"]
        squared_norm = self._squared_grad_norm(steps, device) if clip is not None else zero
        modelled = cap_on and clip is None
        # (zeros in their place otherwise: the collective's size is the same whatever the
        # settings, so that one written on some ranks only is found by its marks, not by
        # collectives of different sizes)
        terms = model_terms(steps, self.uses_moments, device) if modelled else [zero] * 3
        loss0, grad_max, overflow_risk, squared, *sums = mean_to_host(
            [loss.to(device), largest, risk, squared_norm, *terms],
            self._process_group,
            self._rank_marks(type(self).__name__),
        )
        self._grad_norm = math.sqrt(squared) if clip is not None else math.nan
        if modelled:
            self._model_terms = ModelTerms(*sums)
        if not (math.isfinite(loss0) and math.isfinite(grad_max)):
            culprit = "the gradient" if math.isfinite(loss0) else LOSS_CULPRIT
            return loss0, Outcome(kind="nonfinite", warning=culprit)
        if grad_max == 0.0:
            return loss0, Outcome(kind="zero_grad")
        if clip is not None and self._grad_norm > clip:
            # torch.nn.utils.clip_grad_norm_'s rule, in place on the gradients (the search's
            # analytic slope divides it out: the test keeps the true gradient's slope)
            self._clip_factor = clip / (self._grad_norm + 1e-6)
            torch._foreach_mul_(grads, self._clip_factor)
        if clip is not None and cap_on:
            # the cap's sums need the clipped gradients: one more synchronisation
            self._model_terms = ModelTerms(
                *mean_to_host(model_terms(steps, self.uses_moments, device), self._process_group)
            )
        if overflow_risk > 0.0 and self._second_moments_overflow(steps, device):
            return loss0, Outcome(kind="nonfinite", warning="Adam's second moment (g*g overflows)")
        return loss0, None

    @staticmethod
    def _squared_grad_norm(steps: list[GroupStep], device: torch.device) -> Tensor:
        """``||g||^2`` over all parameters, in float64 (``max_grad_norm``'s: a float32 sum
        of squares overflows from entries near 1e19, and the clip factor was then 0); a
        shard counts once per rank it is split over, so that the mean over ranks is the
        total (FSDP2)."""
        norms = [n for step in steps for n in wide_norms(step.grads, torch.float64)]
        if not norms:
            return torch.zeros((), device=device)
        counts = [k for step in steps for k in step.shard_counts]
        return scaled(float64_vector(norms, device).square(), counts).sum()

    def _second_moments_overflow(self, steps: list[GroupStep], device: torch.device) -> bool:
        """Whether ``v' = beta2 v + (1 - beta2) g^2`` has an inf on any rank (a rare check)."""
        moments = [v for step in steps for v in second_moments_after(step)]
        return any_not_finite(moments, device, self._process_group)

    # -- 3 -----------------------------------------------------------------------------------

    def _plan(self, search: SearchState, written: str | None) -> str:
        """Phase 3: ``"zero_lr"``, ``"search"`` or ``"reuse"`` for this step (``written``
        from phase 0)."""
        h = self._settings
        if written == "zero":
            return "zero_lr"
        if search.step < h["warmup_steps"]:
            return "search"  # warm-up caps the step size; the search still decides
        interval = h["search_interval"]
        if (
            search.searches == 0
            or search.unaccepted_in_a_row
            or written == "set"
            or search.nonfinite_losses_in_a_row
            or search.kinks_in_a_row
        ):
            # the initial step size is a guess; one that the last search did not accept
            # (failed, unresolved), that was written into lr, that was followed by a
            # non-finite loss (perhaps where the last update landed), or that the trials'
            # measured slope accepted (5.8) is no better: search
            return "search"
        if interval in ADAPTIVE_CADENCES:
            settled = interval == "settled" and search.settled
            if search.searches < ADAPTIVE_MIN_SEARCHES and not settled:
                return "search"
            # Bias-corrected fast and slow averages of the step size (SaLSa's cadence).
            fast = search.step_size_fast / (1.0 - 0.9**search.searches)
            slow = search.step_size_slow / (1.0 - 0.99**search.searches)
            if not (fast > 0.0 and slow > 0.0):
                return "search"
            change = max(fast / slow, slow / fast) - 1.0
            interval = (
                ADAPTIVE_MAX_INTERVAL if change <= 0 else min(ADAPTIVE_MAX_INTERVAL, 1 / change)
            )
        return "search" if search.steps_since_search + 1 >= interval else "reuse"

    def _model_beta1(self) -> float:
        """The EMA factor of ``loss_floor``'s model: Adam's ``beta1`` (one for all groups,
        checked with the settings), 0 without moments (SLS: the batch's Polyak step)."""
        return self.param_groups[0]["betas"][0] if self.uses_moments else 0.0

    def _model(self, search: SearchState, loss0: float) -> MomentumModel | None:
        """``loss_floor``'s model with this step's batch in it (phase 5.6, stored in phase
        6); ``None`` without the cap."""
        if self._model_terms is None:
            return None
        stored = MomentumModel(search.model_loss_avg, search.model_anchor_avg, search.model_steps)
        return stored.after(self._model_terms, loss0, self._model_beta1())

    def _capped(self, search: SearchState, run: _Run, outcome: Outcome, loss0: float) -> Outcome:
        """Phase 5.6: a step size above ``loss_floor``'s Polyak cap is cut to the cap; the
        search's step size stays the next search's start (``next_step_size``). No cap where
        the loss is below the floor (the model's premise is wrong there)."""
        model, terms = run.model, self._model_terms
        if model is None or terms is None or outcome.kind not in ("search", "reuse"):
            return outcome  # (no terms once the run has refuted the floor)
        if loss0 < self._floor():
            return outcome
        cap = model.cap(terms, self._model_beta1(), self._floor())
        if not cap < outcome.step_size:
            return outcome
        outcome.step_size, outcome.capped, outcome.loss_decrease = cap, True, math.nan
        if run.trial is not None and not run.trial.at_origin:
            if cap > 0.0:
                run.trial.place(cap)
            else:
                run.trial.restore()
        return outcome

    def _watch_loss(
        self,
        search: SearchState,
        run: _Run,
        outcome: Outcome,
        searched: float,
        loss0: float,
        loss_dtype: torch.dtype,
    ) -> None:
        """Phase 5.7: ``loss_rise_guard``'s watch with this batch's loss and the step size
        the search chose (``searched``: before ``loss_floor``'s cap, which shrinks the steps
        taken with the loss's height, so that a loss that jumps, say because the objective
        changed, does not look like growth of the step size). A ceiling is lifted when the
        loss average falls measurably below the lowest it guards; a rise on a step that
        moved the weights, while the step size grew, sets the ceiling to the step size at
        the lowest loss and starts the watch afresh. The ceiling is also lifted where the
        watch begun under it finds even its lowest average measurably above the average
        that set it (``ceiling_rise``): the step size back where the loss was lowest and the
        loss still higher, the rise was not the step size's doing (new data whose floor lies
        above the old lowest). Stored in phase 6."""
        guard = self._settings["loss_rise_guard"]
        if guard is None or outcome.kind not in ("search", "reuse", "failed", "unresolved"):
            return
        stored = self._stored_watch(search)
        watch = stored.after(loss0, searched if outcome.step_size > 0.0 else 0.0)
        resolution = loss_resolution(loss_dtype, watch.mean())
        ceiling = search.step_size_ceiling
        if ceiling < math.inf and watch.lifts(
            search.ceiling_loss, search.ceiling_rise, guard, resolution
        ):
            run.ceiling = (math.inf, 0.0, math.inf)
        # (at its first judgment of a step that moved: also against the start level)
        judged, watch = watch.look(moved=outcome.step_size > 0.0)
        if outcome.step_size > 0.0 and judged.rose(guard, resolution):
            outcome.loss_rose = True
            run.ceiling = (min(ceiling, judged.step_size_at_lowest), judged.lowest, judged.mean())
            run.rise = (
                judged.lowest,
                judged.mean(),
                judged.step_size_at_lowest,
                judged.step_size(),
            )
            watch = LossWatch(from_start=False)
        run.watch = watch

    def _stored_watch(self, search: SearchState) -> LossWatch:
        """The guard's watch from the search state (with warm-up, the first steps' step sizes
        are the ramp's, no search's: no start level is taken)."""
        return LossWatch(
            loss_avg=search.loss_avg,
            loss_spread_avg=search.loss_spread_avg,
            samples=search.loss_samples,
            lowest=search.loss_lowest,
            step_size_avg=search.step_size_avg,
            moves_avg=search.moves_avg,
            step_size_at_lowest=search.step_size_at_lowest,
            error_at_lowest=search.loss_error_at_lowest,
            from_start=search.watch_from_start and not self._settings["warmup_steps"],
            start_mean=search.loss_start_mean,
            step_size_at_start=search.step_size_at_start,
        )

    @staticmethod
    def _store_watch(search: SearchState, watch: LossWatch) -> None:
        search.loss_avg, search.loss_spread_avg = watch.loss_avg, watch.loss_spread_avg
        search.loss_samples, search.loss_lowest = watch.samples, watch.lowest
        search.step_size_avg, search.moves_avg = watch.step_size_avg, watch.moves_avg
        search.step_size_at_lowest = watch.step_size_at_lowest
        search.loss_error_at_lowest = watch.error_at_lowest
        search.watch_from_start, search.loss_start_mean = watch.from_start, watch.start_mean
        search.step_size_at_start = watch.step_size_at_start

    def _ceiling(self, search: SearchState) -> float:
        """``loss_rise_guard``'s ceiling on the step size (``inf`` without the guard)."""
        if self._settings["loss_rise_guard"] is None:
            return math.inf
        return search.step_size_ceiling

    def _floor(self) -> float:
        floor = self._settings["loss_floor"]
        return -math.inf if floor is None else floor

    def _cap_on(self, search: SearchState) -> bool:
        """Whether ``loss_floor``'s cap applies: a floor, not refuted in this run."""
        return self._settings["loss_floor"] is not None and not search.floor_refuted

    def _start_floor(self, search: SearchState) -> float:
        """The floor of ``start="polyak"``'s bound: ``loss_floor``, 0 if it is ``None``;
        ``-inf`` (no bound) once the run has refuted it."""
        if search.floor_refuted:
            return -math.inf
        return self._settings["loss_floor"] or 0.0

    def _planned_step_size(self, search: SearchState, plan: str) -> float:
        """The step size of a step that does not search."""
        return 0.0 if plan == "zero_lr" else search.step_size

    def _step_size_cap(self, search: SearchState) -> float:
        """Warm-up: during the first ``warmup_steps`` updates each search starts at
        ``lr * (k + 1) / warmup_steps`` and tries nothing larger; afterwards no cap."""
        warmup = self._settings["warmup_steps"]
        if search.step >= warmup:
            return math.inf
        return search.initial_step_size * (search.step + 1) / warmup

    # -- 4 -----------------------------------------------------------------------------------

    def _directions(
        self, steps: list[GroupStep], plan: str
    ) -> tuple[list[StepDirection], list[list[Tensor] | None]]:
        """Phase 4: the direction each group searches along, and the denominators
        ``sqrt(v_hat') + eps`` that the update of phase 6 still needs where it moves along
        another direction (AdamSLS). Built from the moments this step would commit; nothing
        is written. A step that does not search builds its update in phase 6, from the
        moments it commits (``v'`` is computed once)."""
        if plan == "zero_lr":
            return [], []
        if plan == "reuse":
            return [], [None] * len(steps)
        kind = self.search_direction
        directions, kept = [], []
        for step in steps:
            denominators = denominators_after(step) if kind.uses_moments else None
            directions.append(build_direction(step, kind, denominators))
            kept.append(denominators if self.update_direction is not kind else None)
        return directions, kept

    # -- 5 -----------------------------------------------------------------------------------

    def _search(
        self, search: SearchState, run: _Run, loss0: float, evaluator: ClosureEvaluator
    ) -> Outcome:
        """Phase 5: the slope (5.1), then trials from where :class:`Backtracking` starts
        (5.2), judged by the Armijo test (5.3), until one is accepted, the search ends
        unresolved (5.5), or ``max_trials`` fail (5.4)."""
        h, trial = self._settings, run.trial
        # the smoothed test has samples behind it (fixed during the search: they change at
        # its commit)
        history = h["smoothing"] > 0.0 and search.averaged > 0
        # At the first search of a run: the closure evaluated again at w0 must give L0 again.
        replay = [evaluator.evaluate()] if search.searches == 0 else []
        resolution = loss_resolution(evaluator.loss_dtype, loss0)
        slope_input = self._slope_input(search, run, evaluator)
        test = SearchTest(
            ArmijoTest(c=h["c"], smoothing=h["smoothing"]),
            loss0,
            resolution,
            search.decrease_avg,
            search.slope_avg,
        )
        # (no trial above what the weights' dtype can hold: beyond it every trial overflows)
        walk = Backtracking.start(
            search.step_size,
            self._step_size_cap(search),
            h["growth_interval"],
            h["backtrack"],
            largest=min(self._ceiling(search), MAX_STEP_SIZE, largest_representable(self.params())),
        )
        polyak = h["start"] == "polyak"
        floor = self._start_floor(search)
        at_polyak_step = False
        if polyak:  # 5.2: no first trial above (L0 - f*) / s (one more synchronisation)
            slope = self._slope_to_host(slope_input, replay, loss0, resolution)
            if not test.set_slope(slope):
                trial.restore()  # the finite-difference probe moved the weights
                return Outcome("nonfinite", trials=0, slope=slope, warning="the slope estimate")
            height = loss0 - floor  # above the loss's lower bound
            bound = height / slope if height > 0.0 and slope > 0.0 else math.inf
            at_polyak_step = bound < walk.eta
            walk.limit(bound)
        judged = (polyak or h["loss_floor"] is not None) and not search.floor_refuted
        nonfinite_in_a_row = 0
        start_finite = False  # the loss at w0 the trials' way was found finite (5.3)
        unchanged = True  # every trial so far gave exactly L0
        judged_trials: list[tuple[float, float]] = []  # (eta, loss), finite, after warm-up
        moved_all_the_way = False  # a trial moved the weights as far as their own norm
        for tried in range(1, h["max_trials"] + 1):
            trial.place(walk.eta)
            trial_loss = evaluator.evaluate(watch_buffers=tried == 1 and not self._buffers_checked)
            if tried > 1 or polyak:
                (value,) = mean_to_host([trial_loss], self._process_group)
            else:  # the slope comes to the host with the first trial's loss
                value, slope = self._first_trial_to_host(
                    trial_loss, slope_input, replay, loss0, resolution
                )
                if not test.set_slope(slope):
                    trial.restore()
                    return Outcome("nonfinite", trials=1, slope=slope, warning="the slope estimate")
            nonfinite_in_a_row = 0 if math.isfinite(value) else nonfinite_in_a_row + 1
            unchanged = unchanged and value == loss0
            # the step's fault? (5.3) If the loss is not finite at w0 either, no step can pass;
            # if it is, a non-finite trial was too large a step, by how much it cannot say
            doubt = nonfinite_in_a_row == NONFINITE_TRIALS_BEFORE_CHECK
            if doubt and not start_finite:
                if not self._finite_at_start(trial, evaluator):
                    return Outcome(
                        "nonfinite", trials=tried, slope=test.slope, warning=NO_GRAD_NONFINITE
                    )
                start_finite = True
            if judged:  # what the trial says of the floor (5.2): the first's word, or below it
                word = floor_word(loss0, value, floor, resolution, at_polyak_step and tried == 1)
                if word == "near":  # suspect: twice the Polyak step goes below, or back up
                    word = self._probe_floor(trial, evaluator, walk.eta, loss0, floor, resolution)
                if word == "below" or (tried == 1 and word == "holds"):
                    run.floor_hit = word == "below"
            verdict = test.judge(value, walk.eta, warmup=walk.cap < math.inf)
            if math.isfinite(value) and walk.cap == math.inf:
                judged_trials.append((walk.eta, value))
            if verdict == "accepted":
                accepted = Outcome.accepted(test, walk.eta, tried, averaged=walk.cap == math.inf)
                accepted.next_step_size = walk.carried(walk.eta)
                # a pass the rounding let through, below every trial that failed, says
                # nothing of the slope; the trials above it may (judged by the plain test:
                # the smoothed one's verdicts are no one trial's)
                smallest = all(walk.eta <= eta for eta, _ in judged_trials)
                rounding = loss0 - value <= FIRM_RISE * resolution
                if rounding and smallest and not history:
                    accepted.overstated = self._overstated(test, judged_trials, loss0, resolution)
                return accepted
            # a loss of exactly 0 that a trial leaves exactly 0: a batch the model has fitted
            # (its float32 loss rounds to 0), flat, not the step too small to see; no climb
            # from it (elsewhere an unchanged loss may be a move below the weights' rounding,
            # or a piecewise-constant forward pass, which climbing gets past)
            walk.flat = walk.flat or (verdict == "unresolved" and loss0 == 0.0 and value == 0.0)
            if verdict == "unresolved" and not walk.ceiling_known:
                walk.set_ceiling(trial.update_as_large_as_weights(self._process_group))
            if verdict == "unresolved" and walk.eta >= walk.ceiling:
                # A move as large as the weights that changes nothing is not below the
                # resolution: the loss is flat or the trial overshot to an equal loss.
                verdict = "rejected"
                moved_all_the_way = True
            if verdict == "unresolved" and not walk.climb():
                unresolved = Outcome(
                    "unresolved",
                    0.0,
                    tried,
                    test.slope,
                    math.nan,
                    walk.unresolved_step_size(history),
                    loss_unchanged=unchanged and (moved_all_the_way or walk.flat),
                )
                unresolved.overstated = self._overstated(test, judged_trials, loss0, resolution)
                # (trials that contradict the slope rose measurably: they were rejected)
                unresolved = self._unless_a_kink(search, test, judged_trials, unresolved)
                self._leave_weights(trial, unresolved)
                return unresolved
            if verdict == "rejected":
                interpolated = h["interpolate"] and walk.cap == math.inf
                predicted = test.largest_passing() if interpolated else math.nan
                finite = math.isfinite(value)
                walk.reject(
                    diverged=not finite and start_finite, finite=finite, predicted=predicted
                )
                # trusted: a model fitted to a trial that lowered the loss measurably, in a
                # search whose scale the first search has set
                trusted = h["trust_interpolation"] and search.searches > 0
                if trusted and math.isfinite(predicted) and test.decrease > resolution:
                    trial.place(walk.eta)
                    return Outcome.trusted(test, walk.eta, tried)
        failed = Outcome("failed", 0.0, h["max_trials"], test.slope, math.nan)
        failed.next_step_size, failed.reset_averages = walk.failed_step_size(history), history
        failed.loss_unchanged = unchanged and (moved_all_the_way or walk.flat)
        failed.overstated = self._overstated(test, judged_trials, loss0, resolution)
        failed = self._unless_a_kink(search, test, judged_trials, failed)
        self._leave_weights(trial, failed)
        return failed

    def _overstated(
        self, test: SearchTest, trials: list[tuple[float, float]], loss0: float, resolution: float
    ) -> float:
        """``overstated_fraction`` of a search's trials ``(eta, loss)``, each promising
        ``eta`` times this step's slope."""
        promised = [(eta, loss, eta * test.slope) for eta, loss in trials]
        return overstated_fraction(promised, loss0, self._settings["c"], resolution)

    @staticmethod
    def _leave_weights(trial: _TrialPoint, ending: Outcome) -> None:
        """At the accepted trial where a kink was passed (5.8), else back at ``w0``."""
        if ending.slope_measured:
            trial.place(ending.step_size)
        else:
            trial.restore()

    def _unless_a_kink(
        self,
        search: SearchState,
        test: SearchTest,
        trials: list[tuple[float, float]],
        ending: Outcome,
    ) -> Outcome:
        """5.8: a search ``ending`` without a step whose trials contradict its slope (a kink
        along the direction) accepts instead the largest trial that the slope they measured
        passes, as the paper's finite difference would have measured it, among those that
        raise the loss by no more than its distance from the floor of the Polyak start (a
        rise larger than all the decrease left is a step too large, not a step through a kink:
        the linear tail of a logistic loss, every trial of a search from ``lr=1e6``). Not
        twice before a search that its own slope accepts: a contradiction that comes back
        is a gradient that is not the loss's (a detached term, a surrogate), and stepping
        through it at every search would climb the loss; the search then ends as it would
        have, and says so (``contradicted_again``)."""
        slope = measured_slope(trials, test.loss0, test.resolution)
        if not math.isfinite(slope):
            return ending
        height = abs(test.loss0 - self._start_floor(search))
        through = [(eta, loss) for eta, loss in trials if loss - test.loss0 <= height]
        rejudged = test.rejudged(through, slope)
        if rejudged is None:
            return ending
        if search.kinks_in_a_row:
            ending.contradicted_again = True
            return ending
        outcome = Outcome.accepted(rejudged, rejudged.tried, ending.trials, averaged=True)
        outcome.slope_measured = True
        return outcome

    def _finite_at_start(self, trial: _TrialPoint, evaluator: ClosureEvaluator) -> bool:
        """Trials keep giving a non-finite loss: is the loss finite when evaluated the trials'
        way (without gradient) at the step's starting weights ``w0``, where the evaluation with
        gradient gave ``L0``? If not, no step size can help. The weights are left at ``w0``.
        At the first search of a run the replay check has evaluated it already."""
        trial.restore()
        if self._replay_loss is not None:
            return math.isfinite(self._replay_loss)
        (value,) = mean_to_host([evaluator.evaluate()], self._process_group)
        return math.isfinite(value)

    def _probe_floor(
        self,
        trial: _TrialPoint,
        evaluator: ClosureEvaluator,
        eta: float,
        loss0: float,
        floor: float,
        resolution: float,
    ) -> str:
        """A first trial at the Polyak step ``eta`` ended almost at the floor: one more
        evaluation, at ``2 eta``, says ``"below"`` if the loss goes on below the floor there
        (a wrong floor) and ``"holds"`` if not (a kink at the floor). The weights go back to
        ``w0 + eta d``."""
        trial.place(2.0 * eta)
        (value,) = mean_to_host([evaluator.evaluate()], self._process_group)
        trial.place(eta)
        return "below" if floor_word(loss0, value, floor, resolution, False) == "below" else "holds"

    def _first_trial_to_host(
        self,
        trial_loss: Tensor,
        slope_input: list[Tensor],
        replay: list[Tensor],
        loss0: float,
        resolution: float,
    ) -> tuple[float, float]:
        """The first trial's loss and the slope (5.1) in one synchronisation, with the
        replay check's loss at the first search of a run."""
        n = len(slope_input)
        values = mean_to_host([*slope_input, trial_loss, *replay], self._process_group)
        self._replay_loss = values[n + 1] if replay else None
        return values[n], self._slope_from(values[:n], loss0, resolution)

    def _slope_to_host(
        self, slope_input: list[Tensor], replay: list[Tensor], loss0: float, resolution: float
    ) -> float:
        """The slope (5.1) alone, before the first trial (``start="polyak"``)."""
        n = len(slope_input)
        values = mean_to_host([*slope_input, *replay], self._process_group)
        self._replay_loss = values[n] if replay else None
        return self._slope_from(values[:n], loss0, resolution)

    def _slope_from(self, values: list[float], loss0: float, resolution: float) -> float:
        """``s``: the analytic slope, or ``f_a = (L0 - f(w0 + lambda d)) / lambda``; a probe
        whose change is within the loss's rounding says nothing about the slope, and where
        the smoothed slope has no history to average it with, ``-g . d`` stands in."""
        if self._settings["slope"] == "analytic":
            return values[0]
        probe, *analytic = values
        self._probe_hidden = abs(loss0 - probe) <= resolution
        if analytic and self._probe_hidden:
            return analytic[0]
        return (loss0 - probe) / self._settings["fd_step"]

    def _slope_input(
        self, search: SearchState, run: _Run, evaluator: ClosureEvaluator
    ) -> list[Tensor]:
        """Phase 5.1 on the device: the analytic slope ``-g . d``, or the probe's loss
        ``f(w0 + lambda d)`` that becomes the finite difference ``f_a`` on the host, with
        ``-g . d`` beside it while the smoothed slope has no history (no smoothing, the
        first search, or after a reset)."""
        h = self._settings
        if h["slope"] == "analytic":
            return [self._analytic_slope(run)]
        assert run.trial is not None
        run.trial.place(h["fd_step"])
        probe = evaluator.evaluate()
        if h["smoothing"] == 0.0 or search.averaged == 0:
            return [probe, self._analytic_slope(run)]
        return [probe]

    def _analytic_slope(self, run: _Run) -> Tensor:
        """``-g . d`` summed on the device (0 on a rank without local gradients, which
        still joins the collectives), with the true gradient ``g``: the gradients are
        clipped in place by then, and their factor is divided out."""
        terms = analytic_slope(run.steps, run.directions)
        if not terms:
            return torch.zeros((), dtype=torch.float64)
        return torch.cat([t.to(torch.float64) for t in terms]).sum() / self._clip_factor

    # -- 6 -----------------------------------------------------------------------------------

    def _commit(self, search: SearchState, run: _Run, outcome: Outcome) -> None:
        """Phase 6: write Adam's moments, move the weights, decay them, update the search
        state. A skipped step (``nonfinite``, ``zero_grad``) writes nothing but counters."""
        if outcome.undo:
            self._undo_untested_update(search)
        if outcome.kind in ("nonfinite", "zero_grad"):
            return
        if run.model is not None:
            search.model_loss_avg = run.model.loss_avg
            search.model_anchor_avg = run.model.anchor_avg
            search.model_steps = run.model.steps
        steps, directions, trial = run.steps, run.directions, run.trial
        if self.uses_moments:
            for step in steps:
                self._store_moments(step)
                commit_moments(step, self.state)
        eta = outcome.step_size
        if outcome.kind in ("failed", "unresolved", "zero_lr"):
            eta = 0.0  # the weights stay at w0 (the trial point was restored)
        elif trial is None or self.update_direction is not self.search_direction:
            if trial is not None:
                trial.restore()
            directions = [
                committed_momentum_direction(
                    step, q if q is not None else committed_denominators(step)
                )
                if self.update_direction.uses_moments
                else build_direction(step, self.update_direction, None)
                for step, q in zip(steps, run.denominators, strict=True)
            ]
        moved = trial is not None and not trial.at_origin
        undoable = self.update_direction.uses_moments and run.all_moments_take_part
        if eta:
            for index, (step, d) in enumerate(zip(steps, directions, strict=True)):
                # At most the whole of w0: the search does not test the decay, and a step size
                # with eta * weight_decay > 1 would otherwise flip and grow the weights.
                decay = min(eta * step.lr_scale * step.group["weight_decay"], 1.0)
                undoable = undoable and decay < 1.0
                if decay:
                    w0 = trial.origins[index] if moved else step.weights
                    torch._foreach_add_(step.weights, w0, alpha=-decay)
                if not moved:
                    d.add_to(step.weights, eta)
        # An update that did not land on (or between w0 and) a trial the search evaluated is
        # untested: remembered so that phase 2's non-finite losses after it can undo it.
        untested = bool(eta) and not moved and undoable
        search.untested_step_size = eta if untested else 0.0
        self._advance(search, outcome, run.floor_hit)
        if run.watch is not None:
            self._store_watch(search, run.watch)
        if run.ceiling is not None:
            search.step_size_ceiling, search.ceiling_loss, search.ceiling_rise = run.ceiling
            search.step_size = min(search.step_size, search.step_size_ceiling)

    def _undo_untested_update(self, search: SearchState) -> None:
        """Move the weights back from where the last, untested update put them:
        ``w <- (w - eta d) / (1 - decay)`` with ``d`` rebuilt from the stored moments as
        that update built it (no step has written them since); the moments stay. The next
        search starts from ``backtrack * eta``."""
        eta = search.untested_step_size
        for group in self.param_groups:
            step = GroupStep(group=group)
            for p in group["params"]:
                state = self.state.get(p, {})
                if "exp_avg" not in state:
                    continue  # (added since that update: it did not move)
                step.params.append(p)
                step.weights.append(local_shard(p))
                step.exp_avgs.append(local_shard(state["exp_avg"]))
                step.exp_avg_sqs.append(local_shard(state["exp_avg_sq"]))
                step.steps.append(int(state["step"]))
            if not step.params:
                continue
            d = committed_momentum_direction(step, committed_denominators(step))
            d.add_to(step.weights, -eta)
            decay = min(eta * step.lr_scale * group["weight_decay"], 1.0)
            if decay:
                torch._foreach_div_(step.weights, 1.0 - decay)
        backtracked = max(self._settings["backtrack"] * eta, MIN_STEP_SIZE)
        search.step_size = min(backtracked, self._ceiling(search))
        search.untested_step_size = 0.0
        search.undone_updates += 1

    def _store_moments(self, step: GroupStep) -> None:
        """Store the moments of parameters that had none (created by ``_gather``)."""
        for p, m, v in zip(step.params, step.exp_avgs, step.exp_avg_sqs, strict=True):
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = m
                state["exp_avg_sq"] = v

    def _advance(self, search: SearchState, outcome: Outcome, floor_hit: bool | None) -> None:
        """The search state after a step that was taken (not skipped); ``floor_hit``: what
        the search's trials said of the floor (``None``: nothing)."""
        if outcome.kind in ("search", "failed", "unresolved"):
            if outcome.kind == "search":
                if outcome.decrease_avg is not None:  # not during warm-up
                    search.decrease_avg = outcome.decrease_avg
                    search.slope_avg = outcome.slope_avg
                    search.averaged += 1
                search.step += 1
            if outcome.reset_averages:
                search.decrease_avg = search.slope_avg = 0.0
                search.averaged = 0
            search.step_size = min(
                max(outcome.next_step_size, MIN_STEP_SIZE), self._ceiling(search)
            )
            refuted_now = False
            if floor_hit is not None and not search.floor_refuted:
                search.floor_hits = search.floor_hits + 1 if floor_hit else 0
                refuted_now = search.floor_refuted
                if refuted_now:
                    # The floor has held the step size down since some unknown step: the
                    # next search starts afresh (from the constructor's lr, as the run's
                    # first did), without the test's averages of the steps it imposed.
                    search.step_size = min(
                        max(search.step_size, search.initial_step_size), self._ceiling(search)
                    )
                    search.decrease_avg = search.slope_avg = 0.0
                    search.averaged = 0
            search.failed_searches += outcome.kind == "failed"
            search.unresolved_searches += outcome.kind == "unresolved"
            search.kinks_passed += outcome.slope_measured
            if outcome.slope_measured:
                search.kinks_in_a_row += 1
            elif outcome.kind == "search":
                search.kinks_in_a_row = 0
            accepted = outcome.kind == "search"
            # (a step size reset where the floor was refuted is no search's: never reused
            # untested)
            reset = not accepted or refuted_now
            search.unaccepted_in_a_row = search.unaccepted_in_a_row + 1 if reset else 0
            # the step size has settled when a search after the first (outside warm-up)
            # takes its first trial
            first_trial = (
                accepted
                and outcome.tested
                and outcome.trials == 1
                and outcome.decrease_avg is not None
            )
            search.settled = int(first_trial and search.searches >= 1)
            search.searches += 1
            search.steps_since_search = 0
            search.step_size_fast = 0.9 * search.step_size_fast + 0.1 * search.step_size
            search.step_size_slow = 0.99 * search.step_size_slow + 0.01 * search.step_size
        elif outcome.kind == "reuse":
            search.step += 1
            search.steps_since_search += 1

    def _record(self, search: SearchState, outcome: Outcome, evaluator: ClosureEvaluator) -> None:
        """Counters and the stored state, then every group's ``lr <- eta * lr_scale``."""
        search.forwards += evaluator.forwards
        search.backwards += evaluator.backwards
        search.trials += outcome.trials
        search.skipped_nonfinite += outcome.kind == "nonfinite"
        losses = search.nonfinite_losses_in_a_row
        search.nonfinite_losses_in_a_row = losses + 1 if outcome.loss_not_finite else 0
        search.skipped_zero_grad += outcome.kind == "zero_grad"
        self._store(search)

    # ------------------------------------------------------------------------------- helpers

    def _placeholder_entries(self, p: Tensor) -> dict[str, Any]:
        if not self.uses_moments:
            return {"step": 0}
        zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}

    def _report_loss_rise(self, rise: tuple[float, float, float, float]) -> None:
        """Say in the log that ``loss_rise_guard`` set a ceiling on the step size, and why."""
        lowest, mean, step_size_at_lowest, step_size = rise
        LOGGER.info(
            "%s: the batch losses' average rose from %.4g to %.4g while the step size grew "
            "from %.3g to %.3g; from now on the step size is at most %.3g (loss_rise_guard; "
            "None turns it off)",
            type(self).__name__,
            lowest,
            mean,
            step_size_at_lowest,
            step_size,
            self.search_state.step_size_ceiling,
        )

    def _report_first_search(
        self, outcome: Outcome, evaluator: ClosureEvaluator, lr: float
    ) -> None:
        """Say in the log what the first search cost: a poor initial ``lr`` costs trials."""
        name = type(self).__name__
        eta = self.search_state.step_size
        level = logging.WARNING if outcome.trials >= FIRST_SEARCH_WARNING_TRIALS else logging.INFO
        LOGGER.log(
            level,
            "%s: the first search took %d trials (%d forward passes), from lr=%.3g to a "
            "step size of %.3g (%s)%s",
            name,
            outcome.trials,
            evaluator.forwards,
            lr,
            eta,
            outcome.kind,
            f"; pass lr={eta:.2g} to start there"
            if level == logging.WARNING and outcome.kind == "search"
            else "",
        )

    def _warn_about(
        self,
        outcome: Outcome,
        evaluator: ClosureEvaluator,
        written: str | None,
        lr_cut: bool,
        loss0: float,
        refutes_floor: bool,
    ) -> None:
        """The one-time warnings, each with its fix: a skipped step, a closure that does not
        replay its randomness or forgot backward, a schedule left in the loop, a wrong
        ``loss_floor``, unprotected buffers. Issued before phase 6 writes anything."""
        name = type(self).__name__
        if refutes_floor:
            floor = self._settings["loss_floor"]
            which, off = (
                (f"loss_floor={floor:g}", "The Polyak cap and the Polyak start are")
                if floor is not None
                else ('the floor 0 that start="polyak" assumes (loss_floor=None)', "It is")
            )
            self._warn_once(
                "floor_refuted",
                f"{name}: the loss goes below {which}: on {FLOOR_HITS} searches in a row a "
                "trial fell below it (the Polyak bounds had held the loss just above it, "
                f"where they would have stalled the run). {off} off for the rest of this "
                "run. Pass the loss's lower bound as loss_floor (a loss that can be "
                "negative), or loss_floor=None",
                UserWarning,
            )
        if outcome.warning is not None:
            self._warn_once(  # once per culprit: the loss, the gradient, the slope, ...
                f"nonfinite: {outcome.warning}",
                f"{name}: {outcome.warning} is not finite (NaN or inf); the step was skipped "
                "and the weights and optimizer state left unchanged. Further skips are counted "
                "in optimizer.last_step / the state's 'skipped_nonfinite' without warning.",
                RuntimeWarning,
            )
        if outcome.undo:
            self._warn_once("undone", UNDONE_WARNING.format(name=name), UserWarning)
        if evaluator.unprotected_modules is not None:
            self._buffers_checked = True
            if evaluator.unprotected_modules:
                modules = ", ".join(evaluator.unprotected_modules)
                message = BUFFERS_WARNING.format(name=name, modules=modules)
                if self._buffers:
                    message += STALE_BUFFERS_HINT
                self._warn_once("buffers", message, UserWarning)
        # (trials that moved unprotected buffers, spectral_norm's power iteration, say, do not
        # follow the gradient either: the two warnings below, after the one above, name them)
        hint = BUFFERS_MOVED_HINT if "buffers" in self._warned else ""
        if math.isfinite(outcome.overstated):
            taken = outcome.kind == "search"  # (passed by a change below the loss's rounding)
            message = overstated_message(name, 1.0 / outcome.overstated, self.params(), taken)
            self._warn_once("overstated", message + hint, UserWarning)
        if outcome.contradicted_again:
            message = CONTRADICTED_WARNING.format(name=name, kind=outcome.kind)
            self._warn_once("contradicted", message + hint, UserWarning)
        if self._replay_loss is not None:
            self._warn_if_not_replayed(loss0, self._replay_loss)
        if outcome.kind == "zero_grad" and evaluator.backward_forgotten:
            self._warn_once("no_backward", NO_BACKWARD_WARNING.format(name=name), UserWarning)
        if evaluator.dropped_gradients is not None:  # (one look: a loop zeroing in place
            self._dropped_looked = True  # stays quiet after it, at no cost per step)
            if evaluator.dropped_gradients:
                message = DROPPED_GRADIENTS_WARNING.format(name=name)
                self._warn_once("dropped_gradients", message, UserWarning)
        if self._streak("loss_unchanged", outcome.loss_unchanged) >= STALL_WARNING_STEPS:
            message = UNCHANGED_LOSS_WARNING.format(name=name, n=STALL_WARNING_STEPS)
            self._warn_once("loss_unchanged", message, UserWarning)
        probed = self._probe_hidden is not None  # (a search with the finite-difference slope)
        if probed and self._streak("hidden_probes", self._probe_hidden) >= HIDDEN_PROBE_SEARCHES:
            message = HIDDEN_PROBE_WARNING.format(
                name=name,
                n=HIDDEN_PROBE_SEARCHES,
                fd_step=self._settings["fd_step"],
                dtype=str(evaluator.loss_dtype).removeprefix("torch."),
                loss=loss0,
            )
            self._warn_once("hidden_probes", message, UserWarning)
        if self._streak("failed_searches", outcome.kind == "failed") >= STALL_WARNING_STEPS:
            message = FAILED_SEARCHES_WARNING.format(
                name=name, n=STALL_WARNING_STEPS, next=outcome.next_step_size
            )
            self._warn_once("failed_searches", message, UserWarning)
        unresolved = self._streak("unresolved", outcome.kind == "unresolved")
        low_precision = torch.finfo(evaluator.loss_dtype).bits < 32
        if unresolved >= STALL_WARNING_STEPS and low_precision:
            message = UNRESOLVED_WARNING.format(
                name=name,
                n=STALL_WARNING_STEPS,
                dtype=str(evaluator.loss_dtype).removeprefix("torch."),
                ulps=RESOLUTION_ULPS,
                resolution=loss_resolution(evaluator.loss_dtype, loss0),
                loss=loss0,
            )
            self._warn_once("unresolved", message, UserWarning)
        disconnected = outcome.kind == "zero_grad" and evaluator.disconnected
        if self._streak("disconnected", disconnected) >= STALL_WARNING_STEPS:
            message = DISCONNECTED_WARNING.format(name=name, n=STALL_WARNING_STEPS)
            self._warn_once("disconnected", message, UserWarning)
        self._written_lr_steps = self._written_lr_steps + 1 if written else 0
        self._lr_cuts += lr_cut
        if schedule_suspected(self._written_lr_steps, self._lr_cuts):
            message = SCHEDULE_WARNING.format(name=name, n=SCHEDULE_WARNING_STEPS)
            self._warn_once("schedule", message, UserWarning)
        if self._model_terms is not None and loss0 < self._floor():
            self._warn_once(
                "loss_floor",
                f"{name}: the loss {loss0:.6g} is below loss_floor={self._floor():g}, the lower "
                "bound the Polyak cap assumes; the cap is off while it is. Pass the loss's "
                "lower bound as loss_floor (a loss that can be negative), or loss_floor=None."
                + UNBOUNDED_LOSS_HINT,
                UserWarning,
            )

    def _warn_if_not_replayed(self, loss0: float, again: float) -> None:
        message = not_replayed_message(type(self).__name__, loss0, again)
        if message is not None:
            self._warn_once("replay", message, UserWarning)
