"""A line search over Schedule-Free AdamW's step size: a prototype (``benchmarks/docs/method.md``,
section 17), not part of ``alsals``.

On the GPT-2 stand-in the defaults' searches settle at Schedule-Free's own rate, and Adam at
that rate trails both: the gap there is the dynamics, not the step size. This script tests
whether a line search can set the step size of Schedule-Free's dynamics instead of Adam's.
It runs the benchmark (``alsals-bench run ...``, the same arguments) with two more rows:

* ``schedulefree-search``: ``schedulefree.AdamWScheduleFree`` (its defaults, no warm-up),
  its step size ``gamma`` set by a search in each of the first 10 steps and every 10th step
  after (the step size reused between). Schedule-Free moves the weights it evaluates the
  gradient at, ``y``, by an averaging move that does not depend on ``gamma`` plus
  ``gamma`` times a multiple of Adam's preconditioned gradient ``P g``; the search starts
  from the averaging move's end ``y_a`` (one forward pass) and accepts the first trial with
  ``f(y_a) - f(y') >= c g . (y_a - y')`` (Armijo on the batch, ``c = 0.6``), starting at
  1.1 times the last accepted ``gamma`` (0.1 at the first search) and backtracking by 0.8.
  Each trial reruns Schedule-Free's step from a snapshot of the weights, gradients and
  optimizer state, and its forward pass draws the training pass's random numbers (dropout),
  as ``alsals``'s trials do (CPU generator only: the benchmark's runs here are on the CPU),
  and leaves the buffers (BatchNorm's running statistics) as the training pass left them.
* ``schedulefree-search-guarded``: the same, with three changes against the collapses the
  first row shows: the test is taken from ``y``, where the gradient was taken, along the
  whole move (``f(y) - f(y') >= c g . (y - y')``); a search whose averaging move alone fails
  that test keeps the step size and takes no trial (no step size can pass it there); and
  each search starts no higher than the Polyak step, where the linear model from ``y_a``
  reaches 0 (as ``ALSALS(params)``'s ``start="polyak"``).
* ``adam-constant``: Adam at a constant 2.2e-3 (the defaults' searched level on the GPT-2
  stand-in) after Schedule-Free's 5% linear warm-up.

    OMP_NUM_THREADS=1 python benchmarks/scripts/schedule_free_search.py run --budget quick \\
        --tasks austen-gpt2 --optimizers schedulefree-search adam-constant \\
        --seeds 10,11 --out /tmp/sf_search --no-report

Needs the benchmark's ``peers`` extra (``schedulefree``).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import Tensor, nn

from alsals_bench import registry
from alsals_bench.cli import main
from alsals_bench.tasks.base import Budget, Task

C = 0.6  # the paper's Armijo constant
BACKTRACK = 0.8
GROWTH = 1.1
FIRST_STEP_SIZE = 0.1  # ALSALS's lr
SEARCH_EVERY = 10
ADAM_CONSTANT_LR = 2.2e-3


class ScheduleFreeSearch(registry.ScheduleFreeStepper):
    """Schedule-Free AdamW with its step size searched (see the module's docstring)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, buffers: list[Tensor], guarded: bool = False
    ) -> None:
        super().__init__(optimizer)
        self.guarded = guarded
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.buffers = buffers
        self.gamma: float | None = None
        self.steps = 0
        self.trials = 0

    def _set(self, gamma: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = gamma

    def _snapshot(self) -> tuple[list[Tensor], list[Tensor | None], dict[str, Any]]:
        return (
            [p.detach().clone() for p in self.params],
            [None if p.grad is None else p.grad.clone() for p in self.params],
            copy.deepcopy(self.optimizer.state_dict()),
        )

    def _restore(self, snapshot: tuple[list[Tensor], list[Tensor | None], dict[str, Any]]) -> None:
        weights, grads, state = snapshot
        with torch.no_grad():
            for p, w, g in zip(self.params, weights, grads, strict=True):
                p.copy_(w)
                if g is not None:
                    p.grad.copy_(g)  # Schedule-Free's step divides the gradients in place
        # load_state_dict keeps the tensors it is given: a copy, or the next step would
        # change the snapshot
        self.optimizer.load_state_dict(copy.deepcopy(state))

    def _taken_step(self, gamma: float) -> list[Tensor]:
        self._set(gamma)
        self.optimizer.step()
        return [p.detach().clone() for p in self.params]

    def step(self, closure: Any) -> Tensor:
        rng_before = torch.get_rng_state()  # each trial sees the training pass's dropout
        loss = self.forward_backward(closure)
        rng_after = torch.get_rng_state()
        self.steps += 1
        self.trials = 0
        due = self.gamma is None or self.steps <= SEARCH_EVERY or self.steps % SEARCH_EVERY == 0
        if not due:
            self._set(self.gamma)
            self.optimizer.step()
            return loss.detach()
        snapshot = self._snapshot()
        base = self._taken_step(0.0)
        base_loss = self._trial_loss(closure, rng_before)
        self._restore(snapshot)
        # guarded: the test from y, where the gradient was taken, along the whole move
        origin, origin_loss = (
            (snapshot[0], float(loss.detach())) if self.guarded else (base, base_loss)
        )

        grads = snapshot[1]
        if self.guarded and self.gamma is not None:
            averaging = _promised(grads, base, snapshot[0])
            if origin_loss - base_loss < C * averaging:
                # the averaging move alone fails the test: no step size can pass it, and
                # the search says nothing about the step size, which is kept
                self._set(self.gamma)
                self.optimizer.step()
                torch.set_rng_state(rng_after)
                return loss.detach()
        gamma = FIRST_STEP_SIZE if self.gamma is None else self.gamma * GROWTH
        for trial in range(100):
            self.trials += 1
            self._set(gamma)
            self.optimizer.step()
            if self.guarded and trial == 0:
                # start no higher than the Polyak step: where the linear model from y_a
                # along the step reaches 0 (the loss's floor)
                per_unit = _promised(grads, self.params, base) / gamma
                if per_unit > 0 and base_loss / per_unit < gamma:
                    gamma = base_loss / per_unit
                    self._restore(snapshot)
                    self._set(gamma)
                    self.optimizer.step()
            promised = _promised(grads, self.params, origin)
            if promised > 0 and origin_loss - self._trial_loss(closure, rng_before) >= C * promised:
                break
            self._restore(snapshot)
            gamma *= BACKTRACK
        else:
            self._set(gamma)
            self.optimizer.step()
        self.gamma = gamma
        torch.set_rng_state(rng_after)
        return loss.detach()

    def _trial_loss(self, closure: Any, rng: Tensor) -> float:
        """The loss at the weights in place, with the training pass's random numbers; the
        buffers (BatchNorm's running statistics) as the training pass left them."""
        kept = [b.clone() for b in self.buffers]
        torch.set_rng_state(rng)
        loss = float(self.forward(closure))
        with torch.no_grad():
            for b, k in zip(self.buffers, kept, strict=True):
                b.copy_(k)
        return loss

    @property
    def lr(self) -> float:
        return self.gamma or 0.0

    def details(self) -> dict[str, Any]:
        return {"trials": self.trials}


def _promised(grads: list[Tensor | None], to: list[Tensor], origin: list[Tensor]) -> float:
    """The decrease the gradients promise for the move from ``origin`` to ``to``:
    ``-g . (to - origin)``, summed over the parameters."""
    with torch.no_grad():
        return -sum(
            float((g * (t - o)).sum())
            for t, o, g in zip(to, origin, grads, strict=True)
            if g is not None
        )


def _schedule_free_search(guarded: bool) -> Any:
    def build(model: nn.Module, task: Task, budget: Budget) -> registry.Stepper:
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(model.parameters(), warmup_steps=0)
        return ScheduleFreeSearch(optimizer, list(model.buffers()), guarded)

    return build


def _adam_constant(model: nn.Module, task: Task, budget: Budget) -> registry.Stepper:
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_CONSTANT_LR)
    warmup = max(1, int(0.05 * budget.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return registry.Stepper(optimizer, schedule)


registry.REGISTRY["schedulefree-search"] = registry.OptimizerSpec(
    "schedulefree-search",
    "Schedule-Free AdamW, its step size set by an Armijo search (a prototype)",
    _schedule_free_search(guarded=False),
    "schedulefree",
)
registry.REGISTRY["schedulefree-search-guarded"] = registry.OptimizerSpec(
    "schedulefree-search-guarded",
    "schedulefree-search tested from y, Polyak start, averaging checked first (a prototype)",
    _schedule_free_search(guarded=True),
    "schedulefree",
)
registry.REGISTRY["adam-constant"] = registry.OptimizerSpec(
    "adam-constant", f"Adam at a constant {ADAM_CONSTANT_LR} after a 5% warm-up", _adam_constant
)

if __name__ == "__main__":
    sys.exit(main())
