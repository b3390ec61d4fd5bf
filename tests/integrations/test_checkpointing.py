"""Activation checkpointing inside the closure: the run is the plain model's.

``torch.utils.checkpoint`` recomputes a block's forward during backward, replaying the
random state it saved (dropout masks); the line search replays the random state for every
trial and evaluates trials under ``torch.no_grad()``. The two compose: both forms take
exactly the plain model's steps (the reentrant one, as in any training loop, where the
blocks' inputs require grad: the data here, an embedding's output in a transformer).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS


class Blocks(nn.Module):
    def __init__(self, checkpointed: str | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.2)) for _ in range(3)
        )
        self.head = nn.Linear(16, 1)
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointed is None:
                x = x + block(x)
            else:
                reentrant = self.checkpointed == "reentrant"
                x = x + checkpoint(block, x, use_reentrant=reentrant)
        return self.head(x)


def run(cls, checkpointed: str | None, steps: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Blocks(checkpointed)
    x, y = torch.randn(64, 16).requires_grad_(), torch.randn(64, 1)
    opt = cls(model.parameters())
    for i in range(steps):
        idx = slice(16 * (i % 4), 16 * (i % 4 + 1))
        opt.step(lambda idx=idx: nn.functional.mse_loss(model(x[idx]), y[idx]))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("checkpointed", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "cls",
    [ALSALS, ALSALS.paper, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "ALSALS.paper", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_checkpointed_model_takes_the_plain_models_steps(cls, checkpointed):
    plain = run(cls, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anything the run says is a failure, but
        # (the reentrant form warns in trials, under no_grad, that no input requires grad)
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
        checkpointed_run = run(cls, checkpointed)
    start = run(cls, None, steps=0)
    assert all((p - q).abs().max() > 1e-3 for p, q in zip(plain, start, strict=True))
    for p, q in zip(plain, checkpointed_run, strict=True):
        assert torch.equal(p, q)
