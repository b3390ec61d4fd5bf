"""Where fashion-resnet's accuracy goes: BatchNorm's running statistics or the weights.

Trains the quick budget of ``fashion-resnet`` (a ResNet-8 with BatchNorm, 400 steps of 64)
with ``MomentumALSALS(params)`` and with tuned Adam (``adam@0.003``, the grid's best rate), as the
benchmark does (the same batches and initialisation: the accuracies at steps 100-400 are
those of the stored runs), and evaluates every ``--every`` steps twice at the same weights:
with the running statistics the training forwards left (the benchmark's metric), and with
statistics recomputed on ``--batches`` training batches at those weights (a cumulative
average, as ``torch.optim.swa_utils.update_bn`` does; the batches come from a stream of
their own, so training is not disturbed). Needs the fashion-mnist data
(``alsals-bench fetch``).

    python benchmarks/scripts/batchnorm_statistics.py      # about 15 minutes on one core
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from torch import nn

from alsals import MomentumALSALS
from alsals_bench.tasks.fashion_resnet import FashionResNet

OPTIMIZERS = ("alsals-recommended", "adam@0.003")


def recomputed(model: nn.Module, next_batch, batches: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the average over ``batches``
    training batches at its current weights."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    copied.train()
    with torch.no_grad():
        for _ in range(batches):
            x, _ = next_batch()
            copied(x)
    return copied


def train(name: str, seed: int, every: int, batches: int) -> list[tuple[int, float, float]]:
    task = FashionResNet()
    budget = task.budgets["quick"]
    run = task.setup(seed, budget, torch.device("cpu"))
    calibration = task.setup(seed + 100, budget, torch.device("cpu"))  # its own stream
    model = run.model
    if name == "alsals-recommended":
        optimizer = MomentumALSALS(model.parameters(), buffers=model.buffers())
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=float(name.split("@")[1]))
    rows = []
    for step in range(1, budget.steps + 1):
        batch = run.next_batch()
        if isinstance(optimizer, MomentumALSALS):
            optimizer.step(lambda batch=batch: run.loss(model, batch))
        else:
            optimizer.zero_grad()
            run.loss(model, batch).backward()
            optimizer.step()
        if step % every == 0:
            running = run.evaluate(model)["accuracy"]
            model.train()
            fresh = run.evaluate(recomputed(model, calibration.next_batch, batches))["accuracy"]
            rows.append((step, running, fresh))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--batches", type=int, default=20, help="batches for the statistics")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    print("accuracy with running / recomputed BatchNorm statistics")
    for name in OPTIMIZERS:
        peaks, finals = [], []
        for seed in seeds:
            rows = train(name, seed, args.every, args.batches)
            cells = " ".join(f"{s}:{a:.3f}/{b:.3f}" for s, a, b in rows)
            print(f"{name} seed {seed}: {cells}", flush=True)
            peaks.append((max(r[1] for r in rows), max(r[2] for r in rows)))
            finals.append(rows[-1][1:])
        mean = statistics.fmean
        print(
            f"{name}: peak {mean(p[0] for p in peaks):.3f} / {mean(p[1] for p in peaks):.3f}, "
            f"last {mean(f[0] for f in finals):.3f} / {mean(f[1] for f in finals):.3f} "
            f"(mean over seeds {args.seeds})",
            flush=True,
        )


if __name__ == "__main__":
    main()
