"""What a line search costs per step: wall time and memory against Adam and SaLSa.

``alsals-bench speed`` (or ``python -m alsals_bench.speed``) times, side by side in one
process, one training step of:

* ``adam``: ``torch.optim.Adam(foreach=True)``, one forward and one backward pass per step;
* our line searches, by the registry's names: ``sls``, ``adam-sls``, ``alsals`` (the paper's
  defaults: finite-difference slope, a search every step), ``alsals-analytic`` (slope
  ``-g.d``, no probe pass), ``alsals-adaptive`` (finite difference, SaLSa's cadence) and
  ``alsals-fast`` (analytic slope and adaptive cadence);
* the authors' reference SaLSa (``salsa-optimizer`` from PyPI, used as it is): ``salsa``
  (its default ``speed_up=True``: adaptive cadence, slope ``g.g/sqrt(v)``, no probe pass)
  and ``salsa-every`` (``speed_up=False``: a search every step).

Method, per model (one model and one fixed sequence of synthetic batches):

1. Warm-up, once per configuration: from the same initial weights and random state, run
   ``--warmup`` steps so that the search has settled (the first steps of a line search
   backtrack from the initial step size, tens of trials) and the adaptive cadences have
   reached their regime; keep the weights, buffers and optimizer (a deep copy) as a snapshot.
2. Timing: for each repeat, for each configuration in an order rotated by one per repeat,
   restore the configuration's snapshot, then time ``--steps`` steps (the same batches and
   random state for every configuration). The step time is the wall time of the whole step,
   the closure's passes included; the closure's own time is measured inside it, so the
   optimizer's own time is the step time minus the closure time (for Adam: ``step()``).
   Medians over repeats are reported with their min-max spread.
3. Memory: restore the snapshot once more and run ``--memory-steps`` steps while tracking
   every tensor storage allocated by an operator (a ``TorchDispatchMode``; on CUDA,
   ``torch.cuda.max_memory_allocated``). The peak is the bytes alive at the worst moment of
   a step: weights, buffers and optimizer state that persist, plus gradients, activations
   and the optimizer's temporaries.

Passes are counted by the closure wrapper (calls with and without backward); for our
optimizers they are checked against ``optimizer.last_step``. Our optimizers get the
``closure(backward)`` form so that the backward pass runs inside the closure and is timed as
part of it, as it is for Adam and SaLSa.

Every time is taken twice: wall clock (``time.perf_counter``) and the process's CPU time
(``time.process_time``). On a machine shared with other jobs the CPU time is the steadier of
the two (it does not count the time the process waits for a core); on CUDA only wall time
means anything, and the closure synchronises the device on entry and exit. The CPU run uses
one torch thread by default (``--threads``): two threads on two busy cores stall each other.
Before the warm-up, the cost of the passes themselves is measured (a training forward and
backward, and a forward under ``no_grad`` as the trials run it), which gives each
configuration's lower bound from its pass counts alone.

``--profile NAME,...`` prints a cProfile of those configurations' timed steps, sorted by own
time: the evidence for where an optimizer spends its time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import json
import math
import platform
import pstats
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alsals import ALSALS, SLS, AdamSLS

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Batch], Tensor]

# ------------------------------------------------------------------------------- models


@dataclass
class Workload:
    """One model, its loss, and a fixed sequence of synthetic batches."""

    model: nn.Module
    loss: LossFn
    batches: list[Batch]
    description: str

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _mlp(widths: Sequence[int], batch: int, n_batches: int, gen: torch.Generator) -> Workload:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    batches = [
        (
            torch.randn(batch, widths[0], generator=gen),
            torch.randint(0, widths[-1], (batch,), generator=gen),
        )
        for _ in range(n_batches)
    ]
    shape = "-".join(str(w) for w in widths)
    return Workload(model, _cross_entropy, batches, f"MLP {shape}, ReLU, batch {batch}")


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with BatchNorm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class _ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, one basic block per stage, global pooling, a classifier."""

    def __init__(self, channels: Sequence[int], classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU()
        )
        blocks = []
        for i, c in enumerate(channels):
            blocks.append(_Block(channels[max(0, i - 1)], c, 1 if i == 0 else 2))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _cnn(
    channels: Sequence[int], size: int, batch: int, n_batches: int, gen: torch.Generator
) -> Workload:
    model = _ResNet(channels, 10)
    batches = [
        (
            torch.randn(batch, 3, size, size, generator=gen),
            torch.randint(0, 10, (batch,), generator=gen),
        )
        for _ in range(n_batches)
    ]
    desc = (
        f"ResNet, basic blocks {'/'.join(map(str, channels))} channels, BatchNorm, "
        f"3x{size}x{size}, batch {batch}"
    )
    return Workload(model, _cross_entropy, batches, desc)


def _gpt2_loss(model: nn.Module, batch: Batch) -> Tensor:
    (ids,) = batch
    return model(input_ids=ids, labels=ids).loss


def _gpt2(
    layers: int,
    heads: int,
    width: int,
    vocab: int,
    ctx: int,
    batch: int,
    n_batches: int,
    gen: torch.Generator,
) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        vocab_size=vocab,
        n_positions=ctx,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    batches = [(torch.randint(0, vocab, (batch, ctx), generator=gen),) for _ in range(n_batches)]
    desc = (
        f"GPT-2 (transformers GPT2LMHeadModel), {layers} layers, {heads} heads, width {width}, "
        f"vocab {vocab}, context {ctx}, batch {batch}, dropout 0.1"
    )
    return Workload(model, _gpt2_loss, batches, desc)


N_BATCHES = 8  # distinct batches, cycled

MODELS: dict[str, Callable[[torch.Generator], Workload]] = {
    "mlp": lambda g: _mlp([784, 1024, 1024, 10], 128, N_BATCHES, g),
    "cnn": lambda g: _cnn([16, 32, 64], 32, 32, N_BATCHES, g),
    "gpt2": lambda g: _gpt2(2, 4, 256, 8192, 128, 4, N_BATCHES, g),
    "gpt2-124m": lambda g: _gpt2(12, 12, 768, 50257, 1024, 8, N_BATCHES, g),
    # Small stand-ins for the smoke test.
    "mlp-tiny": lambda g: _mlp([16, 32, 4], 8, 3, g),
    "cnn-tiny": lambda g: _cnn([4, 8], 8, 4, 3, g),
    "gpt2-tiny": lambda g: _gpt2(1, 2, 16, 64, 8, 2, 3, g),
}
# Defaults per model: (timed steps per repeat, warm-up steps, repeats). A full default run of
# the three CPU models takes about 10 minutes on one core of a busy 2-core machine. Timed steps
# are a multiple of 10 so that every window holds whole periods of the adaptive cadence.
RUN_LENGTHS: dict[str, tuple[int, int, int]] = {
    "mlp": (10, 60, 10),
    "cnn": (10, 40, 8),
    "gpt2": (10, 30, 5),
    "gpt2-124m": (10, 60, 7),
}
DEFAULT_MODELS = ("mlp", "cnn", "gpt2")

# ------------------------------------------------------------------------------ drivers


class Driver:
    """Runs one training step of an optimizer on a batch, timing the closure's passes."""

    def __init__(self, optimizer: torch.optim.Optimizer, work: Workload, device: torch.device):
        self.optimizer = optimizer
        self.work = work
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.closure_time = 0.0
        self.closure_cpu = 0.0
        self.forwards = 0
        self.backwards = 0
        self.batch: Batch = ()

    def _pass(self, backward: bool) -> Tensor:
        """One forward pass (with backward when asked), timed and counted."""
        self.sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        if backward:
            self.work.model.zero_grad(set_to_none=True)
            loss = self.work.loss(self.work.model, self.batch)
            loss.backward()
            self.backwards += 1
        else:
            with torch.no_grad():
                loss = self.work.loss(self.work.model, self.batch)
        self.forwards += 1
        self.sync()
        self.closure_time += time.perf_counter() - start
        self.closure_cpu += time.process_time() - start_cpu
        return loss.detach()

    def step(self, batch: Batch) -> None:
        raise NotImplementedError


class AdamDriver(Driver):
    def step(self, batch: Batch) -> None:
        self.batch = batch
        self._pass(backward=True)
        self.optimizer.step()


class LineSearchDriver(Driver):
    def step(self, batch: Batch) -> None:
        self.batch = batch
        before = (self.forwards, self.backwards)

        def closure(backward: bool) -> Tensor:
            return self._pass(backward)

        self.optimizer.step(closure)
        info = self.optimizer.last_step
        counted = (self.forwards - before[0], self.backwards - before[1])
        if counted != (info.forwards, info.backwards):
            raise AssertionError(f"pass count {counted} != last_step {info}")


class SalsaDriver(Driver):
    """SaLSa's protocol: ``closure(backwards=...)``; it prints on exact cancellation."""

    cancellations = 0

    def step(self, batch: Batch) -> None:
        self.batch = batch

        def closure(backwards: bool = False) -> Tensor:
            return self._pass(backwards)

        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            self.optimizer.step(closure)
        self.cancellations += sink.getvalue().count("cancelation")


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    build: Callable[[nn.Module], torch.optim.Optimizer]
    driver: type[Driver]
    # The SaLSa configuration that does the same work: SaLSa's slope is analytic-style
    # (g.g/sqrt(v), no probe pass), so only our analytic-slope ALSALS runs compare with it,
    # every step with speed_up=False and adaptive with speed_up=True.
    salsa: str | None = None


def _ours(cls: type, **kwargs: Any) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: cls(model.parameters(), buffers=model.buffers(), **kwargs)


def _salsa(speed_up: bool) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def build(model: nn.Module) -> torch.optim.Optimizer:
        from salsa.SaLSA import SaLSA

        return SaLSA(model.parameters(), speed_up=speed_up)

    return build


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config(
            "adam",
            "torch.optim.Adam(foreach=True), lr 1e-3",
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
            AdamDriver,
        ),
        Config("sls", "SLS (analytic slope, every step)", _ours(SLS), LineSearchDriver),
        Config(
            "adam-sls",
            "AdamSLS (analytic slope, every step)",
            _ours(AdamSLS),
            LineSearchDriver,
        ),
        Config(
            "alsals",
            "ALSALS, paper defaults (finite-difference slope, every step)",
            _ours(ALSALS),
            LineSearchDriver,
        ),
        Config(
            "alsals-analytic",
            "ALSALS, analytic slope, every step",
            _ours(ALSALS, slope="analytic"),
            LineSearchDriver,
            "salsa-every",
        ),
        Config(
            "alsals-adaptive",
            "ALSALS, finite-difference slope, adaptive cadence",
            _ours(ALSALS, search_interval="adaptive"),
            LineSearchDriver,
        ),
        Config(
            "alsals-fast",
            "ALSALS, analytic slope, adaptive cadence",
            _ours(ALSALS, slope="analytic", search_interval="adaptive"),
            LineSearchDriver,
            "salsa",
        ),
        Config(
            "salsa",
            "SaLSa 0.1.0 (PyPI), defaults: speed_up=True (adaptive cadence)",
            _salsa(True),
            SalsaDriver,
        ),
        Config(
            "salsa-every",
            "SaLSa 0.1.0 (PyPI), speed_up=False (a search every step)",
            _salsa(False),
            SalsaDriver,
        ),
    )
}
DEFAULT_CONFIGS = tuple(CONFIGS)

# Targets of the issue, as ratios to Adam's step time.
TIME_TARGETS = {"alsals": 1.8, "alsals-analytic": 1.45, "alsals-fast": 1.15}
OWN_TARGET = 2.0  # optimizer's own time / Adam's step()
MEMORY_TARGET = 1.0  # peak beyond Adam's, in parameter-sized buffers

# ------------------------------------------------------------------------------- memory


class LiveStorage(TorchDispatchMode):
    """Bytes of tensor storages alive, and their peak: those allocated by operators while the
    mode is active, plus those ``adopt``-ed (weights, optimizer state) until they are freed.

    Storages, not tensors, are tracked: a gradient is stored through a detached alias of the
    backward's output, which outlives the output tensor itself. Adopting the state counts an
    optimizer that replaces its state tensors each step (SaLSa) once, not twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""  # the operator whose output set the peak
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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
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
                self.peak_op = func._schema.name
        return out


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable in ``obj`` (dicts, lists, tensors)."""
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Persistent optimizer state (moments, SaLSa's gv/mv, ...), in bytes."""
    return _tensor_bytes(dict(optimizer.state), set())


# ---------------------------------------------------------------------------- benchmark


@dataclass
class Measurement:
    """One configuration on one model: per-repeat values (per step) and the memory pass."""

    config: str
    step_s: list[float] = field(default_factory=list)
    closure_s: list[float] = field(default_factory=list)
    cpu_step_s: list[float] = field(default_factory=list)
    cpu_closure_s: list[float] = field(default_factory=list)
    forwards: float = 0.0
    backwards: float = 0.0
    peak_bytes: int = 0
    state_bytes: int = 0
    peak_op: str = ""  # CPU: the operator at the peak
    cancellations: int = 0

    @property
    def own_s(self) -> list[float]:
        return [s - c for s, c in zip(self.step_s, self.closure_s, strict=True)]

    @property
    def cpu_own_s(self) -> list[float]:
        return [s - c for s, c in zip(self.cpu_step_s, self.cpu_closure_s, strict=True)]


@dataclass
class ModelResult:
    model: str
    description: str
    params: int
    param_bytes: int
    buffer_bytes: int
    measurements: dict[str, Measurement]
    device: str = "cpu"
    # CPU seconds (device seconds on CUDA) of one pass, medians: "fwd_bwd" (a training
    # forward and backward), "fwd" (its forward part), "trial" (a forward under no_grad).
    pass_s: dict[str, float] = field(default_factory=dict)

    @property
    def trial_share(self) -> float:
        """A no-grad forward pass as a fraction of a training forward and backward."""
        return self.pass_s["trial"] / self.pass_s["fwd_bwd"] if self.pass_s else math.nan


@dataclass
class Snapshot:
    weights: list[Tensor]
    buffers: list[Tensor]
    optimizer: torch.optim.Optimizer
    step: int  # batches consumed so far


def clone_optimizer(
    optimizer: torch.optim.Optimizer, shared: Sequence[Tensor]
) -> torch.optim.Optimizer:
    """A deep copy of the optimizer's whole ``__dict__`` that keeps ``shared`` tensors (the
    model's parameters and buffers) by reference. ``copy.deepcopy`` alone would go through
    ``Optimizer.__getstate__``, which drops attributes such as SaLSa's step-size averages."""
    memo = {id(t): t for t in shared}
    clone = optimizer.__class__.__new__(optimizer.__class__)
    clone.__dict__.update(copy.deepcopy(optimizer.__dict__, memo))
    return clone


class Bench:
    """Side-by-side measurement of several configurations on one workload."""

    def __init__(
        self,
        work: Workload,
        configs: Sequence[str],
        device: torch.device,
        *,
        seed: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.work = work
        self.configs = [CONFIGS[name] for name in configs]
        self.device = device
        self.seed = seed
        self.log = log
        self.params = list(work.model.parameters())
        self.buffers = list(work.model.buffers())
        self.initial = self._save()
        self.snapshots: dict[str, Snapshot] = {}

    def _save(self) -> tuple[list[Tensor], list[Tensor]]:
        return [p.detach().clone() for p in self.params], [b.clone() for b in self.buffers]

    def _load(self, weights: list[Tensor], buffers: list[Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, weights)
            if buffers:
                torch._foreach_copy_(self.buffers, buffers)
        for p in self.params:
            p.grad = None

    def _driver(self, config: Config, optimizer: torch.optim.Optimizer) -> Driver:
        return config.driver(optimizer, self.work, self.device)

    def _restore(self, config: Config) -> tuple[Driver, int]:
        snap = self.snapshots[config.name]
        self._load(snap.weights, snap.buffers)
        optimizer = clone_optimizer(snap.optimizer, self.params + self.buffers)
        torch.manual_seed(self.seed + 1)
        return self._driver(config, optimizer), snap.step

    def _run(self, driver: Driver, start: int, steps: int) -> None:
        batches = self.work.batches
        for i in range(steps):
            driver.step(batches[(start + i) % len(batches)])

    def warm_up(self, steps: int) -> None:
        """From the same initial state, settle each configuration and snapshot it."""
        for config in self.configs:
            self._load(*self.initial)
            torch.manual_seed(self.seed)
            optimizer = config.build(self.work.model)
            driver = self._driver(config, optimizer)
            self._run(driver, 0, steps)
            weights, buffers = self._save()
            self.snapshots[config.name] = Snapshot(
                weights, buffers, clone_optimizer(optimizer, self.params + self.buffers), steps
            )

    def time(self, steps: int, repeats: int) -> dict[str, Measurement]:
        out = {c.name: Measurement(c.name) for c in self.configs}
        for r in range(repeats):
            k = r % len(self.configs)
            order = self.configs[k:] + self.configs[:k]
            for config in order:
                driver, start = self._restore(config)
                gc.collect()
                gc.disable()
                try:
                    driver.sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    self._run(driver, start, steps)
                    driver.sync()
                    elapsed = time.perf_counter() - t0
                    cpu = time.process_time() - c0
                finally:
                    gc.enable()
                m = out[config.name]
                m.step_s.append(elapsed / steps)
                m.closure_s.append(driver.closure_time / steps)
                m.cpu_step_s.append(cpu / steps)
                m.cpu_closure_s.append(driver.closure_cpu / steps)
                m.forwards = driver.forwards / steps
                m.backwards = driver.backwards / steps
                m.cancellations += getattr(driver, "cancellations", 0)
            summary = "  ".join(f"{c.name} {1e3 * out[c.name].step_s[-1]:.1f}" for c in order)
            self.log(f"    repeat {r + 1}/{repeats} (ms/step): {summary}")
        return out

    def memory(self, steps: int, out: dict[str, Measurement]) -> None:
        for config in self.configs:
            driver, start = self._restore(config)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(self.device)
                self._run(driver, start, steps)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                tracker = LiveStorage()
                tracker.adopt([self.params, self.buffers, dict(driver.optimizer.state)])
                with tracker:
                    self._run(driver, start, steps)
                peak = tracker.peak
                out[config.name].peak_op = tracker.peak_op
            out[config.name].peak_bytes = peak
            out[config.name].state_bytes = state_bytes(driver.optimizer)

    def pass_costs(self, repeats: int = 7) -> dict[str, float]:
        """Median cost of the passes themselves, from the initial weights (CPU time on CPU,
        synchronised wall time on CUDA)."""
        self._load(*self.initial)
        torch.manual_seed(self.seed)
        cuda = self.device.type == "cuda"
        clock = time.perf_counter if cuda else time.process_time
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        costs: dict[str, list[float]] = {"fwd_bwd": [], "fwd": [], "trial": []}
        model, loss_fn = self.work.model, self.work.loss
        for i in range(repeats + 1):
            batch = self.work.batches[i % len(self.work.batches)]
            sync()
            t0 = clock()
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            sync()
            t1 = clock()
            loss.backward()
            sync()
            t2 = clock()
            with torch.no_grad():
                loss_fn(model, batch)
            sync()
            t3 = clock()
            if i:  # the first round warms up
                costs["fwd_bwd"].append(t2 - t0)
                costs["fwd"].append(t1 - t0)
                costs["trial"].append(t3 - t2)
        self._load(*self.initial)
        return {k: statistics.median(v) for k, v in costs.items()}

    def profile(self, name: str, steps: int, top: int = 30) -> str:
        config = CONFIGS[name]
        driver, start = self._restore(config)
        profiler = cProfile.Profile()
        profiler.enable()
        self._run(driver, start, steps)
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        return text.getvalue()


def measure_model(
    name: str,
    configs: Sequence[str],
    *,
    steps: int,
    repeats: int,
    warmup: int,
    memory_steps: int,
    device: torch.device,
    seed: int = 0,
    profile: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> ModelResult:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    work = MODELS[name](gen)
    work.model.to(device).train()
    work.batches = [tuple(t.to(device) for t in b) for b in work.batches]
    log(f"{name}: {work.description}; {work.num_params:,} parameters")
    bench = Bench(work, configs, device, seed=seed, log=log)
    pass_s = bench.pass_costs()
    fwd, bwd = pass_s["fwd"], pass_s["fwd_bwd"] - pass_s["fwd"]
    log(
        f"    passes: forward+backward {1e3 * pass_s['fwd_bwd']:.1f} ms, backward = "
        f"{bwd / fwd:.2f} forwards, no-grad forward {1e3 * pass_s['trial']:.1f} ms "
        f"= {pass_s['trial'] / pass_s['fwd_bwd']:.2f} of forward+backward"
    )
    t0 = time.perf_counter()
    bench.warm_up(warmup)
    log(f"    warm-up ({warmup} steps each): {time.perf_counter() - t0:.0f} s")
    results = bench.time(steps, repeats)
    if memory_steps > 0:
        t0 = time.perf_counter()
        bench.memory(memory_steps, results)
        log(f"    memory ({memory_steps} steps each): {time.perf_counter() - t0:.0f} s")
    for config in profile:
        log(f"    cProfile of {config}, {steps} steps, sorted by own time:")
        log(bench.profile(config, steps))
    return ModelResult(
        model=name,
        description=work.description,
        params=work.num_params,
        param_bytes=work.param_bytes,
        buffer_bytes=sum(b.numel() * b.element_size() for b in work.model.buffers()),
        measurements=results,
        device=device.type,
        pass_s=pass_s,
    )


# ------------------------------------------------------------------------------- report


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _ratio(x: float, y: float) -> float:
    return x / y if y and not math.isnan(y) else math.nan


def summarize(result: ModelResult) -> list[dict[str, Any]]:
    """One row per configuration, with ratios to Adam's medians (wall and CPU time)."""
    ms = result.measurements
    adam = ms.get("adam", Measurement("adam"))
    adam_step, adam_cpu = _median(adam.step_s), _median(adam.cpu_step_s)
    adam_own, adam_cpu_own = _median(adam.own_s), _median(adam.cpu_own_s)
    rows = []
    for name, m in ms.items():
        step, cpu = _median(m.step_s), _median(m.cpu_step_s)
        counterpart = CONFIGS[name].salsa
        other = ms.get(counterpart) if counterpart else None
        rows.append(
            {
                "config": name,
                "step_ms": 1e3 * step,
                "step_ms_min": 1e3 * min(m.step_s),
                "step_ms_max": 1e3 * max(m.step_s),
                "x_adam": _ratio(step, adam_step),
                "x_adam_min": _ratio(min(m.step_s), adam_step),
                "x_adam_max": _ratio(max(m.step_s), adam_step),
                "cpu_x_adam": _ratio(cpu, adam_cpu),
                "cpu_x_adam_min": _ratio(min(m.cpu_step_s), adam_cpu),
                "cpu_x_adam_max": _ratio(max(m.cpu_step_s), adam_cpu),
                "passes_x_adam": _ratio(_median(m.closure_s), adam_step),
                "cpu_passes_x_adam": _ratio(_median(m.cpu_closure_s), adam_cpu),
                # The floor: this configuration's passes plus Adam's own time.
                "floor_x_adam": _ratio(_median(m.closure_s) + adam_own, adam_step),
                "cpu_floor_x_adam": _ratio(_median(m.cpu_closure_s) + adam_cpu_own, adam_cpu),
                "forwards": m.forwards,
                "backwards": m.backwards,
                "nominal": (m.forwards + 2 * m.backwards) / 3,
                # The limit with this model's measured pass costs.
                "pass_limit": m.backwards + (m.forwards - m.backwards) * result.trial_share,
                "own_ms": 1e3 * _median(m.own_s),
                "own_x_adam": _ratio(_median(m.own_s), adam_own),
                "cpu_own_x_adam": _ratio(_median(m.cpu_own_s), adam_cpu_own),
                "peak_mib": m.peak_bytes / 2**20,
                "peak_x_adam": _ratio(m.peak_bytes, adam.peak_bytes),
                "extra_params": (m.peak_bytes - adam.peak_bytes) / result.param_bytes,
                "state_mib": m.state_bytes / 2**20,
                "state_params": m.state_bytes / result.param_bytes,
                "peak_op": m.peak_op,
                "salsa": counterpart or "",
                "x_salsa": _ratio(step, _median(other.step_s)) if other else math.nan,
                "cpu_x_salsa": _ratio(cpu, _median(other.cpu_step_s)) if other else math.nan,
                "cancellations": m.cancellations,
            }
        )
    return rows


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if math.isnan(x) else format(x, spec)


def _has_memory(result: ModelResult) -> bool:
    return any(m.peak_bytes for m in result.measurements.values())


def _pass_line(result: ModelResult) -> str:
    p = result.pass_s
    if not p:
        return ""
    return (
        f" Passes: forward+backward {1e3 * p['fwd_bwd']:.1f} ms, a backward = "
        f"{(p['fwd_bwd'] - p['fwd']) / p['fwd']:.2f} forwards, a no-grad (trial) forward = "
        f"{result.trial_share:.2f} of a forward+backward (nominal: 0.33)."
    )


def markdown(results: Sequence[ModelResult]) -> str:
    """Per model: a time table and a memory table."""
    lines = [
        "Time ratios read *wall time / CPU time* (the process's CPU time, which other jobs on a "
        "shared machine do not inflate), medians over the repeats; (min–max) is the spread of "
        "the wall-time ratio over repeats. *nominal*: the issue's pass count, a backward = 2 "
        "forwards; *pass limit*: the same with this model's measured pass costs. *floor*: this "
        "configuration's measured passes plus Adam's own time, as timed in the run. *own*: "
        "step time minus the time inside the closure (for Adam: `optimizer.step()`). "
        "P: the parameters' size.",
        "",
    ]
    for result in results:
        rows = summarize(result)
        lines += [
            f"### {result.model}",
            "",
            f"{result.description}; {result.params:,} parameters "
            f"(P = {result.param_bytes / 2**20:.1f} MiB).{_pass_line(result)}",
            "",
            "| configuration | ms/step (min–max) | **× Adam** (min–max) | fwd / bwd per step "
            "| nominal (F+2B)/3 | pass limit | floor | own ms | own × Adam `step()` | × SaLSa |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            salsa = (
                f"{_fmt(r['x_salsa'])} / {_fmt(r['cpu_x_salsa'])} ({r['salsa']})"
                if r["salsa"]
                else ""
            )
            lines.append(
                f"| {r['config']} "
                f"| {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) "
                f"| **{_fmt(r['x_adam'])}** / **{_fmt(r['cpu_x_adam'])}** "
                f"({_fmt(r['x_adam_min'])}–{_fmt(r['x_adam_max'])}) "
                f"| {r['forwards']:.2f} / {r['backwards']:.2f} "
                f"| {r['nominal']:.2f} "
                f"| {_fmt(r['pass_limit'])} "
                f"| {_fmt(r['floor_x_adam'])} / {_fmt(r['cpu_floor_x_adam'])} "
                f"| {r['own_ms']:.2f} "
                f"| {_fmt(r['own_x_adam'])} / {_fmt(r['cpu_own_x_adam'])} "
                f"| {salsa} |"
            )
        if not _has_memory(result):
            lines.append("")
            continue
        lines += [
            "",
            "| configuration | peak MiB | × Adam | beyond Adam (× P) | optimizer state MiB (× P) "
            "| peak reached in |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['config']} | {r['peak_mib']:.1f} | {_fmt(r['peak_x_adam'])} "
                f"| {_fmt(r['extra_params'], '+.2f')} "
                f"| {r['state_mib']:.1f} ({r['state_params']:.2f}) "
                f"| {r['peak_op'].replace('aten::', '') or '–'} |"
            )
        lines.append("")
    return "\n".join(lines)


def target_rows(result: ModelResult) -> list[dict[str, Any]]:
    """The issue's targets on one model: what, the measured value (wall; CPU time), met."""
    rows = {r["config"]: r for r in summarize(result)}
    out = []

    def add(what: str, value: float, cpu: float, limit: float) -> None:
        out.append(
            {"model": result.model, "target": what, "value": value, "cpu": cpu, "limit": limit}
        )

    for name, limit in TIME_TARGETS.items():
        if name in rows:
            r = rows[name]
            add(f"{name}: step ≤ {limit}× Adam", r["x_adam"], r["cpu_x_adam"], limit)
    ours = [n for n in rows if n != "adam" and CONFIGS[n].driver is LineSearchDriver]
    for name in ours:
        r = rows[name]
        add(
            f"{name}: own time ≤ {OWN_TARGET:g}× Adam `step()`",
            r["own_x_adam"],
            r["cpu_own_x_adam"],
            OWN_TARGET,
        )
    for name in ours if _has_memory(result) else ():
        r = rows[name]
        add(
            f"{name}: peak ≤ Adam + {MEMORY_TARGET:g} P (× P beyond Adam)",
            r["extra_params"],
            math.nan,
            MEMORY_TARGET,
        )
    for name in ours:
        r = rows[name]
        if r["salsa"] and not math.isnan(r["x_salsa"]):
            add(f"{name}: faster than {r['salsa']} (× SaLSa)", r["x_salsa"], r["cpu_x_salsa"], 1)
    return out


def targets(results: Sequence[ModelResult]) -> str:
    lines = ["| model | target | wall time | CPU time | met |", "|---|---|---|---|---|"]
    for result in results:
        for t in target_rows(result):
            ok = t["value"] <= t["limit"]
            lines.append(
                f"| {t['model']} | {t['target']} | {_fmt(t['value'])} | {_fmt(t['cpu'])} "
                f"| {'yes' if ok else '**no**'} |"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    import os

    info["cpus"] = os.cpu_count()
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(ImportError):
        import importlib.metadata as md

        info["salsa-optimizer"] = md.version("salsa-optimizer")
        info["transformers"] = md.version("transformers")
    return info


def plot(results: Sequence[ModelResult], path: Path) -> None:
    """Bar chart: step time as a multiple of Adam's, split into passes and optimizer time; a
    row for wall time and, for CPU runs, one for CPU time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clocks = ["wall"] + (["cpu"] if all(r.device == "cpu" for r in results) else [])
    fig, axes = plt.subplots(
        len(clocks),
        len(results),
        figsize=(4.2 * len(results), 3.6 * len(clocks)),
        sharey=True,
        squeeze=False,
    )
    for row, clock in enumerate(clocks):
        pre = "" if clock == "wall" else "cpu_"
        for ax, result in zip(axes[row], results, strict=True):
            rows = summarize(result)
            names = [r["config"] for r in rows]
            total = [r[f"{pre}x_adam"] for r in rows]
            passes = [r[f"{pre}passes_x_adam"] for r in rows]
            own = [t - p for t, p in zip(total, passes, strict=True)]
            lo = [t - r[f"{pre}x_adam_min"] for t, r in zip(total, rows, strict=True)]
            hi = [r[f"{pre}x_adam_max"] - t for t, r in zip(total, rows, strict=True)]
            y = list(range(len(rows)))
            ax.barh(y, passes, color="#8fb3d9", label="forward/backward passes")
            ax.barh(y, own, left=passes, color="#d9822b", label="optimizer's own time")
            ax.errorbar(total, y, xerr=[lo, hi], fmt="none", ecolor="black", capsize=2, lw=0.8)
            ax.plot(
                [r[f"{pre}floor_x_adam"] for r in rows],
                y,
                "k|",
                ms=9,
                label="floor: its passes + Adam's own time",
            )
            for name, limit in TIME_TARGETS.items():
                if name in names:
                    i = names.index(name)
                    ax.plot([limit, limit], [i - 0.4, i + 0.4], color="green", lw=2)
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_yticks(y, names)
            ax.set_title(f"{result.model}: {'wall' if clock == 'wall' else 'CPU'} time")
            ax.set_xlabel("step time / Adam's")
    axes[0][0].invert_yaxis()  # shared by all panels: the first configuration on top
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Step time relative to Adam (median of repeats, min–max bars; green: target)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    results: Sequence[ModelResult],
    out: Path,
    command: str,
    plot_chart: bool,
    host: dict[str, Any] | None = None,
) -> str:
    """``speed.json`` (every measurement), ``speed.md`` (the tables) and ``speed.png``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": host or machine(),
        "results": [
            {
                **{k: v for k, v in asdict(r).items() if k != "measurements"},
                "measurements": {k: asdict(m) for k, m in r.measurements.items()},
                "summary": summarize(r),
            }
            for r in results
        ],
    }
    (out / "speed.json").write_text(json.dumps(payload, indent=1))
    text = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Machine: {json.dumps(payload['machine'])}",
            "",
            markdown(results),
            "### Targets",
            "",
            targets(results),
            "",
        ]
    )
    (out / "speed.md").write_text(text)
    if plot_chart:
        plot(results, out / "speed.png")
    return text


def load(path: Path) -> tuple[str, dict[str, Any], list[ModelResult]]:
    """The command, machine and results of a ``speed.json``."""
    payload = json.loads(path.read_text())
    fields = {f for f in Measurement.__dataclass_fields__}
    results = []
    for r in payload["results"]:
        measurements = {
            k: Measurement(**{f: v for f, v in m.items() if f in fields})
            for k, m in r["measurements"].items()
        }
        results.append(
            ModelResult(
                model=r["model"],
                description=r["description"],
                params=r["params"],
                param_bytes=r["param_bytes"],
                buffer_bytes=r["buffer_bytes"],
                measurements=measurements,
                device=r.get("device", "cpu"),
                pass_s=r.get("pass_s", {}),
            )
        )
    return payload["command"], payload["machine"], results


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alsals-bench speed",
        description="Step time and peak memory of the line searches against Adam and SaLSa.",
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="of " + ", ".join(CONFIGS))
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default: per model)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default: per model)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps to settle each configuration before timing (default: per model)",
    )
    p.add_argument(
        "--memory-steps", type=int, default=10, help="steps tracked for peak memory (0: skip)"
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steady timings on a shared machine; 0: torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/speed"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="skip the bar chart")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild speed.md and speed.png from OUT/speed.json",
    )
    p.add_argument(
        "--profile",
        default="",
        help="after measuring, cProfile these configurations' timed steps (comma-separated)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report_only:
        command, host, loaded = load(args.out / "speed.json")
        print(write(loaded, args.out, command, not args.no_plot, host))
        return 0
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for m in models:
        if m not in MODELS:
            print(f"unknown model {m!r}; known: {', '.join(MODELS)}", file=sys.stderr)
            return 2
    for c in configs:
        if c not in CONFIGS:
            print(f"unknown configuration {c!r}; known: {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
    if "adam" not in configs:
        configs.insert(0, "adam")  # every ratio is to Adam
    if any(CONFIGS[c].driver is SalsaDriver for c in configs):
        try:
            import salsa.SaLSA  # noqa: F401
        except ImportError:
            print("the SaLSa configurations need: pip install salsa-optimizer", file=sys.stderr)
            return 2
    if (
        (args.steps is not None and args.steps < 1)
        or (args.repeats is not None and args.repeats < 1)
        or (args.warmup is not None and args.warmup < 0)
        or args.memory_steps < 0
    ):
        print(
            "--steps and --repeats must be >= 1, --warmup and --memory-steps >= 0", file=sys.stderr
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = "alsals-bench speed " + " ".join(argv)
    results = []
    start = time.perf_counter()
    for name in models:
        steps, warmup, repeats = RUN_LENGTHS.get(name, (10, 10, 3))
        results.append(
            measure_model(
                name,
                configs,
                steps=steps if args.steps is None else args.steps,
                repeats=repeats if args.repeats is None else args.repeats,
                warmup=warmup if args.warmup is None else args.warmup,
                memory_steps=args.memory_steps,
                device=device,
                seed=args.seed,
                profile=[c for c in args.profile.split(",") if c],
            )
        )
    text = write(results, args.out, command.strip(), not args.no_plot)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
