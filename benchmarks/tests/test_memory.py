"""The memory tracker of the step-cost benchmark and the library's cost tests."""

from __future__ import annotations

import torch
from torch import nn

from alsals import MomentumALSALS
from alsals_bench.memory import LiveStorage, state_bytes


def test_memory_tracker_counts_gradients_and_temporaries():
    model = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    tracker = LiveStorage()
    with tracker:
        model(x).square().sum().backward()
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert tracker.live >= grad_bytes  # the gradients are still alive after backward
    assert tracker.peak >= grad_bytes + 16 * 32 * 4

    # State replaced by a new tensor each step (as SaLSa does) is counted once.
    state = {"v": torch.zeros(1000)}
    tracker = LiveStorage()
    tracker.adopt(state)
    with tracker:
        for _ in range(3):
            state["v"] = state["v"] * 0.9 + 1.0
    assert tracker.live == 4000
    assert tracker.peak <= 3 * 4000  # old, temporary and new at most

    optimizer = MomentumALSALS(model.parameters())
    assert state_bytes(optimizer) == 0
    optimizer.step(lambda: model(x).square().mean())
    assert state_bytes(optimizer) == 2 * grad_bytes  # exp_avg and exp_avg_sq


def test_tracker_records_host_syncs_and_can_pause():
    x = torch.randn(100)
    tracker = LiveStorage()
    with tracker:
        y = x * 2.0
        y.sum().item()
        with tracker.paused():
            z = x + 1.0
    assert tracker.ops == ["aten::mul", "aten::sum", "aten::_local_scalar_dense"]
    assert tracker.syncs == ["aten::_local_scalar_dense"]
    assert tracker.live == y.untyped_storage().nbytes() and z.numel() == 100
