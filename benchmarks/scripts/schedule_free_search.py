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

    def __init__(self, optimizer: torch.optim.Optimizer, buffers: list[Tensor]) -> None:
        super().__init__(optimizer)
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
        gamma = FIRST_STEP_SIZE if self.gamma is None else self.gamma * GROWTH
        for _ in range(100):
            self.trials += 1
            self._set(gamma)
            self.optimizer.step()
            with torch.no_grad():
                promised = -sum(
                    float((g * (p - b)).sum())
                    for p, b, g in zip(self.params, base, snapshot[1], strict=True)
                    if g is not None
                )
            if promised > 0 and base_loss - self._trial_loss(closure, rng_before) >= C * promised:
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


def _schedule_free_search(model: nn.Module, task: Task, budget: Budget) -> registry.Stepper:
    from schedulefree import AdamWScheduleFree

    return ScheduleFreeSearch(
        AdamWScheduleFree(model.parameters(), warmup_steps=0), list(model.buffers())
    )


def _adam_constant(model: nn.Module, task: Task, budget: Budget) -> registry.Stepper:
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_CONSTANT_LR)
    warmup = max(1, int(0.05 * budget.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return registry.Stepper(optimizer, schedule)


registry.REGISTRY["schedulefree-search"] = registry.OptimizerSpec(
    "schedulefree-search",
    "Schedule-Free AdamW, its step size set by an Armijo search (a prototype)",
    _schedule_free_search,
    "schedulefree",
)
registry.REGISTRY["adam-constant"] = registry.OptimizerSpec(
    "adam-constant", f"Adam at a constant {ADAM_CONSTANT_LR} after a 5% warm-up", _adam_constant
)

if __name__ == "__main__":
    sys.exit(main())
