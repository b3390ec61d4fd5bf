"""Mixed precision with the line-search optimizers (torch only).

**bf16 (or fp16 without a scaler) autocast** works inside any closure. What matters is the
loss value the line search compares: its Armijo test looks at differences between losses,
and a loss rounded to bfloat16 (8 significant bits, about 0.4 % steps) hides the small
decreases a good step makes. Compute the loss in float32: ``F.cross_entropy`` and
``F.mse_loss`` already run in float32 under autocast; a hand-written reduction should use
``logits.float()``. :func:`autocast_closure` runs a closure under autocast and warns when the
loss comes back in half precision.

**fp16 with** ``torch.amp.GradScaler``: ``scaler.step(optimizer)`` cannot drive a line search
(it refuses closures, and it unscales the gradients before the step while a line search
computes them inside the step). :func:`step_with_scaler` replaces
``scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()``: the step's
gradient evaluation runs ``scaler.scale(loss).backward()`` and ``scaler.unscale_``, the
optimizer skips the step when the unscaled gradients hold an inf or NaN (``kind ==
"nonfinite"``, weights, moments and step size untouched, exactly like ``scaler.step``;
the search state counts the skip and its passes), and
``scaler.update()`` then lowers or grows the scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from alsals.closure import ClosureForm
from alsals.integrations import DRIVEN
from alsals.line_search import LineSearchOptimizer
from alsals.schedule_free import ALSALS

__all__ = ["autocast_closure", "step_with_scaler"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
_LOW_PRECISION_MESSAGE = (
    "the closure returned the loss in {dtype}: the line search then compares loss values "
    "rounded to {dtype} and misses the small decreases its test looks for. Compute the "
    "loss in float32 (F.cross_entropy and F.mse_loss do so under autocast; otherwise reduce "
    "logits.float())."
)


def _check_loss_precision(loss: object, where: str) -> None:
    if isinstance(loss, Tensor) and loss.dtype in HALF_DTYPES:
        warnings.warn(
            f"{where}: " + _LOW_PRECISION_MESSAGE.format(dtype=loss.dtype),
            RuntimeWarning,
            stacklevel=3,
        )


def autocast_closure(
    closure: Callable[..., Tensor],
    device_type: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Callable[..., Tensor]:
    """Run ``closure`` under ``torch.autocast(device_type, dtype)`` and return its loss in
    float32 or wider (a half-precision loss widened).

    The returned closure has the same form as ``closure`` (``closure()`` or
    ``closure(backward)``), so the optimizer treats it the same way. A loss that comes back
    in float16/bfloat16 triggers a ``RuntimeWarning`` (see the module docstring): upcasting
    it afterwards cannot restore the digits the comparison needs.
    """

    if not callable(closure):
        raise TypeError(
            f"autocast_closure needs the closure that computes the loss, got {closure!r}"
        )

    def run(*args: object) -> Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            loss = closure(*args)
        _check_loss_precision(loss, "autocast_closure")
        # (a float64 loss keeps its digits: only half precision is widened)
        low = isinstance(loss, Tensor) and loss.dtype in (torch.float16, torch.bfloat16)
        return loss.float() if low else loss

    if ClosureForm(closure).takes_backward:

        def with_backward(backward: bool) -> Tensor:
            return run(backward)

        return with_backward

    def plain() -> Tensor:
        return run()

    return plain


#: The optimizer's warning for a skipped step whose gradient (not loss) is not finite: under
#: a GradScaler that is an overflow of the scaled gradients, the scaler's normal operation.
_OVERFLOW_SKIP_WARNING = r".*: the gradient( \(or Adam's second moment[^)]*\))? is not finite"


def step_with_scaler(
    optimizer: LineSearchOptimizer | ALSALS,
    closure: Callable[..., Tensor],
    scaler: torch.amp.GradScaler,
    *,
    update: bool = True,
) -> Tensor:
    """One line-search step with fp16 gradients scaled by ``scaler``; returns the loss.

    ``closure`` takes one of the optimizer's two forms:

    * ``closure()`` returns the loss (compute it under ``torch.autocast``); this function
      sets the gradients to ``None`` and runs ``scaler.scale(loss).backward()`` itself.
    * ``closure(backward)`` runs backward itself when ``backward=True`` and must then call
      ``scaler.scale(loss).backward()`` (not ``loss.backward()``), e.g. per micro-batch for
      gradient accumulation or under DDP's ``no_sync``.

    Either way ``scaler.unscale_(optimizer)`` follows the backward pass, so the line search
    sees true gradients; with an inf/NaN among them the optimizer skips the step
    (``optimizer.last_step.kind == "nonfinite"``, without the optimizer's warning: an
    overflow is the scaler's normal operation; a non-finite loss still warns). Clip with
    the optimizer's ``max_grad_norm``: it clips the unscaled gradients (do not call
    ``unscale_`` or ``clip_grad_norm_`` in the closure). With ``update=True`` (default)
    ``scaler.update()`` runs afterwards; pass ``update=False`` to call it yourself (several
    optimizers sharing one scaler). Do not call ``scaler.step(optimizer)``. An exception in
    the step leaves the scaler as it was too, so the step can be retried. Accelerate's
    ``AcceleratedOptimizer`` (whose own ``step`` would unscale before the closure has run)
    is looked through: the optimizer it holds steps, and the wrapper's ``step_was_skipped``
    tells a skipped step, so that Accelerate's scheduler skips it too. Lightning's wrapper
    is refused: its step runs Lightning's precision plugin (use ``bf16-mixed``).
    """
    if any(c.__name__ == "LightningOptimizer" for c in type(optimizer).__mro__):
        raise TypeError(
            "step_with_scaler cannot drive Lightning's optimizer: its step runs Lightning's "
            "precision plugin, whose fp16 scaler steps without the closure. Use "
            "precision='bf16-mixed' or '32-true' (docs/integrations.md, Lightning)"
        )
    wrapper = None
    inner = getattr(optimizer, "optimizer", None)
    if (
        not isinstance(optimizer, DRIVEN)
        and isinstance(optimizer, torch.optim.Optimizer)  # (not a scheduler that holds one)
        and isinstance(inner, DRIVEN)
    ):
        wrapper, optimizer = optimizer, inner
    if not isinstance(optimizer, DRIVEN):
        raise TypeError(
            "step_with_scaler drives an alsals line-search optimizer; for other optimizers "
            "use scaler.step(optimizer) as usual, or the step() of a wrapper that holds "
            "the scaler itself (Accelerate's prepared optimizer)"
        )
    if not callable(closure):
        raise TypeError("step_with_scaler needs the closure that computes the loss")
    if not isinstance(scaler, torch.amp.GradScaler):  # (torch.cuda.amp's is a subclass)
        raise TypeError(f"step_with_scaler needs a torch.amp.GradScaler, got {scaler!r}")
    scaled = _ScaledClosure(optimizer, closure, scaler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _OVERFLOW_SKIP_WARNING, RuntimeWarning)
            loss = optimizer.step(scaled)
    except BaseException:
        if scaled.unscaled:  # forget this attempt's unscale_, or a retry could not unscale
            scaler._per_optimizer_states.pop(id(optimizer), None)
        raise
    if wrapper is not None and hasattr(wrapper, "_is_overflow"):
        wrapper._is_overflow = optimizer.last_step.kind == "nonfinite"  # (step_was_skipped)
    if update and scaled.unscaled:
        scaler.update()
    return loss


class _ScaledClosure:
    """The user's closure in the ``closure(backward)`` form, with the scaler's backward
    and ``unscale_`` in the first evaluation."""

    def __init__(
        self,
        optimizer: LineSearchOptimizer | ALSALS,
        closure: Callable[..., Tensor],
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.optimizer, self.scaler = optimizer, scaler
        self.form = ClosureForm(closure)
        self.unscaled = False
        # a closure() is run after the gradients are set to None (the scaler's backward is
        # its gradient alone): the optimizer looks for gradients computed outside the step,
        # which that drops, as it does for a closure() given to step() itself
        self.drops_gradients = not self.form.takes_backward

    def __call__(self, backward: bool) -> Tensor:
        if backward:
            loss = self.form(True) if self.form.takes_backward else self._scaled_backward()
            self.scaler.unscale_(self.optimizer)
            self.unscaled = True
        else:
            loss = self.form(False)
        _check_loss_precision(loss, "step_with_scaler")
        return loss.detach() if isinstance(loss, Tensor) else loss

    def _scaled_backward(self) -> Tensor:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        loss = self.form(True)
        if not (isinstance(loss, Tensor) and loss.requires_grad):
            raise RuntimeError(
                "step_with_scaler: closure() must return a loss that requires grad "
                "(it runs scaler.scale(loss).backward() on it); a closure that runs "
                "backward itself must take a `backward` argument"
            )
        if any(p.grad is not None for g in self.optimizer.param_groups for p in g["params"]):
            raise RuntimeError(
                "step_with_scaler: closure() ran backward itself (an LBFGS-style closure); "
                "here the scaler runs scaler.scale(loss).backward(): return the loss without "
                "calling backward, or take a `backward` argument and call "
                "scaler.scale(loss).backward() when it is True"
            )
        self.scaler.scale(loss).backward()
        return loss
