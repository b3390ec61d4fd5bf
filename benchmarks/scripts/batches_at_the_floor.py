"""Batches whose loss is at its floor, measured (``benchmarks/docs/method.md``, section 15).

The Polyak start bounds a search's first trial by ``(L0 - f*) / s``. Where a batch's loss
is at the floor but for rounding (one sample of an L1 fit or a hinge loss, fitted exactly
by the step before), that bound is ~1e-17. Until commit 5a3a6a7 the accepted step size was
handed on to the next search, which then grew it back by ``2^(1/b)`` per search: hundreds of
steps. Whether a sample lands at 1e-16 or exactly at 0 (no bound) depends on the CPU's
rounding, so the problem runs in float32 and float64 over several seeds.

Problems (one sample per step, drawn at random, 400 steps, ``MomentumALSALS(params)`` and SLS /
AdamSLS with ``start="polyak"``): an L1 fit (64 samples, 10 features, a linear model that
fits them exactly) and a multi-class hinge loss (64 samples, 2 classes, separable). For each:
the loss over all samples after 400 steps (median and range over seeds) and the number of
runs whose step size handed on to the next search (``optimizer.search_state.step_size``)
fell below 1e-10 at some step.

    python benchmarks/scripts/batches_at_the_floor.py      # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch
from torch import nn

from alsals import SLS, AdamSLS, LineSearchOptimizer, MomentumALSALS

STEPS = 400
SEEDS = range(10)

OPTIMIZERS: dict[str, Callable[..., LineSearchOptimizer]] = {
    "MomentumALSALS (defaults)": MomentumALSALS,
    "SLS, Polyak start": lambda p: SLS(p, start="polyak"),
    "AdamSLS, Polyak start": lambda p: AdamSLS(p, start="polyak"),
}


def run(make: Callable[..., LineSearchOptimizer], loss: str, seed: int, dtype: torch.dtype):
    """The loss over all samples after ``STEPS`` one-sample steps, and the smallest step
    size handed on from one search to the next."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 10, generator=gen, dtype=dtype)
    torch.manual_seed(seed)
    if loss == "l1":
        y = x @ torch.randn(10, generator=gen, dtype=dtype)
        model = nn.Linear(10, 1).to(dtype)

        def closure(i):
            return (model(x[i]).squeeze(-1) - y[i]).abs().mean()
    else:
        labels = (x[:, 0] > 0).long()
        model = nn.Linear(10, 2).to(dtype)

        def closure(i):
            return nn.functional.multi_margin_loss(model(x[i]), labels[i])

    opt = make(model.parameters())
    smallest = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(STEPS):
            i = torch.randint(0, 64, (1,))
            opt.step(lambda i=i: closure(i))
            smallest = min(smallest, opt.search_state.step_size)
    with torch.no_grad():
        return float(closure(torch.arange(64))), smallest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()  # no options: --help says what the script measures, and exits
    print(
        "| problem | dtype | optimizer | final loss (median, range) | runs handing on a step size < 1e-10 |"
    )
    print("|---|---|---|---|---|")
    for loss in ("l1", "hinge"):
        for dtype in (torch.float32, torch.float64):
            for name, make in OPTIMIZERS.items():
                results = [run(make, loss, seed, dtype) for seed in SEEDS]
                finals = [r[0] for r in results]
                collapsed = sum(r[1] < 1e-10 for r in results)
                print(
                    f"| {loss} | {str(dtype).removeprefix('torch.')} | {name} | "
                    f"{statistics.median(finals):.3g} ({min(finals):.2g}-{max(finals):.2g}) | "
                    f"{collapsed}/{len(results)} |"
                )


if __name__ == "__main__":
    main()
