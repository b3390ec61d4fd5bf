"""The models the step-cost benchmark times: one model, its loss and fixed synthetic batches.

The CNN is the benchmark's own ResNet (``alsals_bench.models.resnet``, CIFAR stem, one basic
block per stage) and the language models its GPT-2 (``alsals_bench.models.gpt2``); the MLP
is built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alsals_bench.models import BasicBlock, ResNet, gpt2_lm

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclass
class Workload:
    """One model, its loss, and a fixed sequence of synthetic batches."""

    model: nn.Module
    loss: LossFn
    batches: list[Batch]
    description: str

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _labelled(shape: Sequence[int], classes: int, n_batches: int, gen: torch.Generator):
    """``n_batches`` of random inputs of ``shape`` (batch first) with random class labels."""
    return [
        (
            torch.randn(*shape, generator=gen),
            torch.randint(0, classes, (shape[0],), generator=gen),
        )
        for _ in range(n_batches)
    ]


def _mlp(widths: Sequence[int], batch: int, n_batches: int, gen: torch.Generator) -> Workload:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    batches = _labelled((batch, widths[0]), widths[-1], n_batches, gen)
    shape = "-".join(str(w) for w in widths)
    return Workload(
        nn.Sequential(*layers), _cross_entropy, batches, f"MLP {shape}, ReLU, batch {batch}"
    )


def _cnn(
    channels: Sequence[int], size: int, batch: int, n_batches: int, gen: torch.Generator
) -> Workload:
    model = ResNet(BasicBlock, [1] * len(channels), channels, 10, stem="cifar")
    batches = _labelled((batch, 3, size, size), 10, n_batches, gen)
    desc = (
        f"ResNet, basic blocks {'/'.join(map(str, channels))} channels, BatchNorm, "
        f"3x{size}x{size}, batch {batch}"
    )
    return Workload(model, _cross_entropy, batches, desc)


def _gpt2_loss(model: nn.Module, batch: Batch) -> Tensor:
    (ids,) = batch
    return model(input_ids=ids, labels=ids).loss


def _gpt2(
    size: str,
    vocab: int,
    ctx: int,
    batch: int,
    n_batches: int,
    gen: torch.Generator,
    **overrides: Any,
) -> Workload:
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = gpt2_lm(size, vocab_size=vocab, n_positions=ctx, **overrides)
    c = model.config
    batches = [(torch.randint(0, vocab, (batch, ctx), generator=gen),) for _ in range(n_batches)]
    desc = (
        f"GPT-2 (transformers GPT2LMHeadModel), {c.n_layer} layers, {c.n_head} heads, "
        f"width {c.n_embd}, vocab {vocab}, context {ctx}, batch {batch}, dropout {c.resid_pdrop}"
    )
    return Workload(model, _gpt2_loss, batches, desc)


N_BATCHES = 8  # distinct batches, cycled

MODELS: dict[str, Callable[[torch.Generator], Workload]] = {
    "mlp": lambda g: _mlp([784, 1024, 1024, 10], 128, N_BATCHES, g),
    "cnn": lambda g: _cnn([16, 32, 64], 32, 32, N_BATCHES, g),
    "gpt2": lambda g: _gpt2("mini", 8192, 128, 4, N_BATCHES, g, n_embd=256),
    "gpt2-124m": lambda g: _gpt2("124M", 50257, 1024, 8, N_BATCHES, g),
    # Many small tensors (24 layers of width 32: 292 tensors, 0.3M parameters): where the
    # optimizer's cost per tensor, not per parameter, shows.
    "gpt2-deep": lambda g: _gpt2("mini", 512, 32, 4, N_BATCHES, g, n_layer=24, n_embd=32),
    # Small stand-ins for the smoke test.
    "mlp-tiny": lambda g: _mlp([16, 32, 4], 8, 3, g),
    "cnn-tiny": lambda g: _cnn([4, 8], 8, 4, 3, g),
    "gpt2-tiny": lambda g: _gpt2("tiny", 64, 8, 2, 3, g, n_embd=16),
}
# Defaults per model: (timed steps per repeat, warm-up steps, repeats). A full default run of
# the three CPU models takes about 10 minutes on one core of a busy 2-core machine. Timed steps
# are a multiple of 10 so that every window holds whole periods of the adaptive cadence.
RUN_LENGTHS: dict[str, tuple[int, int, int]] = {
    "mlp": (10, 60, 10),
    "cnn": (10, 40, 8),
    "gpt2": (10, 30, 5),
    "gpt2-124m": (10, 60, 7),
    "gpt2-deep": (10, 30, 7),
}
DEFAULT_MODELS = ("mlp", "cnn", "gpt2")
