"""A slow, float64, per-tensor transcription of ``docs/algorithms.md``.

This module is the yardstick the fast optimizers in ``alsals`` are held to. It was written
from the specification (and the paper: Kenneweg, Kenneweg & Hammer, *Improving Line Search
Methods for Large Scale Neural Network Training*, ACDSA 2024), not from the fast code.
Everything is a plain Python loop over tensors, one small function per equation, so that
each line can be checked against the page by eye.

The reference does not know about ``nn.Module``: a problem is a loss function
``f(weights) -> 0-dim float64 tensor`` of a flat list of weight tensors (the parameters of
all groups, in group order). Gradients come from ``torch.autograd`` in float64.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy
import torch
from torch import Tensor

LossFn = Callable[[Sequence[Tensor]], Tensor]

RESOLUTION_ULPS = 4  # units in the last place of the loss (phase 5.3)
UPWARD_FACTOR = 2.0  # after an unresolved trial (phase 5.3)
NONFINITE_TRIALS_BEFORE_CHECK = 2  # non-finite trials in a row, then f(w0) again (5.3)
MIN_STEP_SIZE = sys.float_info.min  # the smallest normal float (phases 0, 5, 6)
LOSS_WATCH_FACTOR = 0.99  # EMA of the batch losses (phase 5.7)
LOSS_WATCH_SAMPLES = 100  # losses the watch holds before it judges (phase 5.7)

VARIANTS = ("SLS", "AdamSLS", "MomentumALSALS")

#: Table "Directions": (search direction, update direction) per optimizer.
DIRECTIONS = {
    "SLS": ("gradient", "gradient"),
    "AdamSLS": ("preconditioned", "momentum"),
    "MomentumALSALS": ("momentum", "momentum"),
}

#: Table "Directions": the per-optimizer defaults (the rest are shared, see SearchConfig).
DEFAULTS = {
    "SLS": {"lr": 1.0, "c": 0.1, "smoothing": 0.0, "slope": "analytic"},
    "AdamSLS": {"lr": 0.1, "c": 0.1, "smoothing": 0.0, "slope": "analytic"},
    "MomentumALSALS": {"lr": 0.1, "c": 0.6, "smoothing": 0.99, "slope": "finite_difference"},
}


# --------------------------------------------------------------------------------------
# Configuration and state
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig:
    """The search-level options (shared by all groups)."""

    variant: str
    lr: float
    c: float
    smoothing: float
    slope: str
    backtrack: float = 0.9
    interpolate: bool = False
    trust_interpolation: bool = False
    growth_interval: float = 500
    max_trials: int = 100
    fd_step: float = 5e-8
    warmup_steps: int = 0
    search_interval: int | str = 1
    max_grad_norm: float | None = None
    start: str = "grown"
    search_direction: str | None = None  # MomentumALSALS: "momentum" (None) or "preconditioned"
    loss_floor: float | None = None  # f* of the Polyak cap (phase 5.6); None: no cap
    loss_rise_guard: float | None = None  # z of the loss-rise guard (phase 5.7); None: off

    @property
    def adam(self) -> bool:
        return self.variant != "SLS"

    @property
    def searched_along(self) -> str:
        return self.search_direction or DIRECTIONS[self.variant][0]

    @property
    def update_direction(self) -> str:
        return DIRECTIONS[self.variant][1]


def make_config(variant: str, **overrides) -> SearchConfig:
    """The config of ``variant`` with its defaults, overridden by ``overrides``."""
    if variant not in VARIANTS:
        raise ValueError(variant)
    return SearchConfig(variant=variant, **{**DEFAULTS[variant], **overrides})


@dataclass(frozen=True)
class GroupConfig:
    """The per-group options (``betas`` and ``eps`` are unused by SLS)."""

    lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ParamState:
    """Per-parameter Adam state: ``m``, ``v`` (start 0) and ``t`` (starts 0)."""

    m: Tensor
    v: Tensor
    t: int = 0


@dataclass
class SearchState:
    """Optimizer-wide state (``state[first parameter]["line_search"]``)."""

    step_size: float  # eta
    initial_step_size: float  # eta_init
    decrease_avg: float = 0.0  # D
    slope_avg: float = 0.0  # G
    averaged: int = 0  # n: samples in D and G since their last reset
    step: int = 0  # k, updates taken
    searches: int = 0
    steps_since_search: int = 0
    eta_fast: float = 0.0
    eta_slow: float = 0.0
    failed_searches: int = 0
    unresolved_searches: int = 0
    unaccepted_in_a_row: int = 0  # searches since the last accepted one
    settled: bool = False  # the last search, not the first, accepted its first trial
    skipped_nonfinite: int = 0
    model_loss_avg: float = 0.0  # the Polyak cap's model (phase 5.6): EMA of L0
    model_anchor_avg: float = 0.0  # ... and of w . g
    model_steps: int = 0
    loss_avg: float = 0.0  # the loss-rise guard's watch (phase 5.7): EMA of L0
    loss_spread_avg: float = 0.0  # ... of the squared deviations of L0 (West)
    loss_samples: int = 0  # losses in them since the watch began
    loss_lowest: float = 0.0  # the lowest bias-corrected EMA of L0 since it began judging
    step_size_avg: float = 0.0  # ... of the step size taken
    moves_avg: float = 0.0  # ... of 1 for an update that moved the weights, else 0
    step_size_at_lowest: float = 0.0  # step_size_avg / moves_avg at loss_lowest
    loss_error_at_lowest: float = 0.0  # the standard error of the loss average then
    step_size_ceiling: float = math.inf  # no step size above it (phase 6)
    ceiling_loss: float = 0.0  # loss_lowest when the ceiling was set
    ceiling_rise: float = math.inf  # the loss average that set the ceiling
    floor_hits: int = 0  # searches in a row whose trials showed the loss below the floor
    untested_step_size: float = 0.0  # eta of the last update if it was untested, else 0
    nonfinite_losses_in_a_row: int = 0  # steps skipped for a non-finite loss, in a row
    undone_updates: int = 0
    kinks_passed: int = 0  # searches that took a step with the slope their trials measured
    kinks_in_a_row: int = 0  # ... since the last search its own slope accepted


FLOOR_HITS = 3  # from this many on, the run no longer uses the floor (5.2, 5.6)


@dataclass
class StepRecord:
    """What one reference step did (mirrors ``alsals.StepInfo``)."""

    kind: str
    step_size: float
    loss: float
    trials: int = 0
    forwards: int = 0
    backwards: int = 0
    slope: float = math.nan
    loss_decrease: float = math.nan
    slope_avg: float = math.nan  # G after this step's smoothing (searches only)
    grad_norm: float = math.nan  # ||g|| before clipping (max_grad_norm only)
    clipped: bool = False
    capped: bool = False  # a search during warm-up (started at the ramp's value)
    grown: float = math.nan  # where the search would start without the Polyak limit
    tried: list[float] = field(default_factory=list)  # every eta_try evaluated
    trial_losses: list[float] = field(default_factory=list)  # f(w + eta_try d) for each
    trusted: bool = False  # the step size was taken untested (trust_interpolation)
    polyak_capped: bool = False  # the Polyak cap cut the step size (phase 5.6)
    searched_step_size: float = 0.0  # the update's step size before the cap (0: no move)
    loss_rose: bool = False  # the loss-rise guard cut the ceiling (phase 5.7)
    floor_refuted: bool = False  # the floor was found wrong at this step (5.2, 5.6)
    kink: bool = False  # the trials contradicted the slope and one was accepted (5.8)


# --------------------------------------------------------------------------------------
# Evaluations
# --------------------------------------------------------------------------------------


def loss_and_gradients(f: LossFn, weights: Sequence[Tensor]) -> tuple[float, list[Tensor | None]]:
    """Phase 1: ``L0 = f(w)`` and ``g`` (``None`` for weights the loss does not touch)."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    loss = f(leaves)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    return loss.item(), [None if g is None else g.detach().clone() for g in grads]


def loss_only(f: LossFn, weights: Sequence[Tensor]) -> float:
    """A forward pass without gradients."""
    with torch.no_grad():
        return f([w.detach() for w in weights]).item()


def is_finite(x: float) -> bool:
    return math.isfinite(x)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --------------------------------------------------------------------------------------
# Equations
# --------------------------------------------------------------------------------------


def adam_moments(state: ParamState, g: Tensor, betas: tuple[float, float]) -> None:
    """Eq. 3 (phase 4, on copies; phase 6 commits them): ``t += 1``, ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``."""
    beta1, beta2 = betas
    state.t += 1
    state.m = beta1 * state.m + (1 - beta1) * g
    state.v = beta2 * state.v + (1 - beta2) * g * g


def gradient_direction(g: Tensor, lr_scale: float) -> Tensor:
    """Table "Directions", gradient: ``d = -lr_scale * g``."""
    return -lr_scale * g


def preconditioned_direction(
    g: Tensor, state: ParamState, group: GroupConfig, lr_scale: float
) -> Tensor:
    """Table "Directions", preconditioned: ``-lr_scale g / (sqrt(v / (1 - b2^t)) + eps)``."""
    _, beta2 = group.betas
    v_hat = state.v / (1 - beta2**state.t)
    return -lr_scale * g / (torch.sqrt(v_hat) + group.eps)


def momentum_direction(state: ParamState, group: GroupConfig, lr_scale: float) -> Tensor:
    """Table "Directions", momentum: ``-lr_scale m_hat / (sqrt(v_hat) + eps)``."""
    beta1, beta2 = group.betas
    m_hat = state.m / (1 - beta1**state.t)
    v_hat = state.v / (1 - beta2**state.t)
    return -lr_scale * m_hat / (torch.sqrt(v_hat) + group.eps)


def direction(name: str, g: Tensor, state: ParamState | None, group: GroupConfig) -> Tensor:
    """The direction ``name`` of one parameter, scaled by its group's ``lr_scale``."""
    if name == "gradient":
        return gradient_direction(g, group.lr_scale)
    if name == "preconditioned":
        return preconditioned_direction(g, state, group, group.lr_scale)
    if name == "momentum":
        return momentum_direction(state, group, group.lr_scale)
    raise ValueError(name)


def analytic_slope(grads: Sequence[Tensor], d_search: Sequence[Tensor]) -> float:
    """Phase 5.1, Eqs. 1 and 5: ``s = -g . d_search`` summed over all parameters."""
    return -sum(float((g * d).sum()) for g, d in zip(grads, d_search, strict=True))


def finite_difference_slope(loss0: float, loss_probe: float, fd_step: float) -> float:
    """Phase 5.1, Eq. 6: ``s = (L0 - f(w + lambda d_search)) / lambda``."""
    return (loss0 - loss_probe) / fd_step


def smooth(average: float, value: float, b: float) -> float:
    """The exponential moving average used for ``D`` and ``G``: ``b avg + (1 - b) value``.

    With ``b = 0`` this is ``value`` exactly (``G <- s``).
    """
    if b == 0:
        return value
    return b * average + (1 - b) * value


def grown_step_size(eta: float, growth_interval: float) -> float:
    """Phase 5.2, Eq. 2: ``eta_try <- eta * 2^(1 / b_g)``."""
    return eta * 2 ** (1 / growth_interval)


def armijo_constant(c: float, slope_avg: float) -> float:
    """Eq. 8 on the smoothed slope: ``c_h = c`` if ``G > 0`` else ``1 / c``."""
    return c if slope_avg > 0 else 1 / c


def armijo_accepts(loss: float, decrease: float, c_h: float, eta: float, slope_avg: float) -> bool:
    """Eq. 9 (phase 5.3): accept if ``L`` is finite and ``D' >= c_h * eta_try * G``."""
    return is_finite(loss) and decrease >= c_h * eta * slope_avg


def quadratic_curvature(eta: float, delta: float, s: float) -> float:
    """``k`` of the quadratic ``q(x) = s x - k x^2 / 2`` through ``q(eta) = delta``."""
    return 2.0 * ((s * eta - delta) / eta) / eta


def quadratic_passing_step(
    eta: float, delta: float, s: float, decrease_avg: float, G: float, c_h: float, b: float
) -> float | None:
    """``interpolate``: the largest ``x`` with ``b D + (1 - b) q(x) >= c_h x G`` on the
    quadratic ``q(x) = s x - k x^2 / 2`` through the rejected trial (``q(eta) = delta``);
    ``None`` without positive curvature or a positive root."""
    k = quadratic_curvature(eta, delta, s)
    if not (is_finite(k) and k > 0.0):
        return None
    # b D + (1 - b)(s x - k x^2 / 2) - c_h G x, highest power first
    roots = numpy.roots([-(1.0 - b) * k / 2.0, (1.0 - b) * s - c_h * G, b * decrease_avg])
    positive = [r.real for r in roots if abs(r.imag) <= 1e-12 * abs(r) and r.real > 0.0]
    return max(positive) if positive else None


def resolution(loss0: float) -> float:
    """Phase 5.3: the rounding of the loss, ``4 * eps(float64) * |L0|``."""
    return RESOLUTION_ULPS * torch.finfo(torch.float64).eps * abs(loss0)


def unresolved(loss: float, delta: float, predicted: float, tol: float) -> bool:
    """Phase 5.3: a finite trial whose loss did not change, or whose change and predicted
    change ``c_h * eta * |s|`` both lie within ``tol``."""
    return is_finite(loss) and (delta == 0 or max(abs(delta), predicted) <= tol)


def warmup_cap(initial_step_size: float, k: int, warmup_steps: int) -> float:
    """Phase 5.2, warm-up: while ``k < warmup_steps`` a search starts at
    ``eta_init * (k + 1) / warmup_steps`` and tries nothing larger; no cap afterwards."""
    if k >= warmup_steps:
        return math.inf
    return initial_step_size * (k + 1) / warmup_steps


def adaptive_interval(eta_fast: float, eta_slow: float, searches: int) -> float:
    """Phase 3, adaptive: ``K = min(10, 1 / (max(r, 1/r) - 1))`` (10 if ``r = 1``), with ``r``
    the ratio of the bias-corrected averages."""
    r = (eta_fast / (1 - 0.9**searches)) / (eta_slow / (1 - 0.99**searches))
    spread = max(r, 1 / r) - 1
    if spread == 0:
        return 10.0
    return min(10.0, 1 / spread)


def search_due(state: SearchState, search_interval: int | str) -> bool:
    """Phase 3: whether this step searches (outside warm-up)."""
    if (
        state.searches == 0
        or state.unaccepted_in_a_row
        or state.nonfinite_losses_in_a_row
        or state.kinks_in_a_row
    ):
        # no search has accepted the step size, the step after it was not finite, or only
        # the slope its trials measured accepted it (5.8): it is not reused untested
        return True
    if search_interval in ("adaptive", "settled"):
        if state.searches < 10 and not (search_interval == "settled" and state.settled):
            return True
        interval = adaptive_interval(state.eta_fast, state.eta_slow, state.searches)
        return state.steps_since_search + 1 >= interval
    return state.steps_since_search + 1 >= search_interval


def track_step_sizes(state: SearchState) -> None:
    """Phase 6: bookkeeping after any search (accepted, failed or unresolved)."""
    state.searches += 1
    state.steps_since_search = 0
    state.eta_fast = 0.9 * state.eta_fast + 0.1 * state.step_size
    state.eta_slow = 0.99 * state.eta_slow + 0.01 * state.step_size


def polyak_model_after(
    state: SearchState, loss0: float, weights_dot_grad: float, beta1: float
) -> tuple[float, float, int]:
    """Phase 5.6: the model's averages with this batch: ``L_avg' = b1 L_avg + (1 - b1) L0``,
    ``gamma' = b1 gamma + (1 - b1) w . g``, ``k' = k + 1``."""
    return (
        beta1 * state.model_loss_avg + (1 - beta1) * loss0,
        beta1 * state.model_anchor_avg + (1 - beta1) * weights_dot_grad,
        state.model_steps + 1,
    )


def polyak_cap(
    model: tuple[float, float, int],
    weights_dot_momentum: float,
    momentum_norm: float,
    beta1: float,
    floor: float,
) -> float:
    """Phase 5.6: ``b1 max(L_avg' + w . m' - gamma' - b1 f*, 0) / sum lr_scale m' P m'`` with
    ``b1 = 1 - beta1^k'`` (1 without momentum); ``inf`` where the denominator is not > 0."""
    loss_avg, anchor_avg, steps = model
    if not momentum_norm > 0:
        return math.inf
    b1 = 1 - beta1**steps if beta1 > 0 else 1.0
    return b1 * max(loss_avg + weights_dot_momentum - anchor_avg - b1 * floor, 0.0) / momentum_norm


#: The watch's state, in the order ``watch_after`` returns it (phase 5.7).
WATCH_FIELDS = (
    "loss_avg",
    "loss_spread_avg",
    "loss_samples",
    "loss_lowest",
    "step_size_avg",
    "moves_avg",
    "step_size_at_lowest",
    "loss_error_at_lowest",
)


def watch_error(spread: float, n: int) -> float:
    """Phase 5.7: the standard error ``sqrt(var (1 - b) / (1 + b))`` of the loss average,
    with ``var = max(V / (1 - b^n), 0)``."""
    b = LOSS_WATCH_FACTOR
    var = max(spread / (1 - b**n), 0.0)
    return math.sqrt(var * (1 - b) / (1 + b))


def watch_after(state: SearchState, loss0: float, eta: float) -> list:
    """Phase 5.7: ``[A', V', n', lowest', S', M', S_lowest', E_lowest']`` with
    ``A' = b A + (1 - b) L0``, ``V' = b V + (1 - b) (1 - w) (L0 - mean)^2`` (``mean`` the
    corrected average before, ``L0`` at ``n = 0``; ``w = (1 - b) / (1 - b^n')``), ``S' = b S + (1 - b) eta`` (the
    step size taken), ``M' = b M + (1 - b) [eta > 0]``, ``n' = n + 1`` (``b = 0.99``; a
    non-finite ``L0`` leaves them). From ``n' = 100`` on, a bias-corrected ``A' / (1 - b^n')``
    below ``lowest`` (or the first, at ``n' = 100``) becomes ``lowest'``, and then
    ``S_lowest' = S' / M'`` and ``E_lowest'`` the average's standard error."""
    st = state
    if not is_finite(loss0):
        return [getattr(st, name) for name in WATCH_FIELDS]
    b = LOSS_WATCH_FACTOR
    avg = b * st.loss_avg + (1 - b) * loss0
    n = st.loss_samples + 1
    mean_before = st.loss_avg / (1 - b**st.loss_samples) if st.loss_samples else loss0
    share = (1 - b) / (1 - b**n)
    spread = b * st.loss_spread_avg + (1 - b) * (1 - share) * (loss0 - mean_before) ** 2
    eta_avg = b * st.step_size_avg + (1 - b) * eta
    moves = b * st.moves_avg + (1 - b) * (1.0 if eta > 0 else 0.0)
    lowest, at_lowest, error = st.loss_lowest, st.step_size_at_lowest, st.loss_error_at_lowest
    mean = avg / (1 - b**n)
    if n == LOSS_WATCH_SAMPLES or (n > LOSS_WATCH_SAMPLES and mean < lowest):
        lowest, at_lowest = mean, (eta_avg / moves if moves > 0 else 0.0)
        error = watch_error(spread, n)
    return [avg, spread, n, lowest, eta_avg, moves, at_lowest, error]


def watch_margin(watch: list, z: float, error: float) -> float:
    """Phase 5.7: ``(z + 2 sqrt(2 ln(n / 100))) error``."""
    return (z + 2 * math.sqrt(2 * math.log(watch[2] / LOSS_WATCH_SAMPLES))) * error


def watch_mean(watch: list) -> float:
    return watch[0] / (1 - LOSS_WATCH_FACTOR ** watch[2])


def loss_rose(watch: list, z: float) -> bool:
    """Phase 5.7: ``n > 100``, ``rise = mean - lowest`` above the loss's resolution and the
    margin in ``E_lowest``, and the average step size ``S / M`` above ``S_lowest > 0``."""
    if watch[2] <= LOSS_WATCH_SAMPLES:
        return False
    rise = watch_mean(watch) - watch[3]
    eta_now = watch[4] / watch[5] if watch[5] > 0 else 0.0
    grew = eta_now > watch[6] > 0
    margin = watch_margin(watch, z, watch[7])
    return grew and rise > resolution(watch_mean(watch)) and rise > margin


def loss_fell_below(watch: list, level: float, z: float) -> bool:
    """Phase 5.7: ``n > 100`` and ``level - mean`` above the resolution and the margin in
    the average's standard error now."""
    if watch[2] <= LOSS_WATCH_SAMPLES:
        return False
    fall = level - watch_mean(watch)
    margin = watch_margin(watch, z, watch_error(watch[1], watch[2]))
    return fall > resolution(watch_mean(watch)) and fall > margin


def loss_stayed_above(watch: list, level: float, z: float) -> bool:
    """Phase 5.7: ``n > 100`` and ``lowest - level`` above the resolution and the margin in
    ``E_lowest``: since the watch began, the loss average never came back to ``level``."""
    if watch[2] <= LOSS_WATCH_SAMPLES:
        return False
    rise = watch[3] - level
    margin = watch_margin(watch, z, watch[7])
    return rise > resolution(watch_mean(watch)) and rise > margin


def decoupled_update(
    w0: Tensor, d_update: Tensor, eta: float, lr_scale: float, weight_decay: float
) -> Tensor:
    """Phase 6: ``w <- w0 + eta d_update - min(eta lr_scale weight_decay, 1) w0`` (AdamW's
    form; the untested decay takes at most the whole of ``w0``)."""
    return w0 + eta * d_update - min(eta * lr_scale * weight_decay, 1.0) * w0


def displaced(weights: Sequence[Tensor], active: dict[int, Tensor], eta: float) -> list[Tensor]:
    """``w + eta d`` on the parameters in ``active`` (index -> d); others unchanged."""
    return [w + eta * active[i] if i in active else w for i, w in enumerate(weights)]


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------


class ReferenceOptimizer:
    """One ``step`` of SLS / AdamSLS / MomentumALSALS, exactly as ``docs/algorithms.md`` states.

    ``groups`` is a list of ``(weights, GroupConfig)``; the reference keeps float64 copies
    of the weights in ``self.weights`` (a flat list, groups in order). ``step`` runs the
    phases of the page in order, one method each, under the page's names.
    """

    def __init__(
        self, groups: Sequence[tuple[Sequence[Tensor], GroupConfig]], config: SearchConfig
    ) -> None:
        self.config = config
        self.groups = [group for _, group in groups]
        self.weights: list[Tensor] = []
        self.group_of: list[int] = []
        for index, (weights, _) in enumerate(groups):
            for w in weights:
                self.weights.append(w.detach().clone().to(torch.float64))
                self.group_of.append(index)
        self.state = SearchState(step_size=config.lr, initial_step_size=config.lr)
        self.param_state: dict[int, ParamState] = {}
        self.lr = [config.lr * group.lr_scale for group in self.groups]
        self.last_step: StepRecord | None = None

    def _group(self, i: int) -> GroupConfig:
        return self.groups[self.group_of[i]]

    def step(self, f: LossFn) -> float:
        """Phases 0-6. A skipped step (phase 2) still runs 0 and the ``lr`` part of 6."""
        written = self.adopt_written_lr()  # 0
        loss0, grads = self.evaluate(f)  # 1
        record = StepRecord(kind="", step_size=0.0, loss=loss0, forwards=1, backwards=1)
        self.last_step = record
        active = [i for i, g in enumerate(grads) if g is not None]
        skip = self.check(loss0, grads, active)  # 2
        if skip is not None:
            record.kind = skip
            self.count_skip(skip, loss_not_finite=not is_finite(loss0))
            self.set_group_lrs()
            return loss0
        true_grads = grads  # the test's slope is the true gradient's (clipping moves the update)
        grads = self.clip(grads, active)
        moments = self.moments_after(grads, active)
        plan = self.plan(written)  # 3
        d_search, d_update = self.directions(grads, active, moments)  # 4
        outcome = "taken"
        if plan == "search":
            searched = [true_grads[i] for i in active]
            outcome = self.search(f, loss0, searched, d_search, record)  # 5
        if outcome == "nonfinite":
            record.kind = "nonfinite"
            self.count_skip("nonfinite", loss_not_finite=self.start_not_finite)
        else:
            self.state.nonfinite_losses_in_a_row = 0
            cap = self.polyak(loss0, grads, active, moments)  # 5.6
            self.commit(plan, outcome, moments, d_update, record, cap)  # 6
            self.watch(loss0, plan, outcome, record)  # 5.7, stored with 6
        self.set_group_lrs()
        return loss0

    # -- 0 -------------------------------------------------------------------------------
    def adopt_written_lr(self) -> str | None:
        """Phase 0: the first group ``lr`` that differs from ``eta * lr_scale`` sets ``eta``
        (``"set"``; the step then searches from it); a written 0 in any group means no update
        this step (``"zero"``; ``eta`` is kept); ``None`` when nothing was written."""
        written = [
            (lr, group)
            for lr, group in zip(self.lr, self.groups, strict=True)
            if lr != self.state.step_size * group.lr_scale
        ]
        if not written:
            return None
        if any(lr == 0 for lr, _ in written):
            return "zero"
        lr, group = written[0]
        self.state.step_size = max(lr / group.lr_scale, MIN_STEP_SIZE)
        # the guard's ceiling and watch start afresh (phase 0)
        st = self.state
        st.step_size_ceiling, st.ceiling_loss, st.ceiling_rise = math.inf, 0.0, math.inf
        for name in WATCH_FIELDS:
            setattr(st, name, 0)
        return "set"

    # -- 1 -------------------------------------------------------------------------------
    def evaluate(self, f: LossFn) -> tuple[float, list[Tensor | None]]:
        """Phase 1: ``L0 = f(w0)`` and ``g``."""
        return loss_and_gradients(f, self.weights)

    # -- 2 -------------------------------------------------------------------------------
    def check(self, loss0: float, grads: list[Tensor | None], active: list[int]) -> str | None:
        """Phase 2: ``"nonfinite"``, ``"zero_grad"`` or ``None`` (the step goes on)."""
        # The page lists the skip rules in this order: a NaN loss is non-finite first.
        if not is_finite(loss0) or not all_finite([grads[i] for i in active]):
            return "nonfinite"
        if not active or all(bool((grads[i] == 0).all()) for i in active):
            return "zero_grad"
        if self.config.adam:
            for i in active:
                state = self.param_state.get(i)
                v = state.v if state is not None else torch.zeros_like(grads[i])
                _, beta2 = self._group(i).betas
                if not all_finite([beta2 * v + (1 - beta2) * grads[i] * grads[i]]):
                    return "nonfinite"
        return None

    def clip(self, grads: list[Tensor | None], active: list[int]) -> list[Tensor | None]:
        """Phase 2: with ``max_grad_norm``, ``g <- g * max_grad_norm / (||g|| + 1e-6)`` where
        ``||g||`` (over all parameters) exceeds it (``torch.nn.utils.clip_grad_norm_``)."""
        limit = self.config.max_grad_norm
        if limit is None:
            return grads
        norm = math.sqrt(sum(float((grads[i] * grads[i]).sum()) for i in active))
        self.last_step.grad_norm = norm
        if norm <= limit:
            return grads
        self.last_step.clipped = True
        return [None if g is None else g * (limit / (norm + 1e-6)) for g in grads]

    def count_skip(self, kind: str, loss_not_finite: bool = False) -> None:
        """A skipped step; the second in a row for a non-finite loss at ``w0`` (not a
        non-finite gradient or slope) after an untested update undoes that update (6)."""
        st = self.state
        st.skipped_nonfinite += kind == "nonfinite"
        if not loss_not_finite:
            st.nonfinite_losses_in_a_row = 0
            return
        if st.untested_step_size > 0 and st.nonfinite_losses_in_a_row >= 1:
            self.undo_untested_update()
        st.nonfinite_losses_in_a_row += 1

    def undo_untested_update(self) -> None:
        """Phase 6: ``w <- (w - eta d_update) / (1 - decay)`` with ``d_update`` from the
        stored moments (unchanged since that update), ``eta <- backtrack eta``."""
        st = self.state
        eta = st.untested_step_size
        for i, state in self.param_state.items():
            group = self._group(i)
            d = momentum_direction(state, group, group.lr_scale)
            decay = min(eta * group.lr_scale * group.weight_decay, 1.0)
            self.weights[i] = (self.weights[i] - eta * d) / (1.0 - decay)
        st.step_size = min(max(self.config.backtrack * eta, MIN_STEP_SIZE), self.ceiling())
        st.untested_step_size = 0.0
        st.undone_updates += 1

    def moments_after(self, grads: list[Tensor | None], active: list[int]) -> dict[int, ParamState]:
        """Eq. 3 on copies: the moments this step commits in phase 6 (Adam variants)."""
        if not self.config.adam:
            return {}
        out = {}
        for i in active:
            state = self.param_state.get(i)
            if state is None:
                zeros = torch.zeros_like(self.weights[i])
                state = ParamState(m=zeros.clone(), v=zeros.clone())
            new = ParamState(m=state.m.clone(), v=state.v.clone(), t=state.t)
            adam_moments(new, grads[i], self._group(i).betas)
            out[i] = new
        return out

    # -- 3 -------------------------------------------------------------------------------
    def plan(self, written: str | None) -> str:
        """Phase 3: ``"zero_lr"``, ``"search"`` or ``"reuse"``."""
        cfg, st = self.config, self.state
        if written == "zero":
            return "zero_lr"
        if st.step < cfg.warmup_steps or written == "set":
            return "search"  # with the warm-up cap of phase 5.2; from a written lr
        return "search" if search_due(st, cfg.search_interval) else "reuse"

    # -- 4 -------------------------------------------------------------------------------
    def directions(
        self, grads: list[Tensor | None], active: list[int], moments: dict[int, ParamState]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Phase 4: ``d_search`` and ``d_update`` from the moments of this step."""
        cfg = self.config
        d_search = {
            i: direction(cfg.searched_along, grads[i], moments.get(i), self._group(i))
            for i in active
        }
        d_update = {
            i: direction(cfg.update_direction, grads[i], moments.get(i), self._group(i))
            for i in active
        }
        return d_search, d_update

    # -- 5 -------------------------------------------------------------------------------
    def search(
        self,
        f: LossFn,
        loss0: float,
        grads: list[Tensor],
        d_search: dict[int, Tensor],
        record: StepRecord,
    ) -> str:
        """Phase 5: returns ``"accepted"``, ``"failed"``, ``"unresolved"`` or ``"nonfinite"``;
        sets ``record.step_size`` (accepted) and ``self.next_step_size``."""
        cfg, st = self.config, self.state
        b = cfg.smoothing
        w0 = self.weights
        self.floor_hit: bool | None = None  # what the trials say of the floor (5.2)
        self.start_not_finite = False  # a "nonfinite" return for the loss at w0 (5.3)
        replayed = None  # 5.1, at the first search of a run: f(w0) again
        if st.searches == 0:
            replayed = loss_only(f, w0)
            record.forwards += 1

        # 5.2 Growth, under the warm-up cap (needed first: the first trial is evaluated
        # together with the slope).
        cap = warmup_cap(st.initial_step_size, st.step, cfg.warmup_steps)
        ceiling = self.ceiling()  # the guard's: no trial above it
        if cap < math.inf:  # warm-up: start at the ramp, never above it
            eta_start = eta_try = min(cap, ceiling)
        else:
            eta_start = st.step_size
            grown = min(grown_step_size(eta_start, cfg.growth_interval), ceiling)
            eta_try = max(grown, MIN_STEP_SIZE)
        record.capped = cap < math.inf

        # 5.1 Slope.
        if cfg.slope == "analytic":
            s = analytic_slope(grads, list(d_search.values()))
        elif cfg.slope == "finite_difference":
            loss_probe = loss_only(f, displaced(w0, d_search, cfg.fd_step))
            record.forwards += 1
            s = finite_difference_slope(loss0, loss_probe, cfg.fd_step)
            # A probe within the loss's rounding says nothing; with no history in G to
            # average it with, the analytic slope stands in.
            if abs(loss0 - loss_probe) <= resolution(loss0) and (b == 0 or st.averaged == 0):
                s = analytic_slope(grads, list(d_search.values()))
        else:
            raise ValueError(cfg.slope)
        record.slope = s
        if not is_finite(s):
            if cfg.start == "polyak":  # the slope was checked before any trial
                return "nonfinite"
            # The first trial was evaluated in the same synchronisation as the slope.
            loss_only(f, displaced(w0, d_search, eta_try))
            record.forwards += 1
            record.trials += 1
            return "nonfinite"
        record.grown = eta_try
        refuted = st.floor_hits >= FLOOR_HITS
        floor = -math.inf if refuted else (cfg.loss_floor or 0.0)  # 0 if None
        height = loss0 - floor  # above the loss's lower bound
        at_polyak_step = False
        unbounded = 0.0  # the start the Polyak bound lowered
        if cfg.start == "polyak" and height > 0 and s > 0:  # 5.2: at most the Polyak step
            at_polyak_step = height / s < eta_try
            unbounded = eta_try if at_polyak_step else 0.0
            eta_try = max(min(eta_try, height / s), MIN_STEP_SIZE)
        judged = (cfg.start == "polyak" or cfg.loss_floor is not None) and not refuted
        G = record.slope_avg = smooth(st.slope_avg, s, b)  # G', stored only on acceptance
        c_h = armijo_constant(cfg.c, G)
        tol = resolution(loss0)

        # 5.3 Trials.
        rejected = False
        smallest_rejected = math.inf  # the smallest finite rejected trial
        largest_unresolved = 0.0
        flat = False  # an unresolved trial left the loss exactly where a change was resolvable
        nonfinite_in_a_row = 0
        start_finite = False  # f(w0) the trials' way was found finite (5.3)
        for _ in range(cfg.max_trials):
            loss = loss_only(f, displaced(w0, d_search, eta_try))
            record.forwards += 1
            record.trials += 1
            record.tried.append(eta_try)
            record.trial_losses.append(loss)
            nonfinite_in_a_row = 0 if is_finite(loss) else nonfinite_in_a_row + 1
            if nonfinite_in_a_row == NONFINITE_TRIALS_BEFORE_CHECK:
                if replayed is None:  # 5.3: f(w0) the trials' way
                    replayed = loss_only(f, w0)
                    record.forwards += 1
                if not is_finite(replayed):  # no step size can help: skip the step
                    self.start_not_finite = True
                    return "nonfinite"
                start_finite = True
            # a non-finite trial where f(w0) was found finite: the step was too large, by how
            # much it cannot say: the next trial a tenth (interpolation's largest cut)
            diverged = not is_finite(loss) and start_finite
            if judged and height > resolution(loss0) and is_finite(loss):
                # 5.2: a trial below the floor says the floor is wrong; a first trial at the
                # Polyak step within 1/64 of the height above it is suspect, and a trial at
                # twice the step decides (below the floor: wrong); else the first says it held
                first = len(record.tried) == 1
                below = loss - floor < -resolution(loss0)
                if not below and first and at_polyak_step and loss - floor < height / 64:
                    probe = loss_only(f, displaced(w0, d_search, 2.0 * eta_try))
                    record.forwards += 1
                    below = is_finite(probe) and probe - floor < -resolution(loss0)
                if first or below:
                    self.floor_hit = below
            delta = loss0 - loss
            decrease = smooth(st.decrease_avg, delta, b)
            if cap < math.inf:  # 5.3 during warm-up: no measurable increase, D and G kept
                if is_finite(loss) and delta >= -tol:
                    record.step_size = eta_try
                    # 5.2: a bound that lowered the start lowers eta tenfold at most
                    carried = 0.0 if rejected else 0.1 * unbounded
                    self.next_step_size = max(eta_try, carried)
                    record.loss_decrease = delta
                    return "accepted"
                rejected = rejected or is_finite(loss)
                eta_try = max(cfg.backtrack * eta_try, MIN_STEP_SIZE)
                continue
            if unresolved(loss, delta, c_h * eta_try * abs(s), tol):
                largest_unresolved = max(largest_unresolved, eta_try)
                larger = min(UPWARD_FACTOR * eta_try, cap, ceiling)
                # 5.5: a loss of exactly 0 left exactly 0: a fitted, flat batch, no climb
                flat = flat or (loss0 == 0 and loss == 0)
                if rejected and self.through_a_kink(loss0, s, record):  # 5.8
                    return "accepted"
                if rejected or flat or larger <= eta_try:  # 5.5 no measurable decrease
                    if flat:
                        self.next_step_size = eta_start
                    elif rejected and not (b > 0 and st.averaged > 0):
                        # the next search starts at the smallest rejected trial
                        grows = 1.0 if cap < math.inf else 2 ** (1 / cfg.growth_interval)
                        self.next_step_size = max(smallest_rejected / grows, MIN_STEP_SIZE)
                    else:
                        self.next_step_size = max(eta_start, largest_unresolved)
                    return "unresolved"
                eta_try = larger
                continue
            if armijo_accepts(loss, decrease, c_h, eta_try, G):
                st.decrease_avg = decrease
                st.slope_avg = G
                st.averaged += 1
                record.step_size = eta_try
                carried = 0.0 if rejected else 0.1 * unbounded  # 5.2, as above
                self.next_step_size = max(eta_try, carried)
                record.loss_decrease = delta
                return "accepted"
            rejected = rejected or is_finite(loss)
            if is_finite(loss):
                smallest_rejected = min(smallest_rejected, eta_try)
            if diverged:
                eta_try = max(0.1 * eta_try, MIN_STEP_SIZE)
                continue
            skip = 0  # interpolate: trials plain backtracking would make that the model fails
            passing = None
            if cfg.interpolate and is_finite(loss):
                passing = quadratic_passing_step(eta_try, delta, s, st.decrease_avg, G, c_h, b)
                grid = [eta_try * cfg.backtrack ** (j + 1) for j in range(200)]
                lowest = max(j for j, x in enumerate(grid) if x >= 0.1 * eta_try)
                if passing is not None:
                    skip = min([j for j, x in enumerate(grid) if x <= passing] + [lowest])
            rejected_at = eta_try
            for _ in range(skip + 1):
                eta_try = max(cfg.backtrack * eta_try, MIN_STEP_SIZE)
            if cfg.trust_interpolation and st.searches > 0 and passing is not None and delta > tol:
                # the step size the quadratic through the rejected trial predicts will
                # pass, taken untested; D stores the decrease the quadratic predicts there
                k = quadratic_curvature(rejected_at, delta, s)
                st.decrease_avg = smooth(st.decrease_avg, s * eta_try - k * eta_try**2 / 2, b)
                st.slope_avg = G
                st.averaged += 1
                record.step_size = self.next_step_size = eta_try
                record.trusted = True
                return "accepted"

        if self.through_a_kink(loss0, s, record):  # 5.8
            return "accepted"
        # 5.4 No trial accepted.
        if b > 0 and st.averaged > 0:
            st.decrease_avg = st.slope_avg = 0.0
            st.averaged = 0
            self.next_step_size = eta_start
        elif rejected:  # the next search starts one backtrack below the last trial
            below = record.tried[-1] * cfg.backtrack
            grows = 1.0 if cap < math.inf else 2 ** (1 / cfg.growth_interval)
            self.next_step_size = max(below / grows, MIN_STEP_SIZE)
        else:
            self.next_step_size = eta_start if flat else max(eta_start, largest_unresolved)
        return "failed"

    def through_a_kink(self, loss0: float, s: float, record: StepRecord) -> bool:
        """5.8: the trials of a search that accepted none rose at the smallest step sizes
        that changed the loss measurably, every one up to the first at least twice as large
        as the smallest rise of 8 resolutions or more (a firm one), and in proportion to eta
        between the two (power in [0.5, 1.5]): the slope ``s`` is wrong (a kink). Judge the
        trials again, largest first, with the firm rise's secant as the slope; accept the
        first that passes among those that raise the loss by at most ``|L0 - floor|`` (the
        floor of 5.2, 0 without ``loss_floor``). Not while a search passed a kink since the last search that its
        own slope accepted."""
        cfg, st, b, tol = self.config, self.state, self.config.smoothing, resolution(loss0)
        if record.capped:  # warm-up trials are not judged by the slope
            return False
        points = sorted(
            (eta, loss0 - loss)
            for eta, loss in zip(record.tried, record.trial_losses, strict=True)
            if is_finite(loss) and abs(loss0 - loss) > tol
        )
        if not points or points[0][1] >= 0:
            return False
        firm = next((i for i, (_, delta) in enumerate(points) if -delta >= 8 * tol), None)
        if firm is None:
            return False
        eta1, delta1 = points[firm]
        upto = next((i for i in range(firm, len(points)) if points[i][0] >= 2 * eta1), None)
        if upto is None or any(delta >= 0 for _, delta in points[: upto + 1]):
            return False
        eta2, delta2 = points[upto]
        if not 0.5 <= math.log(delta1 / delta2) / math.log(eta1 / eta2) <= 1.5:
            return False
        if st.kinks_in_a_row > 0:  # a contradiction that comes back: no step through it
            return False
        measured = delta1 / eta1
        G = smooth(st.slope_avg, measured, b)
        c_h = armijo_constant(cfg.c, G)
        refuted = st.floor_hits >= FLOOR_HITS
        height = abs(loss0 - (-math.inf if refuted else (cfg.loss_floor or 0.0)))
        finite = [  # no step through a kink raises the loss by more than is left above the floor
            (e, loss)
            for e, loss in zip(record.tried, record.trial_losses, strict=True)
            if is_finite(loss) and loss - loss0 <= height
        ]
        for eta, loss in sorted(finite, reverse=True):
            delta = loss0 - loss
            decrease = smooth(st.decrease_avg, delta, b)
            if unresolved(loss, delta, c_h * eta * abs(measured), tol):
                continue
            if armijo_accepts(loss, decrease, c_h, eta, G):
                st.decrease_avg, st.slope_avg = decrease, G
                st.averaged += 1
                st.kinks_passed += 1
                record.slope, record.slope_avg, record.kink = measured, G, True
                record.step_size = self.next_step_size = eta
                record.loss_decrease = delta
                return True
        return False

    # -- 5.6 -----------------------------------------------------------------------------
    def polyak(
        self,
        loss0: float,
        grads: list[Tensor | None],
        active: list[int],
        moments: dict[int, ParamState],
    ) -> float:
        """Phase 5.6: the largest step size the momentum model allows (``inf`` without
        ``loss_floor`` or with the loss below it); stores the model's averages."""
        floor = self.config.loss_floor
        if floor is None or self.state.floor_hits >= FLOOR_HITS:  # none, or refuted
            return math.inf
        beta1 = self.groups[0].betas[0] if self.config.adam else 0.0
        w_g = sum(float((self.weights[i] * grads[i]).sum()) for i in active)
        if self.config.adam:
            w_m = sum(float((self.weights[i] * moments[i].m).sum()) for i in active)
            norm = 0.0
            for i in active:
                group, state = self._group(i), moments[i]
                v_hat = state.v / (1 - group.betas[1] ** state.t)
                q = torch.sqrt(v_hat) + group.eps
                norm += group.lr_scale * float((state.m * state.m / q).sum())
        else:
            w_m = w_g
            norm = sum(self._group(i).lr_scale * float((grads[i] * grads[i]).sum()) for i in active)
        model = polyak_model_after(self.state, loss0, w_g, beta1)
        st = self.state
        st.model_loss_avg, st.model_anchor_avg, st.model_steps = model
        if loss0 < floor:
            return math.inf
        return polyak_cap(model, w_m, norm, beta1, floor)

    # -- 6 -------------------------------------------------------------------------------
    def commit(
        self,
        plan: str,
        outcome: str,
        moments: dict[int, ParamState],
        d_update: dict[int, Tensor],
        record: StepRecord,
        cap: float = math.inf,
    ) -> None:
        """Phase 6: moments, update, search state."""
        st = self.state
        self.param_state.update(moments)
        moved = plan == "reuse" or outcome == "accepted"
        st.untested_step_size = 0.0
        if moved:
            eta = st.step_size if plan != "search" else record.step_size
            record.searched_step_size = eta
            if cap < eta:  # 5.6: the search's eta stays the next search's start
                eta = cap
                record.polyak_capped = True
                record.loss_decrease = math.nan
            self.weights = [
                decoupled_update(
                    w, d_update[i], eta, self._group(i).lr_scale, self._group(i).weight_decay
                )
                if i in d_update
                else w
                for i, w in enumerate(self.weights)
            ]
            st.step += 1
            record.step_size = eta
            # untested: it did not land on (or between w0 and) an evaluated trial; undoable:
            # every parameter with moments moved, and no decay took the whole of w0
            cfg = self.config
            untested = plan == "reuse" or cfg.update_direction != cfg.searched_along
            undoable = (
                cfg.update_direction == "momentum"
                and set(self.param_state) <= set(d_update)
                and all(
                    eta * self._group(i).lr_scale * self._group(i).weight_decay < 1.0
                    for i in d_update
                )
            )
            st.untested_step_size = eta if untested and undoable else 0.0
        if plan == "search":
            st.step_size = min(max(self.next_step_size, MIN_STEP_SIZE), self.ceiling())
            if self.floor_hit is not None and st.floor_hits < FLOOR_HITS:
                st.floor_hits = st.floor_hits + 1 if self.floor_hit else 0
                if st.floor_hits == FLOOR_HITS:  # refuted: start afresh from lr, no averages
                    record.floor_refuted = True
                    st.step_size = min(max(st.step_size, st.initial_step_size), self.ceiling())
                    st.decrease_avg = st.slope_avg = 0.0
                    st.averaged = 0
            st.failed_searches += outcome == "failed"
            st.unresolved_searches += outcome == "unresolved"
            in_warmup = st.step - (outcome == "accepted") < self.config.warmup_steps
            first_trial = (
                outcome == "accepted"
                and record.trials == 1
                and not in_warmup
                and not record.trusted
            )
            st.settled = first_trial and st.searches >= 1
            # a step size reset where the floor was refuted is no search's: searched next
            reset = outcome != "accepted" or record.floor_refuted
            st.unaccepted_in_a_row = st.unaccepted_in_a_row + 1 if reset else 0
            if record.kink:
                st.kinks_in_a_row += 1
            elif outcome == "accepted":
                st.kinks_in_a_row = 0
            track_step_sizes(st)
            record.kind = "search" if outcome == "accepted" else outcome
        else:
            if plan != "zero_lr":
                st.steps_since_search += 1
            record.kind = plan

    def ceiling(self) -> float:
        """The loss-rise guard's ceiling on the step size (``inf`` without the guard)."""
        return math.inf if self.config.loss_rise_guard is None else self.state.step_size_ceiling

    def watch(self, loss0: float, plan: str, outcome: str, record: StepRecord) -> None:
        """Phase 5.7 (written with phase 6): steps that searched or reused take the batch
        loss and the step size into the watch: the search's, before the Polyak cap (0 where
        the update did not move). A ceiling is lifted (``inf``) when the
        loss average falls below ``ceiling_loss`` by the margin; if the loss average rose on
        a step that moved the weights while the step size grew, the ceiling becomes the
        smaller of itself and ``S_lowest``, ``ceiling_loss`` the lowest average,
        ``ceiling_rise`` the average now, ``eta`` is held below the ceiling, and the watch
        starts afresh; a ceiling is also lifted where the lowest average since lies above
        ``ceiling_rise`` by the margin in ``E_lowest``."""
        z, st = self.config.loss_rise_guard, self.state
        if z is None or plan == "zero_lr":
            return
        watch = watch_after(st, loss0, record.searched_step_size if record.step_size > 0 else 0.0)
        ceiling = st.step_size_ceiling
        lifted = loss_fell_below(watch, st.ceiling_loss, z)
        lifted = lifted or loss_stayed_above(watch, st.ceiling_rise, z)
        if ceiling < math.inf and lifted:
            st.step_size_ceiling, st.ceiling_loss, st.ceiling_rise = math.inf, 0.0, math.inf
        if record.step_size > 0 and loss_rose(watch, z):
            record.loss_rose = True
            st.step_size_ceiling = min(ceiling, watch[6])
            st.ceiling_loss, st.ceiling_rise = watch[3], watch_mean(watch)
            watch = [0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0]
        st.step_size = min(st.step_size, self.ceiling())
        for name, value in zip(WATCH_FIELDS, watch, strict=True):
            setattr(st, name, value)

    def set_group_lrs(self) -> None:
        """Phase 6, last: every group's ``lr <- eta * lr_scale``."""
        self.lr = [self.state.step_size * group.lr_scale for group in self.groups]
