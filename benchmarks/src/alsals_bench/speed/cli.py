"""``alsals-bench speed``: its options, and the run from parsed options to the report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from alsals_bench._args import MAX_SEED, int_at_least, names_of
from alsals_bench.registry import REGISTRY
from alsals_bench.speed.configs import CONFIGS, DEFAULT_CONFIGS
from alsals_bench.speed.measure import measure_model
from alsals_bench.speed.report import load, write
from alsals_bench.speed.workloads import DEFAULT_MODELS, MODELS, RUN_LENGTHS

DESCRIPTION = "Step time and peak memory of the line searches against Adam and SaLSa."


# The whole-number options: flag, default, help.
_COUNTS = (
    ("--steps", None, "timed steps per repeat (default: per model)"),
    ("--repeats", None, "interleaved repeats (default: per model)"),
    ("--warmup", None, "steps to settle each configuration before timing (default: per model)"),
    ("--memory-steps", 10, "steps tracked for peak memory (0: skip)"),
    (
        "--threads",
        1,
        "CPU threads, >= 1 (1: steady timings on a busy machine), or 0: torch's default",
    ),
    ("--seed", 0, "seed of the weights, the batches and the random stream"),
)

#: The counts checked when parsed (the others in ``_invalid``): a seed out of range ended
#: the measurement in a traceback from ``manual_seed`` (or ran a negative seed unnoticed).
_KINDS = {
    "--threads": int_at_least(0, "0: torch's default"),
    "--seed": int_at_least(0, "seeds are 0 to 2**63 - 1", maximum=MAX_SEED),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="of " + ", ".join(CONFIGS))
    for flag, default, text in _COUNTS:
        p.add_argument(flag, type=_KINDS.get(flag, int), default=default, help=text)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--out", type=Path, default=Path("runs/speed"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="skip the bar chart")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild speed.md and speed.png from OUT/speed.json",
    )
    p.add_argument(
        "--profile",
        type=names_of(CONFIGS, "configuration"),
        default="",
        help="after measuring, cProfile these configurations' timed steps (comma-separated)",
    )


def _invalid(args: argparse.Namespace, models: list[str], configs: list[str]) -> str | None:
    """What is wrong with the options' names and counts, if anything (checked before the
    output folder, so that a misspelt name creates nothing)."""
    if not models:
        return "no model given (--models)"
    if not configs:
        return "no configuration given (--configs)"
    for m in models:
        if m not in MODELS:
            return f"unknown model {m!r}; known: {', '.join(MODELS)}"
    for c in configs:
        if c not in CONFIGS:
            return f"unknown configuration {c!r}; known: {', '.join(CONFIGS)}"
    for c in (c for c in args.profile.split(",") if c):
        if c not in configs and c != "adam":
            return f"--profile {c}: not measured; add it to --configs"
    peers = {CONFIGS[c].peer for c in configs} - {None}
    for peer in sorted(peers):
        if not REGISTRY[peer].available():
            return f"the {peer} configurations need: pip install {REGISTRY[peer].package}"
    if (
        (args.steps is not None and args.steps < 1)
        or (args.repeats is not None and args.repeats < 1)
        or (args.warmup is not None and args.warmup < 0)
        or args.memory_steps < 0
    ):
        return "--steps and --repeats must be >= 1, --warmup and --memory-steps >= 0"
    return None


def _unwritable(out: Path) -> str | None:
    """Why ``out`` cannot take the results, if it cannot: checked before minutes of
    measuring, not after."""
    from alsals_bench.cli import UsageError, check_out  # (the CLI imports this module)

    try:
        check_out(out)
    except UsageError as err:
        return str(err)
    return None


def _fail(message: str) -> int:
    """Print a usage error on one line, as every subcommand does; exit status 2."""
    print(f"alsals-bench speed: {message}", file=sys.stderr)
    return 2


def _report_only(args: argparse.Namespace) -> int:
    """``--report-only``: rebuild speed.md and speed.png from OUT/speed.json."""
    source = args.out / "speed.json"
    if not source.is_file():
        return _fail(f"--report-only: no {source} to report")
    try:
        command, host, loaded = load(source)
    except (ValueError, KeyError, TypeError) as err:  # (json's errors are ValueErrors)
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        return _fail(f"--report-only: {source} is not a speed result ({reason})")
    problem = _unwritable(args.out)
    if problem:
        return _fail(problem)
    print(write(loaded, args.out, command, not args.no_plot, host))
    return 0


def run(args: argparse.Namespace, command: str) -> int:
    """Measure (or, with ``--report-only``, reload) and write the report; ``command`` is the
    command line recorded with the results."""
    if args.report_only:
        return _report_only(args)
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    problem = _invalid(args, models, configs)
    if problem:
        return _fail(problem)
    if "adam" not in configs:
        configs.insert(0, "adam")  # every ratio is to Adam
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = (str(err) or type(err).__name__).splitlines()[0]
        return _fail(f"--device {args.device!r} is not usable here: {reason}")
    problem = _unwritable(args.out)
    if problem:
        return _fail(problem)
    results = []
    start = time.perf_counter()
    for name in models:
        steps, warmup, repeats = RUN_LENGTHS.get(name, (10, 10, 3))
        results.append(
            measure_model(
                name,
                configs,
                steps=steps if args.steps is None else args.steps,
                repeats=repeats if args.repeats is None else args.repeats,
                warmup=warmup if args.warmup is None else args.warmup,
                memory_steps=args.memory_steps,
                device=device,
                seed=args.seed,
                profile=[c for c in args.profile.split(",") if c],
            )
        )
    text = write(results, args.out, command, not args.no_plot)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0
