"""A systematic fault sweep: every closure call of every step of short runs, faulted.

For each optimizer and configuration a dry run counts the closure's calls per step (the
gradient evaluation, the replay check, the finite-difference probe, trials, the look at
``x`` after two non-finite losses, ...). The same run is then taken again, and at each step
``s`` every call ``k`` is faulted in turn:

* the closure raises (``RuntimeError``, ``KeyboardInterrupt``, a backward hook's error, a
  warning under ``-W error``): the exception propagates and the weights, buffers, ``.grad``,
  every group's settings and ``lr``, ``state_dict()``, ``last_step`` and the random stream
  are as before the step; the run then goes on in place, and each step equals the dry
  run's bit for bit;
* the closure returns NaN or +inf (or a NaN gradient at the gradient call), on a copy of the
  run: no exception; at the gradient call the step is skipped (``nonfinite``) with nothing
  but counters written; in a trial the trial fails (the step never ends at the faulted
  point); the weights stay finite and the next steps train.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from conftest import assert_bitwise_same

STEPS = 10
CONTINUED = 1  # steps run on after a NaN / inf fault
KINDS = {"search", "reuse", "zero_lr", "failed", "unresolved", "nonfinite", "zero_grad"}
KINDS |= {"kept", "exhausted"}  # ALSALS's


class Fault(RuntimeError):
    pass


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 1, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(6, 8, 1, generator=gen, dtype=torch.float64)
    return x, y


class Run:
    """A float64 MLP, its optimizer, and a closure whose calls are counted and faulted.

    ``outlier``: steps whose batch adds a stiff quadratic centred where its gradient is
    taken (a curvature the gradient does not see: the search cuts the step size deep, and
    ``cut_retry`` checks the cut on the next batch); ``nonfinite``: steps whose loss is NaN
    at the gradient call (two in a row: the undo of an untested update, ALSALS's look at
    ``x``); ``writes``: ``lr`` multiplied (0: set to 0) before a step; ``batchnorm``: a
    model with BatchNorm and dropout, its buffers protected."""

    def __init__(
        self,
        make,
        *,
        groups=False,
        form="plain",
        outlier=(),
        nonfinite=(),
        writes=None,
        batchnorm=False,
    ):
        torch.manual_seed(0)
        layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)]
        if batchnorm:
            layers[1:1] = [nn.BatchNorm1d(6), nn.Dropout(0.2)]
        self.model = nn.Sequential(*layers).double()
        self.x, self.y = _data()
        params = list(self.model.parameters())
        if groups:
            params = [
                {"params": params[:2]},
                {"params": params[2:], "lr_scale": 0.5, "weight_decay": 0.01},
            ]
        extra = {"buffers": self.model.buffers()} if batchnorm else {}
        self.opt = make(params, **extra)
        self.form, self.outlier = form, set(outlier)
        self.nonfinite, self.writes = set(nonfinite), writes or {}
        self.fault: tuple[int, str] | None = None
        self.calls: list[bool] = []  # this step's calls: autograd enabled (the gradient's)
        self.points: list[torch.Tensor] = []  # the weights each call saw
        self.model[0].weight.register_hook(self._hook)

    def _hook(self, grad):
        if self.fault == (len(self.calls), "hook"):
            raise Fault("in backward")
        return grad

    def before_step(self, s):
        """What the training loop does between steps, once before step ``s``."""
        if s in self.writes:
            for group in self.opt.param_groups:
                group["lr"] *= self.writes[s]

    def closure(self, s):
        x, y = self.x[s % len(self.x)], self.y[s % len(self.y)]
        model, anchor = self.model, []

        def loss():
            torch.rand(2)  # the closure draws random numbers
            k = len(self.calls) + 1
            self.calls.append(torch.is_grad_enabled())
            self.points.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
            value = nn.functional.mse_loss(model(x), y)
            if s in self.outlier:
                anchor[:] = anchor or [p.detach().clone() for p in model.parameters()]
                pairs = zip(model.parameters(), anchor, strict=True)
                stiff = sum(((p - a) ** 2).sum() for p, a in pairs)
                value = value + 1e3 * stiff
            kind = self.fault[1] if self.fault is not None and self.fault[0] == k else None
            if kind is None and k == 1 and s in self.nonfinite:
                kind = "nan"
            if kind == "raise":
                raise Fault(f"call {k}")
            if kind == "interrupt":
                raise KeyboardInterrupt(f"call {k}")
            if kind == "nan":
                return value * math.nan
            if kind == "inf":
                return value + math.inf
            if kind == "nan_grad":  # a finite loss, a NaN gradient
                w = model[0].weight[0, 0]
                return value + torch.sqrt(w - w)
            return value

        if self.form == "plain":
            return loss

        def with_backward(backward):
            if backward:
                self.opt.zero_grad()
            value = loss()
            if backward:
                value.backward()
            return value

        return with_backward

    def step(self, s, fault=None, werror=False):
        self.calls, self.points, self.fault = [], [], fault
        with warnings.catch_warnings():
            warnings.simplefilter("error" if werror else "ignore")
            return self.opt.step(self.closure(s))

    def copy(self):
        return copy.deepcopy(self)

    def weights(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def snapshot(self):
        opt = self.opt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = copy.deepcopy(opt.state_dict())  # (first: it adopts weight edits)
        return {
            "weights": self.weights(),
            "grads": [None if p.grad is None else p.grad.clone() for p in self.model.parameters()],
            "buffers": [b.clone() for b in self.model.buffers()],
            "groups": [
                copy.deepcopy({k: v for k, v in g.items() if k != "params"})
                for g in opt.param_groups
            ],
            "state": state,
            "rng": torch.get_rng_state(),
        }

    def full_loss(self):
        with torch.no_grad():
            out = self.model.eval()(self.x.reshape(-1, 4))
            self.model.train()
            return nn.functional.mse_loss(out, self.y.reshape(-1, 1)).item()


def tensors_of(state_dict):
    """Per-parameter tensors of a state dict (not the counters a skipped step writes)."""
    entries = {i: {n: v for n, v in e.items() if torch.is_tensor(v)} for i, e in state_dict.items()}
    return {i: e for i, e in entries.items() if e}


def dry_run(make, **options):
    run = Run(make, **options)
    record = []
    for s in range(STEPS):
        run.before_step(s)
        torch.manual_seed(1000 + s)
        run.step(s)
        grads = [None if p.grad is None else p.grad.clone() for p in run.model.parameters()]
        record.append((list(run.calls), run.weights(), grads, repr(run.opt.last_step)))
    return record


def check_raised(run, snap, s, k, kind, grads_after):
    """The step raised: everything as before it (the gradients: before the step's backward
    pass completed, as they were; after it, this step's)."""
    now = run.snapshot()
    for key in ("weights", "buffers", "groups", "state", "rng"):
        assert_bitwise_same(snap[key], now[key], f"{key} after {kind} at call {k} of step {s}")
    if kind in ("raise", "interrupt", "hook"):
        assert_bitwise_same(
            snap["grads"] if k == 1 else grads_after, now["grads"], f"grads, {kind} at {k}"
        )


def check_nonfinite(run, snap, s, k, kind, calls, second_skip):
    """NaN / inf / a NaN gradient at call ``k``, on a copy: no exception, the step skipped at
    the gradient call, a failed trial elsewhere; the copy trains on."""
    fork = run.copy()
    fork.step(s, (k, kind))
    info, weights = fork.opt.last_step, fork.weights()
    where = f"{kind} at call {k} of step {s}: {info}"
    assert info.kind in KINDS, where
    assert all(torch.isfinite(w).all() for w in weights), where
    if k == 1:
        assert info.kind == "nonfinite", where
    if info.kind == "nonfinite" and not second_skip:  # (the second undoes, restarts z)
        assert_bitwise_same(snap["weights"], weights, where)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            after = fork.opt.state_dict()["state"]
        assert_bitwise_same(tensors_of(snap["state"]["state"]), tensors_of(after), where)
    if not calls[k - 1]:  # a trial (or the replay check, the probe, the look at x)
        end = torch.cat([w.flatten() for w in weights])
        moved = not torch.equal(end, torch.cat([w.flatten() for w in snap["weights"]]))
        assert not (moved and torch.equal(end, fork.points[k - 1])), where
        if isinstance(fork.opt, ALSALS) and info.kind == "search" and not info.capped:
            assert math.isfinite(info.loss_decrease), where
    for t in range(s + 1, min(STEPS, s + 1 + CONTINUED)):
        fork.before_step(t)
        loss = fork.step(t)
        assert math.isfinite(loss.item()) or t in fork.nonfinite, f"{where}; step {t}"


def sweep(make, **options):
    """Returns the number of (step, call, fault) cases checked."""
    record = dry_run(make, **options)
    run = Run(make, **options)
    start = run.full_loss()
    cases = 0
    for s, (calls, weights, grads, info) in enumerate(record):
        run.before_step(s)
        torch.manual_seed(1000 + s)
        snap, last = run.snapshot(), run.opt.last_step
        for k, gradient_call in enumerate(calls, start=1):
            if gradient_call:
                faults = ["raise", "interrupt", "hook", "nan", "inf", "nan_grad", "nan_werror"]
            else:  # (KeyboardInterrupt takes Fault's way: at the step's last call only)
                faults = ["raise", "nan", "inf"] + ["interrupt"] * (k == len(calls))
            for kind in faults:
                cases += 1
                if kind in ("nan", "inf", "nan_grad"):
                    check_nonfinite(run, snap, s, k, kind, calls, s - 1 in run.nonfinite)
                    torch.set_rng_state(snap["rng"])
                    continue
                werror = kind == "nan_werror"
                fault = (k, "nan" if werror else kind)
                expected = {"raise": Fault, "interrupt": KeyboardInterrupt, "hook": Fault}
                if werror:  # where this step warns about the NaN: the warning is an error
                    try:
                        run.copy().step(s, fault, werror=True)
                        warns = False
                    except Warning:
                        warns = True
                    torch.set_rng_state(snap["rng"])
                    if not warns:
                        continue
                try:
                    run.step(s, fault, werror=werror)
                except expected.get(kind, Warning):
                    pass
                else:
                    pytest.fail(f"{kind} at call {k} of step {s} did not propagate")
                check_raised(run, snap, s, k, kind, grads)
                assert run.opt.last_step is last
        run.step(s)  # the step itself, after all that: the dry run's, bit for bit
        assert repr(run.opt.last_step) == info, s
        assert_bitwise_same(weights, run.weights(), f"weights after step {s}")
        assert len(run.calls) == len(calls)
    end = run.full_loss()
    assert math.isfinite(end) and end < 0.5 * start, (start, end)
    return cases


PAPER = ALSALS.paper
CLASSES = {
    "SLS": SLS,
    "AdamSLS": AdamSLS,
    "MomentumALSALS": MomentumALSALS,
    "ALSALS": ALSALS,
    "ALSALS.paper": PAPER,
}


def _cadence(cls):
    """A search in the first steps, then every 3rd: first-phase, cadence and reuse steps."""
    if cls is ALSALS:
        return {"initial_searches": 3, "search_interval": 3}
    return {"search_interval": 3}


def _floor(cls):
    """The other ``loss_floor`` than the class's default (ALSALS: 0 by default)."""
    return {"loss_floor": None if cls is ALSALS else 0.0}


CONFIGS = {
    "defaults": (lambda cls: {}, {}),
    "warmup": (lambda cls: {"warmup_steps": 4}, {}),
    "loss_floor": (_floor, {}),
    "cadence": (_cadence, {}),
    "groups": (lambda cls: {}, {"groups": True}),
    "clipped": (lambda cls: {"max_grad_norm": 0.5}, {}),
    "closure_backward": (lambda cls: {}, {"form": "backward"}),
    "batchnorm": (lambda cls: {}, {"batchnorm": True}),
    # two skips in a row after a reuse step (an untested update): the undo; ALSALS's look at x
    "two_nonfinite": (_cadence, {"nonfinite": (5, 6)}),
    # lr written: grown, 0 (zero_lr), cut, grown
    "written_lr": (_cadence, {"writes": {3: 5.0, 5: 0.0, 7: 0.1, 8: 3.0}}),
}
CASES = [(c, n) for c in CLASSES for n in CONFIGS]
# ALSALS's own: a cut beyond 10x in the first phase, checked on the next batch (cut_retry)
CASES += [("ALSALS", "outlier")]
CONFIGS["outlier"] = (_cadence, {"outlier": (1,)})


@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_a_fault_at_any_call_of_any_step(name, config):
    cls = CLASSES[name]
    settings, options = CONFIGS[config]

    def make(params, **extra):
        return cls(params, **settings(cls), **extra)

    assert sweep(make, **options) > 20


def test_the_outlier_run_reaches_the_retry():
    """The outlier configuration does reach ``cut_retry``: step 1 cuts the step size beyond
    10x, and step 2 searches again from the start step 1 had, on its own batch, and keeps
    the larger step size."""
    run = Run(lambda p: ALSALS(p, **_cadence(ALSALS)), outlier=(1,))
    run.step(0)
    run.step(1)
    assert run.opt.search_state.retry_from > 10 * run.opt.search_state.step_size
    run.step(2)
    assert run.opt.last_step.kind == "search" and run.opt.search_state.retry_from == 0.0
    assert run.opt.search_state.step_size > run.opt.last_step.step_size / 2 > 1e-2
