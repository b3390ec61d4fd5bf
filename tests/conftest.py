"""Shared fixtures: the optimizer table and small deterministic problems."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alsals import PAPER_ALSALS, SLS, AdamSLS, MomentumALSALS


class PaperALSALS(MomentumALSALS):
    """MomentumALSALS in the paper's exact configuration (``MomentumALSALS.paper``), as a class."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{**PAPER_ALSALS, **kwargs})


#: Every configuration a property must hold for: the paper's three and MomentumALSALS's defaults.
OPTIMIZERS = [SLS, AdamSLS, PaperALSALS, MomentumALSALS]
OPTIMIZER_IDS = ["SLS", "AdamSLS", "MomentumALSALS-paper", "MomentumALSALS"]
#: The paper's configurations: a search every step, starting at eta 2^(1/b) (the tests of
#: those mechanics).
PAPER = [SLS, AdamSLS, PaperALSALS]
PAPER_IDS = ["SLS", "AdamSLS", "MomentumALSALS-paper"]


@pytest.fixture(params=OPTIMIZERS, ids=OPTIMIZER_IDS)
def optimizer_class(request):
    return request.param


@pytest.fixture
def buffer_watch(monkeypatch):
    """The unprotected-buffer watch switched on: it stays off in a process where
    torch.compile ran (a global module hook would make compiled models recompile), and the
    compile tests may have run before."""
    import alsals.closure

    monkeypatch.setattr(alsals.closure, "_compiled_anything", lambda: False)


@pytest.fixture(params=PAPER, ids=PAPER_IDS)
def paper_class(request):
    """The paper's three configurations: for the mechanics of a search every step."""
    return request.param


def make_classification(n: int = 128, features: int = 8, seed: int = 0):
    """A fixed, linearly separable-ish binary classification set."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, generator=gen)
    y = (x @ w + 0.3 * torch.randn(n, generator=gen) > 0).float()
    return x, y


class SmallNet(nn.Module):
    """An MLP with dropout and BatchNorm: randomness and buffers in one forward pass."""

    def __init__(self, features: int = 8, hidden: int = 16, dropout: float = 0.3):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))))).squeeze(-1)


def bce_closure(model, x, y):
    def closure():
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    return closure


def assert_bitwise_same(a: object, b: object, where: str = "") -> None:
    """Equal bit for bit: tensors by ``torch.equal`` (and dtype), floats exactly (NaN equal
    to NaN), containers entry by entry."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        same = torch.equal(a, b) or (
            a.is_floating_point()
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
        assert same, where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            assert_bitwise_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_same(x, y, f"{where}[{index}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, (where, a, b)
