"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes.

torch supports FSDP2 on CPU here: the control run (AdamW) trains a sharded model and the
ranks agree. FSDP2 parameters, gradients and optimizer state are DTensors; the core works on
their local shards (``to_local``), leaves empty shards out of the gradient check, and sums
the analytic slope over shards. The line search on the sharded model must match one
process training the unsharded model on the union of the ranks' batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).resolve().parent / "_fsdp_worker.py"
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("fsdp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--standalone",  # the agent binds a free port itself: no race for one
        str(WORKER), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference(name: str) -> tuple[torch.Tensor, list]:
    """One process, unsharded, on the union of the ranks' batches (the mean of their losses)."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _fsdp_worker as worker
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = worker.OPTIMIZERS[name](model.parameters())
    decisions = []
    for step in range(worker.STEPS):
        xs, ys = zip(*(worker.batch(r, step) for r in range(WORLD)), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        optimizer.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        info = optimizer.last_step
        decisions.append((info.kind, info.trials, info.step_size))
        if name.endswith("clipped"):
            assert info.grad_norm > optimizer.defaults["max_grad_norm"], "clipping must act"
    return torch.cat([p.detach().flatten() for p in model.parameters()]), decisions


def test_fsdp2_itself_trains_on_cpu_with_gloo(ranks):
    rank0, rank1 = ranks
    assert rank0["world"] == WORLD
    assert set(rank0["sharded"]) == {"DTensor"}, "fully_shard must have sharded every parameter"
    assert torch.equal(rank0["adamw"], rank1["adamw"])


NAMES = ["MomentumALSALS", "SLS", "MomentumALSALS-clipped", "ALSALS", "ALSALS-clipped"]


@pytest.mark.parametrize("name", NAMES)
def test_line_search_on_fsdp2_matches_the_unsharded_run(ranks, name):
    rank0, rank1 = (rank[name] for rank in ranks)
    assert "error" not in rank0 and "error" not in rank1, (
        rank0.get("error"),
        rank1.get("error"),
    )
    assert rank0["decisions"] == rank1["decisions"]
    assert torch.equal(rank0["weights"], rank1["weights"])
    weights, decisions = reference(name)
    assert [d[:2] for d in rank0["decisions"]] == [d[:2] for d in decisions]
    if name.startswith("ScheduleFree"):
        assert {d[0] for d in decisions} >= {"search", "reuse"}
    torch.testing.assert_close(rank0["weights"], weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ALSALS", "MomentumALSALS"])
def test_a_sharded_run_resumed_from_a_mid_run_checkpoint_continues_bit_for_bit(ranks, name):
    """Model and optimizer state dicts of the sharded run (each rank its shards), saved
    mid-run and loaded into a fresh sharded model and optimizer: the resumed run ends on
    the uninterrupted run's weights exactly, on every rank."""
    for rank in ranks:
        result = rank[f"resume-{name}"]
        assert "error" not in result, result.get("traceback")
        assert torch.equal(result["straight"], result["resumed"])
    assert torch.equal(
        ranks[0][f"resume-{name}"]["straight"], ranks[1][f"resume-{name}"]["straight"]
    )


@pytest.mark.parametrize("flatten", [True, False], ids=["flattened", "nested"])
@pytest.mark.parametrize("name", ["ALSALS", "MomentumALSALS"])
def test_a_sharded_run_checkpointed_through_distributed_checkpoint_goes_on_bit_for_bit(
    ranks, name, flatten
):
    """The same through torch.distributed.checkpoint's get_state_dict / set_state_dict
    (torchtitan's way; flattened, its default there, or nested): the helpers create the
    fresh optimizer's state by a step without closure before loading into it, which the
    optimizers answer with placeholders (before 0.2.10 the flattened load restored
    nothing)."""
    for rank in ranks:
        result = rank[f"dcp-{name}-{flatten}"]
        assert "error" not in result, result.get("traceback")
        assert torch.equal(result["straight"], result["resumed"])
