"""Optimizers by name, each wrapped so that the runner can drive any of them the same way.

A line search needs a closure; Adam wants ``backward(); step()`` and a schedule;
Schedule-Free wants ``train()``/``eval()`` around evaluation. ``Stepper`` hides those
differences behind ``step(closure) -> loss``. Every forward and backward pass of every
optimizer goes through the stepper's two pass methods, which count the passes and run inside
``pass_clock`` (the step-cost benchmark times them there).

Names:

* the paper's candidates (Sec. IV-A): ``alsals``, ``adam-sls``, ``adam`` (the paper's
  baseline: cosine decay with 10% warm-up on NLP tasks, a flat rate on images, peak learning
  rate from the task), and ``sls``;
* MomentumALSALS variants for the cost trade-off: ``alsals-analytic`` (slope ``-g.d``, no probe
  pass), ``alsals-adaptive`` (SaLSa's search cadence), ``alsals-fast`` (both);
* ``adam@LR``: the baseline with another peak learning rate; ``adam-tuned`` expands to
  ``adam@LR`` for every LR of the task's grid (``adam`` itself at the paper's LR, which every
  grid holds) and the report keeps the best;
* the untuned baseline ``adamw-cosine``: AdamW at one fixed peak rate (1e-3) on every
  task, linear warm-up over 5% of the steps then cosine decay to 0, torch's weight decay
  0.01: what a user does without a sweep (group ``baselines``);
* peers from PyPI (extra ``peers``): ``prodigy``, ``dadapt-adam``, ``schedulefree``,
  ``dog``, ``salsa`` (the authors' follow-up), ``momo-adam`` (MoMo-Adam, a Polyak-type
  step from the batch loss) and ``prodigy-sf`` (Prodigy + Schedule-Free), each with its
  documented defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from alsals import ALSALS, PAPER_ALSALS, SLS, AdamSLS, LineSearchOptimizer, MomentumALSALS
from alsals.optimizers import GROWTH_10_PERCENT
from alsals_bench.tasks.base import Budget, Task

PAPER = ("alsals", "adam-sls", "adam")
VARIANTS = ("sls", "alsals-analytic", "alsals-adaptive", "alsals-fast")
ABLATION = (
    "alsals",
    "alsals-analytic",
    "alsals-adaptive",
    "alsals-growth",
    "alsals-smooth",
    "alsals-backtrack",
    "alsals-c",
    "alsals-polyak",
    "alsals-preconditioned",
    "alsals-candidate",
    "alsals-settled",
    "alsals-interpolate",
    "alsals-trust",
    "alsals-capped",
    "alsals-guarded",
    "alsals-recommended",
    "alsals-recommended-uncapped",
    "alsals-recommended-preconditioned",
    "alsals-recommended-settled",
    "alsals-recommended-settled-preconditioned",
    "alsals-recommended-geometric",
    "alsals-recommended-tested",
    "alsals-recommended-c05",
    "alsals-recommended-c03",
    "alsals-recommended-capped-preconditioned",
)
#: the library's recommended configurations: ALSALS(params) and MomentumALSALS(params)
RECOMMENDED = ("alsals-schedulefree", "alsals-recommended")
PEERS = ("prodigy", "dadapt-adam", "schedulefree", "dog", "salsa", "momo-adam", "prodigy-sf")
#: untuned baselines: one configuration for every task, no sweep
BASELINES = ("adamw-cosine",)
#: the untuned baseline's settings: one peak rate for every task, warm-up over this fraction
#: of the steps, then cosine decay to 0; torch's default weight decay
ADAMW_COSINE_LR = 1e-3
ADAMW_COSINE_WARMUP = 0.05
ADAMW_COSINE_WEIGHT_DECAY = 0.01
GROUPS = {
    "paper": PAPER,
    "recommended": RECOMMENDED,
    "variants": VARIANTS,
    "peers": PEERS,
    "baselines": BASELINES,
    "ablation": ABLATION,
    "all": PAPER + RECOMMENDED + ("adam-tuned",) + BASELINES + VARIANTS + PEERS,
}


class Stepper:
    """Drives a torch-style optimizer (backward, step, schedule) through a closure."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.forwards = 0
        self.backwards = 0
        self._scheduled_lr: float | None = None  # the rate a scheduled step used
        # Settings the runner adds to a run's start record (Adam: its configured peak rate).
        self.start_info: dict[str, Any] = {}
        # Entered around every pass: a timer in the step-cost benchmark, nothing elsewhere.
        self.pass_clock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    def forward_backward(self, closure: Callable[[], Tensor]) -> Tensor:
        """A training pass: fresh gradients of the closure's loss."""
        with self.pass_clock:
            self.optimizer.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
        self.forwards += 1
        self.backwards += 1
        return loss

    def forward(self, closure: Callable[[], Tensor]) -> Tensor:
        """A trial pass: the loss only, no graph."""
        with self.pass_clock, torch.no_grad():
            loss = closure()
        self.forwards += 1
        return loss

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = self.forward_backward(closure)
        self.optimizer.step()
        if self.scheduler is not None:
            # Read before the schedule moves the rate on to the next step's.
            self._scheduled_lr = self._group_lr()
            self.scheduler.step()
        return loss.detach()

    def _group_lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["lr"]) * float(group.get("d", 1.0))

    @property
    def lr(self) -> float:
        """The learning rate the last step used (scaled by the estimate where there is one)."""
        if self._scheduled_lr is not None:
            return self._scheduled_lr
        return self._group_lr()

    def details(self) -> dict[str, Any]:
        return {}

    def seed(self, seed: int) -> None:
        """The run's seed, given by the runner after building: for an optimizer that draws
        random numbers of its own (SaLSa); nothing for the others."""

    def train(self) -> None:
        """Called before training steps (Schedule-Free swaps its weights here)."""

    def eval(self) -> None:
        """Called before evaluation."""


class LineSearchStepper(Stepper):
    """Drives our line searches, with the closure form that runs backward itself."""

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        def passes(backward: bool) -> Tensor:
            return self.forward_backward(closure) if backward else self.forward(closure)

        return self.optimizer.step(passes)

    def details(self) -> dict[str, Any]:
        # lr is the searched step size; step_size the one taken (smaller where capped);
        # loss_rose marks the steps where loss_rise_guard set a ceiling
        info = self.optimizer.last_step
        details = {
            "kind": info.kind,
            "trials": info.trials,
            "slope": info.slope,
            "step_size": info.step_size,
        }
        if info.loss_rose:
            details["loss_rose"] = True
        return details


class ScheduleFreeStepper(Stepper):
    def train(self) -> None:
        self.optimizer.train()

    def eval(self) -> None:
        self.optimizer.eval()


def _schedulefree_search(**settings: Any) -> Callable[[nn.Module, Task, Budget], Stepper]:
    """``ALSALS(params, **settings)`` as a user runs it (no warm-up)."""

    def build(model: nn.Module, task: Task, budget: Budget) -> Stepper:
        return LineSearchStepper(ALSALS(model.parameters(), buffers=model.buffers(), **settings))

    return build


class MomoStepper(Stepper):
    """MoMo-Adam needs the batch loss: its documented use is ``backward()`` then
    ``step(loss=loss)``.

    Its step size ``tau = min(lr / (1 - beta1^k), t1)`` (``t1`` the Polyak-type step from the
    loss) is a local of ``step``; ``lr`` reports it as measured on one small parameter:
    the update is ``-tau * m / D``, so ``tau = -<delta, m / D> / |m / D|^2`` (in float64, from
    the optimizer's state after the step; exact up to the rounding of ``delta``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        # Smallest first, but skip tiny tensors (a lone scale) whose update rounds coarsely.
        self._probes = sorted(params, key=lambda p: (p.numel() < 32, p.numel()))
        self._tau = math.nan

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = self.forward_backward(closure)
        probe = next((p for p in self._probes if p.grad is not None), None)
        before = None if probe is None else probe.detach().clone()
        self.optimizer.step(loss=loss.detach())
        self._tau = math.nan if probe is None else self._measure(probe, before)
        return loss.detach()

    def _measure(self, probe: Tensor, before: Tensor) -> float:
        state = self.optimizer.state[probe]
        group = next(g for g in self.optimizer.param_groups if any(p is probe for p in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        correction = 1 - beta2 ** state["step"]
        m, v = state["grad_avg"].double(), state["grad_avg_sq"].double()
        direction = m / ((v / correction).sqrt() + eps)
        norm = float((direction * direction).sum())
        if norm == 0:
            return math.nan
        delta = probe.detach().double() - before.double()
        return -float((delta * direction).sum()) / norm

    @property
    def lr(self) -> float:
        return self._tau


class DoGStepper(Stepper):
    """DoG's ``lr`` is a multiplier (1 by default); the step size it took is ``eta``."""

    @property
    def lr(self) -> float:
        eta = self.optimizer.param_groups[0].get("eta")
        return float(eta[0]) if eta else math.nan


class SalsaStepper(Stepper):
    """SaLSa's closure protocol: ``closure(backwards=...)`` runs backward when asked.

    ``SaLSA.step`` (salsa-optimizer 0.1.0) reseeds torch's global generator (and numpy's)
    with ``int(time.time())`` around every evaluation of the closure, so that its trial
    evaluations see the same dropout masks as the step's gradient; the masks therefore
    depend on the wall clock (two runs of one seed differ, and the steps within one second
    all draw the same masks). Once ``seed`` has given it
    the run's seed (the runner does), this stepper draws one seed per step from a private
    generator seeded by the run's seed and reseeds torch's generators with it at the start
    of every evaluation of the step, inside SaLSA's own reseeding: every evaluation of one
    step sees the same masks, as SaLSA intends, and the same seed gives the same run. Each
    evaluation runs under ``torch.random.fork_rng``, so the global streams are as before
    the step (as SaLSA leaves them too), and numpy's global state, which SaLSA reseeds
    without restoring, is put back after the step. Unseeded (the step-cost benchmark),
    it is SaLSA exactly as published.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        self._seeds: torch.Generator | None = None
        self._devices = sorted(
            {
                p.device.index or 0
                for group in optimizer.param_groups
                for p in group["params"]
                if p.device.type == "cuda"
            }
        )

    def seed(self, seed: int) -> None:
        self._seeds = torch.Generator().manual_seed(seed)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        if self._seeds is None:

            def salsa_closure(backwards: bool = False) -> Tensor:
                return self.forward_backward(closure) if backwards else self.forward(closure)

            return self.optimizer.step(salsa_closure).detach()

        step_seed = int(torch.randint(2**62, (1,), generator=self._seeds))
        devices = self._devices

        def seeded_closure(backwards: bool = False) -> Tensor:
            with torch.random.fork_rng(devices=devices):
                torch.default_generator.manual_seed(step_seed)
                for index in devices:
                    torch.cuda.default_generators[index].manual_seed(step_seed)
                return self.forward_backward(closure) if backwards else self.forward(closure)

        # numpy's legacy global state, the one SaLSA reseeds
        numpy_state = np.random.get_state()  # noqa: NPY002
        try:
            return self.optimizer.step(seeded_closure).detach()
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002

    @property
    def lr(self) -> float:
        return float(self.optimizer.step_size)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    description: str
    build: Callable[[nn.Module, Task, Budget], Stepper]
    package: str | None = None  # the PyPI distribution a peer comes from

    def available(self) -> bool:
        if self.package is None:
            return True
        try:
            importlib.import_module(_MODULES[self.package])
        except ImportError:
            return False
        return True


_MODULES = {
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "schedulefree": "schedulefree",
    "dog-optimizer": "dog",
    "salsa-optimizer": "salsa.SaLSA",
    "momo-opt": "momo",
    "prodigy-plus-schedule-free": "prodigyplus",
}


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up to the peak rate over ``warmup`` steps, then cosine decay to 0 at
    step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def paper_adam_schedule(
    optimizer: torch.optim.Optimizer, task: Task, budget: Budget
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Sec. IV-A: cosine decay after a 10% linear warm-up for NLP, a flat rate for images
    (tasks outside the paper's two domains decay, as a user's tuned Adam would)."""
    if task.domain == "image":
        return None
    warmup = max(budget.warmup_steps, math.ceil(0.1 * budget.steps))
    return warmup_cosine(optimizer, warmup, budget.steps)


def _adam(lr: float | None) -> Callable[[nn.Module, Task, Budget], Stepper]:
    """Adam under the paper's schedule at peak rate ``lr`` (None: the task's ``adam_lr``)."""

    def build(model: nn.Module, task: Task, budget: Budget) -> Stepper:
        peak = task.adam_lr if lr is None else lr
        optimizer = torch.optim.Adam(model.parameters(), lr=peak)
        stepper = Stepper(optimizer, paper_adam_schedule(optimizer, task, budget))
        # The configured peak rate, for the start record: the report places the run in the
        # Adam grid by it (the largest logged rate is lower when a run ends in its warm-up).
        stepper.start_info = {"peak_lr": peak}
        return stepper

    return build


def adam_rate(name: str) -> float:
    """The peak learning rate of ``adam@LR``; a ValueError unless LR is a positive, finite
    number (``adam@0`` would otherwise mean "no rate")."""
    text = name.split("@", 1)[1]
    try:
        lr = float(text)
    except ValueError:
        raise ValueError(f"invalid learning rate in optimizer name {name!r}") from None
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"invalid learning rate in optimizer name {name!r}: a peak rate is a positive, "
            f"finite number (adam@1e-3)"
        )
    return lr


def _adamw_cosine(model: nn.Module, task: Task, budget: Budget) -> Stepper:
    """The untuned baseline: one rate for every task, 5% warm-up (at least the task's shared
    warm-up), cosine decay to 0."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=ADAMW_COSINE_LR, weight_decay=ADAMW_COSINE_WEIGHT_DECAY
    )
    warmup = max(1, budget.warmup_steps, math.ceil(ADAMW_COSINE_WARMUP * budget.steps))
    return Stepper(optimizer, warmup_cosine(optimizer, warmup, budget.steps))


# All of the ablation's changes that SaLSa also makes, on our engine: a candidate configuration.
CANDIDATE: dict[str, Any] = {
    **PAPER_ALSALS,
    "slope": "analytic",
    "search_interval": "adaptive",
    "growth_interval": GROWTH_10_PERCENT,
    "smoothing": 0.9,
    "backtrack": 0.8,
}

# MomentumALSALS's defaults: the candidate, each search started no higher than the Polyak step and
# backtracking by interpolation, whose predicted step size is taken untested after a trial
# that lowered the loss but failed the test, every update capped by the Polyak step on
# MoMo's momentum model of the loss (loss_floor 0), and a step size that grew while the batch
# losses' average climbed sent back to its level at the lowest loss (loss_rise_guard 3).
RECOMMENDED: dict[str, Any] = {
    **CANDIDATE,
    "start": "polyak",
    "interpolate": True,
    "trust_interpolation": True,
    "loss_floor": 0.0,
    "loss_rise_guard": 3.0,
}
# The defaults before the Polyak cap (method.md section 11) and the loss-rise guard
# (section 12): the variants below were run without either and keep that, as measured.
UNCAPPED: dict[str, Any] = {**RECOMMENDED, "loss_floor": None, "loss_rise_guard": None}
# The defaults before trust_interpolation (method.md section 10): every trial tested. The
# variants of the defaults below were run with it and keep it, as measured.
TESTED: dict[str, Any] = {**UNCAPPED, "trust_interpolation": False}

# Our line searches by name: the class and its settings. ``alsals`` and its variants are
# the paper's configuration (PAPER_ALSALS) with one change each, whatever MomentumALSALS's defaults.
LINE_SEARCHES: dict[str, tuple[type[LineSearchOptimizer], dict[str, Any]]] = {
    "alsals": (MomentumALSALS, PAPER_ALSALS),
    "adam-sls": (AdamSLS, {}),
    "sls": (SLS, {}),
    "alsals-analytic": (MomentumALSALS, {**PAPER_ALSALS, "slope": "analytic"}),
    "alsals-adaptive": (MomentumALSALS, {**PAPER_ALSALS, "search_interval": "adaptive"}),
    "alsals-fast": (
        MomentumALSALS,
        {**PAPER_ALSALS, "slope": "analytic", "search_interval": "adaptive"},
    ),
    # ablation (#11): one change each from the paper's configuration
    "alsals-growth": (MomentumALSALS, {**PAPER_ALSALS, "growth_interval": GROWTH_10_PERCENT}),
    "alsals-smooth": (MomentumALSALS, {**PAPER_ALSALS, "smoothing": 0.9}),
    "alsals-backtrack": (MomentumALSALS, {**PAPER_ALSALS, "backtrack": 0.8}),
    "alsals-c": (MomentumALSALS, {**PAPER_ALSALS, "c": 0.3}),
    "alsals-polyak": (MomentumALSALS, {**PAPER_ALSALS, "start": "polyak"}),
    "alsals-preconditioned": (
        MomentumALSALS,
        {**PAPER_ALSALS, "search_direction": "preconditioned"},
    ),
    "alsals-candidate": (MomentumALSALS, CANDIDATE),
    "alsals-settled": (MomentumALSALS, {**PAPER_ALSALS, "search_interval": "settled"}),
    "alsals-interpolate": (MomentumALSALS, {**PAPER_ALSALS, "interpolate": True}),
    "alsals-trust": (
        MomentumALSALS,
        {**PAPER_ALSALS, "interpolate": True, "trust_interpolation": True},
    ),
    "alsals-capped": (MomentumALSALS, {**PAPER_ALSALS, "loss_floor": 0.0}),
    "alsals-guarded": (MomentumALSALS, {**PAPER_ALSALS, "loss_rise_guard": 3.0}),
    # the candidate, each search started no higher than the Polyak step, backtracking by
    # interpolation, trusting it: MomentumALSALS's defaults, spelled out so that the row does not
    # move if the defaults do
    "alsals-recommended": (MomentumALSALS, RECOMMENDED),
    # ... without the Polyak cap (the defaults before loss_floor, method.md section 11)
    "alsals-recommended-uncapped": (MomentumALSALS, UNCAPPED),
    # ... testing every trial (the defaults before trust_interpolation, method.md section 10)
    "alsals-recommended-tested": (MomentumALSALS, TESTED),
    # ... and searching along the preconditioned gradient instead
    "alsals-recommended-preconditioned": (
        MomentumALSALS,
        {**TESTED, "search_direction": "preconditioned"},
    ),
    # ... and with the cadence "settled" (an option: cheaper, see method.md section 8)
    "alsals-recommended-settled": (MomentumALSALS, {**TESTED, "search_interval": "settled"}),
    "alsals-recommended-settled-preconditioned": (
        MomentumALSALS,
        {**TESTED, "search_interval": "settled", "search_direction": "preconditioned"},
    ),
    # ... with plain backtracking (the defaults before interpolation, method.md section 9)
    "alsals-recommended-geometric": (MomentumALSALS, {**TESTED, "interpolate": False}),
    # MomentumALSALS's defaults with a looser Armijo test, and searching along the preconditioned
    # gradient, both with the Polyak cap in place (method.md section 17; none kept)
    "alsals-recommended-c05": (MomentumALSALS, {**RECOMMENDED, "c": 0.5}),
    "alsals-recommended-c03": (MomentumALSALS, {**RECOMMENDED, "c": 0.3}),
    "alsals-recommended-capped-preconditioned": (
        MomentumALSALS,
        {**RECOMMENDED, "search_direction": "preconditioned"},
    ),
}


def line_search_stepper(name: str, model: nn.Module, **settings: Any) -> LineSearchStepper:
    """The line search ``name`` of ``LINE_SEARCHES`` on ``model`` (its buffers protected from
    the trial evaluations), with ``settings`` added to its own."""
    cls, own = LINE_SEARCHES[name]
    return LineSearchStepper(
        cls(model.parameters(), buffers=model.buffers(), **{**own, **settings})
    )


#: rows that run ``MomentumALSALS(params)`` as a user does: its defaults, on every task as they are
#: (no shared warm-up to Adam's rate), like the peers at their documented defaults
AS_USERS_RUN_THEM = (
    "alsals-recommended",
    "alsals-recommended-uncapped",
    "alsals-recommended-preconditioned",
    "alsals-recommended-settled",
    "alsals-recommended-settled-preconditioned",
    "alsals-recommended-geometric",
    "alsals-recommended-tested",
    "alsals-recommended-c05",
    "alsals-recommended-c03",
    "alsals-recommended-capped-preconditioned",
)


def _line_search(name: str) -> Callable[[nn.Module, Task, Budget], Stepper]:
    """The paper's protocol: where a task warms up (the paper's GPT-2 runs, Sec. IV-A: "a
    warm-starting period of 2000 steps for all algorithms"), the line search warms up to the
    task's peak learning rate like Adam does, then takes over; elsewhere it starts from its
    own initial step. The rows of ``AS_USERS_RUN_THEM`` take no warm-up and no rate from the
    task anywhere: a tuned peak rate is what ``MomentumALSALS(params)`` exists to do without."""

    def build(model: nn.Module, task: Task, budget: Budget) -> Stepper:
        if name in AS_USERS_RUN_THEM:
            return line_search_stepper(name, model)
        warm = {"warmup_steps": budget.warmup_steps}
        if budget.warmup_steps:
            warm["lr"] = task.adam_lr
        return line_search_stepper(name, model, **warm)

    return build


def _peer(factory: Callable[..., torch.optim.Optimizer], stepper: type = Stepper):
    def build(model: nn.Module, task: Task, budget: Budget) -> Stepper:
        return stepper(factory(model, task, budget))

    return build


def _prodigy(model: nn.Module, task: Task, budget: Budget) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(model.parameters(), lr=1.0)


def _dadapt(model: nn.Module, task: Task, budget: Budget) -> torch.optim.Optimizer:
    from dadaptation import DAdaptAdam

    return DAdaptAdam(model.parameters(), lr=1.0)


def _schedulefree(model: nn.Module, task: Task, budget: Budget) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    # The authors' recommended defaults: lr 0.0025 and a warm-up (we use 5% of the run).
    return AdamWScheduleFree(
        model.parameters(), lr=0.0025, warmup_steps=max(1, int(0.05 * budget.steps))
    )


def _dog(model: nn.Module, task: Task, budget: Budget) -> torch.optim.Optimizer:
    from dog import DoG

    return DoG(model.parameters())


def _momo_adam(model: nn.Module, task: Task, budget: Budget) -> Stepper:
    from momo import MomoAdam

    # The authors' documented setting for MoMo-Adam: lr 1e-2 (their default), lower bound 0.
    return MomoStepper(MomoAdam(model.parameters(), lr=1e-2))


def _prodigy_sf(model: nn.Module, task: Task, budget: Budget) -> torch.optim.Optimizer:
    from prodigyplus import ProdigyPlusScheduleFree

    # Its defaults (lr 1, no schedule: "a constant scheduler should be used"); it prints a
    # note on construction about our single parameter group, which is silenced.
    with contextlib.redirect_stdout(io.StringIO()):
        return ProdigyPlusScheduleFree(model.parameters(), lr=1.0)


def salsa_stepper(model: nn.Module, **settings: Any) -> SalsaStepper:
    """The authors' SaLSa (``salsa-optimizer``) on ``model``, its defaults but ``settings``."""
    from salsa.SaLSA import SaLSA

    return SalsaStepper(SaLSA(model.parameters(), **settings))


def _salsa(model: nn.Module, task: Task, budget: Budget) -> Stepper:
    return salsa_stepper(model)


REGISTRY: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("alsals", "MomentumALSALS, the paper's defaults", _line_search("alsals")),
        OptimizerSpec("adam-sls", "Adam + SLS (Sec. II-B)", _line_search("adam-sls")),
        OptimizerSpec("adam", "Adam, the paper's baseline schedule and peak LR", _adam(None)),
        OptimizerSpec(
            "adamw-cosine",
            "AdamW at lr 1e-3 on every task, 5% warm-up, cosine to 0, weight decay 0.01",
            _adamw_cosine,
        ),
        OptimizerSpec("sls", "SLS along the gradient (Sec. II-A)", _line_search("sls")),
        OptimizerSpec(
            "alsals-analytic",
            "MomentumALSALS with the analytic slope -g.d (no probe pass)",
            _line_search("alsals-analytic"),
        ),
        OptimizerSpec(
            "alsals-adaptive",
            "MomentumALSALS with SaLSa's adaptive search cadence",
            _line_search("alsals-adaptive"),
        ),
        OptimizerSpec(
            "alsals-fast",
            "MomentumALSALS, analytic slope and adaptive cadence",
            _line_search("alsals-fast"),
        ),
        OptimizerSpec(
            "alsals-growth",
            "MomentumALSALS growing the step size 10% per search (SaLSa's)",
            _line_search("alsals-growth"),
        ),
        OptimizerSpec(
            "alsals-smooth", "MomentumALSALS with smoothing 0.9", _line_search("alsals-smooth")
        ),
        OptimizerSpec(
            "alsals-backtrack",
            "MomentumALSALS backtracking by 0.8",
            _line_search("alsals-backtrack"),
        ),
        OptimizerSpec("alsals-c", "MomentumALSALS with c = 0.3", _line_search("alsals-c")),
        OptimizerSpec(
            "alsals-polyak",
            "MomentumALSALS starting each search no higher than the Polyak step L0/s",
            _line_search("alsals-polyak"),
        ),
        OptimizerSpec(
            "alsals-preconditioned",
            "MomentumALSALS searching along the preconditioned gradient (Adam + SLS's and SaLSa's)",
            _line_search("alsals-preconditioned"),
        ),
        OptimizerSpec(
            "alsals-settled",
            "MomentumALSALS with the adaptive cadence that starts once the step size has settled",
            _line_search("alsals-settled"),
        ),
        OptimizerSpec(
            "alsals-recommended",
            "MomentumALSALS's defaults: the candidate with Polyak-limited starts, trusted interpolation, "
            "the Polyak cap and the loss-rise guard",
            _line_search("alsals-recommended"),
        ),
        OptimizerSpec(
            "alsals-recommended-uncapped",
            "alsals-recommended without the Polyak cap (the defaults before loss_floor)",
            _line_search("alsals-recommended-uncapped"),
        ),
        OptimizerSpec(
            "alsals-recommended-tested",
            "alsals-recommended testing every trial (the defaults before trust_interpolation)",
            _line_search("alsals-recommended-tested"),
        ),
        OptimizerSpec(
            "alsals-recommended-preconditioned",
            "alsals-recommended-tested searching along the preconditioned gradient",
            _line_search("alsals-recommended-preconditioned"),
        ),
        OptimizerSpec(
            "alsals-recommended-settled",
            "alsals-recommended-tested with the cadence 'settled'",
            _line_search("alsals-recommended-settled"),
        ),
        OptimizerSpec(
            "alsals-recommended-settled-preconditioned",
            "alsals-recommended-settled searching along the preconditioned gradient",
            _line_search("alsals-recommended-settled-preconditioned"),
        ),
        OptimizerSpec(
            "alsals-recommended-geometric",
            "alsals-recommended-tested with plain backtracking (no interpolation)",
            _line_search("alsals-recommended-geometric"),
        ),
        OptimizerSpec(
            "alsals-recommended-c05",
            "MomentumALSALS's defaults with c = 0.5",
            _line_search("alsals-recommended-c05"),
        ),
        OptimizerSpec(
            "alsals-recommended-c03",
            "MomentumALSALS's defaults with c = 0.3",
            _line_search("alsals-recommended-c03"),
        ),
        OptimizerSpec(
            "alsals-recommended-capped-preconditioned",
            "MomentumALSALS's defaults searching along the preconditioned gradient",
            _line_search("alsals-recommended-capped-preconditioned"),
        ),
        OptimizerSpec(
            "alsals-interpolate",
            "MomentumALSALS with interpolated backtracking (fewer trials per search)",
            _line_search("alsals-interpolate"),
        ),
        OptimizerSpec(
            "alsals-trust",
            "MomentumALSALS with interpolated backtracking, its predicted step size taken untested",
            _line_search("alsals-trust"),
        ),
        OptimizerSpec(
            "alsals-capped",
            "MomentumALSALS with every update capped by the Polyak step on MoMo's momentum model",
            _line_search("alsals-capped"),
        ),
        OptimizerSpec(
            "alsals-guarded",
            "MomentumALSALS with the loss-rise guard: a step size that grew while the loss climbed goes back",
            _line_search("alsals-guarded"),
        ),
        OptimizerSpec(
            "alsals-candidate",
            "MomentumALSALS: analytic slope, adaptive cadence, growth 10%, smoothing 0.9, backtrack 0.8",
            _line_search("alsals-candidate"),
        ),
        OptimizerSpec(
            "alsals-schedulefree",
            "ALSALS: Schedule-Free AdamW, its step size set by an Armijo search",
            _schedulefree_search(),
        ),
        # its ablation (method.md section 18): one choice off each
        OptimizerSpec(
            "alsals-schedulefree-first-phase-never",
            "ALSALS searching in each of the first 10 steps whatever they find",
            _schedulefree_search(first_phase="never"),
        ),
        OptimizerSpec(
            "alsals-schedulefree-first-phase-settled",
            "ALSALS ending the first 10 steps' searches once the step size settled",
            _schedulefree_search(first_phase="settled"),
        ),
        OptimizerSpec(
            "alsals-schedulefree-geometric",
            "ALSALS with plain backtracking (no interpolation)",
            _schedulefree_search(interpolate=False),
        ),
        OptimizerSpec(
            "alsals-schedulefree-uncapped",
            "ALSALS of method.md section 18 without the Polyak cap on every step",
            _schedulefree_search(
                polyak_cap=False,
                polyak_start="sets",
                rise_restart=False,
                late_retry=False,
                regrowth=None,
            ),
        ),
        OptimizerSpec(
            "alsals-schedulefree-lead-shrink",
            "ALSALS (section 19) shrinking its step size while z trails x",
            _schedulefree_search(
                lead_rule="shrink",
                polyak_start="sets",
                rise_restart=False,
                late_retry=False,
                regrowth=None,
            ),
        ),
        OptimizerSpec(
            "alsals-schedulefree-polyak-start-sets",
            "ALSALS whose Polyak start bound sets the step size (method.md section 18)",
            _schedulefree_search(
                polyak_start="sets", rise_restart=False, late_retry=False, regrowth=None
            ),
        ),
        OptimizerSpec(
            "alsals-schedulefree-lead-hold",
            "ALSALS (section 19) holding its step size while z trails x",
            _schedulefree_search(
                lead_rule="hold",
                polyak_start="sets",
                rise_restart=False,
                late_retry=False,
                regrowth=None,
            ),
        ),
        OptimizerSpec(
            "alsals-schedulefree-kept-shrink",
            "ALSALS shrinking its step size after a run of kept searches beyond chance",
            _schedulefree_search(kept_rule="shrink"),
        ),
        OptimizerSpec(
            "alsals-schedulefree-no-cut-retry",
            "ALSALS without cut_retry: a cut beyond 10x in the first phase stands (section 32)",
            _schedulefree_search(cut_retry=False),
        ),
        OptimizerSpec(
            "alsals-schedulefree-no-late-retry",
            "ALSALS of 0.2.6: only cuts beyond 10x checked on the next batch (method.md 34)",
            _schedulefree_search(late_retry=False, regrowth=None),
        ),
        OptimizerSpec(
            "alsals-schedulefree-no-regrowth",
            "ALSALS of 0.2.7: growth by 10% per search after a cut too (method.md section 35)",
            _schedulefree_search(regrowth=None),
        ),
        OptimizerSpec(
            "alsals-schedulefree-c03",
            "ALSALS with a looser Armijo test, c=0.3 (exploration, method.md section 33)",
            _schedulefree_search(c=0.3),
        ),
        OptimizerSpec(
            "alsals-schedulefree-no-start-rise",
            "ALSALS without halving a step size whose loss rose above the start (method.md 33)",
            _schedulefree_search(start_rise=False),
        ),
        OptimizerSpec(
            "alsals-schedulefree-no-restart",
            "ALSALS whose loss-rise guard does not restart z at x (method.md section 22)",
            _schedulefree_search(rise_restart=False),
        ),
        OptimizerSpec("prodigy", "Prodigy (lr=1)", _peer(_prodigy), "prodigyopt"),
        OptimizerSpec("dadapt-adam", "D-Adaptation Adam (lr=1)", _peer(_dadapt), "dadaptation"),
        OptimizerSpec(
            "schedulefree",
            "Schedule-Free AdamW (lr 0.0025, 5% warm-up)",
            _peer(_schedulefree, ScheduleFreeStepper),
            "schedulefree",
        ),
        OptimizerSpec("dog", "DoG (defaults)", _peer(_dog, DoGStepper), "dog-optimizer"),
        OptimizerSpec("salsa", "SaLSa, the authors' follow-up", _salsa, "salsa-optimizer"),
        OptimizerSpec("momo-adam", "MoMo-Adam (lr 1e-2, step(loss=...))", _momo_adam, "momo-opt"),
        OptimizerSpec(
            "prodigy-sf",
            "Prodigy + Schedule-Free (lr 1, defaults)",
            _peer(_prodigy_sf, ScheduleFreeStepper),
            "prodigy-plus-schedule-free",
        ),
    )
}


def get_optimizer(name: str) -> OptimizerSpec:
    """The spec for ``name``; ``adam@LR`` gives the baseline at peak learning rate LR."""
    if name.startswith("adam@"):
        lr = adam_rate(name)
        return OptimizerSpec(name, f"Adam, the paper's schedule, peak LR {lr:g}", _adam(lr))
    if name not in REGISTRY:
        known = ", ".join([*REGISTRY, "adam@LR", "adam-tuned", *GROUPS])
        raise ValueError(f"unknown optimizer {name!r}; known: {known}")
    spec = REGISTRY[name]
    if not spec.available():
        raise ValueError(
            f"optimizer {name!r} needs the PyPI package {spec.package!r}: "
            f"pip install {spec.package} (or pip install 'alsals-bench[peers]')"
        )
    return spec


def expand(names: list[str], task: Task) -> list[str]:
    """Resolve groups (``paper``, ``peers``, ...) and ``adam-tuned`` into run names."""
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out += expand(list(GROUPS[name]), task)
        elif name == "adam-tuned":
            # The grid point at the paper's peak LR is the ``adam`` run itself.
            out += ["adam" if lr == task.adam_lr else f"adam@{lr:g}" for lr in task.adam_grid]
        else:
            out.append(name)
    return list(dict.fromkeys(out))
