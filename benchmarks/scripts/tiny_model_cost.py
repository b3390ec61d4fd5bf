"""What ``ALSALS(params)`` costs against AdamW where the model itself costs almost nothing.

A line search's step has a fixed cost beside its passes (Python, a host synchronisation per
evaluation); on a model whose training step takes about a millisecond it is what a user
sees. An MLP 3-128-128-2 (17k weights) on a fixed batch of 256 with noise drawn in the
closure (as a diffusion model's is): 300 steps of ``ALSALS(params)``, AdamW at 1e-3 and
Schedule-Free AdamW, interleaved, wall time on one thread; printed: the median over
repeats, the ratio to AdamW and ``ALSALS``'s forward passes per step.

    python benchmarks/scripts/tiny_model_cost.py      # about 15 seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import schedulefree
import torch
from torch import nn

from alsals import ALSALS


def run(name: str, steps: int) -> tuple[float, float]:
    """Seconds for ``steps`` steps of optimizer ``name``, and its forward passes per step."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2)
    )
    x, y = torch.randn(256, 3), torch.randn(256, 2)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x + 0.1 * torch.randn_like(x)), y)

    if name == "ALSALS":
        opt = ALSALS(model.parameters())
    elif name == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=2.5e-3)
        opt.train()
    forwards = 0
    start = time.perf_counter()
    for _ in range(steps):
        if isinstance(opt, ALSALS):
            opt.step(loss)
            forwards += opt.last_step.forwards
        else:
            opt.zero_grad()
            loss().backward()
            opt.step()
            forwards += 1
    return time.perf_counter() - start, forwards / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per run (300)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per optimizer (5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = ("AdamW", "Schedule-Free AdamW", "ALSALS")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            runs[name].append(run(name, args.steps))
    adamw = statistics.median(t for t, _ in runs["AdamW"])
    for name in names:
        median = statistics.median(t for t, _ in runs[name])
        passes = statistics.median(p for _, p in runs[name])
        print(f"{name:20s} {median:6.3f} s  {median / adamw:4.2f}x AdamW  {passes:.2f} passes/step")


if __name__ == "__main__":
    main()
