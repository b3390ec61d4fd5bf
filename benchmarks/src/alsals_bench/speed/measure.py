"""Measuring the configurations side by side on one workload: time, passes and memory.

``Bench`` runs the method of :mod:`alsals_bench.speed` (warm-up and snapshot, interleaved timed
repeats, a memory pass, the cost of the passes themselves); ``measure_model`` does it for
one of the ``MODELS``. Each configuration is driven by its registry stepper, whose passes
run inside a ``PassClock``: the time inside the passes is the closure's time, the rest of
the step is the optimizer's own.
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import gc
import io
import math
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alsals_bench.memory import LiveStorage, state_bytes
from alsals_bench.registry import SalsaStepper, Stepper
from alsals_bench.speed.configs import CONFIGS, Config
from alsals_bench.speed.workloads import MODELS, Batch, Workload


class PassClock:
    """Wall and CPU time spent inside the passes; the stepper enters it around each pass.
    On CUDA it synchronises the device on entry and exit."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.wall = 0.0
        self.cpu = 0.0
        self._start = (0.0, 0.0)

    def __enter__(self) -> None:
        self.sync()
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc: object) -> None:
        self.sync()
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


class Driver:
    """One configuration's stepper on the workload: one training step per batch, its passes
    timed and counted. SaLSa prints on exact cancellation: its output is counted, not shown."""

    def __init__(self, stepper: Stepper, work: Workload, device: torch.device) -> None:
        self.stepper = stepper
        self.work = work
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.clock = PassClock(self.sync)
        stepper.pass_clock = self.clock
        self.quiet = isinstance(stepper, SalsaStepper)
        self.cancellations = 0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    def step(self, batch: Batch) -> None:
        def closure() -> Tensor:
            return self.work.loss(self.work.model, batch)

        if not self.quiet:
            self.stepper.step(closure)
            return
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            self.stepper.step(closure)
        self.cancellations += sink.getvalue().count("cancelation")


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
    stepper: type[Stepper]  # the kind of stepper that drives it
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

    def _restore(self, config: Config) -> tuple[Driver, int]:
        snap = self.snapshots[config.name]
        self._load(snap.weights, snap.buffers)
        stepper = snap.stepper(clone_optimizer(snap.optimizer, self.params + self.buffers))
        torch.manual_seed(self.seed + 1)
        return Driver(stepper, self.work, self.device), snap.step

    def _run(self, driver: Driver, start: int, steps: int) -> None:
        batches = self.work.batches
        for i in range(steps):
            driver.step(batches[(start + i) % len(batches)])

    def warm_up(self, steps: int) -> None:
        """From the same initial state, settle each configuration and snapshot it."""
        for config in self.configs:
            self._load(*self.initial)
            torch.manual_seed(self.seed)
            stepper = config.build(self.work.model)
            self._run(Driver(stepper, self.work, self.device), 0, steps)
            weights, buffers = self._save()
            optimizer = clone_optimizer(stepper.optimizer, self.params + self.buffers)
            self.snapshots[config.name] = Snapshot(
                weights, buffers, optimizer, type(stepper), steps
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
                m.closure_s.append(driver.clock.wall / steps)
                m.cpu_step_s.append(cpu / steps)
                m.cpu_closure_s.append(driver.clock.cpu / steps)
                m.forwards = driver.stepper.forwards / steps
                m.backwards = driver.stepper.backwards / steps
                m.cancellations += driver.cancellations
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
