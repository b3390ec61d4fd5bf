"""Worker for test_fsdp: one rank of a 2-process FSDP2 (``fully_shard``) job on CPU/gloo.

    python -m torch.distributed.run --nproc_per_node 2 _fsdp_worker.py OUT_DIR
    python -m torch.distributed.run --nproc_per_node 4 _fsdp_worker.py OUT_DIR 2x2

Trains the same sharded model with ``torch.optim.AdamW`` (the control: FSDP2 itself works
here) and with each optimizer of ``OPTIMIZERS``, and saves per rank the full weights, the
decisions, and the error an optimizer raised, if any. Each rank draws its own data.

With a mesh shape (``2x2``) the mesh is 2-D, ``("replicate", "shard")``: HSDP, each
parameter ``(Replicate(), Shard(0))``, split over 2 ranks of 4 (the shard count is not the
world size). It then trains, in float64, AdamW and each optimizer of ``HSDP_OPTIMIZERS``
(``train``: per step, what ``last_step`` says and every value the optimizer averaged over
the ranks).
"""

from __future__ import annotations

import contextlib
import gc
import io
import sys
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import alsals.line_search
import alsals.schedule_free
from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.distributed import mean_to_host, shard_count

STEPS = 6
# the analytic slope sums over all shards: the part a sharded run must get right
OPTIMIZERS = {
    "MomentumALSALS": lambda params: MomentumALSALS(params, slope="analytic"),
    "SLS": lambda params: SLS(params),
    # clipping needs the gradient norm over all shards of all ranks
    "MomentumALSALS-clipped": lambda params: MomentumALSALS(
        params, slope="analytic", max_grad_norm=0.05
    ),
    # its two dot products and the gradient norm sum over shards; search_interval=2 takes
    # searches and reused steps, weight decay the weights' own shards
    "ALSALS": lambda params: ALSALS(
        params, weight_decay=0.01, initial_searches=2, search_interval=2
    ),
    "ALSALS-clipped": lambda params: ALSALS(
        params, max_grad_norm=0.05, initial_searches=2, search_interval=2
    ),
}


#: HSDP's optimizers (2-D mesh, float64): each sum over shards counted once per replica
HSDP_OPTIMIZERS = {
    name: OPTIMIZERS[name]
    for name in ("ALSALS", "ALSALS-clipped", "MomentumALSALS", "MomentumALSALS-clipped")
} | {"AdamSLS": lambda params: AdamSLS(params)}
HSDP_DTYPE = torch.float64


def build(mesh, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank
    # The last bias has one element: with 2 ranks, one of them holds an empty shard.
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(rank: int, step: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 8, generator=gen, dtype=dtype)
    return x, x[:, :3].sum(dim=1, keepdim=True)


def full_weights(model: nn.Module) -> torch.Tensor:
    """All weights, unsharded (DTensors gathered; plain tensors as they are)."""
    return torch.cat(
        [getattr(p, "full_tensor", p.detach)().detach().flatten() for p in model.parameters()]
    )


@contextlib.contextmanager
def recorded_means(log: list) -> Iterator[None]:
    """Each answer of ``mean_to_host`` in the optimizers' modules (the values averaged over
    the ranks, on which every decision rests) appended to ``log`` as (caller, values)."""
    modules = (alsals.line_search, alsals.schedule_free)

    def recording(values, group, marks=None):
        answer = mean_to_host(values, group, marks)
        log.append((sys._getframe(1).f_code.co_name, answer))
        return answer

    for module in modules:
        module.mean_to_host = recording
    try:
        yield
    finally:
        for module in modules:
            module.mean_to_host = mean_to_host


def train(model: nn.Module, optimizer, batches: Callable[[int], tuple]) -> dict:
    """``STEPS`` steps on ``batches(step)``: the full weights, ``last_step`` of each step
    and the values each step averaged over the ranks (``recorded_means``)."""
    steps, means = [], []
    for step in range(STEPS):
        x, y = batches(step)
        log: list = []
        with recorded_means(log):
            optimizer.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        i = optimizer.last_step
        steps.append((i.kind, i.trials, i.step_size, i.loss, i.slope, i.grad_norm, i.loss_decrease))
        means.append(log)
    return {"weights": full_weights(model), "steps": steps, "means": means}


def main(out: str, shape: tuple[int, ...] | None = None) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if shape is None:
        mesh = init_device_mesh("cpu", (world,))
        results = train_all(rank, world, mesh)
    else:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        results = train_hsdp(rank, world, mesh)
    torch.save(results, f"{out}/rank{rank}.pt")
    # The models (and the communication work they still reference) go while the process
    # group is alive: gloo work freed during interpreter shutdown can abort the process.
    gc.collect()
    dist.barrier()  # no rank tears gloo down while a peer still has a collective in flight
    dist.destroy_process_group()


def train_all(rank: int, world: int, mesh) -> dict:
    """AdamW, then each line search, on the sharded model: what this rank ended with."""
    results: dict = {"world": world}

    model = build(mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    results["adamw"] = full_weights(model)

    for name, make in OPTIMIZERS.items():
        model = build(mesh)
        results["sharded"] = [type(p).__name__ for p in model.parameters()]
        optimizer = make(model.parameters())
        decisions = []
        try:
            for step in range(STEPS):
                x, y = batch(rank, step)

                def closure(x=x, y=y, model=model):
                    return nn.functional.mse_loss(model(x), y)

                optimizer.step(closure)
                info = optimizer.last_step
                decisions.append((info.kind, info.trials, info.step_size))
            results[name] = {"weights": full_weights(model), "decisions": decisions}
        except Exception as error:  # noqa: BLE001 - recorded for the test to report
            results[name] = {
                "error": f"{type(error).__name__}: {error}".splitlines()[0],
                "traceback": traceback.format_exc(),
                "decisions": decisions,
            }
    # a process group of this rank alone, not the mesh's ranks: refused before a move
    alone = [dist.new_group([r]) for r in range(world)][rank]
    for cls in (ALSALS, MomentumALSALS):
        model = build(mesh)
        before = full_weights(model)
        optimizer = cls(model.parameters(), process_group=alone)
        x, y = batch(rank, 0)
        try:
            optimizer.step(lambda x=x, y=y, model=model: nn.functional.mse_loss(model(x), y))
            error = None
        except ValueError as err:
            error = str(err)
        results[f"alone-{cls.__name__}"] = {
            "error": error,
            "unmoved": torch.equal(before, full_weights(model)),
        }
    resumes = [(f"resume-{name}", name, None) for name in RESUMED]
    resumes += [(f"dcp-{name}-{flat}", name, flat) for name in RESUMED for flat in (True, False)]
    for key, name, flatten in resumes:
        try:
            results[key] = resume(rank, mesh, OPTIMIZERS[name], flatten)
        except Exception as error:  # noqa: BLE001 - recorded for the test to report
            results[key] = {
                "error": f"{type(error).__name__}: {error}".splitlines()[0],
                "traceback": traceback.format_exc(),
            }
    return results


def train_hsdp(rank: int, world: int, mesh) -> dict:
    """AdamW, then each optimizer of ``HSDP_OPTIMIZERS``, on the model sharded over the
    2-D mesh, in float64: what this rank ended with (``train``'s record)."""
    model = build(mesh, HSDP_DTYPE)
    results: dict = {
        "world": world,
        "mesh": tuple(mesh.shape),
        "params": [
            (type(p).__name__, tuple(map(repr, p.placements)), shard_count(p))
            for p in model.parameters()
        ],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y = batch(rank, step, HSDP_DTYPE)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    results["adamw"] = full_weights(model)
    for name, make in HSDP_OPTIMIZERS.items():
        model = build(mesh, HSDP_DTYPE)
        try:
            results[name] = train(
                model, make(model.parameters()), lambda step: batch(rank, step, HSDP_DTYPE)
            )
        except Exception as error:  # noqa: BLE001 - recorded for the test to report
            results[name] = {
                "error": f"{type(error).__name__}: {error}".splitlines()[0],
                "traceback": traceback.format_exc(),
            }
    # tensor parallelism over the mesh's second dimension, FSDP2 over its first: the first
    # layer's weight is (_StridedShard(0), Shard(0)), split over all 4 ranks; the two ranks
    # of a tensor-parallel pair see the same batch (that of their data-parallel index)
    data_rank = mesh["replicate"].get_local_rank()
    for name in TP_OPTIMIZERS:
        model = build_tensor_parallel(mesh)
        results[f"tp-{name}-placements"] = [
            (tuple(map(repr, p.placements)), shard_count(p)) for p in model.parameters()
        ]
        try:
            results[f"tp-{name}"] = train(
                model,
                HSDP_OPTIMIZERS[name](model.parameters()),
                lambda step: batch(data_rank, step, HSDP_DTYPE),
            )
        except Exception as error:  # noqa: BLE001 - recorded for the test to report
            results[f"tp-{name}"] = {
                "error": f"{type(error).__name__}: {error}".splitlines()[0],
                "traceback": traceback.format_exc(),
            }
    return results


#: the optimizers run with tensor parallelism + FSDP2 on the 2-D mesh
TP_OPTIMIZERS = ("ALSALS", "MomentumALSALS")


def build_tensor_parallel(mesh) -> nn.Module:
    """The model of ``build``, its layers column- then row-wise parallel over the mesh's
    second dimension and sharded by FSDP2 over its first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(HSDP_DTYPE)
    parallelize_module(model, mesh["shard"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["replicate"])
    fully_shard(model, mesh=mesh["replicate"])
    return model


#: the optimizers resumed mid-run from a checkpoint of the sharded model and optimizer
RESUMED = ("ALSALS", "MomentumALSALS")


def resume(rank: int, mesh, make, flatten: bool | None = None) -> dict:
    """STEPS steps straight, and the same run checkpointed after STEPS // 2 steps (each rank
    its shards: the sharded model's and optimizer's state dicts, through torch.save; with
    ``flatten`` not None, through torch.distributed.checkpoint's get_state_dict /
    set_state_dict, flattened or nested) and resumed into a fresh sharded model and
    optimizer: the full weights of both."""

    def run(model, optimizer, steps) -> None:
        for step in steps:
            x, y = batch(rank, step)
            optimizer.step(lambda x=x, y=y, model=model: nn.functional.mse_loss(model(x), y))

    model = build(mesh)
    optimizer = make(model.parameters())
    run(model, optimizer, range(STEPS // 2))
    options = None
    if flatten is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    saved = io.BytesIO()
    torch.save({"model": model_state, "optimizer": optimizer_state}, saved)
    run(model, optimizer, range(STEPS // 2, STEPS))
    straight = full_weights(model)

    fresh = build(mesh)
    resumed = make(fresh.parameters())
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    if options is not None:
        set_state_dict(
            fresh,
            resumed,
            model_state_dict=checkpoint["model"],
            optim_state_dict=checkpoint["optimizer"],
            options=options,
        )
    else:
        fresh.load_state_dict(checkpoint["model"])
        resumed.load_state_dict(checkpoint["optimizer"])
    run(fresh, resumed, range(STEPS // 2, STEPS))
    return {"straight": straight, "resumed": full_weights(fresh)}


if __name__ == "__main__":
    main(sys.argv[1], tuple(map(int, sys.argv[2].split("x"))) if len(sys.argv) > 2 else None)
