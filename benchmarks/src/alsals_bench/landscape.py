"""``alsals-bench landscape``: reproduce the paper's Figs. 2-4 on an offline task.

Trains MomentumALSALS (the paper's defaults) on a task and scans the loss along the search direction
before each of the last ``--scans`` steps; writes the scans (JSON) and three PNGs:
``fig2_single_batch.png``, ``fig3_consecutive_batches.png``, ``fig4_heatmap.png``.

    alsals-bench landscape --task minilm-finefood --steps 40 --scans 30 --out docs/results/landscape
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from alsals import LineSearchOptimizer
from alsals.diagnostics import LandscapeRecorder, log_grid
from alsals.diagnostics.plots import plot_consecutive, plot_heatmap, plot_single
from alsals_bench._args import MAX_SEED, int_at_least
from alsals_bench.registry import get_optimizer
from alsals_bench.tasks import get_task

DESCRIPTION = (
    "Reproduce the paper's Figs. 2-4 on an offline task: train a line search and scan the loss "
    "along its search direction before each of the last --scans steps."
)


class NotALineSearch(ValueError):
    """The optimizer a landscape run was asked for has no search direction to scan."""


def run(
    task_name: str,
    optimizer: str,
    steps: int,
    scans: int,
    out: Path,
    budget: str = "quick",
    seed: int = 0,
    grid: Sequence[float] | None = None,
    device: str = "cpu",
) -> list[Path]:
    task = get_task(task_name)
    run_ = task.setup(seed, task.budget(budget), torch.device(device))
    model = run_.model
    model.train()
    stepper = get_optimizer(optimizer).build(model, task, task.budget(budget))
    stepper.seed(seed)
    opt = stepper.optimizer
    if not isinstance(opt, LineSearchOptimizer):  # before any training
        raise NotALineSearch(
            f"{optimizer!r} has no search direction to scan (MomentumALSALS, AdamSLS and SLS "
            "configurations have; ALSALS searches a step size, Adam none)"
        )
    recorder = LandscapeRecorder(opt, every=1, step_sizes=grid or log_grid(1e-7, 1.0, 36))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for step in range(steps):
        batch = run_.next_batch()

        def closure(batch=batch):
            return run_.loss(model, batch)

        if step >= steps - scans:
            scan = recorder.maybe_scan(closure)
            print(
                f"step {step}: loss {scan.loss:.4f}, chosen {scan.chosen_step_size}, "
                f"best {scan.best_step_size:.2e} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
        stepper.step(closure)
    records = [s.to_dict() for s in recorder.scans]
    (out / "scans.json").write_text(
        json.dumps({"task": task_name, "optimizer": optimizer, "scans": records})
    )
    label = f"{task_name}, {optimizer}"
    return [
        plot_single(
            recorder.scans[-1], out / "fig2_single_batch.png", f"{label}: one batch (Fig. 2)"
        ),
        plot_consecutive(
            recorder.scans[-10:],
            out / "fig3_consecutive_batches.png",
            f"{label}: last 10 batches (Fig. 3)",
        ),
        plot_heatmap(recorder.scans, out / "fig4_heatmap.png", f"{label}: loss decrease (Fig. 4)"),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", default="digits-cnn", help="the task to train (alsals-bench list)"
    )
    parser.add_argument(
        "--optimizer",
        default="alsals",
        help="a line search of the registry (alsals-bench list): its direction is scanned",
    )
    parser.add_argument(
        "--steps", type=int_at_least(1, "training steps"), default=60, help="training steps"
    )
    parser.add_argument(
        "--scans",
        type=int_at_least(1, "scans"),
        default=30,
        help="scan before each of the last N steps",
    )
    parser.add_argument("--budget", default="quick", help="the task budget whose sizes to use")
    parser.add_argument(
        "--seed",
        type=int_at_least(0, "seeds are 0 to 2**63 - 1", maximum=MAX_SEED),
        default=0,
        help="seed of the model and the batches",
    )
    parser.add_argument(
        "--points",
        type=int_at_least(2, "a grid from 1e-7 to 1 has both ends"),
        default=36,
        help="grid points from 1e-7 to 1 (at least 2)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/landscape"),
        help="output folder: scans.json and the three figures",
    )


def run_command(args: argparse.Namespace) -> int:
    if args.scans > args.steps:
        print("alsals-bench landscape: --scans must be at most --steps", file=sys.stderr)
        return 2
    from alsals_bench.cli import UsageError, check_device, check_out

    try:  # the names, device, data and folder before any training: a one-line error
        task = get_task(args.task)
        get_optimizer(args.optimizer)
        check_device(args.device)
        task.check_data(task.budget(args.budget))
        check_out(args.out)
    except (KeyError, ValueError, FileNotFoundError, UsageError) as err:
        print(f"alsals-bench landscape: {str(err.args[0]).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        paths = run(
            args.task,
            args.optimizer,
            args.steps,
            args.scans,
            args.out,
            args.budget,
            args.seed,
            log_grid(1e-7, 1.0, args.points),
            args.device,
        )
    except NotALineSearch as err:
        print(f"alsals-bench landscape: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
