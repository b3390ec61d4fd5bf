"""Run (task, optimizer, seed, budget) and append what happens to a JSON-lines log.

Each run writes ``<out>/<budget>/<task>/<optimizer>__seed<k>.jsonl``: a ``start`` record
(the configuration), one ``step`` record per training step (loss, step size, cumulative
training wall time, cumulative forward and backward passes), an ``eval`` record every
``eval_every`` steps and at the end (the task's metrics), and an ``end`` record (summary).
A log without an ``end`` record is a partial run: a sweep started again discards and
repeats it, and skips every finished one, so a sweep killed at any point loses only the run
in progress.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from alsals_bench.registry import get_optimizer
from alsals_bench.tasks import get_task

DIVERGED_AFTER = 20  # consecutive non-finite training losses end a run as "diverged"
SMOOTHING = 0.98  # EMA of the training loss for the "final loss" of Table II


def loss_ema(values: Iterable[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected EMA of the finite training losses after each step (NaN before the
    first): ``beta m + (1 - beta) loss`` from ``m = 0``, divided by ``1 - beta^n`` over the
    ``n`` finite losses so far, as Adam corrects its moments; kept in the equivalent form
    ``m += (loss - m) (1 - beta) / (1 - beta^n)``, exact for a constant loss. Uncorrected
    (started at the first loss), a 40-step run's value kept 0.98^39 = 45% of the first
    step's loss."""
    out, mean, n = [], math.nan, 0
    for value in values:
        if math.isfinite(value):
            n += 1
            weight = (1.0 - beta) / (1.0 - beta**n)
            mean = value if n == 1 else mean + (value - mean) * weight
        out.append(mean)
    return out


@dataclass(frozen=True)
class RunKey:
    task: str
    optimizer: str
    seed: int
    budget: str

    def path(self, out: Path) -> Path:
        return Path(out) / self.budget / self.task / f"{self.optimizer}__seed{self.seed}.jsonl"


def read_log(path: Path) -> list[dict[str, Any]]:
    """All complete records of a log (a torn last line from a kill is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def is_finished(path: Path) -> bool:
    if not path.exists():
        return False
    records = read_log(path)
    return bool(records) and records[-1].get("type") == "end"


def _append(file: IO[str], record: dict[str, Any]) -> None:
    file.write(json.dumps(record, allow_nan=True) + "\n")
    file.flush()


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def run_one(
    key: RunKey,
    out: Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
    landscape_every: int = 0,
) -> Path:
    """Train one run to completion (or divergence) and return its log path."""
    path = key.path(out)
    if is_finished(path):
        return path
    # Everything that can fail on a wrong name, a missing budget or missing data is resolved
    # before the log is opened: a run that cannot start leaves no (empty) log behind.
    prepared = _prepare(key, torch.device(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as log:  # a previous partial log of this run is discarded
        _train(key, prepared, log, progress, landscape_every)
    return path


@dataclass
class _Prepared:
    task: Any
    budget: Any
    spec: Any
    run: Any
    model: torch.nn.Module
    stepper: Any
    device: torch.device


def _prepare(key: RunKey, device: torch.device) -> _Prepared:
    """The run's task, budget, optimizer, seeded model and batches, and stepper."""
    task = get_task(key.task)
    budget = task.budget(key.budget)
    spec = get_optimizer(key.optimizer)
    run = task.setup(key.seed, budget, device)
    model = run.model.to(device)
    model.train()
    stepper = spec.build(model, task, budget)
    stepper.seed(key.seed)
    return _Prepared(task, budget, spec, run, model, stepper, device)


def _train(
    key: RunKey, prepared: _Prepared, log: IO[str], progress: bool, landscape_every: int
) -> None:
    task, budget, spec, run = prepared.task, prepared.budget, prepared.spec, prepared.run
    model, stepper, device = prepared.model, prepared.stepper, prepared.device
    _append(
        log,
        {
            "type": "start",
            "task": key.task,
            "optimizer": key.optimizer,
            "description": spec.description,
            "seed": key.seed,
            "budget": key.budget,
            "steps": budget.steps,
            "batch_size": budget.batch_size,
            "domain": task.domain,
            "metrics": list(task.metrics),
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            **stepper.start_info,
        },
    )
    bar = _progress(budget.steps, f"{key.task} {key.optimizer} s{key.seed}", progress)
    train_time, losses, nonfinite, status, step = 0.0, [], 0, "ok", 0
    evaluations: list[dict[str, float]] = []

    def evaluate() -> None:
        stepper.eval()
        model.eval()
        metrics = run.evaluate(model)
        model.train()
        stepper.train()
        evaluations.append(metrics)
        _append(log, {"type": "eval", "step": step, "time": train_time, **metrics})

    try:
        stepper.train()
        for step in range(1, budget.steps + 1):
            batch = run.next_batch()
            if landscape_every and (step - 1) % landscape_every == 0:
                _record_landscape(log, stepper, lambda batch=batch: run.loss(model, batch), step)
            start = time.perf_counter()
            value = float(stepper.step(lambda batch=batch: run.loss(model, batch)))
            _sync(device)
            train_time += time.perf_counter() - start
            losses.append(value)
            nonfinite = 0 if math.isfinite(value) else nonfinite + 1
            _append(
                log,
                {
                    "type": "step",
                    "step": step,
                    "loss": value,
                    "lr": stepper.lr,
                    "time": train_time,
                    "forwards": stepper.forwards,
                    "backwards": stepper.backwards,
                    **stepper.details(),
                },
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}", lr=f"{stepper.lr:.2e}", refresh=False)
            if nonfinite >= DIVERGED_AFTER:
                status = "diverged"
                break
            if step % budget.eval_every == 0 or step == budget.steps:
                evaluate()
    finally:
        if bar is not None:
            bar.close()
    if status == "ok" and _broken_at_end(evaluations):
        status = "diverged"  # blew up in its last steps, too few for DIVERGED_AFTER
    last = loss_ema(losses)[-1] if losses else math.nan
    smoothed = last if math.isfinite(last) else None

    _append(
        log,
        {
            "type": "end",
            "status": status,
            "steps_done": step,
            "train_time": train_time,
            "time_per_step": train_time / max(1, step),
            "forwards_per_step": stepper.forwards / max(1, step),
            "backwards_per_step": stepper.backwards / max(1, step),
            **_summary(task.metrics, evaluations, smoothed, status),
        },
    )


def _record_landscape(log: IO[str], stepper: Any, closure: Any, step: int) -> None:
    """A ``landscape`` record: the loss along the search direction before this step (the
    paper's Figs. 2-4); only line-search optimizers have one. Not counted in train time."""
    from alsals import LineSearchOptimizer
    from alsals.diagnostics import scan_direction

    if isinstance(stepper.optimizer, LineSearchOptimizer):
        scan = scan_direction(stepper.optimizer, closure)
        _append(log, {"type": "landscape", **scan.to_dict(), "step": step})


def _broken_at_end(evaluations: list[dict[str, float]]) -> bool:
    """Whether the run's last evaluation found a non-finite metric (its validation loss):
    the model it ends with is broken, whatever its smoothed training loss says."""
    last = evaluations[-1] if evaluations else {}
    return any(isinstance(v, float) and not math.isfinite(v) for v in last.values())


def _summary(
    metrics: Iterable[str],
    evaluations: list[dict[str, float]],
    smoothed_loss: float | None,
    status: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {"final_train_loss": smoothed_loss if status == "ok" else None}
    for name in metrics:
        values = [e[name] for e in evaluations if name in e and math.isfinite(e[name])]
        out[f"final_{name}"] = evaluations[-1].get(name) if evaluations else None
        if name == "accuracy":
            out["peak_accuracy"] = max(values) if values else None
        else:
            out[f"best_{name}"] = min(values) if values else None
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep(
    tasks: list[str],
    optimizers: list[str],
    seeds: list[int],
    budget: str,
    out: Path,
    device: str = "cpu",
    progress: bool = True,
    landscape_every: int = 0,
) -> list[Path]:
    """Every (task, optimizer, seed): finished runs are skipped, partial ones repeated."""
    from alsals_bench.registry import expand

    paths = []
    for task_name in tasks:
        task = get_task(task_name)
        names = expand(optimizers, task)
        for seed in seeds:
            for name in names:
                key = RunKey(task_name, name, seed, budget)
                finished = is_finished(key.path(out))
                if progress:
                    state = "done, skipped" if finished else "running"
                    print(f"[{task_name} | {name} | seed {seed} | {budget}] {state}", flush=True)
                paths.append(run_one(key, out, device, progress, landscape_every))
    return paths


def default_out() -> Path:
    return Path(os.environ.get("ALSALS_RUNS_DIR", "runs"))
