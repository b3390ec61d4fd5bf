"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes.

torch supports FSDP2 on CPU here: the control run (AdamW) trains a sharded model and the
ranks agree. FSDP2 parameters, gradients and optimizer state are DTensors; the core works on
their local shards (``to_local``), leaves empty shards out of the gradient check, and sums
the analytic slope over shards. The line search on the sharded model must match one
process training the unsharded model on the union of the ranks' batches.

HSDP (a 2-D mesh, 4 processes: 2 replicas of 2 shards) too, in float64: there a parameter is
split over 2 ranks while the optimizer averages over 4, so each shard's sums count twice on
each rank and the mean over the 4 ranks is the sum over one replica's shards.
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


def launch(out: Path, world: int, *args: str) -> list[dict]:
    """The worker on ``world`` processes (torchrun): what each rank saved."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--standalone",  # the agent binds a free port itself: no race for one
        str(WORKER), str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fsdp"), WORLD)


def worker_module():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _fsdp_worker as worker
    finally:
        sys.path.pop(0)
    return worker


def reference(name: str) -> tuple[torch.Tensor, list]:
    """One process, unsharded, on the union of the ranks' batches (the mean of their losses)."""
    worker = worker_module()
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
def test_a_process_group_that_is_not_the_mesh_s_ranks_is_refused_before_a_move(ranks, name):
    """Each rank's own group of one: its shard's slope terms would count as the whole
    gradient's and the ranks would decide apart, silently."""
    for rank, result in enumerate(ranks):
        outcome = result[f"alone-{name}"]
        assert outcome["unmoved"]
        assert outcome["error"] is not None, "the mismatch went unnoticed"
        assert (
            f"over ranks [0, 1], but the optimizer's process_group holds ranks [{rank}]"
            in (outcome["error"])
        )


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


# -- HSDP: a 2-D mesh, (Replicate(), Shard(0)) ------------------------------------------------

HSDP_MESH = (2, 2)  # (replicate, shard)
HSDP_WORLD = HSDP_MESH[0] * HSDP_MESH[1]


@pytest.fixture(scope="module")
def hsdp_ranks(tmp_path_factory):
    """4 ranks, each parameter split over the 2 of its replica: the shard count (2) is not
    the world size (4), over which the optimizers average."""
    return launch(tmp_path_factory.mktemp("hsdp"), HSDP_WORLD, "x".join(map(str, HSDP_MESH)))


def hsdp_reference(name: str) -> dict:
    """One process, unsharded, in float64, on the union of the 4 ranks' batches."""
    worker = worker_module()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(worker.HSDP_DTYPE)

    def batches(step):
        xs, ys = zip(
            *(worker.batch(r, step, worker.HSDP_DTYPE) for r in range(HSDP_WORLD)), strict=True
        )
        return torch.cat(xs), torch.cat(ys)

    return worker.train(model, worker.HSDP_OPTIMIZERS[name](model.parameters()), batches)


HSDP_NAMES = ["ALSALS", "ALSALS-clipped", "MomentumALSALS", "MomentumALSALS-clipped", "AdamSLS"]


@pytest.mark.slow  # 4 processes
def test_hsdp_itself_trains_on_cpu_with_gloo(hsdp_ranks):
    for rank in hsdp_ranks:
        assert rank["world"] == HSDP_WORLD and rank["mesh"] == HSDP_MESH
        # every parameter split over the 2 ranks of its replica: shard count 2, world 4
        assert set(rank["params"]) == {("DTensor", ("Replicate()", "Shard(dim=0)"), 2)}
        assert torch.equal(rank["adamw"], hsdp_ranks[0]["adamw"])


def _floats(steps: list) -> torch.Tensor:
    """step_size, loss, slope, grad_norm, loss_decrease of each step."""
    return torch.tensor([s[2:] for s in steps], dtype=torch.float64)


def global_values(log: list) -> torch.Tensor:
    """The values of a step's ``recorded_means`` log that are global quantities: all but the
    largest gradient entry in the line searches' first average (``_check``), a mean of the
    ranks' own largest entries (a test for 0 and for finiteness alone)."""
    values = [v for _, answer in log for v in answer]
    callers = [caller for caller, _ in log]
    if "_check" in callers:
        largest = sum(len(answer) for _, answer in log[: callers.index("_check")]) + 1
        assert values.pop(largest) > 0.0
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.slow  # 4 processes
@pytest.mark.parametrize("name", HSDP_NAMES)
def test_line_search_on_hsdp_decides_alike_on_every_rank_and_as_one_process(hsdp_ranks, name):
    """Every rank takes the same decisions from the same averaged values and ends on the same
    weights (bit for bit: both replicas of each shard move alike); these equal those of one
    process on the union of the batches in float64 up to rounding (the sums are grouped
    differently: per shard, then over ranks): the step sizes, the slopes (``last_step`` and
    every value the optimizer averaged over the ranks: ALSALS's g . (y - z) and g . u, the
    gradient norm, the Polyak cap's sums), the weights."""
    results = [rank[name] for rank in hsdp_ranks]
    for result in results:
        assert "error" not in result, result.get("traceback")
    first = results[0]
    for result in results[1:]:  # (exactly: repr writes each float's bits, nan as nan)
        assert repr(result["steps"]) == repr(first["steps"])
        assert repr(result["means"]) == repr(first["means"])
        assert torch.equal(result["weights"], first["weights"])

    single = hsdp_reference(name)
    assert [s[:2] for s in first["steps"]] == [s[:2] for s in single["steps"]]
    torch.testing.assert_close(
        _floats(first["steps"]), _floats(single["steps"]), rtol=1e-9, atol=1e-12, equal_nan=True
    )
    kinds = {s[0] for s in single["steps"]}
    if name.startswith("ALSALS"):
        assert kinds >= {"search", "reuse"}
    else:
        assert not torch.isnan(_floats(single["steps"])[:, 2]).any(), "a slope at each step"
    if name.endswith("clipped"):
        assert any(s[5] > 0.05 for s in single["steps"]), "clipping must act"

    for sharded, alone in zip(first["means"], single["means"], strict=True):
        callers = [caller for caller, _ in sharded]
        assert callers == [caller for caller, _ in alone]
        if name.startswith("ALSALS"):  # its slopes: g . (y - z) and g . u, after 5 others
            sums = next(answer for caller, answer in sharded if caller == "_run")
            assert len(sums) == 7 and sums[2] == 1.0 and sums[6] != 0.0
        else:
            assert "_check" in callers
        torch.testing.assert_close(
            global_values(sharded), global_values(alone), rtol=1e-9, atol=1e-12
        )
    torch.testing.assert_close(first["weights"], single["weights"], rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # 4 processes
@pytest.mark.parametrize("name", ["ALSALS", "MomentumALSALS"])
def test_tensor_parallel_with_fsdp2_decides_as_one_process(hsdp_ranks, name):
    """FSDP2 over tensor parallelism shards the first layer's dimension 0 twice:
    ``(_StridedShard(0), Shard(0))``, which is no ``Shard`` (and whose ``is_shard()`` is
    false). Counted as one shard of 2 instead of 4, its slope terms were halved and the
    searches accepted larger steps than one process (0.1 against 0.08 at the first)."""
    worker = worker_module()
    placements = hsdp_ranks[0][f"tp-{name}-placements"]
    assert [count for _, count in placements] == [4, 4, 4, 2], placements
    assert "_StridedShard" in placements[0][0][0]
    runs = [rank[f"tp-{name}"] for rank in hsdp_ranks]
    assert all("error" not in run for run in runs), runs[0].get("traceback")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(worker.HSDP_DTYPE)

    def batches(step):  # the union of the two data-parallel indices' batches
        xs, ys = zip(*(worker.batch(r, step, worker.HSDP_DTYPE) for r in range(2)), strict=True)
        return torch.cat(xs), torch.cat(ys)

    one = worker.train(model, worker.HSDP_OPTIMIZERS[name](model.parameters()), batches)
    for run in runs:
        assert [s[:2] for s in run["steps"]] == [s[:2] for s in one["steps"]]
        torch.testing.assert_close(
            _floats(run["steps"]), _floats(one["steps"]), rtol=1e-9, atol=0, equal_nan=True
        )
        torch.testing.assert_close(run["weights"], one["weights"], rtol=1e-9, atol=1e-12)
