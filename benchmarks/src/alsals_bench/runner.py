"""Run (task, optimizer, seed, budget) and append what happens to a JSON-lines log.

Each run writes ``<out>/<budget>/<task>/<optimizer>__seed<k>.jsonl``: a ``start`` record
(the configuration), one ``step`` record per training step (loss, step size, cumulative
training wall time, cumulative forward and backward passes), an ``eval`` record every
``eval_every`` steps and at the end (the task's metrics), and an ``end`` record (summary).
A log without an ``end`` record is a partial run: a sweep started again discards and
repeats it, and skips every finished one, so a sweep killed at any point loses only the run
in progress. While a run trains, a lock file ``<log>.lock`` beside its log keeps a second
process (another ``run`` on the same folder) from writing the same log; a run whose lock
another process holds is skipped. The lock is the operating system's (``flock``) on that file,
so it ends with its process however the process ends: a lock file that a killed run left
behind is taken over by the next run (where ``fcntl`` is missing, on Windows, the file's
existence alone is the lock, and such a file must be deleted by hand).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

try:
    import fcntl
except ImportError:  # (Windows: the lock file's existence is the lock)
    fcntl = None

import alsals
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


class LogError(ValueError):
    """A file that cannot be read as a log: it is not UTF-8 text. (A kill cannot leave
    that: the records are ASCII JSON.)"""


class RunLocked(RuntimeError):
    """Another process holds the run's lock file: it is writing the same log."""

    def __init__(self, lock: Path) -> None:
        where = (
            f"its lock file {lock} exists (another process is writing its log); delete the "
            "lock file if no other process is running"
            if fcntl is None
            else f"another process (pid {_holder(lock)}) holds its lock file {lock}: it is "
            "writing its log"
        )
        super().__init__(where)
        self.lock = lock


def _holder(lock: Path) -> str:
    """The process id the lock file names, for the message (``?`` if it names none yet)."""
    try:
        return lock.read_text().strip() or "?"
    except OSError:
        return "?"


def read_log(path: Path) -> list[Any]:
    """All complete records of a log, up to the first line that is no JSON: a torn last
    line from a kill, or the NUL bytes a crash can leave, ends the log there. A ``LogError``
    for a complete line that is not UTF-8 text. The records are what the lines hold; the
    runner's are JSON objects (``report.load_runs`` checks)."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if not raw.endswith(b"\n"):
                    break  # a torn last line, whatever it holds
                raise LogError(f"line {number} is not UTF-8 text") from None
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def is_finished(path: Path) -> bool:
    """Whether ``path`` is a log whose last record is an ``end`` record; a file that cannot
    be read as a log is not (a sweep runs it again)."""
    if not path.exists():
        return False
    try:
        records = read_log(path)
    except LogError:
        return False
    return bool(records) and isinstance(records[-1], dict) and records[-1].get("type") == "end"


def lock_path(path: Path) -> Path:
    """The lock file of the log ``path``: a process holds it while it writes the log."""
    return path.with_name(path.name + ".lock")


def is_locked(lock: Path) -> bool:
    """Whether a live process holds the lock file ``lock`` (without ``fcntl``: whether it
    exists)."""
    if fcntl is None:
        return lock.exists()
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing releases the shared lock, where it was taken)
    return False


def _take_lock(lock: Path) -> int:
    """The open lock file ``lock``, locked for this process until it is closed; a
    ``RunLocked`` where another process holds it."""
    if fcntl is None:
        try:
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise RunLocked(lock) from None
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_WRONLY)
        try:
            _flock_exclusive(fd, lock)
            try:  # (a file its holder removed as we opened it is no lock: open it again)
                taken = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                taken = False
            if taken:
                os.ftruncate(fd, 0)  # (a killed run's pid)
                os.write(fd, f"{os.getpid()}\n".encode())  # (who holds it, for a user)
                return fd
        except BaseException:  # (no descriptor, and so no lock, outlives a failure here)
            os.close(fd)
            raise
        os.close(fd)


#: How often, and how far apart, a lock held by another process is tried again before the
#: run is left to it: another sweep's look (``is_locked``) holds it for a moment only
LOCK_TRIES, LOCK_RETRY_SECONDS = 5, 0.02


def _flock_exclusive(fd: int, lock: Path) -> None:
    """Lock the open ``lock`` for this process; a ``RunLocked`` where another holds it."""
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt + 1 < LOCK_TRIES:
                time.sleep(LOCK_RETRY_SECONDS)
    raise RunLocked(lock)


def other_settings(path: Path, budget: Any) -> dict[str, tuple[Any, Any]]:
    """The sizes a finished log was run with that ``budget`` no longer uses, as
    ``{name: (logged, now)}`` (steps, batch size); empty where they agree, or where the log
    does not record them."""
    records = read_log(path)
    start = records[0] if records and isinstance(records[0], dict) else {}
    now = {"steps": budget.steps, "batch_size": budget.batch_size}
    return {k: (start[k], v) for k, v in now.items() if k in start and start[k] != v}


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
    """Train one run to completion (or divergence) and return its log path; a
    ``RunLocked`` where another process holds the run's lock file."""
    path = key.path(out)
    if is_finished(path):
        return path
    lock = lock_path(path)
    if is_locked(lock):  # (before the data is loaded; taking the lock below decides)
        raise RunLocked(lock)
    # Everything that can fail on a wrong name, a missing budget or missing data is resolved
    # before the log is opened: a run that cannot start leaves no (empty) log behind.
    prepared = _prepare(key, torch.device(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _take_lock(lock)
    try:
        if is_finished(path):  # finished by another process since the first look
            return path
        with open(path, "w") as log:  # a previous partial log of this run is discarded
            _train(key, prepared, log, progress, landscape_every)
    finally:
        lock.unlink(missing_ok=True)  # (before the lock ends: no other run takes this file)
        os.close(fd)
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
            "alsals": alsals.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            **stepper.start_info,
        },
    )
    if landscape_every and not _scannable(stepper):  # (else no record, and no word of why)
        print(
            f"[{key.task} | {key.optimizer} | seed {key.seed}] --landscape-every: no landscape "
            "records: it has no search direction to scan (MomentumALSALS, AdamSLS and SLS have)",
            file=sys.stderr,
            flush=True,
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


def _scannable(stepper: Any) -> bool:
    """Whether the run's optimizer has a search direction to scan (a line search along one:
    ``ALSALS``, which searches Schedule-Free's step size, and Adam have none)."""
    from alsals import LineSearchOptimizer

    return isinstance(stepper.optimizer, LineSearchOptimizer)


def _record_landscape(log: IO[str], stepper: Any, closure: Any, step: int) -> None:
    """A ``landscape`` record: the loss along the search direction before this step (the
    paper's Figs. 2-4); only line-search optimizers have one. Not counted in train time."""
    from alsals.diagnostics import scan_direction

    if _scannable(stepper):
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
    """Every (task, optimizer, seed): finished runs are skipped, partial ones repeated, and
    runs another process holds (their lock file exists) skipped with a line that says so. A
    finished run of other sizes than the budget's now is kept, with a line naming them;
    without ``progress``, one line counts the skipped runs."""
    from alsals_bench.registry import expand

    paths, skipped = [], 0
    for task_name in tasks:
        task = get_task(task_name)
        names = expand(optimizers, task)
        for seed in seeds:
            for name in names:
                key = RunKey(task_name, name, seed, budget)
                label = f"[{task_name} | {name} | seed {seed} | {budget}]"
                path = key.path(out)
                if is_finished(path):
                    skipped += 1
                    _say_skipped(label, path, task.budget(budget), progress)
                    paths.append(path)
                    continue
                if progress:
                    print(f"{label} running", flush=True)
                try:
                    paths.append(run_one(key, out, device, progress, landscape_every))
                except RunLocked as err:
                    print(f"{label} skipped: {err}", flush=True)
    if skipped and not progress:
        print(f"{skipped} finished run(s) skipped (their logs are kept)", flush=True)
    return paths


def _say_skipped(label: str, path: Path, budget: Any, progress: bool) -> None:
    """The line for a finished run the sweep skips: "done, skipped" with ``progress``; and,
    always, where it ran with other sizes than the budget's now, which, and how to rerun."""
    differs = other_settings(path, budget)
    if differs:
        sizes = ", ".join(f"{k} {logged} (now {now})" for k, (logged, now) in differs.items())
        print(
            f"{label} done, kept, but it ran with other settings: {sizes}; "
            f"delete {path} to rerun it",
            flush=True,
        )
    elif progress:
        print(f"{label} done, skipped", flush=True)


def default_out() -> Path:
    return Path(os.environ.get("ALSALS_RUNS_DIR", "runs"))
