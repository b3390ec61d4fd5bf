"""A loss that can go below the floor of the Polyak cap and start, measured
(``benchmarks/docs/method.md``, section 13).

Losses whose minimum is below 0, which ``MomentumALSALS``'s default ``loss_floor=0`` (and
``start="polyak"``'s floor 0 when ``loss_floor`` is ``None``) takes for a lower bound, in
float64 from a fixed start, full batch: a quadratic with condition number 10 minus 0.5 and
minus 5 (10 weights), and a Gaussian negative log-likelihood with a learned variance
(linear regression, 256 examples, 4 features, noise 0.1: its minimum is near -1.8). For each
optimizer: the number of steps until the loss is within 1e-6 of its minimum (``-`` if not
in 1000), the loss after 1000 steps, and the step at which the run refuted the floor.

    python benchmarks/scripts/wrong_floor.py      # a few seconds
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from alsals import SLS, AdamSLS, LineSearchOptimizer, MomentumALSALS

F64 = torch.float64
STEPS = 1000

OPTIMIZERS: dict[str, Callable[..., LineSearchOptimizer]] = {
    "MomentumALSALS (defaults)": MomentumALSALS,
    "MomentumALSALS, loss_floor=None": lambda p: MomentumALSALS(p, loss_floor=None),
    "SLS, loss_floor=0, Polyak start": lambda p: SLS(p, loss_floor=0.0, start="polyak"),
    "AdamSLS, loss_floor=0, Polyak start": lambda p: AdamSLS(p, loss_floor=0.0, start="polyak"),
}


def quadratic(offset: float) -> tuple[list[Tensor], Callable[[], Tensor], float]:
    gen = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.1, 1.0, 10, dtype=F64)
    w = torch.randn(10, generator=gen, dtype=F64).mul_(3.0).requires_grad_(True)
    return [w], lambda: 0.5 * (scales * w * w).sum() + offset, offset


def gaussian_nll() -> tuple[list[Tensor], Callable[[], Tensor], float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64) + 0.1 * torch.randn(
        256, generator=gen, dtype=F64
    )
    torch.manual_seed(0)  # the model's initial weights
    model = nn.Linear(4, 1).to(F64)
    log_var = torch.zeros(1, dtype=F64, requires_grad=True)
    nll = nn.GaussianNLLLoss()

    def closure() -> Tensor:
        return nll(model(x)[:, 0], y, log_var.exp().expand(256))

    # its minimum: least squares, then the variance of the residuals
    design = torch.cat([x, torch.ones(256, 1, dtype=F64)], dim=1)
    residual = y - design @ torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    minimum = 0.5 * (math.log(float((residual**2).mean())) + 1.0)
    return [*model.parameters(), log_var], closure, minimum


PROBLEMS = {
    "quadratic - 0.5": lambda: quadratic(-0.5),
    "quadratic - 5": lambda: quadratic(-5.0),
    "Gaussian NLL": gaussian_nll,
}


def run(make: Callable, problem: Callable) -> tuple[str, float, str]:
    params, closure, minimum = problem()
    opt = make(params)
    reached, refuted = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, STEPS + 1):
            opt.step(closure)
            if refuted is None and getattr(opt.search_state, "floor_refuted", False):
                refuted = step
            if reached is None and float(closure().detach()) - minimum < 1e-6:
                reached = step
    final = float(closure().detach())
    return (
        "-" if reached is None else str(reached),
        final,
        "-" if refuted is None else str(refuted),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()  # no options: --help says what the script measures, and exits
    print("| problem (minimum) | optimizer | steps to 1e-6 | loss after 1000 | refuted at |")
    print("|---|---|---|---|---|")
    for name, problem in PROBLEMS.items():
        minimum = problem()[2]
        for label, make in OPTIMIZERS.items():
            reached, final, refuted = run(make, problem)
            print(f"| {name} ({minimum:.4g}) | {label} | {reached} | {final:.6g} | {refuted} |")


if __name__ == "__main__":
    main()
