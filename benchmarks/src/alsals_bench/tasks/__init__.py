"""Benchmark tasks: ``TASKS`` maps each name users type to a ``Task`` instance.

Offline tasks (``OFFLINE_TASKS``: the paper's six, on fetched stand-in data) run here; the
full-scale ones (the paper's own experiments) need a GPU and the user's copies of the
datasets; the check tasks (``CHECK_TASKS``) test a method on problems it was not chosen on.
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
from alsals_bench.tasks.checks import CHECK_SUITE
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
        *CHECK_SUITE,
    )
}
OFFLINE_TASKS: tuple[str, ...] = tuple(
    name for name, task in TASKS.items() if task.offline and task.suite == "paper"
)
FULLSCALE_NAMES: tuple[str, ...] = tuple(name for name, task in TASKS.items() if not task.offline)
CHECK_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.suite == "check")


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises ``KeyError`` listing the known ones
    (with the tasks registered beside the suites', such as the held-out script's)."""
    try:
        return TASKS[name]
    except KeyError:
        others = [t for t in TASKS if t not in {*OFFLINE_TASKS, *FULLSCALE_NAMES, *CHECK_TASKS}]
        raise KeyError(
            f"unknown task {name!r}; offline tasks: {', '.join(OFFLINE_TASKS)}; "
            f"full-scale tasks: {', '.join(FULLSCALE_NAMES)}; check tasks: {', '.join(CHECK_TASKS)}"
            + (f"; other tasks: {', '.join(others)}" if others else "")
        ) from None


__all__ = [
    "CHECK_TASKS",
    "FULLSCALE_NAMES",
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
