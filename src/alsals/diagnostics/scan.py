"""Scan the loss along the direction a line-search optimizer searches now."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from alsals._closure import BufferGuard, Closure, RandomState, _accepts_backward, _as_loss_tensor
from alsals.acceptance import ArmijoTest
from alsals.line_search import LineSearchOptimizer


@dataclass
class LandscapeScan:
    """One mini-batch's loss decrease ``f(w) - f(w + eta d)`` over a grid of step sizes.

    ``chosen_step_size`` is the step size the optimizer accepts on this batch (``None`` if
    the step did not search: warm-up, cadence, failure, skipped); ``best_step_size`` the grid
    point with the largest decrease. ``boundary[i]`` is the smallest decrease the
    acceptance test of this step would accept at ``step_sizes[i]`` (Eq. 9 with the smoothed
    averages solved for the raw decrease), and ``accepted[i]`` whether the scanned decrease
    reaches it. ``slope`` is this step's slope estimate and ``slope_average`` the smoothed
    value the test used.
    """

    step: int
    loss: float
    step_sizes: list[float]
    decreases: list[float]
    boundary: list[float]
    accepted: list[bool]
    chosen_step_size: float | None
    best_step_size: float
    slope: float
    slope_average: float
    kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def log_grid(low: float = 1e-8, high: float = 10.0, num: int = 50) -> list[float]:
    """``num`` step sizes spaced evenly on a log scale from ``low`` to ``high``."""
    if not (0 < low < high) or num < 2:
        raise ValueError(f"invalid grid: low={low}, high={high}, num={num}")
    ratio = (high / low) ** (1 / (num - 1))
    return [low * ratio**i for i in range(num)]


class _Snapshot:
    """Everything a step changes, to put back afterwards."""

    def __init__(self, optimizer: LineSearchOptimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.values = [p.detach().clone() for p in self.params]
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.state = copy.deepcopy(optimizer.state_dict())
        self.last_step = optimizer.last_step
        self.warned = optimizer._warned_nonfinite
        self.buffers = BufferGuard(optimizer._buffers)
        self.buffers.capture()
        self.rng = RandomState()

    @torch.no_grad()
    def restore(self) -> None:
        for p, value, grad in zip(self.params, self.values, self.grads, strict=True):
            p.copy_(value)
            p.grad = grad
        self.optimizer.load_state_dict(self.state)
        self.optimizer.last_step = self.last_step
        self.optimizer._warned_nonfinite = self.warned
        self.buffers.restore()
        self.rng.restore()


def scan_direction(
    optimizer: LineSearchOptimizer,
    closure: Closure,
    step_sizes: Sequence[float] | None = None,
) -> LandscapeScan:
    """Scan the loss along the direction ``optimizer`` would search on this batch now.

    Runs the optimizer's step on ``closure`` to learn the direction and the step size it
    would choose, puts the weights, gradients, optimizer state, module buffers and the random
    state back exactly, then evaluates the closure at ``w + eta d`` for every ``eta`` of the
    grid with the same randomness the step saw. Calling ``optimizer.step(closure)`` afterwards
    takes exactly the step that the scan reports.
    """
    if not isinstance(optimizer, LineSearchOptimizer):
        raise TypeError(f"scan_direction needs an alsals optimizer, got {type(optimizer).__name__}")
    grid = list(step_sizes) if step_sizes is not None else log_grid()
    if not grid or any(not (math.isfinite(e) and e > 0) for e in grid):
        raise ValueError("step_sizes must be positive and finite")

    snapshot = _Snapshot(optimizer)
    search_before = dict(optimizer._search_state())
    try:
        optimizer.step(closure)
        info = optimizer.last_step
        direction = optimizer._search_direction_now()
        loss0 = info.loss
    finally:
        snapshot.restore()

    h = optimizer.param_groups[0]
    test = ArmijoTest(c=h["c"], smoothing=h["smoothing"])
    slope_average = (
        test.average(search_before["slope_avg"], info.slope)
        if math.isfinite(info.slope)
        else math.nan
    )
    decreases = _losses_along(optimizer, closure, direction, grid, loss0, snapshot.rng)
    boundary = [
        _minimum_decrease(test, search_before["decrease_avg"], e, slope_average) for e in grid
    ]
    finite = [(d, e) for d, e in zip(decreases, grid, strict=True) if math.isfinite(d)]
    chosen = info.step_size if info.kind == "search" else None
    return LandscapeScan(
        step=int(search_before["step"]),
        loss=loss0,
        step_sizes=grid,
        decreases=decreases,
        boundary=boundary,
        accepted=[math.isfinite(d) and d >= b for d, b in zip(decreases, boundary, strict=True)],
        chosen_step_size=chosen,
        best_step_size=max(finite)[1] if finite else math.nan,
        slope=info.slope,
        slope_average=slope_average,
        kind=info.kind,
    )


def _minimum_decrease(test: ArmijoTest, decrease_avg: float, eta: float, slope_avg: float) -> float:
    """Solve ``b D + (1 - b) Delta >= c_h eta G`` for the smallest accepted ``Delta``."""
    if not math.isfinite(slope_avg):
        return math.nan
    b = test.smoothing
    needed = test.factor(slope_avg) * eta * slope_avg
    return (needed - b * decrease_avg) / (1.0 - b)


@torch.no_grad()
def _losses_along(
    optimizer: LineSearchOptimizer,
    closure: Closure,
    direction: list[tuple[Tensor, Tensor]],
    grid: list[float],
    loss0: float,
    rng_at_start: RandomState,
) -> list[float]:
    params = [p for p, _ in direction]
    steps = [d for _, d in direction]
    origin = [p.detach().clone() for p in params]
    buffers = BufferGuard(optimizer._buffers)
    buffers.capture()
    takes_backward = _accepts_backward(closure)
    decreases = []
    try:
        for eta in grid:
            torch._foreach_copy_(params, origin)
            torch._foreach_add_(params, steps, alpha=eta)
            rng_at_start.restore()
            value = closure(backward=False) if takes_backward else closure()
            loss = float(_as_loss_tensor(value, "closure()"))
            buffers.restore()
            decreases.append(loss0 - loss)
    finally:
        torch._foreach_copy_(params, origin)
        buffers.restore()
        rng_at_start.restore()
    return decreases


class LandscapeRecorder:
    """Scan every ``every`` steps during training; call ``maybe_scan`` before ``step``.

    ``scans`` keeps the results (a list of :class:`LandscapeScan`), in order.
    """

    def __init__(
        self,
        optimizer: LineSearchOptimizer,
        every: int = 1,
        step_sizes: Sequence[float] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"invalid every: {every!r} (expected an integer >= 1)")
        self.optimizer = optimizer
        self.every = every
        self.step_sizes = list(step_sizes) if step_sizes is not None else log_grid()
        self.scans: list[LandscapeScan] = []
        self._calls = 0

    def maybe_scan(self, closure: Closure) -> LandscapeScan | None:
        due = self._calls % self.every == 0
        self._calls += 1
        if not due:
            return None
        scan = scan_direction(self.optimizer, closure, self.step_sizes)
        self.scans.append(scan)
        return scan
