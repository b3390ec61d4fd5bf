"""Hugging Face Accelerate used directly (no Trainer): the recipe of docs/integrations.md.

Single process on the CPU, a few seconds. Checks: ``AcceleratedOptimizer.step(closure)``
passes the closure through and the run is the raw optimizer's bit for bit (one backward
pass per step, no warning); gradient accumulation inside a ``closure(backward)`` (with
``accelerator.no_sync`` and ``accelerator.backward``) takes the steps one batch of the
micro-batches' union takes; ``max_grad_norm`` reports what ``accelerator.clip_grad_norm_``
would; a BatchNorm model prepared before the optimizer is built keeps its buffers
protected; ``accelerator.save_state`` / ``load_state`` resumes bit-identically; bf16
autocast on the CPU trains without a warning; and ``accelerator.accumulate()`` with
``gradient_accumulation_steps > 1`` runs the closure on the last micro-batch only (the
documented reason not to use it).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from alsals import ALSALS, MomentumALSALS  # noqa: E402

OPTIMIZERS = [ALSALS, MomentumALSALS]
IDS = ["ALSALS", "MomentumALSALS"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton: each test builds its own."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def dataset(n: int = 256, dtype: torch.dtype = torch.float32) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=gen, dtype=dtype)
    y = (x[:, :4].sum(dim=1) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def make_model(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))


def loader(
    batch_size: int = 32, shuffle: bool = False, dtype: torch.dtype = torch.float32
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset(dtype=dtype), batch_size=batch_size, shuffle=shuffle, drop_last=True
    )


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def accelerate_steps(accelerator, model, optimizer, data, steps, micro_batches=1):
    """The recipe's loop: the whole accumulation window in one closure(backward)."""
    log = []
    while len(log) < steps:
        for x, y in data:
            micro = list(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True))

            def closure(backward: bool, micro=micro) -> torch.Tensor:
                if backward:
                    optimizer.zero_grad()
                total = 0.0
                for i, (xb, yb) in enumerate(micro):
                    last = i == len(micro) - 1
                    sync = accelerator.no_sync(model) if backward and not last else None
                    with sync or contextlib.nullcontext():
                        loss = F.cross_entropy(model(xb), yb) / len(micro)
                        if backward:
                            accelerator.backward(loss)
                    total = total + loss.detach()
                return total

            optimizer.step(closure)  # AcceleratedOptimizer.step returns None
            info = optimizer.optimizer.last_step
            log.append((info.loss, info.kind, info.trials, info.forwards, info.backwards))
            if len(log) == steps:
                break
    return log


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_accelerated_run_is_the_raw_run(cls):
    steps = 20
    model = make_model()
    optimizer = cls(model.parameters())
    torch.manual_seed(123)
    raw = []
    while len(raw) < steps:
        for x, y in loader():
            optimizer.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
            info = optimizer.last_step
            raw.append((info.loss, info.kind, info.trials, info.forwards, info.backwards))
            if len(raw) == steps:
                break

    accelerator = Accelerator(cpu=True)
    model_a = make_model()
    optimizer_a = cls(model_a.parameters())
    model_a, optimizer_a, data = accelerator.prepare(model_a, optimizer_a, loader())
    torch.manual_seed(123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = accelerate_steps(accelerator, model_a, optimizer_a, data, steps)
    assert [str(w.message) for w in caught] == []
    assert log == raw
    assert all(entry[4] == 1 for entry in log)  # one backward pass per step
    assert torch.equal(weights(model_a), weights(model))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_a_batchnorm_model_in_the_recipes_order_runs_as_without_accelerate(cls):
    """The recipe for a model with buffers: prepare the model, then build the optimizer
    with its buffers, then prepare the optimizer: the same run, statistics included, as
    the raw optimizer's, without a warning. (The order matters under 2 CPU processes, where
    prepare's model.to("cpu:0") replaces the buffer tensors; one process, as here, keeps
    them, so this test does not see the order.)"""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))

    model = net()
    optimizer = cls(model.parameters(), buffers=model.buffers())
    for x, y in loader():
        optimizer.step(lambda x=x, y=y: F.cross_entropy(model(x), y))

    accelerator = Accelerator(cpu=True)
    model_a = accelerator.prepare(net())
    optimizer_a = cls(model_a.parameters(), buffers=accelerator.unwrap_model(model_a).buffers())
    optimizer_a, data = accelerator.prepare(optimizer_a, loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerate_steps(accelerator, model_a, optimizer_a, data, len(data))
    assert [str(w.message) for w in caught] == []
    assert torch.equal(weights(model_a), weights(model))
    for a, b in zip(model_a.buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_accumulation_in_the_closure_is_one_larger_batch(cls):
    # (float64: the sum over micro-batches rounds otherwise than the one batch's mean, and
    # in float32 a decision could follow that rounding on some CPU)
    k, steps = 4, 6
    model = make_model(dropout=0.0).double()
    optimizer = cls(model.parameters())
    reference = []
    while len(reference) < steps:
        for x, y in loader(batch_size=32 * k, dtype=torch.float64):
            optimizer.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
            reference.append((optimizer.last_step.kind, optimizer.last_step.trials))
            if len(reference) == steps:
                break

    accelerator = Accelerator(cpu=True)  # gradient_accumulation_steps stays 1
    model_a = make_model(dropout=0.0).double()
    model_a, optimizer_a, data = accelerator.prepare(
        model_a, cls(model_a.parameters()), loader(batch_size=32 * k, dtype=torch.float64)
    )
    log = accelerate_steps(accelerator, model_a, optimizer_a, data, steps, micro_batches=k)
    assert [(entry[1], entry[2]) for entry in log] == reference
    assert torch.allclose(weights(model_a), weights(model), atol=1e-10)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_max_grad_norm_reports_accelerates_norm(cls):
    accelerator = Accelerator(cpu=True)
    model = make_model(dropout=0.0)
    model, optimizer, data = accelerator.prepare(
        model, cls(model.parameters(), max_grad_norm=0.05), loader()
    )
    x, y = next(iter(data))
    probe = make_model(dropout=0.0)
    F.cross_entropy(probe(x), y).backward()
    expected = accelerator.clip_grad_norm_(probe.parameters(), 0.05)
    optimizer.step(lambda: F.cross_entropy(model(x), y))
    assert optimizer.optimizer.last_step.grad_norm == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_save_state_load_state_resumes_bit_identically(cls, tmp_path):
    def build(init_seed: int):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        model = make_model(seed=init_seed)  # with dropout: the random state must resume too
        return accelerator, *accelerator.prepare(
            model, cls(model.parameters()), loader(shuffle=True)
        )

    torch.manual_seed(7)
    accelerator, model, optimizer, data = build(0)
    uninterrupted = accelerate_steps(accelerator, model, optimizer, data, 18)
    expected_weights = weights(model)
    expected_state = optimizer.state_dict()

    torch.manual_seed(7)
    accelerator, model, optimizer, data = build(0)
    first = accelerate_steps(accelerator, model, optimizer, data, 8)  # one epoch
    accelerator.save_state(str(tmp_path))
    accelerator, model, optimizer, data = build(99)  # other weights, a fresh optimizer
    torch.manual_seed(12345)  # load_state restores torch's random state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerator.load_state(str(tmp_path))
        second = accelerate_steps(accelerator, model, optimizer, data, 10)
    assert [str(w.message) for w in caught] == []
    assert first + second == uninterrupted
    assert torch.equal(weights(model), expected_weights)
    state = optimizer.state_dict()["state"]
    for key, entry in expected_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, state[key][name]), name
            else:
                assert value == state[key][name], name


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=IDS)
def test_bf16_autocast_on_cpu(cls):
    logs = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        model = make_model()
        model, optimizer, data = accelerator.prepare(model, cls(model.parameters()), loader())
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logs[precision] = accelerate_steps(accelerator, model, optimizer, data, 16)
        assert [str(w.message) for w in caught] == []
    log = logs["bf16"]
    assert log[0][0] != logs["no"][0][0]  # autocast ran (in the closure's forward)
    assert log[-1][0] < 0.75 * log[0][0]
    assert {entry[1] for entry in log} <= {"search", "reuse", "kept"}


def test_accumulate_with_several_steps_runs_the_closure_on_the_last_micro_batch_only():
    """Why the recipe accumulates inside the closure: with gradient_accumulation_steps=4,
    AcceleratedOptimizer.step is a no-op on 3 of 4 calls, so a per-micro-batch closure
    never runs for those micro-batches (no warning is possible: the optimizer never sees
    them)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = make_model(dropout=0.0)
    model, optimizer, data = accelerator.prepare(model, ALSALS(model.parameters()), loader())
    seen, steps = set(), 0
    for index, (x, y) in enumerate(data):
        with accelerator.accumulate(model):

            def closure(x=x, y=y, index=index):
                seen.add(index)
                return F.cross_entropy(model(x), y)

            before = getattr(optimizer.optimizer, "last_step", None)
            optimizer.step(closure)
            steps += optimizer.optimizer.last_step is not before
    assert steps == 2  # 8 micro-batches: 2 optimizer steps
    assert seen == {3, 7}  # 6 of the 8 micro-batches never reached the optimizer
