"""A loss that is NaN beyond a boundary, measured (``benchmarks/docs/method.md``, section 15).

A noisy quadratic whose minimum lies outside the domain ``||w|| < 1`` of a log barrier
(8 weights, float32, 400 steps, a new noise draw per step): the optimum sits at the
boundary, and beyond it every batch's loss is NaN. An update that no evaluation tested (a
step reusing its step size, AdamSLS's update along the momentum) can cross it; before
commit 5a3a6a7 every later step was then skipped. For each optimizer over 20 seeds: the runs
stuck outside (the last 20 steps all skipped), the steps skipped as non-finite, the updates
undone (the state's ``undone_updates``) and the median final value of the noise-free loss
over the runs that ended inside the domain.

    python benchmarks/scripts/losses_with_a_domain.py      # about a minute
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from collections.abc import Callable

import torch

from alsals import SLS, AdamSLS, LineSearchOptimizer, MomentumALSALS

STEPS = 400
SEEDS = range(20)

OPTIMIZERS: dict[str, Callable[..., LineSearchOptimizer]] = {
    "MomentumALSALS (defaults)": MomentumALSALS,
    "MomentumALSALS, search_interval=1": lambda p: MomentumALSALS(p, search_interval=1),
    "MomentumALSALS.paper": MomentumALSALS.paper,
    "AdamSLS": AdamSLS,
    "SLS": SLS,
}


def barrier(w: torch.Tensor, c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return ((w - c - noise) ** 2).sum() - 0.05 * torch.log(1 - (w**2).sum())


def run(make: Callable[..., LineSearchOptimizer], seed: int) -> tuple[bool, int, int, float]:
    torch.manual_seed(seed)
    c = torch.randn(8)
    c = 1.5 * c / c.norm()
    w = torch.zeros(8, requires_grad=True)
    opt = make([w])
    kinds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(STEPS):
            noise = 0.3 * torch.randn(8)
            opt.step(lambda noise=noise: barrier(w, c, noise))
            kinds.append(opt.last_step.kind)
    state = opt.state[w]["line_search"]
    with torch.no_grad():
        final = float(barrier(w, c, torch.zeros(8)))
    stuck = kinds[-20:] == ["nonfinite"] * 20
    return stuck, kinds.count("nonfinite"), state.get("undone_updates", 0), final


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()  # no options: --help says what the script measures, and exits
    print(
        "| optimizer | runs stuck outside | steps skipped | updates undone | final loss (median) |"
    )
    print("|---|---|---|---|---|")
    for name, make in OPTIMIZERS.items():
        results = [run(make, seed) for seed in SEEDS]
        inside = [r[3] for r in results if math.isfinite(r[3])]
        median = statistics.median(inside) if inside else math.nan
        print(
            f"| {name} | {sum(r[0] for r in results)}/{len(results)} | "
            f"{sum(r[1] for r in results)} | {sum(r[2] for r in results)} | {median:.4g} |"
        )


if __name__ == "__main__":
    main()
