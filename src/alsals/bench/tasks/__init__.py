"""The benchmark tasks by name."""

from __future__ import annotations

from alsals.bench.tasks.base import Budget, Task, TaskRun
from alsals.bench.tasks.digits import DigitsCNN

TASKS: dict[str, Task] = {task.name: task for task in (DigitsCNN(),)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Budget", "Task", "TaskRun", "get_task"]
