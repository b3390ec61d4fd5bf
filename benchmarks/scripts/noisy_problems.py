"""The failure ``loss_rise_guard`` answers, measured: line searches on noisy problems whose
training loss cannot reach 0 (``benchmarks/docs/method.md``, section 12).

Two convex problems in float64, mini-batches of 8 reshuffled each epoch, 2500 steps from
zero weights: a linear regression with unit-variance noise on the targets (512 examples, 16
features; its minimum computed exactly) and a logistic regression with noisy labels (512
examples, 16 features; its minimum estimated by 3000 full-batch L-BFGS iterations). For each
optimizer, with the guard off and on: the mean full-data loss over the last 1000 steps as
a ratio to the minimum, and the steps at which the guard fired.

    python benchmarks/scripts/noisy_problems.py            # seeds 0-2, about 8 minutes
    python benchmarks/scripts/noisy_problems.py --beyond   # + four other settings, 2 seeds

``--beyond`` adds ``MomentumALSALS(params)`` with and without the guard on settings the guard was
not designed on (2 seeds, 2500 steps, the mean full-data loss over the last 1000, every
10th step): the two problems with 2048 examples, 64 features and batches of 32, and two
small MLPs with batches of 16 (8 inputs, 32 tanh or ReLU units): a noisy regression of
``sin(x . a)`` (noise 0.5) and a 3-class problem with 20% of the labels redrawn at random.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from alsals import SLS, AdamSLS, LineSearchOptimizer, MomentumALSALS

F64 = torch.float64
N, D, BATCH, STEPS, LAST = 512, 16, 8, 2500, 1000

OPTIMIZERS: dict[str, Callable[..., LineSearchOptimizer]] = {
    "SLS": SLS,
    "AdamSLS": AdamSLS,
    "MomentumALSALS.paper": MomentumALSALS.paper,
    "MomentumALSALS (defaults)": MomentumALSALS,
    "MomentumALSALS, loss_floor=None": lambda params, **kw: MomentumALSALS(
        params, loss_floor=None, **kw
    ),
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


def beyond(kind: str, seed: int) -> tuple[Tensor, Tensor, nn.Module, Callable, int]:
    """Data, model, loss and batch size of one ``--beyond`` setting."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind in ("regression, d=64, batch 32", "logistic, d=64, batch 32"):
        x = torch.randn(2048, 64, dtype=F64, generator=gen) / 8.0
        signal = x @ torch.randn(64, dtype=F64, generator=gen)
        noise = torch.randn(2048, dtype=F64, generator=gen)
        model = nn.Linear(64, 1, bias=False).double()
        nn.init.zeros_(model.weight)
        if kind.startswith("regression"):
            return x, signal + noise, model, _squared_error, 32
        return x, (3.0 * signal + noise > 0).to(F64), model, _logistic, 32
    x = torch.randn(2048, 8, dtype=F64, generator=gen)
    if kind == "MLP regression, noise 0.5":
        y = torch.sin(x @ torch.randn(8, dtype=F64, generator=gen))
        y = y + 0.5 * torch.randn(2048, dtype=F64, generator=gen)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).double()
        return x, y, model, _squared_error, 16
    labels = (x @ torch.randn(8, 3, dtype=F64, generator=gen)).argmax(1)
    redrawn = torch.rand(2048, generator=gen) < 0.2
    labels[redrawn] = torch.randint(0, 3, (int(redrawn.sum()),), generator=gen)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    return x, labels, model, nn.functional.cross_entropy, 16


def _squared_error(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def _logistic(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y)


BEYOND = (
    "regression, d=64, batch 32",
    "logistic, d=64, batch 32",
    "MLP regression, noise 0.5",
    "MLP, 20% random labels",
)


def run_beyond(kind: str, guard: float | None, seed: int, adam_lr: float = 0.0):
    """``MomentumALSALS(params)`` with ``loss_rise_guard=guard``, or with ``adam_lr`` Adam at that
    peak rate with 10% linear warm-up and cosine decay (the reference a user tunes)."""
    x, y, model, loss, batch = beyond(kind, seed)
    if adam_lr:
        adam = torch.optim.Adam(model.parameters(), lr=adam_lr)
        warmup = STEPS // 10
        schedule = torch.optim.lr_scheduler.LambdaLR(
            adam,
            lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * k / STEPS)),
        )
    else:
        opt = MomentumALSALS(model.parameters(), loss_rise_guard=guard)
    gen = torch.Generator().manual_seed(99 + seed)
    fired, full = [], []
    for k in range(STEPS):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        if adam_lr:
            adam.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            adam.step()
            schedule.step()
        else:
            opt.step(lambda idx=idx: loss(model(x[idx]), y[idx]))
            if opt.last_step.loss_rose:
                fired.append(k)
        if k >= STEPS - LAST and k % 10 == 0:
            with torch.no_grad():
                full.append(float(loss(model(x), y)))
    return sum(full) / len(full), fired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--beyond", action="store_true", help="also the four other settings")
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
    if not args.beyond:
        return
    print()
    print(
        "| setting | MomentumALSALS(params), guard off: final loss | guard on | guard fired at | "
        "Adam 1e-3, cosine | Adam 1e-2, cosine |"
    )
    print("|---|---|---|---|---|---|")
    for kind in BEYOND:
        off, on, fires = [], [], []
        adam: dict[float, list[float]] = {1e-3: [], 1e-2: []}
        for seed in range(2):
            off.append(run_beyond(kind, None, seed)[0])
            loss, fired = run_beyond(kind, 3.0, seed)
            on.append(loss)
            fires.append(",".join(map(str, fired)) or "-")
            for lr, values in adam.items():
                values.append(run_beyond(kind, None, seed, adam_lr=lr)[0])
        cells = [off, on, fires, adam[1e-3], adam[1e-2]]
        text = ["; ".join(c) if c is fires else " / ".join(f"{v:.4f}" for v in c) for c in cells]
        print(f"| {kind} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
