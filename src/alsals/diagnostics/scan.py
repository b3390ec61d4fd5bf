"""Scan the loss along the direction a line-search optimizer searches now."""

from __future__ import annotations

import math
import numbers
import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from alsals.acceptance import ArmijoTest, loss_resolution
from alsals.closure import Closure, ClosureEvaluator, _widest_dtype
from alsals.distributed import local_shard, mean_to_host
from alsals.line_search import SEARCH_KINDS, LineSearchOptimizer, StepPreview
from alsals.messages import not_replayed_message
from alsals.torch_optim_boundary import caller_stacklevel
from alsals.touched_buffers import TouchedBuffers

#: The warnings a scan gives once per optimizer (as its step gives its own once): the
#: causes already named for each optimizer.
_WARNED: weakref.WeakKeyDictionary[LineSearchOptimizer, set[str]] = weakref.WeakKeyDictionary()
#: Said where the scan cannot watch which modules the closure runs (a compiled model).
UNWATCHED_BUFFERS_WARNING = (
    "scan_direction: torch.compile has run in this process, so the scan cannot watch which "
    "modules the closure runs (a global module hook would make compiled models recompile): "
    "it puts back only the buffers {name} protects, none here, and the running statistics "
    "of BatchNorm layers (any module buffers) may have changed. Pass buffers=model.buffers() "
    "to {name} so that scans and trials leave them alone"
)


@dataclass
class LandscapeScan:
    """One mini-batch's loss decrease ``f(w) - f(w + eta d)`` over a grid of step sizes.

    ``chosen_step_size`` is the step size the optimizer's next step takes on this batch
    (the search's, lowered by the Polyak cap of ``loss_floor`` where it acts; a warm-up
    step's search too; ``None`` where the step did not search or its search took nothing:
    a reuse at the cadence, a failed or unresolved search, a skipped step);
    ``best_step_size`` the grid
    point with the largest decrease. A step that reuses its step size (``kind == "reuse"``)
    is scanned along the direction it moves; it has no slope, so no boundary. A step that
    takes no update has no direction: its decreases are NaN. ``boundary[i]`` is the
    smallest decrease the acceptance test of this step would accept at ``step_sizes[i]``
    (Eq. 9 with the smoothed averages solved for the raw decrease), and ``accepted[i]``
    whether the scanned decrease reaches it. ``slope`` is this step's slope estimate and ``slope_average`` the smoothed
    value the test used.

    ``warmup`` says that the step is one of the first ``warmup_steps``: its search judges
    trials by the warm-up rule, not Eq. 9 (any trial passes unless its loss is non-finite or
    measurably above ``loss``), so ``boundary`` is minus the loss's resolution at every step
    size (``RESOLUTION_ULPS`` units in the last place of ``loss``); and it tries nothing
    above ``warmup_cap``, the ramp's ``lr * (k + 1) / warmup_steps`` where its first trial
    goes (``None`` after warm-up). ``accepted`` is the test's verdict alone: above the cap
    it may hold where the search would never try.
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
    warmup: bool = False
    warmup_cap: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _number(value: object) -> float | None:
    """``value`` as a float where it is a real number (a one-element tensor included; not a
    ``bool``), else ``None``."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def log_grid(low: float = 1e-8, high: float = 10.0, num: int = 50) -> list[float]:
    """``num`` step sizes spaced evenly on a log scale from ``low`` to ``high``."""
    ends = []
    for name, value in (("low", low), ("high", high)):
        number = _number(value)
        if number is None:
            raise TypeError(
                f"log_grid: {name} must be a number (a step size), got {type(value).__name__} "
                f"{value!r}"
            )
        ends.append(number)
    try:
        if isinstance(num, bool):
            raise TypeError
        count = operator.index(num)  # (an int, a numpy integer, a one-element int tensor)
    except TypeError:
        raise TypeError(
            f"log_grid: num must be an integer (how many step sizes), got "
            f"{type(num).__name__} {num!r}"
        ) from None
    (low, high), num = ends, count
    if not (0 < low < high < math.inf) or num < 2:
        raise ValueError(f"invalid grid: low={low}, high={high}, num={num}")
    # (in log space: high / low overflows for a grid as wide as 1e-300 .. 1e300)
    start, stop = math.log(low), math.log(high)
    inner = [math.exp(start + (stop - start) * i / (num - 1)) for i in range(1, num - 1)]
    return [low, *inner, high]


def _checked_grid(step_sizes: Sequence[float] | None) -> list[float]:
    """``step_sizes`` as an increasing list of floats (``log_grid()`` for ``None``; a grid
    given in another order is sorted: a scan's points and its plots' lines run along the
    step size); a ``TypeError`` for
    one number, or anything else that holds no step sizes, and a ``ValueError`` that names
    them for step sizes that are not positive, finite numbers."""
    if step_sizes is None:
        return log_grid()
    values = None
    if not isinstance(step_sizes, (str, bytes, numbers.Number)):
        try:
            iterator = iter(step_sizes)  # (a number of another kind, a 0-dim tensor: none)
        except TypeError:
            iterator = None
        if iterator is not None:
            values = list(iterator)  # (an error inside a user's generator is its own)
    if values is None:
        raise TypeError(
            "step_sizes must be a sequence of positive numbers (such as log_grid(1e-7, 1.0, "
            f"36), or [0.1] for one), got {type(step_sizes).__name__} {step_sizes!r}"
        )
    grid = []
    for value in values:
        number = _number(value)
        if number is None:
            raise ValueError(f"step_sizes must be numbers, got {value!r}")
        grid.append(number)
    if not grid or any(not (math.isfinite(e) and e > 0) for e in grid):
        raise ValueError(f"step_sizes must be positive and finite, got {grid}")
    return sorted(grid)  # (the scan and its plots run along the step size)


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


def _check_closure(closure: object) -> None:
    """A ``TypeError`` unless ``closure`` is a function (the optimizer's own message says to
    call ``optimizer.step(closure)``, which misleads inside a scan)."""
    if isinstance(closure, Tensor):
        raise TypeError(
            "scan_direction needs the closure the step will get, not its value: pass the "
            "function that computes and returns the loss, scan_direction(optimizer, closure), "
            "not scan_direction(optimizer, closure()); the scan calls it once per step size"
        )
    if closure is None or not callable(closure):
        raise TypeError(
            "scan_direction needs the closure the step will get: scan_direction(optimizer, "
            "closure, step_sizes), with a function that computes and returns the loss (got "
            f"{type(closure).__name__})"
        )


def _warn_once(optimizer: LineSearchOptimizer, key: str, message: str) -> None:
    """Warn about ``key`` once per optimizer: a recorder scans every few steps, and the cause
    stays the same."""
    warned = _WARNED.setdefault(optimizer, set())
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())


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

    The buffers put back are every buffer of the modules the closure runs, given to the
    optimizer (``buffers=``) or not (:class:`TouchedBuffers`); where ``torch.compile`` has
    run the scan cannot see those modules, puts back the optimizer's buffers only and, where
    it has none, says once that others may have changed. The closure is also evaluated at
    step size 0: a loss other than the step's starting one (beyond ``REPLAY_TOLERANCE``)
    means that the closure does not replay its randomness (it draws its batch with numpy,
    say), which makes every decrease compare different batches; the scan says so once, as
    the step does. During warm-up the boundary and ``accepted`` follow the warm-up rule the
    search uses (see :class:`LandscapeScan`).
    """
    _check_optimizer(optimizer)
    _check_closure(closure)
    grid = _checked_grid(step_sizes)
    with TouchedBuffers() as touched:
        # (the preview puts back the buffers its forward passes moved: the grid starts where
        # the step does; this watcher collects them for the grid's evaluations)
        preview = optimizer.preview(closure)
        if not touched.active and not optimizer.protected_buffers:
            name = type(optimizer).__name__
            _warn_once(optimizer, "buffers", UNWATCHED_BUFFERS_WARNING.format(name=name))
        buffers = list({id(b): b for b in optimizer.protected_buffers + touched.buffers}.values())
        decreases, replayed, loss_dtype = _decreases_along(
            optimizer, closure, preview, grid, buffers, touched.restore
        )
    info, before = preview.info, preview.state
    if replayed is not None:
        _warn_if_not_replayed(optimizer, info.loss, replayed)
    settings = optimizer.param_groups[0]
    test = ArmijoTest(c=settings["c"], smoothing=settings["smoothing"])
    slope_average = (
        test.average(before.slope_avg, info.slope) if math.isfinite(info.slope) else math.nan
    )
    # The rule the search of this step judges trials by: the step size cap of the warm-up
    # ramp is what tells the search it is warming up (``walk.cap < inf``).
    cap = optimizer._step_size_cap(before) if info.kind in SEARCH_KINDS else math.inf
    warmup = cap < math.inf
    if warmup:
        # any trial that does not raise the loss measurably (SearchTest.judge)
        floor = -loss_resolution(loss_dtype, info.loss)
        boundary = [floor] * len(grid)
    else:
        boundary = [_minimum_decrease(test, before.decrease_avg, e, slope_average) for e in grid]
    finite = [(d, e) for d, e in zip(decreases, grid, strict=True) if math.isfinite(d)]
    # (a search the Polyak cap cut to 0, the loss at its floor, took nothing either)
    chosen = info.step_size if info.kind == "search" and info.step_size > 0.0 else None
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
        warmup=warmup,
        warmup_cap=cap if warmup else None,
    )


def _warn_if_not_replayed(optimizer: LineSearchOptimizer, loss0: float, again: float) -> None:
    """Warn once where the closure gave ``again`` at step size 0, at the weights where the
    step's first evaluation gave ``loss0``: the optimizer's message (``REPLAY_TOLERANCE``),
    with what it does to the scan."""
    message = not_replayed_message(f"scan_direction ({type(optimizer).__name__})", loss0, again)
    if message is not None:
        message += (
            f" The scanned curve compares them too, and means nothing: its decrease at step "
            f"size 0 is {loss0 - again:.3g}, not 0."
        )
        _warn_once(optimizer, "replay", message)


def _minimum_decrease(test: ArmijoTest, decrease_avg: float, eta: float, slope_avg: float) -> float:
    """Solve ``b D + (1 - b) Delta >= c_h eta G`` for the smallest accepted ``Delta``."""
    if not math.isfinite(slope_avg):
        return math.nan
    b = test.smoothing
    needed = test.factor(slope_avg) * eta * slope_avg
    return (needed - b * decrease_avg) / (1.0 - b)


def _loss_dtype(loss: Tensor, params: list[Tensor]) -> torch.dtype:
    """The precision the loss was computed in, as the step reads it: a loss returned as a
    Python number (a float64 tensor by then) has the parameters' widest precision."""
    return _widest_dtype(params) if loss.dtype == torch.float64 else loss.dtype


@torch.no_grad()
def _decreases_along(
    optimizer: LineSearchOptimizer,
    closure: Closure,
    preview: StepPreview,
    grid: list[float],
    buffers: list[Tensor],
    reset: Callable[[], None] = lambda: None,
) -> tuple[list[float], float | None, torch.dtype]:
    """``f(w) - f(w + eta d)`` for every ``eta`` of the grid, everything put back after; the
    loss at step size 0 evaluated the same way (``None`` where nothing was evaluated), and
    the precision of the loss. Every evaluation starts from ``buffers`` as they are now,
    after ``reset`` (which puts back buffers a forward pass replaced by new tensors)."""
    if not preview.direction:  # the step takes no update (skipped, or lr 0): nothing to scan
        return [math.nan] * len(grid), None, torch.float32
    params = [local_shard(p) for p in preview.params]
    origin = [p.detach().clone() for p in params]
    evaluator = ClosureEvaluator(closure, optimizer.params(), buffers)
    evaluator.start_without_grad()
    try:
        reset()
        losses = [evaluator.evaluate()]  # at step size 0: does the closure replay its batch?
        for eta in grid:
            torch._foreach_copy_(params, origin)
            torch._foreach_add_(params, preview.direction, alpha=eta)
            reset()
            losses.append(evaluator.evaluate())
    finally:
        torch._foreach_copy_(params, origin)
        evaluator.abort()
    # The loss over all ranks, as the search compares it (info.loss is averaged too).
    replayed, *values = mean_to_host(losses, optimizer.process_group)
    decreases = [preview.info.loss - v for v in values]
    return decreases, replayed, _loss_dtype(losses[0], optimizer.params())


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
