"""Nonsmooth losses, measured (``benchmarks/docs/method.md``, section 16; the README's caution).

At a kink autograd's gradient is one piece's and need not point downhill: every trial of a
search then raises the loss while the analytic slope ``-g . d`` says it should fall. Before
phase 5.8 such a search ended unresolved or failed, and the next search from the same
weights did too. Two problems, float32:

* a full-batch L1 fit that interpolates its data (16 rows, 32 weights, 300 steps), over 5
  initialisations: the final loss (median, range) and the unresolved or failed searches;
* the tie of ``tests/test_nonsmooth.py`` in float64, ``max(w0 + w1, -w0) + 0.01 ||w||^2 + 5``
  from a point where both pieces are equal (30 steps): the loss after 30 steps;
* not a kink: a closure whose loss ``||w||^2 + 5`` carries a detached term, so that its
  gradient is that of ``-||w||^2 / 2`` and every search's trials contradict the slope
  (float64, 30 steps from 10.25): the loss after 30 steps (a step through a contradiction
  that comes back would climb it);
* a ReLU MLP (10-32-32-3, cross-entropy, 256 samples, float32, 400 steps, full batch and
  batches of 32, 4 seeds each): the searches ending without a step and the kinks passed,
  summed (phase 5.8 acts only where a search would end without a step).

For each optimizer, the searches whose trials contradicted the slope and which stepped with
the slope the trials measured (phase 5.8, ``search_state.kinks_passed``) are counted too.

    python benchmarks/scripts/nonsmooth_losses.py      # under a minute
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch
from torch import nn

from alsals import SLS, AdamSLS, LineSearchOptimizer, MomentumALSALS

SEEDS = range(5)

OPTIMIZERS: dict[str, Callable[..., LineSearchOptimizer]] = {
    "MomentumALSALS (defaults)": MomentumALSALS,
    "MomentumALSALS.paper": MomentumALSALS.paper,
    "AdamSLS": AdamSLS,
    "SLS": SLS,
}


def train(make, w: torch.Tensor, loss, steps: int) -> tuple[float, int, int]:
    """The final loss, the searches ending without a step, and those passing a kink."""
    opt = make([w])
    stopped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.step(loss)
            stopped += opt.last_step.kind in ("unresolved", "failed")
    with torch.no_grad():
        return float(loss()), stopped, opt.search_state.kinks_passed


def l1_fit(make, seed: int) -> tuple[float, int, int]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 32, generator=gen)
    y = x @ torch.randn(32, generator=gen)
    w = torch.zeros(32, requires_grad=True)
    return train(make, w, lambda: (x @ w - y).abs().mean(), 300)


def tie(make) -> tuple[float, int, int]:
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss = lambda: torch.stack([w[0] + w[1], -w[0]]).max() + 0.01 * (w**2).sum() + 5.0  # noqa: E731
    return train(make, w, loss, 30)


def surrogate(make) -> tuple[float, int, int]:
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)

    def loss():
        detached_term = -0.5 * (w**2).sum()
        return ((w**2).sum() + 5.0).detach() + detached_term - detached_term.detach()

    return train(make, w, loss, 30)


def relu_mlp(make, seed: int, batch: int | None) -> tuple[float, int, int]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    opt = make(model.parameters())
    stopped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(400):
            idx = torch.randint(0, 256, (batch,), generator=gen) if batch else slice(None)
            xb, yb = x[idx], y[idx]
            opt.step(lambda xb=xb, yb=yb: nn.functional.cross_entropy(model(xb), yb))
            stopped += opt.last_step.kind in ("unresolved", "failed")
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x), y))
    return final, stopped, opt.search_state.kinks_passed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()  # no options: --help says what the script measures, and exits
    print(
        "| optimizer | L1 fit: final loss (median, range) | searches without a step | "
        "kinks passed (5.8) | tie: loss after 30 steps (from 4.05) | without a step | passed "
        "| surrogate gradient: loss after 30 steps (from 10.25) | passed "
        "| ReLU MLP: searches without a step | passed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, make in OPTIMIZERS.items():
        fits = [l1_fit(make, seed) for seed in SEEDS]
        finals = [f[0] for f in fits]
        at_tie, wrong = tie(make), surrogate(make)
        mlps = [relu_mlp(make, seed, batch) for seed in range(4) for batch in (None, 32)]
        print(
            f"| {name} | {statistics.median(finals):.3g} ({min(finals):.2g}-{max(finals):.2g}) | "
            f"{sum(f[1] for f in fits)} | {sum(f[2] for f in fits)} | {at_tie[0]:.3f} | "
            f"{at_tie[1]} | {at_tie[2]} | {wrong[0]:.4g} | {wrong[2]} | "
            f"{sum(m[1] for m in mlps)} | {sum(m[2] for m in mlps)} |"
        )


if __name__ == "__main__":
    main()
