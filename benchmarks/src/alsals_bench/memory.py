"""What a step allocates: tensor storages alive and their peak, seen from the operators.

``LiveStorage`` is a ``TorchDispatchMode``: every storage an operator allocates while the mode
is active is counted as alive until it is freed, and the peak of the bytes alive is kept
(with the operator whose output set it). ``adopt`` counts tensors that exist already
(weights, optimizer state) the same way. It also records the operators it sees, and among
them those that wait for the device (``.item()``, ``bool(tensor)``): the step-cost benchmark
(``alsals-bench speed``) measures peak memory with it, and the library's tests check the
optimizers' memory, host synchronisations and multi-tensor kernels with it.

Storages, not tensors, are tracked: a gradient is stored through a detached alias of the
backward's output, which outlives the output tensor itself. Adopting the optimizer state
counts an optimizer that replaces its state tensors each step (SaLSa) once, not twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Operators that copy a value to the host and so wait for the device.
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"})


class LiveStorage(TorchDispatchMode):
    """Bytes of tensor storages alive (``live``) and their peak (``peak``, reached in
    ``peak_op``); the operators seen (``ops``) and the host synchronisations among them
    (``syncs``). ``paused()`` stops counting new allocations (frees are still counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""  # the operator whose output set the peak
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self.tracking = True
        self._alive: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._alive.discard(ptr)
        self.live -= nbytes

    def _track(self, storage: torch.UntypedStorage) -> bool:
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._alive:
            return False
        nbytes = storage.nbytes()
        self._alive.add(ptr)
        self.live += nbytes
        weakref.finalize(storage, self._free, ptr, nbytes)
        return True

    def adopt(self, obj: Any) -> None:
        """Count the tensors in ``obj`` (nested dicts, lists, tuples) as alive until freed."""
        if isinstance(obj, Tensor):
            self._track(obj.untyped_storage())
        elif isinstance(obj, dict):
            for value in obj.values():
                self.adopt(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self.adopt(value)
        self.peak = max(self.peak, self.live)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Allocations inside are not counted (a closure's own passes, for example)."""
        self.tracking = False
        try:
            yield
        finally:
            self.tracking = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if not self.tracking:
            return out
        name = func._schema.name
        self.ops.append(name)
        if name in SYNC_OPS:
            self.syncs.append(name)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or not self._track(storage):
                continue
            if self.live > self.peak:
                self.peak = self.live
                self.peak_op = name
        return out


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable in ``obj`` (dicts, lists, tensors)."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Persistent optimizer state (moments, SaLSa's gv/mv, ...), in bytes."""
    return tensor_bytes(dict(optimizer.state))
