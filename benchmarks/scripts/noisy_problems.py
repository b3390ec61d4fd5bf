"""The failure ``loss_rise_guard`` answers, measured: line searches on noisy problems whose
training loss cannot reach 0 (``benchmarks/docs/method.md``, section 12).

Two convex problems in float64, mini-batches of 8 reshuffled each epoch, 2500 steps from
zero weights: a linear regression with unit-variance noise on the targets (512 examples, 16
features; its minimum computed exactly) and a logistic regression with noisy labels (512
examples, 16 features; its minimum estimated by 3000 full-batch L-BFGS iterations). For each
optimizer, with the guard off and on: the mean full-data loss over the last 1000 steps as
a ratio to the minimum, and the steps at which the guard fired.

    python benchmarks/scripts/noisy_problems.py            # seeds 0-2, about 3 minutes
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import Tensor

from alsals import ALSALS, SLS, AdamSLS, LineSearchOptimizer

F64 = torch.float64
N, D, BATCH, STEPS, LAST = 512, 16, 8, 2500, 1000

OPTIMIZERS: dict[str, Callable[..., LineSearchOptimizer]] = {
    "SLS": SLS,
    "AdamSLS": AdamSLS,
    "ALSALS.paper": ALSALS.paper,
    "ALSALS (defaults)": ALSALS,
    "ALSALS, loss_floor=None": lambda params, **kw: ALSALS(params, loss_floor=None, **kw),
}


def problem(kind: str, seed: int) -> tuple[Callable[[Tensor, Tensor], Tensor], float]:
    """The loss ``f(w, idx)`` on the examples ``idx`` and the minimum of the full loss."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, dtype=F64, generator=gen) / math.sqrt(D)
    teacher = torch.randn(D, dtype=F64, generator=gen)
    noise = torch.randn(N, dtype=F64, generator=gen)
    if kind == "regression":
        y = x @ teacher + noise

        def loss(w: Tensor, idx: Tensor) -> Tensor:
            return 0.5 * ((x[idx] @ w - y[idx]) ** 2).mean()

        fit = torch.linalg.lstsq(x, y).solution
        return loss, float(loss(fit, torch.arange(N)))
    labels = ((3.0 * x @ teacher + noise) > 0).to(F64)

    def loss(w: Tensor, idx: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(x[idx] @ w, labels[idx])

    w = torch.zeros(D, dtype=F64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([w], max_iter=3000, tolerance_grad=1e-12, tolerance_change=0)

    def closure() -> Tensor:
        lbfgs.zero_grad()
        value = loss(w, torch.arange(N))
        value.backward()
        return value

    lbfgs.step(closure)
    return loss, float(loss(w.detach(), torch.arange(N)))


def run(kind: str, name: str, guard: float | None, seed: int) -> tuple[float, list[int]]:
    loss, minimum = problem(kind, seed)
    w = torch.zeros(D, dtype=F64, requires_grad=True)
    opt = OPTIMIZERS[name]([w], loss_rise_guard=guard)
    gen = torch.Generator().manual_seed(1000 + seed)
    fired, full = [], []
    for k in range(STEPS):
        if k % (N // BATCH) == 0:
            order = torch.randperm(N, generator=gen)
        idx = order[BATCH * (k % (N // BATCH)) : BATCH * (k % (N // BATCH) + 1)]
        opt.step(lambda idx=idx: loss(w, idx))
        if opt.last_step.loss_rose:
            fired.append(k)
        if k >= STEPS - LAST:
            with torch.no_grad():
                full.append(float(loss(w, torch.arange(N))))
    return sum(full) / len(full) / minimum, fired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| problem | optimizer | guard off: loss / minimum | guard on | guard fired at |")
    print("|---|---|---|---|---|")
    for kind in ("regression", "logistic"):
        for name in OPTIMIZERS:
            off, on, fires = [], [], []
            for seed in range(args.seeds):
                off.append(run(kind, name, None, seed)[0])
                ratio, fired = run(kind, name, 3.0, seed)
                on.append(ratio)
                fires.append(",".join(map(str, fired)) or "-")
            print(
                f"| {kind} | {name} | {' / '.join(f'{r:.3f}' for r in off)} | "
                f"{' / '.join(f'{r:.3f}' for r in on)} | {'; '.join(fires)} |"
            )


if __name__ == "__main__":
    main()
