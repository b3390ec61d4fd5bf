"""The cost model of a step: host synchronisations, extra memory, multi-tensor kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alsals.line_search
import alsals.schedule_free
from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals_bench.memory import LiveStorage

SIZES = [(300, 200), (200,), (500, 100)]


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
    mode = LiveStorage()
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
        (MomentumALSALS.paper, {}),
        (MomentumALSALS.paper, {"slope": "analytic"}),
        (MomentumALSALS, {"search_interval": 1, "start": "grown"}),  # backtracks from lr=10
    ],
    ids=[
        "SLS",
        "AdamSLS",
        "MomentumALSALS-paper",
        "MomentumALSALS-paper-analytic",
        "MomentumALSALS",
    ],
)
def test_extra_memory_is_at_most_one_parameter_sized_buffer_beyond_adam(cls, kwargs):
    params = make_params()
    opt = cls(params, lr=10.0, **kwargs)  # backtracks: several trials in the measured step
    mode = LiveStorage()
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


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_alsals_holds_three_parameter_sized_buffers_at_most(max_grad_norm):
    # Through its trials the copy of the average x, the update u and y to come back to;
    # Adam's v' is formed where it is needed (the denominator, the commit), not held (four
    # buffers before, five with clipping, whose gradients' copy now becomes u)
    params = make_params()
    size = param_bytes(params)
    opt = ALSALS(params, lr=10.0, loss_floor=None, max_grad_norm=max_grad_norm)
    mode = LiveStorage()
    closure = quadratic_closure(params, mode)
    opt.step(closure)
    for group in opt.param_groups:
        group["lr"] = 10.0  # a written lr: the next step searches from it and backtracks
    during_trials = []

    def watched(backward: bool):
        if not backward:
            during_trials.append(mode.live)
        return closure(backward)

    with mode:
        opt.step(watched)
    assert opt.last_step.trials > 1, opt.last_step
    scalars = 4096  # losses, slopes and norms: a handful of 0-d tensors
    assert 3 * size <= max(during_trials) <= 3 * size + scalars, (max(during_trials), size)
    assert mode.peak <= 3 * size + scalars, (mode.peak, size)


@pytest.mark.parametrize("cls", [AdamSLS, MomentumALSALS], ids=["AdamSLS", "MomentumALSALS"])
def test_a_step_without_search_needs_no_more_memory_than_adam(cls):
    params = make_params()
    opt = cls(params, lr=1e-3, search_interval=2)
    mode = LiveStorage()
    closure = quadratic_closure(params, mode)
    opt.step(closure)  # searches
    with mode:
        opt.step(closure)  # reuses the step size
    assert opt.last_step.kind == "reuse"
    assert mode.peak <= adam_step_peak() + 4096, (mode.peak, adam_step_peak())


@pytest.mark.parametrize("slope", ["analytic", "finite_difference"])
@pytest.mark.parametrize(
    "cls", [SLS, AdamSLS, MomentumALSALS.paper], ids=["SLS", "AdamSLS", "MomentumALSALS-paper"]
)
def test_one_host_sync_per_trial_plus_one_for_the_start(cls, slope, monkeypatch):
    params = make_params()
    opt = cls(params, lr=10.0, slope=slope)
    calls = []
    original = alsals.line_search.mean_to_host

    def counting(values, group, marks=None):
        calls.append(len(values))
        return original(values, group, marks)

    monkeypatch.setattr(alsals.line_search, "mean_to_host", counting)
    mode = LiveStorage()
    with mode:
        opt.step(quadratic_closure(params, mode))
    info = opt.last_step
    assert info.trials > 1
    assert len(calls) == 1 + info.trials  # the probe shares its sync with the first trial
    assert mode.syncs == []  # no .item() / bool(tensor) anywhere else in the optimizer


def test_step_uses_multi_tensor_kernels_and_no_deepcopy(monkeypatch):
    params = make_params()
    opt = MomentumALSALS(params, lr=10.0)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("deepcopy in step"))
    mode = LiveStorage()
    with mode:
        opt.step(quadratic_closure(params, mode))
    foreach = [op for op in mode.ops if op.startswith("aten::_foreach_")]
    # saving/restoring the weights, trial points, and the moments (committed in place)
    assert {"aten::_foreach_copy_", "aten::_foreach_add_", "aten::_foreach_lerp_"} <= set(foreach)
    # per-tensor elementwise updates would show up as aten::add_/addcdiv_/lerp_/mul_
    per_tensor = {"aten::add_", "aten::addcdiv_", "aten::lerp_", "aten::mul_"}
    assert not per_tensor & set(mode.ops)


def test_last_step_reports_diagnostics_for_logging():
    # float64: the finite-difference slope at fd_step=5e-8 is well resolved on every CPU (in
    # float32 it is at the rounding limit, which differs between machines).
    params = [p.detach().double().requires_grad_() for p in make_params()]
    opt = MomentumALSALS.paper(params, lr=10.0)
    mode = LiveStorage()
    opt.step(quadratic_closure(params, mode))
    info = opt.last_step
    assert info.kind == "search"
    assert info.forwards == info.trials + 3  # start, replay check (first step), probe, trials
    assert info.backwards == 1
    assert info.step_size == opt.param_groups[0]["lr"] > 0
    assert info.loss_decrease > 0 and info.slope > 0
    search = opt.state[params[0]]["line_search"]
    assert search["forwards"] == info.forwards and search["trials"] == info.trials


#: operators that launch no kernel of their own (views, metadata, allocation)
NO_KERNEL = {
    "aten.alias.default",
    "aten.detach.default",
    "aten.empty_like.default",
    "aten.expand.default",
    "aten.select.int",
    "aten.t.default",
    "aten.unbind.int",
    "aten.view.default",
    "aten._unsafe_view.default",
}


class PerTensorKernels(TorchDispatchMode):
    """Counts the operators that are neither multi-tensor (``_foreach_*``) nor kernel-free,
    outside the closure."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = str(func)
        if self.counting and not name.startswith("aten._foreach") and name not in NO_KERNEL:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def kernels_per_step(cls, tensors: int) -> list[tuple[str, int, dict[str, int]]]:
    """(kind, forwards, operators) of 12 steps on a sum of ``tensors`` small quadratics."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=gen).requires_grad_() for _ in range(tensors)]
    targets = [torch.randn(3, generator=gen) for _ in range(tensors)]
    opt = cls(params)
    mode = PerTensorKernels()

    def closure():
        mode.counting = False
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))
        loss.backward()
        mode.counting = True
        return loss

    steps = []
    for _ in range(12):
        mode.ops = {}
        with mode:
            opt.step(closure)
        steps.append((opt.last_step.kind, opt.last_step.forwards, mode.ops))
    return steps


#: each parameter tensor's own kernels per step: its dot products (one per sum over the
#: parameters the step needs), the temporary a sum needs (ALSALS's y - z, Adam + SLS's
#: g / (sqrt(v_hat) + eps)) and, on CPU, the largest gradient entry's aminmax
PER_TENSOR = {
    ALSALS: {"aten.dot.default": 2, "aten.sub.Tensor": 1},
    MomentumALSALS: {"aten.dot.default": 6, "aten.aminmax.default": 1},
    AdamSLS: {"aten.dot.default": 1, "aten.div.Tensor": 1, "aten.aminmax.default": 1},
    SLS: {"aten.dot.default": 1, "aten.aminmax.default": 1},
}


@pytest.mark.parametrize("cls", list(PER_TENSOR), ids=lambda c: c.__name__)
def test_each_parameter_tensor_costs_only_its_dot_products(cls):
    """A model of many small tensors pays per tensor for each kernel launched per tensor
    (and, on CPU, for the Python call): everything elementwise is multi-tensor, and the
    sums over the parameters convert and weigh their per-tensor dot products together, not
    one by one (a float64 conversion and a shard-count product per tensor cost ALSALS a
    third of its step on a thousand scalar parameters)."""
    few, many = kernels_per_step(cls, 4), kernels_per_step(cls, 24)
    compared = 0
    for (kind, forwards, a), (kind_many, forwards_many, b) in zip(few[1:], many[1:], strict=True):
        if (kind, forwards) != (kind_many, forwards_many):
            continue  # (not the same work)
        compared += 1
        extra = {op: (b.get(op, 0) - a.get(op, 0)) / 20 for op in set(a) | set(b)}
        extra = {op: n for op, n in extra.items() if n}
        allowed = PER_TENSOR[cls]
        assert set(extra) <= set(allowed), (kind, extra)
        assert all(extra[op] <= allowed[op] for op in extra), (kind, extra)
    assert compared >= 6


@pytest.mark.parametrize("kwargs", [{}, {"max_grad_norm": 1.0}], ids=["plain", "clipped"])
def test_alsals_synchronises_once_per_step_and_once_per_trial(kwargs, monkeypatch):
    """``ALSALS`` brings values to the host in one synchronisation per step (the loss and
    the step's sums) and one per trial; with protected buffers, one more at a search's first
    trial (whether the first evaluation wrote the weights). No other read the dispatcher
    sees (``item``, ``bool``, ``equal``) is on the step's path; a device-to-host copy
    (``.tolist()``, ``.cpu()``) is no operator on a CPU tensor and is not seen here."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    )
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = ALSALS(model.parameters(), buffers=model.buffers(), **kwargs)
    calls = []
    original = alsals.schedule_free.mean_to_host

    def counting(values, group, marks=None):
        calls.append(len(values))
        return original(values, group, marks)

    closure = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    opt.step(closure)  # (the first: its replay check, and eps checked once per dtype on CPU)
    monkeypatch.setattr(alsals.schedule_free, "mean_to_host", counting)
    kinds = set()
    for step in range(1, 25):
        calls.clear()
        mode = LiveStorage()
        with mode:
            opt.step(closure)
        info = opt.last_step
        kinds.add(info.kind)
        assert len(calls) == 1 + info.trials, (step, info)
        assert mode.syncs == (["aten::equal"] if info.trials else []), (step, info)
    assert {"reuse", "search"} <= kinds
