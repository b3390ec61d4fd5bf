"""What the Polyak cap (``loss_floor``) adds to a step that reuses its step size, measured.

``MomentumALSALS(params)`` against ``MomentumALSALS(params, loss_floor=None)`` on the step-cost benchmark's
CPU models (``alsals_bench.speed.workloads``: an MLP 784-1024-1024-10, a small ResNet, a
2-layer GPT-2) and two small models where the optimizer's share of the step is largest (the
tabular check's MLP 40-256-256-5 at batch 64, and 38 layers of width 64 with LayerNorm at
batch 32: 52 parameter tensors). After 5 steps (one search, then reuses), 20 reuse steps are
timed per repeat from the same snapshot, the two configurations interleaved, in CPU time
of one thread (subnormals flushed); printed:
the medians over repeats and their ratio.

    python benchmarks/scripts/cap_cost.py          # about 3 minutes
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from alsals import MomentumALSALS
from alsals_bench.speed.workloads import MODELS

REPEATS, WARMUP, TIMED = 9, 5, 20


def small(widths: list[int], batch: int, norm: bool) -> tuple[nn.Module, Callable]:
    gen = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), *([nn.LayerNorm(b)] if norm else []), nn.GELU()]
    model = nn.Sequential(*layers[: -2 if norm else -1])
    x = torch.randn(batch, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (batch,), generator=gen)
    return model, lambda m, step: nn.functional.cross_entropy(m(x), y)


def workload(name: str) -> tuple[nn.Module, Callable]:
    wl = MODELS[name](torch.Generator().manual_seed(0))
    return wl.model, lambda m, step: wl.loss(m, wl.batches[step % len(wl.batches)])


CASES: dict[str, Callable[[], tuple[nn.Module, Callable]]] = {
    "mlp (speed)": lambda: workload("mlp"),
    "cnn (speed)": lambda: workload("cnn"),
    "gpt2 (speed)": lambda: workload("gpt2"),
    "MLP 40-256-256-5": lambda: small([40, 256, 256, 5], 64, norm=False),
    "38 layers of 64": lambda: small([32, *[64] * 26, 4], 32, norm=True),
}


def reuse_step_times(model: nn.Module, loss: Callable[[nn.Module, int], Tensor]) -> list[float]:
    """The median CPU time of a reuse step, with the cap and without; every repeat times the
    same steps from the same snapshot (weights, optimizer and random state)."""
    snapshots = {}
    for capped in (True, False):
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        m.train()
        options = {} if capped else {"loss_floor": None}
        opt = MomentumALSALS(m.parameters(), search_interval=10**9, **options)  # one search only
        for step in range(WARMUP):
            opt.step(lambda m=m, step=step: loss(m, step))
        snapshots[capped] = (m, opt)
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(REPEATS):
        for capped in (True, False) if repeat % 2 else (False, True):
            m, opt = copy.deepcopy(snapshots[capped])
            torch.manual_seed(repeat)
            start = time.process_time()
            for step in range(TIMED):
                opt.step(lambda m=m, step=step: loss(m, step))
            times[capped].append((time.process_time() - start) / TIMED * 1e3)
            assert opt.last_step.kind == "reuse"
    return [statistics.median(times[c]) for c in (True, False)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()  # no options: --help says what the script measures, and exits
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # a subnormal weight would time the CPU, not the step
    warnings.simplefilter("ignore")
    print("| model | reuse step, loss_floor=0 (ms) | loss_floor=None (ms) | ratio |")
    print("|---|---|---|---|")
    for name, make in CASES.items():
        capped, free = reuse_step_times(*make())
        print(f"| {name} | {capped:.2f} | {free:.2f} | {capped / free:.2f}x |")


if __name__ == "__main__":
    main()
