"""One line-search engine behind SLS, Adam + SLS and ALSALS.

The three optimizers of the paper differ in four choices only: the direction searched along,
the direction the accepted step is applied along, how the slope on the right-hand side of
the Armijo test is obtained, and the test itself (``c``, smoothing). ``LineSearchOptimizer``
runs the shared procedure; the public classes in :mod:`alsals.optimizers` pick the choices.

One step (see ``step``):

1. Evaluate the closure with gradients at the starting weights ``w``; average the loss
   across ranks. A non-finite loss or gradient skips the step; an all-zero gradient is a
   no-op.
2. Update Adam's moments (if the directions use them).
3. Decide whether to search this step (warm-up and search cadence) or to reuse ``eta``.
4. Search: grow ``eta`` by ``2^(1/b)`` (Eq. 2), then try ``w + eta d`` in place and
   backtrack ``eta <- backtrack * eta`` until the test holds, at most ``max_trials`` times.
   The slope comes either from ``-g.d`` or from a finite-difference probe (Eq. 6).
5. Apply the accepted ``eta`` along the update direction, then decoupled weight decay.

Every trial evaluation replays the first evaluation's random state and restores the module
buffers afterwards. The starting weights are kept in one parameter-sized buffer during the
search so that a failed search, a non-finite trial, or an exception raised by the closure
leaves the weights bit-for-bit as they were.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from alsals._closure import Closure, ClosureEvaluator
from alsals.acceptance import ArmijoTest
from alsals.directions import (
    Direction,
    GroupTensors,
    add_direction,
    compute_denominators,
    descent_slope,
    direction_tensors,
    update_moments,
)
from alsals.distributed import mean_to_host

SLOPES = ("analytic", "finite_difference")

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch < 2.4
    DTensor = Shard = None


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameters, gradients, state); else ``t``."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _shard_count(p: Tensor) -> int:
    """Over how many ranks ``p`` is split: its local slope terms sum, not average."""
    if DTensor is None or not isinstance(p, DTensor):
        return 1
    count = 1
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            count *= p.device_mesh.size(dim)
    return count


# Hyperparameters of the search itself: one value for the whole optimizer.
SEARCH_KEYS = (
    "c",
    "smoothing",
    "backtrack",
    "growth_interval",
    "max_trials",
    "slope",
    "fd_step",
    "warmup_steps",
    "search_interval",
)
# Hyperparameters that may differ between parameter groups.
GROUP_KEYS = ("betas", "eps", "weight_decay", "lr_scale")

ADAPTIVE_MIN_SEARCHES = 10  # SaLSa: always search during the first 10 steps
ADAPTIVE_MAX_INTERVAL = 10  # ... and at least every 10 steps afterwards


@dataclass(frozen=True)
class StepInfo:
    """What the last call to ``step`` did, for logging.

    ``kind`` is ``"search"``, ``"reuse"`` (cadence: the previous step size was reused),
    ``"warmup"``, ``"failed"`` (no trial passed: weights unchanged), ``"nonfinite"``
    (loss, gradient or slope not finite: step skipped) or ``"zero_grad"``.
    ``slope`` is the slope estimate of this step (``nan`` when none was computed) and
    ``loss_decrease`` is ``f(w) - f(w + eta d)`` at the accepted trial (``nan`` if none).
    """

    kind: str
    step_size: float
    loss: float
    trials: int
    forwards: int
    backwards: int
    slope: float
    loss_decrease: float


def _check_range(name: str, value: Any, low: float, high: float, *, closed_low: bool) -> None:
    ok_low = value >= low if closed_low else value > low
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok_low and value < high):
        bracket = "[" if closed_low else "("
        raise ValueError(
            f"invalid {name}: {value!r} (expected a number in {bracket}{low}, {high}))"
        )


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"invalid {name}: {value!r} (expected an integer >= {minimum})")


def _largest_magnitudes(grads: list[Tensor]) -> list[Tensor]:
    """``max |g|`` of each tensor (NaN if it holds a NaN), as device scalars: no host sync.

    On CPU the infinity-norm kernel behind ``torch._foreach_norm(..., inf)`` is not
    vectorised and takes about 20 times as long as ``aminmax``, which also reads each tensor
    once; on other devices the fused multi-tensor norm is the fastest.
    """
    if all(g.device.type == "cpu" for g in grads):
        return [torch.stack(torch.aminmax(g)).abs().max() for g in grads]
    return list(torch._foreach_norm(grads, math.inf))


class LineSearchOptimizer(torch.optim.Optimizer):
    """Base class: an Armijo line search along a configurable direction.

    Subclasses set ``search_direction`` and ``update_direction``. See :mod:`alsals.optimizers`
    for the parameters; ``param_groups[i]["lr"]`` always shows the step size in use for group
    ``i`` (``eta * lr_scale``), and writing to it between steps sets the step size the next
    search starts from.
    """

    search_direction: Direction
    update_direction: Direction

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._validate_search(defaults)
        self._buffers = [b for b in (buffers or ()) if b is not None]
        self._process_group = process_group
        self._warned_nonfinite = False
        self.last_step: StepInfo | None = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- set-up

    @staticmethod
    def _validate_search(h: dict[str, Any]) -> None:
        _check_range("lr", h["lr"], 0.0, math.inf, closed_low=False)
        _check_range("c", h["c"], 0.0, 1.0, closed_low=False)
        _check_range("smoothing", h["smoothing"], 0.0, 1.0, closed_low=True)
        _check_range("backtrack", h["backtrack"], 0.0, 1.0, closed_low=False)
        if not (isinstance(h["growth_interval"], (int, float)) and h["growth_interval"] > 0):
            raise ValueError(
                f"invalid growth_interval: {h['growth_interval']!r} (expected a number > 0; "
                "math.inf disables growth)"
            )
        _check_positive_int("max_trials", h["max_trials"], 1)
        if h["slope"] not in SLOPES:
            raise ValueError(f"invalid slope: {h['slope']!r} (expected one of {SLOPES})")
        _check_range("fd_step", h["fd_step"], 0.0, math.inf, closed_low=False)
        _check_positive_int("warmup_steps", h["warmup_steps"], 0)
        if h["search_interval"] != "adaptive":
            try:
                _check_positive_int("search_interval", h["search_interval"], 1)
            except ValueError:
                raise ValueError(
                    f"invalid search_interval: {h['search_interval']!r} "
                    "(expected an integer >= 1 or 'adaptive')"
                ) from None

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        if "betas" in group:
            betas = group["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"invalid betas: {betas!r} (expected a pair (beta1, beta2))")
            _check_range("betas[0]", betas[0], 0.0, 1.0, closed_low=True)
            _check_range("betas[1]", betas[1], 0.0, 1.0, closed_low=True)
        if "eps" in group:
            _check_range("eps", group["eps"], 0.0, math.inf, closed_low=False)
        _check_range("weight_decay", group["weight_decay"], 0.0, math.inf, closed_low=True)
        _check_range("lr_scale", group["lr_scale"], 0.0, math.inf, closed_low=False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in SEARCH_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key!r} cannot differ between parameter groups: the line search takes one "
                    "decision for all parameters (per-group settings: "
                    f"{', '.join(GROUP_KEYS)})"
                )
        if "lr" in param_group and param_group["lr"] != self.defaults["lr"]:
            raise ValueError(
                "a per-group 'lr' is not supported: the line search picks one step size for all "
                "parameters; scale it per group with 'lr_scale' instead"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("complex parameters are not supported")
        first_state = self.state.get(self.param_groups[0]["params"][0], {})
        step_size = first_state.get("line_search", {}).get("step_size", self.defaults["lr"])
        group["lr"] = step_size * group["lr_scale"]

    def _search_state(self) -> dict[str, Any]:
        """The optimizer-wide state of the search, kept in the first parameter's state so
        that ``state_dict`` carries it (the convention of ``torch.optim.LBFGS``)."""
        first = self.param_groups[0]["params"][0]
        state = self.state[first]
        if "line_search" not in state:
            state["line_search"] = {
                "step": 0,
                "step_size": float(self.defaults["lr"]),
                "initial_step_size": float(self.defaults["lr"]),
                "decrease_avg": 0.0,
                "slope_avg": 0.0,
                "averaged": 0,
                "step_size_fast": 0.0,
                "step_size_slow": 0.0,
                "searches": 0,
                "steps_since_search": 0,
                "forwards": 0,
                "backwards": 0,
                "trials": 0,
                "failed_searches": 0,
                "skipped_nonfinite": 0,
                "skipped_zero_grad": 0,
            }
        return state["line_search"]

    @property
    def uses_moments(self) -> bool:
        return Direction.MOMENTUM in (self.search_direction, self.update_direction) or (
            Direction.PRECONDITIONED in (self.search_direction, self.update_direction)
        )

    def _gather(self) -> list[GroupTensors]:
        """The tensors taking part in this step, with lazily initialised per-parameter state."""
        views = []
        for group in self.param_groups:
            view = GroupTensors(group=group, params=[], grads=[])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        "(e.g. nn.Embedding(sparse=True)); use dense gradients"
                    )
                view.keys.append(p)
                view.params.append(_local(p))
                view.grads.append(_local(p.grad))
                view.shards.append(_shard_count(p))
                if self.uses_moments:
                    state = self.state[p]
                    if "exp_avg" not in state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    view.exp_avgs.append(_local(state["exp_avg"]))
                    view.exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                    view.steps.append(state["step"])
            if view.params:
                views.append(view)
        return views

    def _search_direction_now(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, d) for the search direction given the current gradients and state.

        Right after a step this is the direction that step searched along (the trials do not
        touch ``.grad``); :mod:`alsals.diagnostics` uses it to scan the loss along it.
        """
        pairs: list[tuple[Tensor, Tensor]] = []
        for view in self._gather():
            if self.uses_moments:
                compute_denominators(view)
            pairs += zip(view.params, direction_tensors(view, self.search_direction), strict=True)
        return pairs

    def _adopt_external_step_size(self, search: dict[str, Any]) -> None:
        """A step size written into ``param_groups[i]["lr"]`` since the last step wins."""
        for group in self.param_groups:
            if group["lr"] != search["step_size"] * group["lr_scale"]:
                _check_range(
                    "param_groups[...]['lr']", group["lr"], 0.0, math.inf, closed_low=False
                )
                search["step_size"] = group["lr"] / group["lr_scale"]
                return

    # ------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Take one step; returns the loss at the starting weights (from the first evaluation).

        ``closure`` is required: see :class:`alsals._closure.ClosureEvaluator` for the two
        forms it may take.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        evaluator = ClosureEvaluator(closure, params, self._buffers)  # type: ignore[arg-type]
        search = self._search_state()
        self._adopt_external_step_size(search)

        loss = evaluator.evaluate_with_grad()
        views = self._gather()
        loss0, (kind, eta, trials, slope, decrease) = self._run(search, views, loss, evaluator)

        search["forwards"] += evaluator.forwards
        search["backwards"] += evaluator.backwards
        search["trials"] += trials
        for group in self.param_groups:
            group["lr"] = search["step_size"] * group["lr_scale"]
        self.last_step = StepInfo(
            kind=kind,
            step_size=eta,
            loss=loss0,
            trials=trials,
            forwards=evaluator.forwards,
            backwards=evaluator.backwards,
            slope=slope,
            loss_decrease=decrease,
        )
        return loss

    def _run(
        self,
        search: dict[str, Any],
        views: list[GroupTensors],
        loss: Tensor,
        evaluator: ClosureEvaluator,
    ) -> tuple[float, tuple[str, float, int, float, float]]:
        """Steps 1-5 of the module docstring; returns the starting loss and the outcome."""
        nan = float("nan")
        if not views:  # no parameter has a gradient: nothing to do
            (loss0,) = mean_to_host([loss], self._process_group)
            search["skipped_zero_grad"] += 1
            return loss0, ("zero_grad", 0.0, 0, nan, nan)

        grads = [g for view in views for g in view.grads]
        device = loss.device
        nonempty = [g for g in grads if g.numel()]  # FSDP2: a rank may hold an empty shard
        norms = _largest_magnitudes(nonempty) if nonempty else []
        largest = torch.stack([n.to(device) for n in norms] or [loss.new_zeros(())]).max()
        loss0, grad_max = mean_to_host([loss, largest], self._process_group)
        if not (math.isfinite(loss0) and math.isfinite(grad_max)):
            self._skip_nonfinite(search, "the loss or the gradient")
            return loss0, ("nonfinite", 0.0, 0, nan, nan)
        if grad_max == 0.0:
            search["skipped_zero_grad"] += 1
            return loss0, ("zero_grad", 0.0, 0, nan, nan)

        if self.uses_moments:
            for view in views:
                update_moments(view)
                for p, s in zip(view.keys, view.steps, strict=True):
                    self.state[p]["step"] = s

        mode = self._plan(search)
        if mode != "search":
            eta = self._reuse_or_warmup_step_size(search, mode)
            for view in views:
                decay = 1.0 - eta * view.scale * view.group["weight_decay"]
                if decay != 1.0:
                    torch._foreach_mul_(view.params, decay)
                add_direction(view, self.update_direction, eta)
            search["step"] += 1
            search["steps_since_search"] += 1
            return loss0, (mode, eta, 0, nan, nan)

        # The analytic slope needs temporaries: compute it before the weights are saved.
        analytic = None
        if self._hyper["slope"] == "analytic":
            analytic = descent_slope(views, self.search_direction)
        origin = [torch.empty_like(p) for view in views for p in view.params]
        torch._foreach_copy_(origin, [p for view in views for p in view.params])
        try:
            outcome = self._search(search, views, loss0, origin, evaluator, analytic)
        except BaseException:
            self._restore(views, origin)
            raise
        finally:
            evaluator.finish()
        return loss0, outcome

    @property
    def _hyper(self) -> dict[str, Any]:
        """Search-level hyperparameters: equal in every group, read from the first."""
        return self.param_groups[0]

    def _plan(self, search: dict[str, Any]) -> str:
        """``"warmup"``, ``"search"`` or ``"reuse"`` for this step."""
        if search["step"] < self._hyper["warmup_steps"]:
            return "warmup"
        interval = self._hyper["search_interval"]
        searches = search["searches"]
        if searches == 0:
            return "search"  # the initial step size is a guess: always search first
        if interval == "adaptive":
            if searches < ADAPTIVE_MIN_SEARCHES:
                return "search"
            # Bias-corrected fast and slow averages of the step size (SaLSa's cadence).
            fast = search["step_size_fast"] / (1.0 - 0.9**searches)
            slow = search["step_size_slow"] / (1.0 - 0.99**searches)
            if not (fast > 0.0 and slow > 0.0):
                return "search"
            change = max(fast / slow, slow / fast) - 1.0
            interval = (
                ADAPTIVE_MAX_INTERVAL if change <= 0 else min(ADAPTIVE_MAX_INTERVAL, 1 / change)
            )
        return "search" if search["steps_since_search"] + 1 >= interval else "reuse"

    def _reuse_or_warmup_step_size(self, search: dict[str, Any], mode: str) -> float:
        if mode == "warmup":
            warmup = self._hyper["warmup_steps"]
            search["step_size"] = search["initial_step_size"] * (search["step"] + 1) / warmup
        return search["step_size"]

    def _restore(self, views: list[GroupTensors], origin: list[Tensor]) -> None:
        torch._foreach_copy_([p for view in views for p in view.params], origin)

    def _place(
        self, views: list[GroupTensors], origin: list[Tensor], eta: float, moved: bool
    ) -> None:
        """Set the weights to ``origin + eta * d`` along the search direction."""
        if moved:
            self._restore(views, origin)
        for view in views:
            add_direction(view, self.search_direction, eta)

    def _search(
        self,
        search: dict[str, Any],
        views: list[GroupTensors],
        loss0: float,
        origin: list[Tensor],
        evaluator: ClosureEvaluator,
        analytic_slope: Tensor | None,
    ) -> tuple[str, float, int, float, float]:
        h = self._hyper
        test = ArmijoTest(c=h["c"], smoothing=h["smoothing"])
        nan = float("nan")

        if analytic_slope is None:
            self._place(views, origin, h["fd_step"], moved=False)
            slope_input = evaluator.evaluate()  # f(w + lambda d), turned into f_a below
        else:
            slope_input = analytic_slope

        start_eta = search["step_size"]
        eta = start_eta * 2.0 ** (1.0 / h["growth_interval"])
        moved = h["slope"] == "finite_difference"
        slope = slope_avg = nan
        for trial in range(1, h["max_trials"] + 1):
            self._place(views, origin, eta, moved)
            moved = True
            trial_loss = evaluator.evaluate()
            if trial == 1:  # the slope comes to the host with the first trial's loss
                probe, value = mean_to_host([slope_input, trial_loss], self._process_group)
                slope = (
                    (loss0 - probe) / h["fd_step"] if h["slope"] == "finite_difference" else probe
                )
                if not math.isfinite(slope):
                    self._restore(views, origin)
                    self._skip_nonfinite(search, "the slope estimate")
                    return "nonfinite", 0.0, trial, slope, nan
                slope_avg = test.average(search["slope_avg"], slope)
            else:
                (value,) = mean_to_host([trial_loss], self._process_group)
            decrease = loss0 - value
            decrease_avg = test.average(search["decrease_avg"], decrease)
            if math.isfinite(value) and test.accepts(decrease_avg, eta, slope_avg):
                # Both averages take one sample per accepted search, so their bias cancels.
                search["decrease_avg"] = decrease_avg
                search["slope_avg"] = slope_avg
                search["averaged"] += 1
                self._accept(search, views, origin, eta)
                return "search", eta, trial, slope, decrease
            last_tried = eta
            eta *= h["backtrack"]

        self._restore(views, origin)
        if h["smoothing"] > 0.0 and search["averaged"] > 0:
            # The smoothed history can make the test unsatisfiable at every step size (a
            # negative average decrease with a positive average slope): forget it and keep
            # the step size, so that the next search runs a fresh test from there.
            search["decrease_avg"] = search["slope_avg"] = 0.0
            search["averaged"] = 0
            search["step_size"] = start_eta
        else:
            search["step_size"] = last_tried  # no history to blame: the step is too large
        search["failed_searches"] += 1
        self._finish_search(search)
        return "failed", 0.0, h["max_trials"], slope, nan

    def _accept(
        self, search: dict[str, Any], views: list[GroupTensors], origin: list[Tensor], eta: float
    ) -> None:
        if self.update_direction is not self.search_direction:
            self._restore(views, origin)
            for view in views:
                add_direction(view, self.update_direction, eta)
        start = 0
        for view in views:
            n = len(view.params)
            decay = eta * view.scale * view.group["weight_decay"]
            if decay:
                torch._foreach_add_(view.params, origin[start : start + n], alpha=-decay)
            start += n
        search["step_size"] = eta
        search["step"] += 1
        self._finish_search(search)

    def _finish_search(self, search: dict[str, Any]) -> None:
        search["searches"] += 1
        search["steps_since_search"] = 0
        eta = search["step_size"]
        search["step_size_fast"] = 0.9 * search["step_size_fast"] + 0.1 * eta
        search["step_size_slow"] = 0.99 * search["step_size_slow"] + 0.01 * eta

    def _skip_nonfinite(self, search: dict[str, Any], what: str) -> None:
        search["skipped_nonfinite"] += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: {what} is not finite (NaN or inf); the step was skipped "
                "and the weights left unchanged. Further skips are counted in "
                "optimizer.last_step / the state's 'skipped_nonfinite' without warning.",
                RuntimeWarning,
                stacklevel=4,
            )
