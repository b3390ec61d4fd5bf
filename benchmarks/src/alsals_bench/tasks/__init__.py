"""Benchmark tasks: ``TASKS`` maps each name users type to a ``Task`` instance.

Offline tasks (``task.offline``) run here on fetched stand-in data; the full-scale ones
(the paper's own experiments) need a GPU and the user's copies of the datasets.
"""

from __future__ import annotations

from alsals_bench.tasks.austen_gpt2 import AustenGPT2
from alsals_bench.tasks.base import (
    LONG_FACTOR,
    Budget,
    Task,
    TaskRun,
    batch_stream,
    classification_metrics,
    long_budget,
)
from alsals_bench.tasks.digits import DigitsCNN
from alsals_bench.tasks.fashion_resnet import FashionResNet
from alsals_bench.tasks.fullscale import FULLSCALE_TASKS
from alsals_bench.tasks.minilm import MiniLMBBC, MiniLMFineFood, MiniLMTweets

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        DigitsCNN(),
        FashionResNet(),
        AustenGPT2(),
        MiniLMFineFood(),
        MiniLMBBC(),
        MiniLMTweets(),
        *FULLSCALE_TASKS,
    )
}
OFFLINE_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.offline)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        offline = ", ".join(OFFLINE_TASKS)
        full = ", ".join(n for n in TASKS if n not in OFFLINE_TASKS)
        raise KeyError(
            f"unknown task {name!r}; offline tasks: {offline}; full-scale tasks: {full}"
        ) from None


__all__ = [
    "LONG_FACTOR",
    "OFFLINE_TASKS",
    "TASKS",
    "Budget",
    "Task",
    "TaskRun",
    "batch_stream",
    "classification_metrics",
    "get_task",
    "long_budget",
]
