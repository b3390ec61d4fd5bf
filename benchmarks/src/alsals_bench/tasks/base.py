"""What a benchmark task is: data, model, training budget and metrics, built from a seed.

A run of the benchmark is (task, optimizer, seed, budget). The task owns everything except
the optimizer: it builds the model and a deterministic stream of training batches from the
seed, defines the training loss (what the optimizer's closure returns), and evaluates the
model on held-out data. The runner only loops.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Budget:
    """How long a run trains and how often it is evaluated.

    ``warmup_steps`` is the fixed linear warm-up every optimizer gets on this task (the
    paper's GPT-2 runs warm up for 2000 steps, Sec. IV-A); ``options`` holds task-specific
    sizes (sequence length, model width) so that a budget fully determines the run.
    """

    steps: int
    batch_size: int
    eval_every: int
    warmup_steps: int = 0
    options: dict[str, Any] = field(default_factory=dict)


#: the ``long`` budget of every offline task is its ``quick`` budget run this many times as long
LONG_FACTOR = 5


def long_budget(quick: Budget, factor: int = LONG_FACTOR) -> Budget:
    """``quick`` run ``factor`` times as long: the steps, the shared warm-up and the interval
    between evaluations scaled by ``factor``, so that every schedule that follows the step
    count (Adam's warm-up and cosine decay, Schedule-Free's 5% warm-up) keeps its shape and a
    run is evaluated as many times; batch size, model and data sizes unchanged."""
    return dataclasses.replace(
        quick,
        steps=factor * quick.steps,
        eval_every=factor * quick.eval_every,
        warmup_steps=factor * quick.warmup_steps,
        options=dict(quick.options),
    )


@dataclass
class TaskRun:
    """One seeded instance of a task, ready to train."""

    model: nn.Module
    next_batch: Callable[[], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]


class Task(abc.ABC):
    """A benchmark task. Subclasses set the class attributes and implement ``setup``.

    ``domain`` selects the paper's Adam baseline (Sec. IV-A): ``"image"`` gets a flat
    learning rate, ``"nlp"`` (and ``"tabular"``) cosine decay with 10% linear warm-up;
    ``adam_lr`` is the paper's peak learning rate for the task's family and ``adam_grid``
    the learning rates that ``adam-tuned`` tries. ``metrics`` lists what ``evaluate`` returns; ``"accuracy"`` feeds
    Table I (peak accuracy), and every task reports its final training loss (Table II).
    ``requires`` names the data sources (``alsals-bench fetch --only NAME``) it reads.
    ``suite`` is ``"paper"`` for the paper's experiments and their stand-ins, ``"check"``
    for the tasks that check a method on problems it was not chosen on (``checks.py``).
    """

    name: str
    description: str
    domain: Literal["nlp", "image", "tabular"]
    adam_lr: float
    adam_grid: tuple[float, ...]
    metrics: tuple[str, ...]
    budgets: dict[str, Budget]
    requires: tuple[str, ...] = ()
    offline: bool = True
    suite: Literal["paper", "check"] = "paper"

    def budget(self, preset: str) -> Budget:
        if preset not in self.budgets:
            raise ValueError(
                f"task {self.name!r} has no budget {preset!r} (has: {', '.join(self.budgets)})"
            )
        return self.budgets[preset]

    def check_data(self, budget: Budget) -> None:
        """Raise ``FileNotFoundError`` (its message says how to get the data) if the data
        that a run of ``budget`` reads is missing; cheap, for checking a sweep before its
        first run. The default checks the fetched sources in ``requires``."""
        from alsals_bench.data._store import source_dir

        for name in self.requires:
            source_dir(name)

    @abc.abstractmethod
    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        """Build the model (under ``torch.manual_seed(seed)``) and the batch stream."""


def batch_stream(n: int, batch_size: int, seed: int) -> Callable[[], Tensor]:
    """Indices of shuffled mini-batches, epoch after epoch, from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[Tensor] = []

    def next_indices() -> Tensor:
        if not pending:
            order = torch.randperm(n, generator=generator)
            pending.extend(reversed(order.split(batch_size)[: max(1, n // batch_size)]))
        return pending.pop()

    return next_indices


@torch.no_grad()
def classification_metrics(
    model: nn.Module, inputs: Any, labels: Tensor, batch_size: int, forward: Callable
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``forward(model, inputs[idx])`` over a held-out set."""
    correct, total_loss = 0, 0.0
    n = len(labels)
    for start in range(0, n, batch_size):
        logits = forward(model, inputs, slice(start, start + batch_size)).float()
        target = labels[start : start + batch_size].to(logits.device)
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == target).sum().item()
    return {"accuracy": correct / n, "val_loss": total_loss / n}
