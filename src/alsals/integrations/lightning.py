"""Lightning (``lightning.pytorch``): the manual-optimization pattern for line searches.

Lightning's automatic optimization hands the optimizer a closure that always runs
``training_step`` *and* backward and zeroes the gradients; a line search calls its closure
again under ``torch.no_grad()`` for every trial, where the backward does nothing but
``training_step`` runs (and logs) once per trial, and ``accumulate_grad_batches`` runs
micro-batches outside the closure, whose gradients the optimizer drops. So a
LightningModule trained by an alsals optimizer uses manual optimization and one call per
batch::

    from alsals.integrations.lightning import LineSearchCallback, line_search_step

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = ...

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = line_search_step(self, lambda: F.cross_entropy(self.net(x), y))
            self.log("train_loss", loss)

        def configure_optimizers(self):
            return ALSALS(self.parameters(), buffers=self.buffers())

    trainer = L.Trainer(callbacks=[LineSearchCallback(), LearningRateMonitor("step")])

``line_search_step`` goes through ``self.optimizers().step(closure=...)``, so Lightning
counts the step (``global_step``, ``max_steps``, step-based checkpoints), runs its
``on_before_optimizer_step`` hooks, and its strategy and precision plugin apply; the
gradient evaluation runs ``self.manual_backward`` (under DDP this is what makes the gradient
all-reduce happen). ``LearningRateMonitor`` logs ``param_groups[i]["lr"]``, which is the
searched step size (an update that ``loss_floor``'s cap cut took less).
``LineSearchCallback`` refuses set-ups that cannot work, with the fix in the message, and
logs the trials, forward passes and step size taken of each step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from alsals.integrations import DRIVEN, _raise_import_error

try:
    import lightning.pytorch as pl
except ImportError as error:
    _raise_import_error(error, "lightning", "lightning")

#: Lightning precisions whose weights, and so the loss, are half precision.
HALF_PRECISION_WEIGHTS = ("bf16-true", "16-true")

__all__ = ["LineSearchCallback", "line_search_step"]


def _line_search_optimizers(trainer: pl.Trainer) -> list[Any]:
    return [opt for opt in trainer.optimizers if isinstance(opt, DRIVEN)]


def line_search_step(
    module: pl.LightningModule,
    loss_fn: Callable[[], Tensor],
    optimizer: Any = None,
) -> Tensor:
    """One line-search step of ``module``'s optimizer on the loss ``loss_fn()`` computes.

    ``loss_fn`` takes no argument and returns the loss of this batch (do not call backward
    in it). It is evaluated once with gradients, through ``module.manual_backward``, and
    once per trial under ``torch.no_grad()``, with the same dropout masks each time.
    ``optimizer`` defaults to ``module.optimizers()`` (which must then be a single one).
    Returns the loss at the weights the step started from.
    """
    opt = module.optimizers() if optimizer is None else optimizer
    if isinstance(opt, (list, tuple)):
        raise ValueError(
            "the module has several optimizers: pass the one to step, "
            "line_search_step(self, loss_fn, optimizer=self.optimizers()[i])"
        )
    if not isinstance(opt, DRIVEN):  # LightningOptimizer subclasses the optimizer
        raise TypeError(
            f"line_search_step needs an alsals line-search optimizer, got {type(opt).__name__}"
        )

    def closure() -> Tensor:
        loss = loss_fn()
        if torch.is_grad_enabled():  # the first evaluation; trials run under no_grad
            module.manual_backward(loss)
        return loss.detach()

    # Lightning wraps the closure in a functools.partial, which hides its signature: say
    # that it runs backward itself (the keyword passes through LightningOptimizer.step).
    return opt.step(closure=closure, closure_runs_backward=True)


class LineSearchCallback(pl.Callback):
    """Checks a Lightning set-up for alsals optimizers and logs what each step did.

    At ``fit`` start it raises, with the fix in the message, when a line-search optimizer
    meets automatic optimization or ``precision="16-mixed"`` (Lightning's GradScaler path
    steps the optimizer without a closure). After each training batch it logs
    ``line_search/trials``, ``line_search/forwards`` and ``line_search/step_size`` (the step
    size the update took: below the searched one, which ``LearningRateMonitor`` shows, where
    ``loss_floor``'s cap acted) of the last step (``log=False`` to skip that).
    """

    def __init__(self, log: bool = True) -> None:
        super().__init__()
        self._log = log

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = _line_search_optimizers(trainer)
        if not optimizers:
            return
        name = type(optimizers[0]).__name__
        if pl_module.automatic_optimization:
            raise RuntimeError(
                f"{name} is a line search: it evaluates the loss several times per step, and "
                "under Lightning's automatic optimization training_step would run (and log) "
                "once per evaluation and accumulate_grad_batches would lose gradients. Set "
                "`self.automatic_optimization = False` in the LightningModule and call "
                "`alsals.integrations.lightning.line_search_step(self, loss_fn)` in "
                "training_step (docs/integrations.md, Lightning)."
            )
        if str(trainer.precision) == "16-mixed":
            raise RuntimeError(
                f"precision={trainer.precision!r}: Lightning's fp16 path calls "
                "scaler.step(optimizer) without a closure, which a line search cannot take. "
                "Use precision='bf16-mixed' (no scaler needed), or precision='32-true' with "
                "your own torch.autocast and alsals.integrations.amp.step_with_scaler in "
                "plain PyTorch."
            )
        if str(trainer.precision) in HALF_PRECISION_WEIGHTS:
            warnings.warn(
                f"precision={trainer.precision!r} computes the loss in half precision (8 or "
                "11 significant bits), whose rounding hides the small decreases the Armijo "
                "test looks for. Use precision='bf16-mixed' (float32 weights, a float32 loss) "
                "unless the model does not fit otherwise.",
                UserWarning,
                stacklevel=2,
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._log:
            return
        optimizers = _line_search_optimizers(trainer)
        for i, opt in enumerate(optimizers):
            info = opt.last_step
            if info is None:
                continue
            suffix = "" if len(optimizers) == 1 else f"_{i}"
            pl_module.log_dict(
                {
                    f"line_search/trials{suffix}": float(info.trials),
                    f"line_search/forwards{suffix}": float(info.forwards),
                    f"line_search/step_size{suffix}": float(info.step_size),
                },
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
