"""The closure protocol: how the optimizer evaluates the user's loss inside one step.

A line search evaluates the same mini-batch loss at several points. For those values to be
comparable, every evaluation in one step must see the same randomness (dropout masks, noise
drawn inside the closure) and must leave nothing behind in the model (BatchNorm running
statistics updated at trial weights). After the step, the random stream and the buffers must
be where a single plain training step would have left them. This module owns exactly that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

Closure = Callable[..., Tensor | float]


def _accepts_backward(closure: Closure) -> bool:
    """Whether the closure declares a ``backward`` parameter (it then runs backward itself)."""
    try:
        parameters = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins and some C-implemented callables
        return False
    return "backward" in parameters


class RandomState:
    """A snapshot of torch's global generators: the CPU one and every initialised CUDA device.

    Numpy's and Python's generators are deliberately not touched: replaying them would change
    the user's program in ways they cannot see. Randomness inside a closure should come from
    torch (dropout, ``torch.rand``) to be replayed across the evaluations of one step.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_ready else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class BufferGuard:
    """Keeps trial evaluations from changing module buffers (BatchNorm running statistics).

    ``capture`` records the buffers after the step's first (training) evaluation; ``restore``
    puts them back after each trial evaluation, so the buffers after the step equal those of
    one training-mode forward pass at the starting weights.
    """

    def __init__(self, buffers: Sequence[Tensor]) -> None:
        self.buffers = list(buffers)
        self.saved: list[Tensor] = []

    def capture(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)


def _as_loss_tensor(value: object, role: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"closure must return the loss as a scalar tensor; {role} returned a tensor "
                f"of shape {tuple(value.shape)}"
            )
        return value.reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    raise TypeError(
        f"closure must return the loss (a scalar tensor); {role} returned {type(value).__name__}"
    )


class ClosureEvaluator:
    """Evaluates a closure once with gradients and then any number of times without.

    Two closure forms are accepted:

    * ``closure()`` returns the loss and does not call backward. The optimizer sets the
      parameters' gradients to ``None``, calls the closure with autograd enabled, and runs
      ``loss.backward()``. Trial evaluations run under ``torch.no_grad()``.
    * ``closure(backward: bool)`` runs backward itself when ``backward=True`` (gradient
      accumulation over micro-batches, DDP ``no_sync``, its own loss scaling) and returns the
      loss; it is called with ``backward=False`` under ``torch.no_grad()`` for trials.
    """

    def __init__(
        self, closure: Closure, params: Iterable[Tensor], buffers: Sequence[Tensor]
    ) -> None:
        if closure is None or not callable(closure):
            raise TypeError(
                "this optimizer needs a closure: call optimizer.step(closure) with a function "
                "that computes and returns the loss (see the alsals README, 'The closure'); "
                "trainers that call step() without one (Hugging Face Trainer, Lightning, "
                "GradScaler) have adapters in alsals.integrations (docs/integrations.md)"
            )
        self.closure = closure
        self.params = list(params)
        self.runs_backward_itself = _accepts_backward(closure)
        self.buffers = BufferGuard(buffers)
        self.rng_before: RandomState | None = None
        self.rng_after: RandomState | None = None
        self.forwards = 0
        self.backwards = 0

    def evaluate_with_grad(self) -> Tensor:
        """First evaluation of the step: loss and gradients at the starting point."""
        self.rng_before = RandomState()
        with torch.enable_grad():
            if self.runs_backward_itself:
                loss = _as_loss_tensor(self.closure(backward=True), "closure(backward=True)")
            else:
                for p in self.params:
                    p.grad = None
                loss = _as_loss_tensor(self.closure(), "closure()")
                if not loss.requires_grad:
                    raise RuntimeError(
                        "the loss returned by closure() does not require grad, so the optimizer "
                        "cannot run backward on it: return the loss without .detach() or "
                        ".item(), and do not compute it under torch.no_grad(); a closure that "
                        "runs backward itself must take a `backward` argument"
                    )
                loss.backward()
        self.forwards += 1
        self.backwards += 1
        self.rng_after = RandomState()
        return loss.detach()

    def evaluate(self) -> Tensor:
        """A trial evaluation: same randomness as the first one, no autograd, no side effects."""
        assert self.rng_before is not None, "evaluate_with_grad must run first"
        if self.forwards == 1:  # the buffers are as the first evaluation left them
            self.buffers.capture()
        self.rng_before.restore()
        try:
            with torch.no_grad():
                if self.runs_backward_itself:
                    value = self.closure(backward=False)
                    loss = _as_loss_tensor(value, "closure(backward=False)")
                else:
                    loss = _as_loss_tensor(self.closure(), "closure()")
        finally:
            self.buffers.restore()
        self.forwards += 1
        return loss.detach()

    def finish(self) -> None:
        """Leave the random stream where one plain training evaluation would have left it."""
        if self.rng_after is not None and self.forwards > 1:
            self.rng_after.restore()
