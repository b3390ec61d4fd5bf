"""The cost model of a step: host synchronisations, extra memory, multi-tensor kernels."""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import alsals.line_search
from alsals import ALSALS, SLS, AdamSLS

SIZES = [(300, 200), (200,), (500, 100)]


class LiveAllocations(TorchDispatchMode):
    """Counts bytes of tensors allocated by traced ops that are still alive, and their peak.

    Also records every op that forces a host synchronisation (``.item()``, ``bool(t)``).
    """

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracking = True
        self.syncs: list[str] = []
        self.ops: list[str] = []
        self._alive: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._alive.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.tracking:
            return out
        name = func._schema.name
        self.ops.append(name)
        if name in self.SYNC_OPS:
            self.syncs.append(name)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self._alive or ptr == 0:
                continue
            nbytes = t.untyped_storage().nbytes()
            self._alive.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, nbytes)
        return out

    @contextmanager
    def paused(self):
        self.tracking = False
        try:
            yield
        finally:
            self.tracking = True


def make_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in SIZES]


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def quadratic_closure(params, mode):
    """A closure whose own allocations are hidden from the tracker (it runs backward itself)."""

    def closure(backward: bool):
        with mode.paused():
            loss = sum(torch.dot(p.flatten(), p.flatten()) for p in params) * 10.0
            if backward:
                for p in params:
                    p.grad = None
                loss.backward()
            return loss.detach()

    return closure


def adam_step_peak() -> int:
    params = make_params()
    adam = torch.optim.Adam(params, lr=1e-3, foreach=True)
    mode = LiveAllocations()
    for _ in range(2):  # the second step runs with its state already allocated
        quadratic_closure(params, mode)(True)
        mode.live = mode.peak = 0
        with mode:
            adam.step()
    return mode.peak


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SLS, {}),
        (AdamSLS, {}),
        (ALSALS, {}),
        (ALSALS, {"slope": "analytic"}),
    ],
    ids=["SLS", "AdamSLS", "ALSALS", "ALSALS-analytic"],
)
def test_extra_memory_is_at_most_one_parameter_sized_buffer_beyond_adam(cls, kwargs):
    params = make_params()
    opt = cls(params, lr=10.0, **kwargs)  # backtracks: several trials in the measured step
    mode = LiveAllocations()
    closure = quadratic_closure(params, mode)
    opt.step(closure)
    for group in opt.param_groups:
        group["lr"] = 10.0
    with mode:
        opt.step(closure)
    assert opt.last_step.trials > 1
    scalars = 4096  # losses, slopes and norms: a handful of 0-d tensors
    budget = adam_step_peak() + param_bytes(params) + scalars
    assert mode.peak <= budget, (mode.peak, budget)
    assert mode.peak >= param_bytes(params)  # the tracker sees at least the saved weights


@pytest.mark.parametrize("slope", ["analytic", "finite_difference"])
@pytest.mark.parametrize("cls", [SLS, AdamSLS, ALSALS], ids=["SLS", "AdamSLS", "ALSALS"])
def test_one_host_sync_per_trial_plus_one_for_the_start(cls, slope, monkeypatch):
    params = make_params()
    opt = cls(params, lr=10.0, slope=slope)
    calls = []
    original = alsals.line_search.mean_to_host

    def counting(values, group):
        calls.append(len(values))
        return original(values, group)

    monkeypatch.setattr(alsals.line_search, "mean_to_host", counting)
    mode = LiveAllocations()
    with mode:
        opt.step(quadratic_closure(params, mode))
    info = opt.last_step
    assert info.trials > 1
    assert len(calls) == 1 + info.trials  # the probe shares its sync with the first trial
    assert mode.syncs == []  # no .item() / bool(tensor) anywhere else in the optimizer


def test_step_uses_multi_tensor_kernels_and_no_deepcopy(monkeypatch):
    params = make_params()
    opt = ALSALS(params, lr=10.0)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("deepcopy in step"))
    mode = LiveAllocations()
    with mode:
        opt.step(quadratic_closure(params, mode))
    foreach = [op for op in mode.ops if op.startswith("aten::_foreach_")]
    assert {"aten::_foreach_copy_", "aten::_foreach_addcdiv_", "aten::_foreach_lerp_"} <= set(
        foreach
    )
    # per-tensor elementwise updates of the weights would show up as aten::add_/addcdiv_
    assert "aten::addcdiv_" not in mode.ops


def test_last_step_reports_diagnostics_for_logging():
    params = make_params()
    opt = ALSALS(params, lr=10.0)
    mode = LiveAllocations()
    opt.step(quadratic_closure(params, mode))
    info = opt.last_step
    assert info.kind == "search"
    assert info.forwards == info.trials + 2  # start, probe, trials
    assert info.backwards == 1
    assert info.step_size == opt.param_groups[0]["lr"] > 0
    assert info.loss_decrease > 0 and info.slope > 0
    search = opt.state[params[0]]["line_search"]
    assert search["forwards"] == info.forwards and search["trials"] == info.trials
