"""Turn finished run logs into the paper's tables and figures.

* Table I: peak validation accuracy per classification task (mean ± standard error over
  seeds), the best mean per row in bold, and the average over tasks.
* Table II: final training loss (an EMA of the per-step loss, as the paper smooths it) per
  task, and the logarithmic average over tasks (the geometric mean, as in the paper).
* Language modelling: best validation loss and perplexity.
* Best validation loss of the tasks judged by it alone (no accuracy, no perplexity).
* Equal compute: each optimizer's training loss (the EMA of Table II) at the compute Adam
  used, in pass-equivalents (forward + 2 x backward passes, a backward pass costing about
  two forward ones), so that a line search's extra forward passes are paid for.
* Cost: training time per step (and its ratio to Adam's), forward and backward passes per
  step.
* Figures: training loss against steps (Figs. 5-7), against pass-equivalents and against
  wall-clock training time, the validation metric over steps, all with standard-error bands
  over seeds; the step size over steps (Fig. 1) and the pass-equivalents spent per step.

``adam@LR`` runs of one task, and its ``adam`` runs as the grid point at their configured
peak rate, are folded into one ``adam-tuned`` column: the learning rate whose mean primary
metric (peak accuracy, else final training loss) is best, each seed counted once per rate.
The whole grid is listed, and a best rate at the grid's edge is flagged, in the grid's list
and on the ``adam-tuned`` cells of every table. A row's label counts the task's seeds; a
cell whose mean is over another number of seeds says ``(n=k)``.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alsals_bench.runner import SMOOTHING, LogError, RunKey, loss_ema, read_log
from alsals_bench.tasks import get_task

ORDER = ["alsals", "adam-sls", "adam", "adam-tuned", "adamw-cosine", "sls"]
CURVE_SMOOTHING = 0.95
#: the cost of a backward pass in forward passes: it computes the gradients with respect to
#: both the activations and the weights, two products of a forward pass's size
BACKWARD_COST = 2
#: marks on table cells, each explained under the table where it appears
EDGE_MARK = "‡"
SHORT_MARK = "†"
EDGE_NOTE = (
    f"{EDGE_MARK} `adam-tuned`: the best rate is at the edge of the task's grid (see the grid "
    "below); the grid should be widened."
)
UNEVEN_NOTE = (
    "(n=k): the mean of k seeds, not of the row's n (the others are missing, or diverged "
    "where the table leaves diverged runs out): the cell and the row's best compare "
    "different sets of seeds."
)
SHORT_NOTE = (
    f"{SHORT_MARK} used less compute in total than Adam on the task (in at least one seed): "
    "its loss at the end of its run."
)


@dataclass
class Run:
    task: str
    optimizer: str
    seed: int
    start: dict[str, Any]
    end: dict[str, Any]
    steps: dict[str, np.ndarray] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)


def consistent(runs: list[Run], budget: str) -> tuple[list[Run], list[Run]]:
    """Keep, per task, the runs of the size (steps, batch size) ``budget`` defines for it
    now, where the task and budget are known; else the most common size (ties: the
    larger); return (kept, dropped).

    A task's budget may change between code versions, and a run of another budget may be
    copied into the folder; runs of different sizes must not be averaged into one cell.
    """
    by_task: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_task[run.task].append(run)
    kept, dropped = [], []
    for task, task_runs in by_task.items():
        sizes = [(r.start.get("steps"), r.start.get("batch_size")) for r in task_runs]
        common = _defined_size(task, budget)
        if common is None:
            common = max(set(sizes), key=lambda s: (sizes.count(s), s[0] or 0, s[1] or 0))
        for run, size in zip(task_runs, sizes, strict=True):
            (kept if size == common else dropped).append(run)
    return kept, dropped


def _defined_size(task: str, budget: str) -> tuple[int, int] | None:
    """(steps, batch size) of ``budget`` for ``task`` as the code defines them now, or
    ``None`` for an unknown task or budget."""
    try:
        size = get_task(task).budget(budget)
    except (KeyError, ValueError):
        return None
    return size.steps, size.batch_size


def load_runs(out: Path, budget: str) -> list[Run]:
    """Every finished run of ``budget`` under ``out`` (partial runs are not counted). A file
    that cannot be read as a run's log, or whose records are another run's than its name
    says (a copy, a renamed or misfiled log: counted, it was a second run of one seed), is
    skipped with one warning line that names it and says why: one odd file does not cost
    the whole report."""
    runs = []
    for path in sorted((Path(out) / budget).glob("*/*.jsonl")):
        try:
            run = _load_run(path)
            if run is not None:
                _check_name(path, run, Path(out), budget)
        except BadLog as err:
            print(f"alsals-bench: warning: skipped {path}: {err}", file=sys.stderr)
            continue
        except OSError as err:
            reason = err.strerror or type(err).__name__
            print(
                f"alsals-bench: warning: skipped {path}: cannot be read ({reason})", file=sys.stderr
            )
            continue
        if run is not None:
            runs.append(run)
    return runs


class BadLog(ValueError):
    """A file that cannot be read as a run's log; the message says why."""


#: What the report reads from a finished log's start and end records, and of which type.
_NUMBER = (int, float)
START_FIELDS = {"task": str, "optimizer": str, "seed": int}
END_FIELDS = {"time_per_step": _NUMBER, "forwards_per_step": _NUMBER, "backwards_per_step": _NUMBER}


def _load_run(path: Path) -> Run | None:
    """The finished run the log ``path`` holds; None for a partial run (no end record); a
    ``BadLog`` for a file that is no run's log (not UTF-8, a line that is no JSON object,
    an end record without a start record, a record without the fields the report reads)."""
    try:
        records = read_log(path)
    except LogError as err:
        raise BadLog(str(err)) from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise BadLog(f"line {number} is not a JSON object")
    if not records or records[-1].get("type") != "end":
        return None
    start, end = records[0], records[-1]
    if start.get("type") != "start":
        raise BadLog("an end record without a start record")
    _check_fields(start, START_FIELDS, "start")
    _check_fields(end, END_FIELDS, "end")
    step_records = [r for r in records if r.get("type") == "step"]
    try:
        steps = {
            key: np.array([r.get(key, np.nan) for r in step_records], dtype=float)
            for key in ("step", "loss", "lr", "time", "forwards", "backwards")
        }
    except (TypeError, ValueError):
        raise BadLog("a step record holds a value that is not a number") from None
    evals = [r for r in records if r.get("type") == "eval"]
    if not all(_is(e.get("step"), _NUMBER) for e in evals):
        raise BadLog("an eval record has no step number")
    # The metrics the tables and figures average: numbers, or null where there is none.
    summary = {k: v for k, v in end.items() if k.startswith(("final_", "best_", "peak_"))}
    metrics = [{k: v for k, v in e.items() if k != "type"} for e in evals]
    for kind, values in [("its end", summary)] + [("an eval", m) for m in metrics]:
        for name, value in values.items():
            if value is not None and not _is(value, _NUMBER):
                raise BadLog(f"{kind} record's {name!r} is {value!r}")
    if end.get("final_train_loss") is not None:  # (logs before the EMA's correction)
        end = {**end, "final_train_loss": _ema(steps["loss"], SMOOTHING)[-1]}
    return Run(start["task"], start["optimizer"], start["seed"], start, end, steps, evals)


def _check_name(path: Path, run: Run, out: Path, budget: str) -> None:
    """A ``BadLog`` where the log ``path`` is not where the runner writes the run its
    records hold (``RunKey.path``)."""
    expected = RunKey(run.task, run.optimizer, run.seed, budget).path(out)
    if path != expected:
        raise BadLog(
            f"it holds the run {run.task}/{run.optimizer}/seed {run.seed}, whose log is "
            f"{run.task}/{expected.name} (a copy, or a renamed or misfiled log)"
        )


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance``, except that a JSON ``true`` is no number."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_fields(record: dict[str, Any], fields: dict[str, Any], kind: str) -> None:
    """A ``BadLog`` naming the first of ``fields`` that ``record`` (the ``kind`` record)
    lacks, or holds a value of another type in."""
    for name, type_ in fields.items():
        if name not in record:
            raise BadLog(f"its {kind} record has no {name!r}")
        if not _is(record[name], type_):
            raise BadLog(f"its {kind} record's {name!r} is {record[name]!r}")


def pass_equivalents(run: Run) -> np.ndarray:
    """Cumulative compute after each step of ``run``: forward + 2 x backward passes."""
    return run.steps["forwards"] + BACKWARD_COST * run.steps["backwards"]


#: Adam's passes per step: one forward and one backward pass, in pass-equivalents
ADAM_STEP_COST = 1 + BACKWARD_COST


def adam_compute(runs: list[Run]) -> dict[str, float]:
    """Per task, the compute Adam used: the total pass-equivalents of its ``adam`` run over
    its budget (the largest over seeds). A diverged run stopped early and sets no budget;
    where every ``adam`` run of a task diverged, the compute Adam planned: the budget's
    steps at one forward and one backward pass each (``planned_adam_compute``)."""
    totals: dict[str, float] = {}
    for run in runs:
        if run.optimizer != "adam" or run.end.get("status") != "ok":
            continue
        if not len(run.steps.get("forwards", ())):
            continue
        total = float(pass_equivalents(run)[-1])
        if math.isfinite(total):
            totals[run.task] = max(total, totals.get(run.task, -math.inf))
    for task, total in planned_adam_compute(runs).items():
        totals.setdefault(task, total)
    return totals


def planned_adam_compute(runs: list[Run]) -> dict[str, float]:
    """Per task whose ``adam`` runs (with pass counts) all diverged: the compute a full run
    would have used, its budget's steps x (1 forward + 2 x 1 backward)."""
    adam = [r for r in runs if r.optimizer == "adam" and len(r.steps.get("forwards", ()))]
    planned: dict[str, float] = {}
    for task in {r.task for r in adam}:
        mine = [r for r in adam if r.task == task]
        steps = [r.start.get("steps") for r in mine]
        if all(r.end.get("status") != "ok" for r in mine) and all(
            isinstance(n, int) and n > 0 for n in steps
        ):
            planned[task] = float(max(steps) * ADAM_STEP_COST)
    return planned


def loss_at_compute(run: Run, compute: float) -> tuple[float, bool]:
    """(training loss, short): the EMA of Table II at the last step of ``run`` whose
    cumulative pass-equivalents do not exceed ``compute``, and whether the whole run used less
    than ``compute`` (then that step is its last). NaN where even its first step cost more,
    and for a run that diverged (as in Table II)."""
    cost = pass_equivalents(run)
    if run.end.get("status") != "ok" or not len(cost) or not np.all(np.isfinite(cost)):
        return math.nan, False
    within = np.flatnonzero(cost <= compute)
    if not len(within):
        return math.nan, False
    loss = _ema(run.steps["loss"], SMOOTHING)[within[-1]]
    return float(loss), bool(cost[-1] < compute)


def _mean_se(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    if len(finite) == 1:
        return finite[0], math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1) / math.sqrt(len(finite)))


def _primary(runs: list[Run]) -> tuple[str, bool]:
    """(end-record key, higher_is_better) that ranks a group of runs: peak accuracy, else
    final training loss."""
    if any("peak_accuracy" in r.end for r in runs):
        return "peak_accuracy", True
    return "final_train_loss", False


@dataclass
class TunedGrid:
    """One task's ``adam-tuned`` grid: the primary metric per seed at each learning rate."""

    metric: str
    higher_is_better: bool
    values: dict[float, list[float]]
    best: float
    #: runs left out of the grid because another run of the same seed has the same rate
    duplicates: list[str] = field(default_factory=list)

    @property
    def at_edge(self) -> bool:
        """The best rate is the smallest or largest tried: the grid should be widened."""
        return len(self.values) > 1 and self.best in (min(self.values), max(self.values))

    def describe(self, task: str) -> str:
        cells = []
        for lr in sorted(self.values):
            values = self.values[lr]
            finite = [v for v in values if math.isfinite(v)]
            if len(finite) < len(values):
                text = f"{lr:g}: diverged in {len(values) - len(finite)} of {len(values)} seeds"
            else:
                m, se = _mean_se(finite)
                text = f"{lr:g}: {m:.4g}" + (f" ± {se:.2g}" if math.isfinite(se) else "")
            cells.append(f"**{text}**" if lr == self.best else text)
        edge = " (best at the edge of the grid)" if self.at_edge else ""
        label = {"peak_accuracy": "peak accuracy", "final_train_loss": "final training loss"}
        text = f"- {task} ({label[self.metric]}){edge}: " + ", ".join(cells)
        if self.duplicates:
            text += "; the same seed at the same rate counted once, left out: " + "; ".join(
                self.duplicates
            )
        return text


def adam_grid_rate(run: Run) -> float | None:
    """The peak learning rate at which a run joins its task's Adam grid: the rate in an
    ``adam@LR`` name; for ``adam``, the configured peak rate of its start record (logs
    written before the record had it: the largest logged rate, which is lower when a run
    diverged during its warm-up); None for other runs."""
    if run.optimizer.startswith("adam@"):
        return float(run.optimizer.split("@", 1)[1])
    if run.optimizer != "adam":
        return None
    if run.start.get("peak_lr") is not None:
        return float(run.start["peak_lr"])
    if len(run.steps.get("lr", ())):
        return float(f"{np.max(run.steps['lr']):g}")
    return None


def _grid_preference(run: Run, lr: float) -> tuple[int, str]:
    """Which of two runs of one seed at one rate the grid keeps (the smaller): an explicit
    ``adam@LR`` run before ``adam``, the grid's own spelling ``adam@{lr:g}`` (what
    ``adam-tuned`` runs) before any other, then the name."""
    if run.optimizer == "adam":
        return 2, run.optimizer
    return (0 if run.optimizer == f"adam@{lr:g}" else 1), run.optimizer


def fold_tuned_adam(runs: list[Run]) -> tuple[list[Run], dict[str, TunedGrid]]:
    """Replace each task's ``adam@LR`` runs by those of its best LR, renamed ``adam-tuned``.

    ``adam`` is the grid point at its configured peak rate. One seed counts once per rate:
    where several runs share (rate, seed) (``adam@1e-3`` beside ``adam@0.001``, or ``adam``
    beside an explicit run at its rate) the grid keeps one (``_grid_preference``) and
    ``TunedGrid.duplicates`` names the others. The best LR has the best mean primary metric
    (ties: the lower final training loss); a rate where any seed diverged only wins if every
    rate did.
    """
    kept = [run for run in runs if not run.optimizer.startswith("adam@")]
    # Tasks with a grid: at least one ``adam@LR`` run (``adam`` alone makes no grid).
    grid_tasks = {run.task for run in runs if run.optimizer.startswith("adam@")}
    candidates: dict[str, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        lr = adam_grid_rate(run) if run.task in grid_tasks else None
        if lr is not None:
            candidates[run.task][lr].append(run)
    by_task: dict[str, dict[float, list[Run]]] = {}
    duplicates: dict[str, list[str]] = defaultdict(list)
    for task, rates in candidates.items():
        by_task[task] = {}
        for lr, group in rates.items():
            chosen: dict[int, Run] = {}
            for run in sorted(group, key=lambda r: (r.seed, _grid_preference(r, lr))):
                if run.seed not in chosen:
                    chosen[run.seed] = run
                else:
                    duplicates[task].append(
                        f"{run.optimizer} seed {run.seed} (rate {lr:g}: "
                        f"{chosen[run.seed].optimizer} kept)"
                    )
            by_task[task][lr] = list(chosen.values())
    grids = {}
    for task, groups in by_task.items():
        key, higher = _primary([r for group in groups.values() for r in group])
        values = {
            lr: [
                _finite(r.end.get(key)) if r.end.get("status") == "ok" else math.nan
                for r in sorted(group, key=lambda r: r.seed)
            ]
            for lr, group in groups.items()
        }

        best = max(values, key=lambda lr: _grid_score(values[lr], groups[lr], higher))
        grids[task] = TunedGrid(key, higher, values, best, duplicates.get(task, []))
        for run in groups[best]:
            kept.append(
                Run(run.task, "adam-tuned", run.seed, run.start, run.end, run.steps, run.evals)
            )
    return kept, grids


def _grid_score(values: list[float], runs: list[Run], higher: bool) -> tuple[bool, float, float]:
    """Rank of one grid point: no seed diverged, then the primary metric, then the loss."""
    if not all(math.isfinite(v) for v in values):
        return False, -math.inf, -math.inf
    primary = float(np.mean(values))
    loss = _mean_se([r.end.get("final_train_loss") for r in runs])[0]
    return True, primary if higher else -primary, -loss if math.isfinite(loss) else -math.inf


def _finite(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.nan


def _optimizer_order(names: set[str]) -> list[str]:
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def _table(
    title: str,
    rows: dict[str, dict[str, list[float]]],
    columns: list[str],
    higher_is_better: bool,
    digits: int,
    summary: tuple[str, str] | None,
    marks: dict[tuple[str, str], str] | None = None,
    notes: dict[str, str] | None = None,
    intro: str = "",
    seeds: dict[str, int] | None = None,
) -> str:
    """A markdown table of mean ± s.e., best mean per row in bold; summary = (label, how).

    ``marks`` appends a mark to the cell (row label, column); ``notes`` explains each mark
    under the table, where the table uses it. ``seeds`` gives each row's seed count (the
    n of its label): a cell whose mean is over another number of seeds says ``(n=k)``."""
    marks = marks or {}
    uneven = False
    lines = [f"### {title}", ""]
    if intro:
        lines += [intro, ""]
    lines.append("| task | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    means: dict[str, list[float]] = defaultdict(list)
    for task, cells in rows.items():
        stats = {c: _mean_se(cells.get(c, [])) for c in columns}
        finite = [m for m, _ in stats.values() if math.isfinite(m)]
        best = (max(finite) if higher_is_better else min(finite)) if finite else None
        rendered = []
        for c in columns:
            m, se = stats[c]
            means[c].append(m)
            if not math.isfinite(m):
                rendered.append("–")
                continue
            text = f"{m:.{digits}g}" + (f" ± {se:.2g}" if math.isfinite(se) else "")
            text = f"**{text}**" if m == best else text
            text += marks.get((task, c), "")
            count = sum(v is not None and math.isfinite(v) for v in cells.get(c, []))
            if seeds is not None and task in seeds and count != seeds[task]:
                text += f" (n={count})"
                uneven = True
            rendered.append(text)
        lines.append(f"| {task} | " + " | ".join(rendered) + " |")
    if summary is not None and rows:
        label, how = summary
        cells = []
        for c in columns:
            values = means[c]
            if len(values) != len(rows) or not all(
                math.isfinite(v) and (how != "log" or v > 0) for v in values
            ):
                cells.append("–")
            elif how == "log":
                cells.append(f"{math.exp(np.mean(np.log(values))):.{digits}g}")
            else:
                cells.append(f"{np.mean(values):.{digits}g}")
        lines.append(f"| *{label}* | " + " | ".join(cells) + " |")
    used = [note for mark, note in (notes or {}).items() if any(mark in m for m in marks.values())]
    if uneven:
        used.append(UNEVEN_NOTE)
    if used:
        lines += [""] + [f"{note}  " for note in used[:-1]] + used[-1:]
    return "\n".join(lines) + "\n"


def build_tables(runs: list[Run], grids: dict[str, TunedGrid], finished: int) -> str:
    columns = _optimizer_order({r.optimizer for r in runs})
    tasks = sorted({r.task for r in runs})
    group: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        group[(run.task, run.optimizer)].append(run)

    seeds_of = {t: len({r.seed for r in runs if r.task == t}) for t in tasks}

    def label(t: str) -> str:
        return f"{t} (n={seeds_of[t]})"

    def rows(key: str, only: set[str] | None = None) -> dict[str, dict[str, list[float]]]:
        return {
            label(t): {c: [r.end.get(key) for r in group.get((t, c), [])] for c in columns}
            for t in tasks
            if only is None or t in only
        }

    # A best Adam rate at the grid's edge is marked on every adam-tuned cell of the task.
    edges = sorted(t for t, grid in grids.items() if grid.at_edge and t in seeds_of)
    edge_marks = {(label(t), "adam-tuned"): EDGE_MARK for t in edges}
    edge_notes = {EDGE_MARK: EDGE_NOTE}

    seeds = {label(t): seeds_of[t] for t in tasks}

    def table(title, rows, higher, summary) -> str:
        return _table(title, rows, columns, higher, 4, summary, edge_marks, edge_notes, seeds=seeds)

    classification = {r.task for r in runs if "accuracy" in r.start.get("metrics", [])}
    language = {r.task for r in runs if "perplexity" in r.start.get("metrics", [])}
    # regression and other tasks judged by a validation loss alone
    loss_only = {r.task for r in runs if "val_loss" in r.start.get("metrics", [])} - (
        classification | language
    )
    parts = [
        f"Runs: {finished} finished; mean ± standard error over the n seeds of each task.\n",
    ]
    if edges:
        parts.append(
            f"**Adam's best rate is at the edge of its grid** on {', '.join(edges)} "
            f"({EDGE_MARK} on its cells): widen the grid there (`adam@LR` runs).\n"
        )
    if classification:
        parts.append(
            table(
                "Table I: peak validation accuracy",
                rows("peak_accuracy", classification),
                True,
                ("average", "mean"),
            )
        )
    parts.append(
        table(
            "Table II: final training loss (EMA of the per-step loss)",
            rows("final_train_loss"),
            False,
            ("log average", "log"),
        )
    )
    if language:
        parts.append(
            table(
                "Language modelling: best validation loss",
                rows("best_val_loss", language),
                False,
                None,
            )
        )
        parts.append(
            table(
                "Language modelling: best validation perplexity",
                rows("best_perplexity", language),
                False,
                None,
            )
        )
    if loss_only:
        parts.append(
            table(
                "Best validation loss",
                rows("best_val_loss", loss_only),
                False,
                ("log average", "log"),
            )
        )
    parts.append(_equal_compute_table(runs, group, tasks, columns, seeds_of, edges))
    parts.append(_cost_table(group, tasks, columns))
    if grids:
        parts.append(
            "### adam-tuned: the learning-rate grid\n\n"
            "Mean ± standard error over seeds of the metric that picks the best peak learning "
            "rate (bold); `adam` is the grid point at the paper's rate. Each seed counts once "
            "per rate: of two runs of one seed at one rate (`adam@1e-3` and `adam@0.001`, or "
            "`adam` and an `adam@LR` at its rate) the grid keeps an explicit `adam@LR` run "
            "before `adam`, the grid's own spelling (`adam@0.001`) before another, then the "
            "first name in alphabetical order; the others are named after the task.\n\n"
            + "\n".join(grids[t].describe(t) for t in sorted(grids))
            + "\n"
        )
    diverged = [
        f"{r.task}/{r.optimizer}/seed {r.seed}" for r in runs if r.end.get("status") != "ok"
    ]
    if diverged:
        parts.append("Diverged runs (excluded from the loss table): " + ", ".join(diverged) + "\n")
    return "\n".join(parts)


def _equal_compute_table(
    runs: list[Run],
    group: dict[tuple[str, str], list[Run]],
    tasks: list[str],
    columns: list[str],
    seeds_of: dict[str, int],
    edges: list[str],
) -> str:
    """Each optimizer's training loss at the compute Adam used on the task."""
    title = "Equal compute: training loss at the compute Adam used"
    budgets = adam_compute(runs)
    planned = planned_adam_compute(runs)
    rows: dict[str, dict[str, list[float]]] = {}
    marks: dict[tuple[str, str], str] = {}
    seeds: dict[str, int] = {}
    for task in (t for t in tasks if t in budgets):
        kind = " planned" if task in planned else ""
        row = f"{task} (n={seeds_of[task]}, Adam {budgets[task]:.0f}{kind})"
        rows[row] = {}
        seeds[row] = seeds_of[task]
        for c in columns:
            at = [loss_at_compute(r, budgets[task]) for r in group.get((task, c), [])]
            rows[row][c] = [loss for loss, _ in at]
            short = any(short and math.isfinite(loss) for loss, short in at)
            edge = c == "adam-tuned" and task in edges
            if short or edge:
                marks[(row, c)] = SHORT_MARK * short + EDGE_MARK * edge
    if not rows:
        return f"### {title}\n\nNo `adam` run with pass counts: no compute to compare at.\n"
    intro = (
        "Compute in pass-equivalents: forward passes + 2 × backward passes (a backward pass "
        "costs about two forward passes). Per task, Adam's compute is the total of its `adam` "
        "run over the budget (in the row's label); each optimizer's training loss (the EMA "
        "of Table II) is taken at its last step within that compute (– where its first step "
        "alone cost more). Diverged runs are left out, as in Table II, and set no compute."
    )
    if planned:
        intro += (
            " Every `adam` run diverged on "
            + ", ".join(sorted(planned))
            + ': the compute there is the one Adam planned ("planned" in the label), the '
            "budget's steps at one forward and one backward pass each."
        )
    lacking = [t for t in tasks if t not in budgets]
    if lacking:  # (else the table dropped them without a word, and its average with them)
        intro += (
            " No `adam` run on "
            + ", ".join(lacking)
            + ": left out of this table and its log average (no compute to compare at)."
        )
    notes = {SHORT_MARK: SHORT_NOTE, EDGE_MARK: EDGE_NOTE}
    summary = ("log average", "log")
    return _table(title, rows, columns, False, 4, summary, marks, notes, intro, seeds)


def _cost_table(
    group: dict[tuple[str, str], list[Run]], tasks: list[str], columns: list[str]
) -> str:
    lines = [
        "### Cost per training step (median over seeds)",
        "",
        "Time in ms (ratio to `adam` on the same task), forward / backward passes per step.",
        "",
        "| task | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for task in tasks:
        adam = group.get((task, "adam"), [])
        base = float(np.median([r.end["time_per_step"] for r in adam])) if adam else math.nan
        cells = []
        for c in columns:
            runs = group.get((task, c), [])
            if not runs:
                cells.append("–")
                continue
            t = float(np.median([r.end["time_per_step"] for r in runs]))
            f = float(np.median([r.end["forwards_per_step"] for r in runs]))
            b = float(np.median([r.end["backwards_per_step"] for r in runs]))
            ratio = f" ({t / base:.2f}×)" if math.isfinite(base) and base > 0 else ""
            cells.append(f"{1000 * t:.0f}{ratio}, {f:.2f} / {b:.2f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ema(values: np.ndarray, beta: float) -> np.ndarray:
    return np.array(loss_ema(values.tolist(), beta), dtype=float)


def on_common_x(
    curves: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray] | None:
    """Seeds' curves (x, y) as (x, ys) on one x, to average over seeds.

    Where the seeds share their x (steps: up to the shortest run), that x; where they do not
    (pass-equivalents of a line search, wall-clock time), as many points evenly spaced over
    the range that every seed covers, each seed's y interpolated linearly there (never
    extrapolated). None if there is nothing to plot."""
    curves = [(x, y) for x, y in curves if len(x) and np.all(np.isfinite(x))]
    if not curves:
        return None
    length = min(len(x) for x, _ in curves)
    first = curves[0][0][:length]
    if all(np.array_equal(x[:length], first) for x, _ in curves):
        return first, np.stack([y[:length] for _, y in curves])
    low = max(float(x[0]) for x, _ in curves)
    high = min(float(x[-1]) for x, _ in curves)
    if not low <= high:
        return None
    grid = np.linspace(low, high, max(len(x) for x, _ in curves))
    return grid, np.stack([np.interp(grid, x, y) for x, y in curves])


def _band(ax, curves: list[tuple[np.ndarray, np.ndarray]], label: str, color) -> None:
    """Mean ± standard error over seeds of curves (on a common x, see ``on_common_x``)."""
    common = on_common_x(curves)
    if common is None:
        return
    x, ys = common
    mean = np.nanmean(ys, axis=0)
    ax.plot(x, mean, label=label, color=color, linewidth=1.3)
    if len(ys) > 1:
        se = np.nanstd(ys, axis=0, ddof=1) / math.sqrt(len(ys))
        ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)


def build_figures(runs: list[Run], out_dir: Path) -> list[Path]:
    """One PNG per task: the training loss against steps, pass-equivalents and wall-clock
    training time (top row); the validation metric, the step size and the pass-equivalents
    spent, against steps (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = _optimizer_order({r.optimizer for r in runs})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    written = []
    for task in sorted({r.task for r in runs}):
        task_runs = [r for r in runs if r.task == task]
        metric = "accuracy" if "accuracy" in task_runs[0].start.get("metrics", []) else "val_loss"
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        (ax_loss, ax_compute, ax_time), (ax_metric, ax_lr, ax_cost) = axes
        for name in names:
            group = [r for r in task_runs if r.optimizer == name]
            if not group:
                continue
            color = colors[name]
            loss = {id(r): _ema(r.steps["loss"], CURVE_SMOOTHING) for r in group}
            compute = {id(r): pass_equivalents(r) for r in group}
            _band(ax_loss, [(r.steps["step"], loss[id(r)]) for r in group], name, color)
            _band(ax_compute, [(compute[id(r)], loss[id(r)]) for r in group], name, color)
            _band(ax_time, [(r.steps["time"], loss[id(r)]) for r in group], name, color)
            _band(ax_cost, [(r.steps["step"], compute[id(r)]) for r in group], name, color)
            evals = [
                (
                    np.array([e["step"] for e in r.evals], float),
                    np.array([e.get(metric, np.nan) for e in r.evals], float),
                )
                for r in group
            ]
            _band(ax_metric, evals, name, colors[name])
            _band(ax_lr, [(r.steps["step"], r.steps["lr"]) for r in group], name, colors[name])
        title = f"{task}: training loss (EMA {CURVE_SMOOTHING})"
        ax_loss.set(title=title, xlabel="step", yscale="log")
        ax_compute.set(
            title=f"{task}: training loss at equal compute",
            xlabel="pass-equivalents (forward + 2 x backward)",
            yscale="log",
        )
        ax_time.set(
            title=f"{task}: training loss at equal time",
            xlabel="training wall-clock time (s)",
            yscale="log",
        )
        ax_metric.set(title=f"{task}: validation {metric}", xlabel="step")
        ax_lr.set(title=f"{task}: step size / learning rate", xlabel="step", yscale="log")
        ax_cost.set(title=f"{task}: compute spent", xlabel="step", ylabel="pass-equivalents")
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        ax_loss.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out: Path, budget: str, destination: Path | None = None) -> Path:
    """Write ``report.md`` and one PNG per task; returns the markdown path."""
    runs, dropped = consistent(load_runs(out, budget), budget)
    finished = len(runs)
    runs, grids = fold_tuned_adam(runs)
    if not runs:
        raise FileNotFoundError(f"no finished runs of budget {budget!r} under {out}")
    destination = Path(destination or Path(out) / budget / "report")
    if destination.exists() and not destination.is_dir():
        raise NotADirectoryError(f"{destination} is not a folder: the report goes there")
    figures = build_figures(runs, destination)
    text = [
        f"# alsals-benchmark report: budget `{budget}`",
        "",
        build_tables(runs, grids, finished),
    ]
    if dropped:
        names = ", ".join(f"{r.task}/{r.optimizer}/seed {r.seed}" for r in dropped)
        text.append(
            f"Left out (a different budget size than the other runs of the task): {names}\n"
        )
    text += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    path = destination / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
