"""examples/ddp_train.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Checks that the ranks end with identical weights after taking identical decisions, that
gradient accumulation through ``closure(backward=True)`` with ``no_sync`` all-reduces once
per step, and that the 2-rank run with 4 micro-batches per step follows the same
trajectory as one process training on the union of the ranks' batches, unaccumulated.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from alsals import ALSALS

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_train.py"
EPOCHS, BATCH, ACCUM, WORLD = 2, 32, 4, 2


def load_example():
    spec = importlib.util.spec_from_file_location("ddp_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(WORLD),
        "--standalone",  # the agent binds a free port itself: no race for one
        str(EXAMPLE),
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--accum", str(ACCUM),
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "epoch 1:" in result.stdout
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_keep_identical_weights(ranks):
    rank0, rank1 = ranks
    assert rank0["world"] == rank1["world"] == WORLD
    assert rank0["local_losses"] != rank1["local_losses"], "each rank must see its own shard"
    assert rank0["decisions"] == rank1["decisions"]
    assert any(trials > 1 for _, trials, _, _ in rank0["decisions"]), "backtracking happened"
    assert torch.equal(rank0["weights"], rank1["weights"])
    for (*_, mean_loss), a, b in zip(
        rank0["decisions"], rank0["local_losses"], rank1["local_losses"], strict=True
    ):
        assert mean_loss == pytest.approx((a + b) / 2, rel=1e-6)


def test_no_sync_accumulation_all_reduces_once_per_step(ranks):
    for rank in ranks:
        steps = rank["steps"]
        assert steps == EPOCHS * (512 // WORLD // BATCH)
        # one gradient bucket for this small model: one all-reduce per optimizer step, not
        # one per micro-batch (which would be ACCUM times as many)
        assert rank["allreduces"] == steps


def test_accumulated_ddp_run_matches_one_process_on_the_union_of_batches(ranks):
    """DDP averages gradients and the optimizer averages losses over ranks: the 2-rank run is
    one process minimising the mean loss over both ranks' batches."""
    example = load_example()
    dataset = example.make_dataset(seed=0)
    loaders = []
    for r in range(WORLD):
        sampler = DistributedSampler(
            dataset, num_replicas=WORLD, rank=r, shuffle=True, seed=0, drop_last=True
        )
        loaders.append((sampler, DataLoader(dataset, BATCH, sampler=sampler, drop_last=True)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 2))
    optimizer = ALSALS(model.parameters())
    decisions = []
    for epoch in range(EPOCHS):
        for sampler, _ in loaders:
            sampler.set_epoch(epoch)
        for batches in zip(*(loader for _, loader in loaders), strict=True):
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])

            def closure(x=x, y=y):
                return nn.functional.cross_entropy(model(x), y)

            optimizer.step(closure)
            decisions.append((optimizer.last_step.kind, optimizer.last_step.trials))
    reference = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert [d[:2] for d in ranks[0]["decisions"]] == decisions
    torch.testing.assert_close(ranks[0]["weights"], reference, rtol=1e-4, atol=1e-6)
