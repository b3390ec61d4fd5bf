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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

LossFn = Callable[[Sequence[Tensor]], Tensor]

VARIANTS = ("SLS", "AdamSLS", "ALSALS")

#: Table "Directions": (search direction, update direction) per optimizer.
DIRECTIONS = {
    "SLS": ("gradient", "gradient"),
    "AdamSLS": ("preconditioned", "momentum"),
    "ALSALS": ("momentum", "momentum"),
}

#: Table "Directions": the per-optimizer defaults (the rest are shared, see SearchConfig).
DEFAULTS = {
    "SLS": {"lr": 1.0, "c": 0.1, "smoothing": 0.0, "slope": "analytic"},
    "AdamSLS": {"lr": 0.1, "c": 0.1, "smoothing": 0.0, "slope": "analytic"},
    "ALSALS": {"lr": 0.1, "c": 0.6, "smoothing": 0.99, "slope": "finite_difference"},
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
    growth_interval: float = 500
    max_trials: int = 100
    fd_step: float = 5e-8
    warmup_steps: int = 0
    search_interval: int | str = 1

    @property
    def adam(self) -> bool:
        return self.variant != "SLS"

    @property
    def search_direction(self) -> str:
        return DIRECTIONS[self.variant][0]

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
    skipped_nonfinite: int = 0


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
    tried: list[float] = field(default_factory=list)  # every eta_try evaluated
    trial_losses: list[float] = field(default_factory=list)  # f(w + eta_try d) for each


# --------------------------------------------------------------------------------------
# Evaluations
# --------------------------------------------------------------------------------------


def loss_and_gradients(f: LossFn, weights: Sequence[Tensor]) -> tuple[float, list[Tensor | None]]:
    """Step 1: ``L0 = f(w)`` and ``g`` (``None`` for weights the loss does not touch)."""
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
    """Eq. 3 (step 2): ``t += 1``, ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``."""
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
    """Step 4.1, Eqs. 1 and 5: ``s = -g . d_search`` summed over all parameters."""
    return -sum(float((g * d).sum()) for g, d in zip(grads, d_search, strict=True))


def finite_difference_slope(loss0: float, loss_probe: float, fd_step: float) -> float:
    """Step 4.1, Eq. 6: ``s = (L0 - f(w + lambda d_search)) / lambda``."""
    return (loss0 - loss_probe) / fd_step


def smooth(average: float, value: float, b: float) -> float:
    """The exponential moving average used for ``D`` and ``G``: ``b avg + (1 - b) value``.

    With ``b = 0`` this is ``value`` exactly (``G <- s``).
    """
    if b == 0:
        return value
    return b * average + (1 - b) * value


def grown_step_size(eta: float, growth_interval: float) -> float:
    """Step 4.2, Eq. 2: ``eta_try <- eta * 2^(1 / b_g)``."""
    return eta * 2 ** (1 / growth_interval)


def armijo_constant(c: float, slope_avg: float) -> float:
    """Eq. 8 on the smoothed slope: ``c_h = c`` if ``G > 0`` else ``1 / c``."""
    return c if slope_avg > 0 else 1 / c


def armijo_accepts(loss: float, decrease: float, c_h: float, eta: float, slope_avg: float) -> bool:
    """Eq. 9 (step 4.3): accept if ``L`` is finite and ``D' >= c_h * eta_try * G``."""
    return is_finite(loss) and decrease >= c_h * eta * slope_avg


def warmup_step_size(initial_step_size: float, k: int, warmup_steps: int) -> float:
    """Step 3, warm-up: ``eta <- eta_init * (k + 1) / warmup_steps``."""
    return initial_step_size * (k + 1) / warmup_steps


def adaptive_interval(eta_fast: float, eta_slow: float, searches: int) -> float:
    """Step 3, adaptive: ``K = min(10, 1 / (max(r, 1/r) - 1))`` (10 if ``r = 1``), with ``r``
    the ratio of the bias-corrected averages."""
    r = (eta_fast / (1 - 0.9**searches)) / (eta_slow / (1 - 0.99**searches))
    spread = max(r, 1 / r) - 1
    if spread == 0:
        return 10.0
    return min(10.0, 1 / spread)


def search_due(state: SearchState, search_interval: int | str) -> bool:
    """Step 3: whether this step searches (outside warm-up)."""
    if state.searches == 0:
        return True
    if search_interval == "adaptive":
        if state.searches < 10:
            return True
        interval = adaptive_interval(state.eta_fast, state.eta_slow, state.searches)
        return state.steps_since_search + 1 >= interval
    return state.steps_since_search + 1 >= search_interval


def track_step_sizes(state: SearchState) -> None:
    """Step 4.5: bookkeeping after any search, accepted or failed."""
    state.searches += 1
    state.steps_since_search = 0
    state.eta_fast = 0.9 * state.eta_fast + 0.1 * state.step_size
    state.eta_slow = 0.99 * state.eta_slow + 0.01 * state.step_size


def decoupled_update(
    w0: Tensor, d_update: Tensor, eta: float, lr_scale: float, weight_decay: float
) -> Tensor:
    """Step 5: ``w <- w0 + eta d_update - eta lr_scale weight_decay w0`` (AdamW's form)."""
    return w0 + eta * d_update - eta * lr_scale * weight_decay * w0


def displaced(weights: Sequence[Tensor], active: dict[int, Tensor], eta: float) -> list[Tensor]:
    """``w + eta d`` on the parameters in ``active`` (index -> d); others unchanged."""
    return [w + eta * active[i] if i in active else w for i, w in enumerate(weights)]


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------


class ReferenceOptimizer:
    """One ``step`` of SLS / AdamSLS / ALSALS, exactly as ``docs/algorithms.md`` states.

    ``groups`` is a list of ``(weights, GroupConfig)``; the reference keeps float64 copies
    of the weights in ``self.weights`` (a flat list, groups in order).
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

    # -- step 0 -------------------------------------------------------------------------
    def _adopt_written_lr(self) -> None:
        """Step 0: a group ``lr`` that differs from ``eta * lr_scale`` sets ``eta``."""
        for lr, group in zip(self.lr, self.groups, strict=True):
            if lr != self.state.step_size * group.lr_scale:
                self.state.step_size = lr / group.lr_scale
                return

    def _set_group_lrs(self) -> None:
        """Step 6: every group's ``lr <- eta * lr_scale``."""
        self.lr = [self.state.step_size * group.lr_scale for group in self.groups]

    def _group(self, i: int) -> GroupConfig:
        return self.groups[self.group_of[i]]

    # -- step ---------------------------------------------------------------------------
    def step(self, f: LossFn) -> float:
        """One step: 0, then 1-5 (which may stop early), then 6 in every case.

        The page says a skipped step (``zero_grad``, ``nonfinite``) changes nothing; we
        read that as "no update and no search state", while steps 0 and 6 still keep every
        group's ``lr`` equal to ``eta * lr_scale``.
        """
        self._adopt_written_lr()
        loss0 = self._steps_1_to_5(f)
        self._set_group_lrs()
        return loss0

    def _steps_1_to_5(self, f: LossFn) -> float:
        cfg, st = self.config, self.state

        # 1. L0 and g.
        loss0, grads = loss_and_gradients(f, self.weights)
        active = [i for i, g in enumerate(grads) if g is not None]
        record = StepRecord(kind="", step_size=st.step_size, loss=loss0, forwards=1, backwards=1)
        self.last_step = record
        # The page lists both skip rules without an order; a NaN loss with all-zero
        # gradients is "zero_grad" here and "nonfinite" in the fast code (not tested).
        if not active or all(bool((grads[i] == 0).all()) for i in active):
            record.kind = "zero_grad"
            return loss0
        if not is_finite(loss0) or not all_finite([grads[i] for i in active]):
            st.skipped_nonfinite += 1
            record.kind = "nonfinite"
            return loss0

        # 2. Adam moments (Eq. 3).
        if cfg.adam:
            for i in active:
                if i not in self.param_state:
                    zeros = torch.zeros_like(self.weights[i])
                    self.param_state[i] = ParamState(m=zeros.clone(), v=zeros.clone())
                adam_moments(self.param_state[i], grads[i], self._group(i).betas)

        d_search = {
            i: direction(cfg.search_direction, grads[i], self.param_state.get(i), self._group(i))
            for i in active
        }
        d_update = {
            i: direction(cfg.update_direction, grads[i], self.param_state.get(i), self._group(i))
            for i in active
        }
        w0 = [w.clone() for w in self.weights]

        # 3. Plan.
        if st.step < cfg.warmup_steps:
            plan = "warmup"
            st.step_size = warmup_step_size(st.initial_step_size, st.step, cfg.warmup_steps)
        elif search_due(st, cfg.search_interval):
            plan = "search"
        else:
            plan = "reuse"
        record.kind = plan

        # 4. Search.
        if plan == "search":
            outcome = self._search(f, loss0, [grads[i] for i in active], d_search, w0, record)
            if outcome == "nonfinite":
                self.weights = w0
                st.skipped_nonfinite += 1
                record.kind = "nonfinite"
                record.step_size = st.step_size
                return loss0
            track_step_sizes(st)  # 4.5
            if outcome == "failed":
                self.weights = w0  # restored exactly
                st.failed_searches += 1
                record.kind = "failed"
                record.step_size = st.step_size
                return loss0

        # 5. Update.
        eta = st.step_size
        self.weights = [
            decoupled_update(
                w0[i], d_update[i], eta, self._group(i).lr_scale, self._group(i).weight_decay
            )
            if i in d_update
            else w0[i]
            for i in range(len(w0))
        ]
        st.step += 1
        if plan != "search":
            st.steps_since_search += 1
        record.step_size = eta
        return loss0

    def _search(
        self,
        f: LossFn,
        loss0: float,
        grads: list[Tensor],
        d_search: dict[int, Tensor],
        w0: list[Tensor],
        record: StepRecord,
    ) -> str:
        """Step 4: returns ``"accepted"``, ``"failed"`` or ``"nonfinite"``."""
        cfg, st = self.config, self.state
        b = cfg.smoothing

        # 4.2 Growth (needed first: the first trial is evaluated together with the slope).
        eta_start = st.step_size
        eta_try = grown_step_size(eta_start, cfg.growth_interval)

        # 4.1 Slope.
        if cfg.slope == "analytic":
            s = analytic_slope(grads, list(d_search.values()))
        elif cfg.slope == "finite_difference":
            loss_probe = loss_only(f, displaced(w0, d_search, cfg.fd_step))
            record.forwards += 1
            s = finite_difference_slope(loss0, loss_probe, cfg.fd_step)
        else:
            raise ValueError(cfg.slope)
        record.slope = s
        if not is_finite(s):
            # The first trial was evaluated in the same synchronisation as the slope.
            loss_only(f, displaced(w0, d_search, eta_try))
            record.forwards += 1
            record.trials += 1
            return "nonfinite"
        G = record.slope_avg = smooth(st.slope_avg, s, b)  # G', stored only on acceptance
        c_h = armijo_constant(cfg.c, G)

        # 4.3 Trials.
        for _ in range(cfg.max_trials):
            loss = loss_only(f, displaced(w0, d_search, eta_try))
            record.forwards += 1
            record.trials += 1
            record.tried.append(eta_try)
            record.trial_losses.append(loss)
            delta = loss0 - loss
            decrease = smooth(st.decrease_avg, delta, b)
            if armijo_accepts(loss, decrease, c_h, eta_try, G):
                st.decrease_avg = decrease
                st.slope_avg = G
                st.averaged += 1
                st.step_size = eta_try
                record.loss_decrease = delta
                return "accepted"
            eta_try = cfg.backtrack * eta_try

        # 4.4 No trial accepted: with smoothing history, forget it and keep eta; without,
        # eta is the last step size tried.
        if b > 0 and st.averaged > 0:
            st.decrease_avg = st.slope_avg = 0.0
            st.averaged = 0
            st.step_size = eta_start
        else:
            st.step_size = record.tried[-1]
        return "failed"
