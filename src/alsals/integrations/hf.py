"""Hugging Face ``transformers``: a ``Trainer`` whose optimizer step runs the line search.

``Trainer`` computes the gradients micro-batch by micro-batch in ``training_step`` (under
``no_sync`` for all but the last micro-batch of a gradient-accumulation window), clips
them, and then calls ``optimizer.step()`` without a closure. ``LineSearchTrainer`` keeps
that loop as it is and adds what the line search needs:

* ``training_step`` records each micro-batch of the window (its inputs and the torch random
  state before its forward pass) and runs the usual forward and backward.
* ``optimizer.step()`` gets a closure built from the window. Its gradient evaluation
  (``closure(backward=True)``) returns the window's loss: the gradients are already there,
  accumulated (and clipped) by the Trainer. Each trial (``backward=False``) re-evaluates
  every micro-batch of the window under ``torch.no_grad()`` with the random state that
  micro-batch saw, so it sees the same dropout masks, and scales it exactly as
  ``training_step`` does. So the line search tests the same objective whose gradient it
  steps along, whatever ``gradient_accumulation_steps`` is.
* The learning-rate scheduler is replaced by :class:`FollowStepSize`, which leaves
  ``param_groups[i]["lr"]`` to the line search and reports it: the ``learning_rate`` the
  Trainer logs is the searched step size (an update that ``loss_floor``'s cap cut took
  less). ``learning_rate``, ``lr_scheduler_type`` and the
  ``warmup_*`` arguments of ``TrainingArguments`` do not apply (use the optimizer's
  ``lr`` and ``warmup_steps``).
* ``TrainingArguments.max_grad_norm`` becomes the optimizer's ``max_grad_norm`` (unless it
  has its own) and the Trainer's clipping is turned off: the Trainer would clip ``.grad``
  before the step, which scales the Armijo test's slope with it; the optimizer clips the
  update's gradient and tests with the true slope.
* Checkpoints hold the optimizer's ``state_dict`` (the whole line-search state) and the
  Trainer's random states, so ``train(resume_from_checkpoint=...)`` continues exactly.

Usage::

    from alsals import MomentumALSALS
    from alsals.integrations.hf import LineSearchTrainer

    trainer = LineSearchTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=2),
        train_dataset=train, optimizer_cls_and_kwargs=(MomentumALSALS, {"warmup_steps": 100}),
    )
    trainer.train()

Without ``optimizer_cls_and_kwargs`` the optimizer is ``ALSALS()`` with its defaults
(``training_step`` calls its ``train()`` before the forward pass, so that the Trainer's
backward sees ``y``, where ``ALSALS`` takes its gradient; the step brings the weights back
to the average ``x``, which evaluation and checkpoints see);
``optimizers=(ALSALS(model.parameters()), None)`` works too. ``LineSearchTrainerMixin``
adds the same behaviour to another ``Trainer`` subclass (put it first in the bases).
``bf16=True`` works as is. ``fp16=True`` goes through accelerate's GradScaler: the
gradients are unscaled before clipping and the step, a step whose gradients overflowed is
skipped by the scaler (the line search never runs) and the scale backs off. Not supported:
DeepSpeed (its engine owns the optimizer step), sequence/context parallelism and SageMaker
model parallelism.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alsals.closure import RandomState
from alsals.integrations import DRIVEN, _raise_import_error
from alsals.line_search import LineSearchOptimizer
from alsals.schedule_free import ALSALS
from alsals.state_placeholders import is_state_initialisation

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:
    _raise_import_error(error, "transformers", "hf")

__all__ = ["FollowStepSize", "LineSearchTrainer", "LineSearchTrainerMixin"]


def _schedule_arguments_set(args: Any) -> list[str]:
    """The ``TrainingArguments`` of the learning-rate schedule that are set to other than
    their defaults, which the line search replaces (each would silently do nothing)."""
    fields = getattr(type(args), "__dataclass_fields__", {})
    names = []
    for name in (
        "learning_rate",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "warmup_ratio",
    ):
        field = fields.get(name)
        if field is None or not hasattr(args, name):
            continue
        value, default = getattr(args, name), field.default
        if name == "lr_scheduler_type":  # (an enum once parsed, a string as declared)
            value, default = getattr(value, "value", value), getattr(default, "value", default)
        if name.startswith("warmup") or name.endswith("kwargs"):
            changed = bool(value)  # (any value set at all)
        else:
            changed = value != default
        if changed:
            names.append(name)
    return names


class FollowStepSize(torch.optim.lr_scheduler.LRScheduler):
    """A learning-rate "scheduler" that leaves the lr to the line search and reports it.

    ``get_last_lr()`` returns the current ``param_groups[i]["lr"]``: the step size the line
    search is using, which the Trainer logs as ``learning_rate``.
    """

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        return [group["lr"] for group in self.optimizer.param_groups]


@dataclass
class _MicroBatch:
    model: nn.Module
    inputs: dict[str, Any]
    num_items_in_batch: Tensor | int | None
    accumulation_steps: int
    random_state: RandomState
    loss: Tensor


def _step_with_trainer_closure(
    trainer_ref: weakref.ref, optimizer: LineSearchOptimizer | ALSALS
) -> Callable[..., Tensor]:
    """An instance-level ``step`` that supplies the Trainer's closure when none is given.

    It keeps the contract of torch's learning-rate schedulers, which wrap ``step`` when they
    are built: it carries their mark and records the call, so that a scheduler built before
    it (one the user passed; the trainer warns about it) does not add torch's warning that
    ``step`` was overridden, and ``FollowStepSize``, built after it, does not wrap it again."""
    optimizer_ref = weakref.ref(optimizer)

    def step(closure: Callable[..., Tensor] | None = None) -> Tensor:
        driven = optimizer_ref()
        if closure is None and is_state_initialisation(
            driven.state,  # type: ignore[union-attr]
            driven.param_groups,  # type: ignore[union-attr]
            None,
        ):  # (torch.distributed.checkpoint creating the state: no trainer's batch)
            return type(driven).step(driven, None)
        if closure is None:
            trainer = trainer_ref()
            if trainer is None:
                raise RuntimeError("the LineSearchTrainer that drove this optimizer is gone")
            closure = trainer._line_search_closure()
        driven._opt_called = True  # type: ignore[union-attr]  # (what the schedulers look for)
        return type(driven).step(driven, closure)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return step


class _BackToTheAverage(TrainerCallback):
    """After every optimizer step, ``ALSALS``'s weights back at the average ``x``: the step
    brings them back itself, but a step the GradScaler skips (fp16 overflow) never runs, and
    the weights would stay at ``y``, where ``training_step``'s ``train()`` put them, for the
    checkpoints and the end of the run to see."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        held = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's
        if isinstance(held, ALSALS):
            held.eval()  # (nothing to do where the step ran)


class LineSearchTrainerMixin:
    """Makes a ``transformers.Trainer`` (subclass) drive an alsals line-search optimizer.

    See the module docstring. Put it before ``Trainer`` in the bases:
    ``class MyTrainer(LineSearchTrainerMixin, Trainer)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._line_search_window: list[_MicroBatch] = []
        self._line_search_window_closed = False
        self.add_callback(_BackToTheAverage())  # type: ignore[attr-defined]
        args_ = self.args
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "LineSearchTrainer does not support DeepSpeed: DeepSpeed's engine runs the "
                "optimizer step itself, without the closure a line search needs"
            )
        ignored = _schedule_arguments_set(args_)
        if ignored:
            warnings.warn(
                f"LineSearchTrainer ignores TrainingArguments.{', '.join(ignored)}: the line "
                "search sets the step size (the first search starts from the optimizer's lr "
                "and looks upwards or down from it). Pass lr=... and warmup_steps=... to the "
                "optimizer (optimizer_cls_and_kwargs) instead.",
                UserWarning,
                stacklevel=2,
            )
        # The Trainer's clipping would scale .grad before the step, and with it the slope of
        # the Armijo test: the optimizer clips instead (the update's gradient only)
        clip = getattr(args_, "max_grad_norm", None)
        self._line_search_clip = clip if clip is not None and clip > 0 else None
        if self._line_search_clip is not None:  # (a copy: the caller's args stay as given)
            self.args = args_ = copy.copy(args_)
            args_.max_grad_norm = 0.0
        if self.optimizer is not None:
            self._check_optimizer(self.optimizer)
            self._take_clip(self.optimizer)
        if self.lr_scheduler is not None and not isinstance(self.lr_scheduler, FollowStepSize):
            warnings.warn(
                f"LineSearchTrainer got a {type(self.lr_scheduler).__name__}: every lr it "
                "writes replaces the step size the line search would start its next search "
                "from. Pass optimizers=(optimizer, None) to let the line search alone set it.",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ optimizer set-up

    @staticmethod
    def _check_optimizer(optimizer: Any) -> None:
        if not isinstance(optimizer, DRIVEN):
            # (a class from optimizer_cls_and_kwargs, or an instance)
            name = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
            raise TypeError(
                "LineSearchTrainer drives an alsals line-search optimizer (ALSALS, "
                f"MomentumALSALS, AdamSLS, SLS), got {name}; use transformers.Trainer for others"
            )

    def _take_clip(self, optimizer: Any) -> None:
        """``TrainingArguments.max_grad_norm`` becomes the optimizer's, where it has none of
        its own (the Trainer's clipping is off, see ``__init__``)."""
        clip = self._line_search_clip
        if clip is not None and optimizer.param_groups[0].get("max_grad_norm") is None:
            for group in optimizer.param_groups:
                group["max_grad_norm"] = clip
            optimizer.defaults["max_grad_norm"] = clip

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The line-search optimizer, with weight decay grouped as the Trainer groups it."""
        wrapped = getattr(self.optimizer, "optimizer", None)
        if not isinstance(self.optimizer, DRIVEN) and isinstance(wrapped, DRIVEN):
            # a second train(): the Trainer holds accelerate's wrapper from the first, and
            # prepare() will wrap what this returns again
            self.optimizer = wrapped
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if self.optimizer_cls_and_kwargs is not None:
                cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                cls, kwargs = ALSALS, {}
            if isinstance(cls, type) and not issubclass(cls, DRIVEN):
                self._check_optimizer(cls)  # (a factory, ALSALS.paper, is judged by its result)
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {
                    "params": [p for n, p in named if n in decay],
                    "weight_decay": self.args.weight_decay,
                },
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            kwargs = dict(kwargs)
            # Trials must not move running statistics (BatchNorm and the like). All buffers,
            # integer ones included: BatchNorm's num_batches_tracked counts batches.
            kwargs.setdefault("buffers", list(opt_model.buffers()))
            if self._line_search_clip is not None:
                kwargs.setdefault("max_grad_norm", self._line_search_clip)
            try:
                self.optimizer = cls(groups, **kwargs)
            except TypeError as error:
                if isinstance(cls, type):
                    raise
                name = getattr(cls, "__name__", type(cls).__name__)
                raise TypeError(
                    f"LineSearchTrainer built the optimizer as {name}(param_groups, "
                    f"{', '.join(f'{k}=...' for k in kwargs)}) and got: {error}. A factory in "
                    "optimizer_cls_and_kwargs must build an alsals line-search optimizer "
                    "(ALSALS, MomentumALSALS, AdamSLS, SLS; ALSALS.paper, say); use "
                    "transformers.Trainer for others"
                ) from error
        self._check_optimizer(self.optimizer)
        self._take_clip(self.optimizer)
        # The Trainer (through accelerate) calls optimizer.step() without a closure.
        self.optimizer.step = _step_with_trainer_closure(  # type: ignore[method-assign]
            weakref.ref(self), self.optimizer
        )
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """:class:`FollowStepSize`: the line search, not a schedule, sets the lr."""
        if self.lr_scheduler is None:
            self.lr_scheduler = FollowStepSize(self.optimizer if optimizer is None else optimizer)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # --------------------------------------------------------------------- training step

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The Trainer's forward and backward, recording the micro-batch for the trials."""
        if self._line_search_window_closed:
            self._line_search_window.clear()
            self._line_search_window_closed = False
        inputs = self._prepare_inputs(inputs)  # on the device once, reused by every trial
        held = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's
        if isinstance(held, ALSALS):
            held.train()  # the backward below must see y, where ALSALS takes its gradient
        random_state = RandomState()
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        self._line_search_window.append(
            _MicroBatch(
                model=model,
                inputs=inputs,
                num_items_in_batch=num_items_in_batch,
                accumulation_steps=self.current_gradient_accumulation_steps,
                random_state=random_state,
                loss=loss.detach(),
            )
        )
        if self.accelerator.sync_gradients:  # the last micro-batch before optimizer.step()
            self._line_search_window_closed = True
        return loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Tensor | int | None) -> bool:
        """``training_step``'s rule: is the loss already normalised over the whole window?"""
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def _trial_loss(self, micro: _MicroBatch) -> Tensor:
        """The loss ``training_step`` backpropagates for ``micro``, without autograd."""
        model = micro.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # no gradients to reduce: skip DDP's hooks and buffer sync
        with self.compute_loss_context_manager():
            loss = self.compute_loss(
                model, dict(micro.inputs), num_items_in_batch=micro.num_items_in_batch
            )
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if not self._loss_is_scaled_for_ga(micro.num_items_in_batch):
            loss = loss / micro.accumulation_steps
        return loss.detach()

    def _line_search_closure(self) -> Callable[[bool], Tensor]:
        """The closure for the step that ends the current gradient-accumulation window."""
        window = list(self._line_search_window)
        if not window:
            raise RuntimeError(
                "LineSearchTrainer: optimizer.step() was called with no micro-batch since the "
                "last step; the Trainer calls it after training_step"
            )
        self._line_search_window_closed = True
        device = window[0].loss.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # sum as precisely
        window_loss = sum(micro.loss.to(device, dtype) for micro in window)  # as the trials

        def closure(backward: bool) -> Tensor:
            if backward:  # training_step already ran forward and backward on every micro-batch
                return window_loss
            total = torch.zeros((), dtype=dtype, device=device)
            for micro in window:
                micro.random_state.restore()  # the dropout masks of its training forward
                total += self._trial_loss(micro).to(device, dtype)
            return total

        return closure


class LineSearchTrainer(LineSearchTrainerMixin, Trainer):
    """``transformers.Trainer`` driving ALSALS (or another alsals optimizer); see the module."""
