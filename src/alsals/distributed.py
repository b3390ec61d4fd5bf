"""Making every rank take the same line-search decision.

Under data parallelism each rank sees its own mini-batch, so each evaluates a different loss.
DDP already averages the gradients; the line search must also compare the *same* numbers on
every rank, or ranks accept different step sizes and their weights drift apart. All scalars
a decision depends on are averaged across ranks in one collective before they reach the host.
"""

from __future__ import annotations

import copy
import sys
import zlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

_Copied = TypeVar("_Copied")

_dtensor: list[ModuleType] = []  # DTensor's module, once found (a loaded module stays)


def _dtensor_module() -> ModuleType | None:
    """torch's module that holds ``DTensor`` where it is loaded, else ``None``: no DTensor
    exists before it is, and importing it (sympy and the symbolic-shape machinery, 0.6 s)
    is no cost of ``import alsals``. ``torch.distributed.tensor`` from torch 2.5; in 2.4
    that package exists without ``DTensor`` (the parent of ``.parallel``), which lives in
    ``torch.distributed._tensor``."""
    if not _dtensor:
        for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "DTensor"):
                _dtensor.append(module)
                break
    return _dtensor[0] if _dtensor else None


def local_shard(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameters, gradients, state); else ``t``."""
    module = _dtensor_module()
    return t.to_local() if module is not None and isinstance(t, module.DTensor) else t


def whole_value(t: Tensor) -> Tensor:
    """A DTensor's whole value as a plain tensor (a loss computed under tensor
    parallelism's ``loss_parallel``: replicated, or partial sums reduced); else ``t``."""
    module = _dtensor_module()
    return t.full_tensor() if module is not None and isinstance(t, module.DTensor) else t


def shard_count(p: Tensor) -> int:
    """Over how many ranks ``p`` is split: its local slope terms sum, not average. Every
    mesh dimension that does not replicate it splits it: ``Shard``, and the
    ``_StridedShard`` FSDP2 places over tensor parallelism's ``Shard`` of the same dimension
    (no subclass of ``Shard``, and its ``is_shard()`` is false)."""
    module = _dtensor_module()
    if module is None or not isinstance(p, module.DTensor):
        return 1
    count = 1
    for dim, placement in enumerate(p.placements):
        if not placement.is_replicate():
            count *= p.device_mesh.size(dim)
    return count


def check_meshes_span_group(params: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """A ``ValueError`` unless every DTensor parameter's device mesh is made of ranks of
    ``group`` and ``group`` holds a whole number of such meshes: a shard's slope terms count
    once per shard of the mesh and are averaged over ``group``, which gives the sum over all
    shards where ``group`` is the mesh's ranks or copies of the mesh (FSDP2 on one dimension
    of a larger mesh, the default group: each rank of the other dimensions holds the same
    parameter on its own copy of the submesh). A group of one replica's shards would leave
    the replicas to decide apart; a group of one shard's replicas would count that shard
    alone."""
    module = _dtensor_module()
    if not (dist.is_available() and dist.is_initialized()):
        return
    ranks: list[int] | None = None
    seen: set[int] = set()
    for p in params:
        if getattr(p, "_is_flat_param", False):  # (its shards have one shape on every rank)
            raise ValueError(
                "a parameter is an FSDP1 FlatParameter: each rank holds its own shard of it, "
                "and a line search moves every parameter to each trial on every rank (FSDP1 "
                "is not supported: use FSDP2's fully_shard, or DDP)"
            )
        if module is None or not isinstance(p, module.DTensor):
            continue
        partial = [str(q) for q in p.placements if q.is_partial()]
        if partial:  # (its local values are terms of a sum yet to be taken)
            raise ValueError(
                f"a parameter is a DTensor with a partial placement ({', '.join(partial)}): "
                "its local values are not its own; redistribute it to Shard or Replicate "
                "placements before building the optimizer"
            )
        if id(p.device_mesh) in seen:
            continue
        seen.add(id(p.device_mesh))
        if ranks is None:
            ranks = sorted(dist.get_process_group_ranks(group or dist.group.WORLD))
        mesh = sorted(p.device_mesh.mesh.flatten().tolist())
        if not set(mesh) <= set(ranks) or len(ranks) % len(mesh):
            raise ValueError(
                f"a parameter is a DTensor on a device mesh over ranks {mesh}, but the "
                f"optimizer's process_group holds ranks {ranks}: a sharded parameter's "
                "line search must average over its mesh's ranks, or over whole copies of "
                "its mesh (pass process_group=None, the default group, where the meshes "
                "span every rank, or a group of the mesh's ranks)"
            )


def checked_process_group(group: object) -> dist.ProcessGroup | None:
    """``group`` if it is a process group or ``None`` (the default group); else a
    ``TypeError`` naming ``process_group``."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"invalid process_group: {group!r} (expected a "
            "torch.distributed.ProcessGroup, or None for the default group)"
        )
    return group


def world_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks that share decisions; 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


#: What a rank's error says where the ranks' settings differ, and where their parameters do.
DIFFERENT_SETTINGS = (
    "{name}: the ranks of the process group hold different settings (the same arguments and "
    "parameter groups on every rank are needed, and a setting written between steps, an lr "
    "say, or a group added with add_param_group, must be written or added alike on every "
    "rank: every rank must take the same decisions)"
)
DIFFERENT_PARAMETERS = (
    "{name}: the ranks of the process group hold different parameters (their shapes "
    "differ): a line search moves every parameter to each trial on every rank, so every rank "
    "needs them all, as DDP's replicas or FSDP2's DTensors give them, and a group added with "
    "add_param_group must be added alike on every rank (torch's ZeroRedundancyOptimizer "
    "gives each rank a part: not supported)"
)


def settings_mark(name: str, groups: list[dict]) -> int:
    """A CRC of ``groups``' settings (all but the parameters) and of the optimizer's name:
    what every rank must hold alike. A tensor written as a setting counts by its values
    (its ``repr`` names its device, another on each rank, and rounds them)."""
    settings = [
        sorted(
            (k, repr(v.tolist() if isinstance(v, Tensor) else v))
            for k, v in g.items()
            if k not in ("params", "param_names")
        )
        for g in groups
    ]
    return zlib.crc32(repr([name, *settings]).encode())


def shapes_mark(groups: list[dict]) -> int:
    """A CRC of the parameters' shapes, group by group (a DTensor's shape is the whole
    parameter's, the same on every rank of its mesh)."""
    return zlib.crc32(repr([[tuple(p.shape) for p in g["params"]] for g in groups]).encode())


@dataclass(frozen=True)
class RankMarks:
    """The marks (:func:`settings_mark`, :func:`shapes_mark`) a step compares across the
    ranks inside the collective it issues anyway (``mean_to_host``), so that a setting
    written on some ranks only, between steps, is an error on every rank before their
    collectives pair wrongly (a hang) or their weights drift apart."""

    name: str
    settings: int
    shapes: int


def _mark_terms(marks: RankMarks) -> list[float]:
    """Each mark's two 16-bit halves ``h``, and their squares: summed over ranks (exact in
    float64 up to 2**21 ranks), ``n * sum(h^2) == sum(h)^2`` holds where all ranks hold the
    same ``h`` and nowhere else (Cauchy-Schwarz)."""
    halves = [marks.settings & 0xFFFF, marks.settings >> 16, marks.shapes & 0xFFFF]
    halves.append(marks.shapes >> 16)
    return [float(x) for h in halves for x in (h, h * h)]


def _check_mark_sums(sums: list[float], ranks: int, name: str) -> None:
    """A ``ValueError`` unless every rank held the same marks (:func:`_mark_terms`)."""
    agree = [ranks * round(sums[i + 1]) == round(sums[i]) ** 2 for i in range(0, len(sums), 2)]
    if not (agree[0] and agree[1]):
        raise ValueError(DIFFERENT_SETTINGS.format(name=name))
    if not (agree[2] and agree[3]):
        raise ValueError(DIFFERENT_PARAMETERS.format(name=name))


def mean_to_host(
    values: list[Tensor], group: dist.ProcessGroup | None, marks: RankMarks | None = None
) -> list[float]:
    """Average scalar tensors across ranks and bring them to the host in one synchronisation.

    The values are stacked in float64 so that the acceptance test sees the loss at float32
    precision or better, whatever precision the closure computed it in. With ``marks``,
    the same collective compares them across the ranks: a ``ValueError`` on every rank
    where they differ.
    """
    device = values[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    scalars = [whole_value(v.detach()).reshape(()).to(device=device, dtype=dtype) for v in values]
    ranks = world_size(group)
    if dtype != torch.float64 or ranks == 1:  # (the marks' squares are exact in float64 only)
        marks = None
    if marks is not None:  # (filled on the device: a copy from the host would wait for it)
        scalars += [torch.full((), t, dtype=dtype, device=device) for t in _mark_terms(marks)]
    stacked = torch.stack(scalars)
    if ranks == 1:
        return stacked.tolist()
    if dist.get_backend(group) == dist.Backend.NCCL and not stacked.is_cuda:
        stacked = stacked.cuda()
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    if marks is None:
        stacked /= ranks
        return stacked.tolist()
    sums = stacked.tolist()  # (one synchronisation: float64 divided on the host as on the device)
    _check_mark_sums(sums[len(values) :], ranks, marks.name)
    return [total / ranks for total in sums[: len(values)]]


def any_not_finite(
    tensors: list[Tensor], device: torch.device, group: dist.ProcessGroup | None
) -> bool:
    """Whether any of ``tensors``, on any rank of ``group``, holds an inf or a NaN: one
    collective, which every rank must issue (a rank without tensors too)."""
    flags = [torch.zeros((), device=device, dtype=torch.float64)]
    flags += [(~torch.isfinite(t).all()).to(device, torch.float64) for t in tensors]
    (found,) = mean_to_host([torch.stack(flags).sum()], group)
    return found > 0.0


def check_same_settings(
    name: str, groups: list[dict], group: dist.ProcessGroup | None, device: torch.device | None
) -> None:
    """Every rank of ``group`` holds the same settings and parameter shapes in its parameter
    groups: else a ``ValueError`` on every rank. A collective of its own, which a first step
    issues before anything else (the closure's too: ranks holding different groups would
    pair even the step's first collective wrongly), comparing the marks later steps compare
    in their first collective (:class:`RankMarks`). Nothing without ``torch.distributed``."""
    if world_size(group) == 1:
        return
    marks = RankMarks(name, settings_mark(name, groups), shapes_mark(groups))
    mean_to_host([torch.zeros((), dtype=torch.float64, device=device)], group, marks)


def mean_on_device(value: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The mean of a scalar tensor over the ranks, left on the device (no host sync)."""
    ranks = world_size(group)
    if ranks == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value / ranks


def copy_sharing_process_group(optimizer: _Copied, memo: dict[int, Any]) -> _Copied:
    """``copy.deepcopy`` of an optimizer whose ``_process_group`` the copy shares: a
    communicator is a handle to the ranks, neither copyable nor picklable."""
    clone = type(optimizer).__new__(type(optimizer))
    memo[id(optimizer)] = clone
    state = optimizer.__getstate__()  # type: ignore[attr-defined]
    group = state.pop("_process_group", None)
    clone.__setstate__(copy.deepcopy(state, memo))  # type: ignore[attr-defined]
    clone._process_group = group  # type: ignore[attr-defined]
    return clone
