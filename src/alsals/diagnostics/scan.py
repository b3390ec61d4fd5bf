"""Scan the loss along the direction a line-search optimizer searches now."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from alsals.acceptance import ArmijoTest
from alsals.closure import Closure, ClosureEvaluator
from alsals.distributed import local_shard, mean_to_host
from alsals.line_search import LineSearchOptimizer, StepPreview


@dataclass
class LandscapeScan:
    """One mini-batch's loss decrease ``f(w) - f(w + eta d)`` over a grid of step sizes.

    ``chosen_step_size`` is the step size the optimizer's next step takes on this batch
    (the search's, lowered by the Polyak cap of ``loss_floor`` where it acts; ``None`` if
    the step did not search: warm-up, cadence, failure, skipped); ``best_step_size`` the grid
    point with the largest decrease. A step that reuses its step size (``kind == "reuse"``)
    is scanned along the direction it moves; it has no slope, so no boundary. A step that
    takes no update has no direction: its decreases are NaN. ``boundary[i]`` is the
    smallest decrease the acceptance test of this step would accept at ``step_sizes[i]``
    (Eq. 9 with the smoothed averages solved for the raw decrease), and ``accepted[i]``
    whether the scanned decrease reaches it. ``slope`` is this step's slope estimate and ``slope_average`` the smoothed
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
    if not (0 < low < high < math.inf) or num < 2:
        raise ValueError(f"invalid grid: low={low}, high={high}, num={num}")
    # (in log space: high / low overflows for a grid as wide as 1e-300 .. 1e300)
    start, stop = math.log(low), math.log(high)
    inner = [math.exp(start + (stop - start) * i / (num - 1)) for i in range(1, num - 1)]
    return [low, *inner, high]


def _checked_grid(step_sizes: Sequence[float] | None) -> list[float]:
    """``step_sizes`` as a list of floats (``log_grid()`` for ``None``), or a ``ValueError``
    that names them: a scan needs step sizes that are positive, finite numbers."""
    if step_sizes is None:
        return log_grid()
    grid = []
    for value in step_sizes:
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise ValueError(f"step_sizes must be numbers, got {value!r}")
        grid.append(float(number))
    if not grid or any(not (math.isfinite(e) and e > 0) for e in grid):
        raise ValueError(f"step_sizes must be positive and finite, got {grid}")
    return grid


def _check_optimizer(optimizer: object) -> None:
    """A ``TypeError`` unless ``optimizer`` searches along one direction."""
    if not isinstance(optimizer, LineSearchOptimizer):
        raise TypeError(
            "scan_direction scans the search direction of MomentumALSALS, AdamSLS or SLS, "
            f"got {type(optimizer).__name__}"
            + (
                " (ALSALS searches the step size of Schedule-Free's move, not along one "
                "direction: scan a MomentumALSALS on the same closure)"
                if type(optimizer).__name__ == "ALSALS"
                else ""
            )
        )


def scan_direction(
    optimizer: LineSearchOptimizer,
    closure: Closure,
    step_sizes: Sequence[float] | None = None,
) -> LandscapeScan:
    """Scan the loss along the direction ``optimizer`` would search on this batch now.

    Previews the optimizer's step on ``closure`` (:meth:`LineSearchOptimizer.preview`: the
    direction and the step size it would choose, with nothing changed), then evaluates the
    closure at ``w + eta d`` for every ``eta`` of the grid with the same randomness the step
    sees, and puts the weights, buffers and random state back. Calling
    ``optimizer.step(closure)`` afterwards takes exactly the step that the scan reports: the
    step size ``chosen_step_size``, along the searched direction where the update moves
    along it (SLS, MomentumALSALS; AdamSLS searches along Adam's direction without momentum but
    moves along the momentum one), before the decoupled weight decay, which is not searched.
    Under ``torch.distributed`` every rank scans its own batch and the losses are averaged
    over ranks, as the search averages them (one collective for the whole grid).
    """
    _check_optimizer(optimizer)
    grid = _checked_grid(step_sizes)
    preview = optimizer.preview(closure)
    info, before = preview.info, preview.state
    settings = optimizer.param_groups[0]
    test = ArmijoTest(c=settings["c"], smoothing=settings["smoothing"])
    slope_average = (
        test.average(before.slope_avg, info.slope) if math.isfinite(info.slope) else math.nan
    )
    decreases = _decreases_along(optimizer, closure, preview, grid)
    boundary = [_minimum_decrease(test, before.decrease_avg, e, slope_average) for e in grid]
    finite = [(d, e) for d, e in zip(decreases, grid, strict=True) if math.isfinite(d)]
    chosen = info.step_size if info.kind == "search" else None
    return LandscapeScan(
        step=before.step,
        loss=info.loss,
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
def _decreases_along(
    optimizer: LineSearchOptimizer,
    closure: Closure,
    preview: StepPreview,
    grid: list[float],
) -> list[float]:
    """``f(w) - f(w + eta d)`` for every ``eta`` of the grid, everything put back after."""
    if not preview.direction:  # the step takes no update (skipped, or lr 0): nothing to scan
        return [math.nan] * len(grid)
    params = [local_shard(p) for p in preview.params]
    origin = [p.detach().clone() for p in params]
    evaluator = ClosureEvaluator(closure, optimizer.params(), optimizer.protected_buffers)
    evaluator.start_without_grad()
    losses = []
    try:
        for eta in grid:
            torch._foreach_copy_(params, origin)
            torch._foreach_add_(params, preview.direction, alpha=eta)
            losses.append(evaluator.evaluate())
    finally:
        torch._foreach_copy_(params, origin)
        evaluator.abort()
    # The loss over all ranks, as the search compares it (info.loss is averaged too).
    return [preview.info.loss - v for v in mean_to_host(losses, optimizer.process_group)]


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
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"invalid every: {every!r} (expected an integer >= 1)")
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.every = every
        self.step_sizes = _checked_grid(step_sizes)
        self.scans: list[LandscapeScan] = []
        self._calls = 0

    def maybe_scan(self, closure: Closure) -> LandscapeScan | None:
        """The scan of this call's batch, every ``every`` calls (``None`` between); a scan
        that raises counts as no call, so the next call scans."""
        if self._calls % self.every:
            self._calls += 1
            return None
        scan = scan_direction(self.optimizer, closure, self.step_sizes)
        self._calls += 1
        self.scans.append(scan)
        return scan
