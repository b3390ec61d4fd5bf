"""The fast optimizers, step by step, against the float64 reference of docs/algorithms.md.

Every test runs ``alsals.{SLS,AdamSLS,MomentumALSALS}`` on float64 parameters next to
``tests/reference.py`` on the same loss functions and asserts after every step: the weights,
``optimizer.last_step``, the ``line_search`` state, the Adam moments and the group ``lr``.
Each case also asserts that the behaviour it is about (backtracking, reused step sizes,
warm-up, failed searches, ...) actually happened, so that no case passes vacuously.
The last part checks the reference itself against values computed by hand.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from alsals import SLS, AdamSLS, MomentumALSALS
from reference import (
    GroupConfig,
    ReferenceOptimizer,
    StepRecord,
    adaptive_interval,
    armijo_constant,
    make_config,
)

F64 = torch.float64
# The reference transcribes the paper's configurations: MomentumALSALS is built as MomentumALSALS.paper.
CLASSES = {"SLS": SLS, "AdamSLS": AdamSLS, "MomentumALSALS": MomentumALSALS.paper}
GROUP_KEYS = ("lr_scale", "weight_decay", "betas", "eps")

# Tolerances: weights and everything derived from exact float64 arithmetic are held tight.
# A finite-difference slope divides a loss difference by 5e-8: see SideBySide.slope_tol.
W_TOL = {"rtol": 1e-10, "atol": 1e-12}
SCALAR_RTOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention on a loaded box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# Problems: a loss function of a flat list of weights, per step k, and initial weights.
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    groups: list[list[Tensor]]  # initial weights, grouped
    loss_at: Callable[[int], Callable[[list[Tensor]], Tensor]]  # step k -> f


def quadratic_matrix(dim: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed SPD ``A`` (eigenvalues 1 .. 20) and minimiser ``w*``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    eigenvalues = torch.logspace(0, math.log10(20), dim, dtype=F64)
    a = q @ torch.diag(eigenvalues) @ q.T
    return 0.5 * (a + a.T), torch.randn(dim, generator=gen, dtype=F64)


def quadratic_problem() -> Problem:
    """``0.5 (w - w*)^T A (w - w*)`` with ``w`` split over a (2, 2) and a (2,) tensor."""
    a, w_star = quadratic_matrix()
    gen = torch.Generator().manual_seed(1)
    init = [
        3 * torch.randn(2, 2, generator=gen, dtype=F64),
        torch.randn(2, generator=gen, dtype=F64),
    ]

    def f(ws: list[Tensor]) -> Tensor:
        e = torch.cat([w.reshape(-1) for w in ws]) - w_star
        return 0.5 * e @ (a @ e)

    return Problem("quadratic", [init], lambda k: f)


def logistic_problem(n: int = 96, features: int = 5, batch: int = 16, l2: float = 0.05) -> Problem:
    """L2-regularised logistic regression on a fixed noisy dataset, a fixed cycle of
    mini-batches. The penalty bounds the step sizes, so rounding is not amplified."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, features, generator=gen, dtype=F64)
    teacher = torch.randn(features, generator=gen, dtype=F64)
    y = (x @ teacher + 0.8 * torch.randn(n, generator=gen, dtype=F64) > 0).to(F64)
    order = torch.randperm(n, generator=gen)
    batches = [order[i : i + batch] for i in range(0, n, batch)]
    init = [torch.randn(features, generator=gen, dtype=F64), torch.zeros(1, dtype=F64)]

    def loss_at(k: int):
        idx = batches[k % len(batches)]
        xb, yb = x[idx], y[idx]

        def f(ws: list[Tensor]) -> Tensor:
            weight, bias = ws
            logits = xb @ weight + bias
            penalty = 0.5 * l2 * (weight * weight).sum()  # keeps it strongly convex
            return nn.functional.binary_cross_entropy_with_logits(logits, yb) + penalty

        return f

    return Problem("logistic", [init], loss_at)


def two_group_problem(unused_first: bool = False, intermittent: bool = False) -> Problem:
    """A tanh MLP regression; group 0 = first layer, group 1 = second layer + a parameter
    the loss never touches (its ``.grad`` stays ``None``), or with ``intermittent`` touches
    only on every third step."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(48, 3, generator=gen, dtype=F64)
    y = torch.sin(x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    w1 = 0.5 * torch.randn(5, 3, generator=gen, dtype=F64)
    b1 = 0.1 * torch.randn(5, generator=gen, dtype=F64)
    w2 = 0.5 * torch.randn(5, generator=gen, dtype=F64)
    b2 = torch.zeros(1, dtype=F64)
    unused = torch.randn(4, generator=gen, dtype=F64)
    if unused_first:
        groups = [[unused, w1, b1], [w2, b2]]
        pick, spare = (1, 2, 3, 4), 0
    else:
        groups = [[w1, b1], [w2, unused, b2]]
        pick, spare = (0, 1, 2, 4), 3

    def loss_at(k: int):
        idx = torch.arange(12 * (k % 4), 12 * (k % 4) + 12)

        def f(ws: list[Tensor]) -> Tensor:
            a1, c1, a2, c2 = (ws[i] for i in pick)
            pred = torch.tanh(x[idx] @ a1.T + c1) @ a2 + c2
            loss = ((pred - y[idx]) ** 2).mean()
            if intermittent and k % 3 == 0:
                loss = loss + 0.1 * ((ws[spare] - 1) ** 2).mean()
            return loss

        return f

    return Problem("two_group", groups, loss_at)


def offset_quadratic_problem() -> Problem:
    """The quadratic plus 1: near its minimum the loss is ~1, so float64 rounding of the
    loss (~2e-16) hides the remaining decrease after a few dozen steps (phase 5.3)."""
    base = quadratic_problem()
    f = base.loss_at(0)
    return Problem("offset_quadratic", base.groups, lambda k: lambda ws: f(ws) + 1.0)


def below_zero_quadratic_problem() -> Problem:
    """The quadratic minus 5: its loss goes below ``loss_floor=0`` (and ``start="polyak"``'s
    floor 0), which held down to 0 would stall the run there (phases 5.2, 5.6)."""
    base = quadratic_problem()
    f = base.loss_at(0)
    return Problem("below_zero_quadratic", base.groups, lambda k: lambda ws: f(ws) - 5.0)


def noisy_regression_problem(n: int = 512, features: int = 16, batch: int = 8) -> Problem:
    """Linear regression on noisy targets (the loss cannot reach 0), mini-batches of 8
    reshuffled each epoch: every batch accepts a step too large for the expected loss, and
    without a guard the training loss climbs back from its lowest (phase 5.7)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, features, generator=gen, dtype=F64) / math.sqrt(features)
    y = x @ torch.randn(features, generator=gen, dtype=F64) + torch.randn(
        n, generator=gen, dtype=F64
    )
    per_epoch = n // batch
    epochs = [torch.randperm(n, generator=gen) for _ in range(4)]
    init = [torch.zeros(features, dtype=F64), torch.zeros(1, dtype=F64)]

    def loss_at(k: int):
        order = epochs[(k // per_epoch) % len(epochs)]
        idx = order[batch * (k % per_epoch) : batch * (k % per_epoch + 1)]

        def f(ws: list[Tensor]) -> Tensor:
            weight, bias = ws
            return 0.5 * ((x[idx] @ weight + bias - y[idx]) ** 2).mean()

        return f

    return Problem("noisy_regression", [init], loss_at)


def tie_problem() -> Problem:
    """``max(w0 + w1, -w0) + 0.01 ||w||^2 + 5`` from a point where both pieces are equal:
    autograd's gradient is the first piece's, along which the second rises for every step
    size (phase 5.8). Integers, so the tie is exact."""
    init = [torch.tensor([1.0, -2.0], dtype=F64)]

    def f(ws: list[Tensor]) -> Tensor:
        (w,) = ws
        return torch.stack([w[0] + w[1], -w[0]]).max() + 0.01 * (w**2).sum() + 5.0

    return Problem("tie", [init], lambda k: f)


def surrogate_problem() -> Problem:
    """The loss ``||w||^2 + 5`` with the gradient of ``-||w||^2 / 2``, as a closure with a
    detached term gives: every search's trials contradict its slope (phase 5.8)."""
    init = [torch.tensor([1.0, -2.0, 0.5], dtype=F64)]

    def f(ws: list[Tensor]) -> Tensor:
        (w,) = ws
        surrogate = -0.5 * (w**2).sum()
        return ((w**2).sum() + 5.0).detach() + surrogate - surrogate.detach()

    return Problem("surrogate", [init], lambda k: f)


PROBLEMS = {
    "surrogate": surrogate_problem,
    "tie": tie_problem,
    "below_zero_quadratic": below_zero_quadratic_problem,
    "noisy_regression": noisy_regression_problem,
    "quadratic": quadratic_problem,
    "logistic": logistic_problem,
    "offset_quadratic": offset_quadratic_problem,
}


# --------------------------------------------------------------------------------------
# Running both side by side
# --------------------------------------------------------------------------------------


class SideBySide:
    """The fast optimizer and the reference, built from the same options."""

    def __init__(self, variant, problem, options, group_options=None):
        group_options = group_options or [{} for _ in problem.groups]
        self.problem = problem
        self.params = [[nn.Parameter(w.clone()) for w in weights] for weights in problem.groups]
        self.flat = [p for group in self.params for p in group]
        fast_groups = [
            {"params": ps, **go} for ps, go in zip(self.params, group_options, strict=True)
        ]
        self.opt = CLASSES[variant](fast_groups, **options)

        search = {k: v for k, v in options.items() if k not in GROUP_KEYS}
        defaults = {k: v for k, v in options.items() if k in GROUP_KEYS}
        configs = [GroupConfig(**{**defaults, **go}) for go in group_options]
        self.ref = ReferenceOptimizer(
            list(zip(problem.groups, configs, strict=True)), make_config(variant, **search)
        )
        self.largest_loss = 1.0
        self.compare_counters = True
        self.records: list[StepRecord] = []
        self.totals = {"forwards": 0, "backwards": 0, "trials": 0}

    def step(self, f) -> None:
        fast_loss = self.opt.step(lambda: f(self.flat))
        ref_loss = self.ref.step(f)
        rec = self.ref.last_step
        self.records.append(rec)
        if math.isfinite(ref_loss):
            self.largest_loss = max(self.largest_loss, abs(ref_loss))
        for key in self.totals:
            self.totals[key] += getattr(rec, key)
        assert fast_loss.item() == pytest.approx(ref_loss, rel=SCALAR_RTOL, nan_ok=True)
        self.check()

    def run(self, steps: int, loss_at=None) -> None:
        loss_at = loss_at or self.problem.loss_at
        for k in range(steps):
            try:
                self.step(loss_at(k))
            except AssertionError as err:
                raise AssertionError(f"step {k}: {err}") from err

    def kinds(self) -> list[str]:
        return [r.kind for r in self.records]

    # -- the comparisons -----------------------------------------------------------------
    def check(self) -> None:
        self.check_weights()
        self.check_step_info()
        self.check_line_search_state()
        self.check_param_state()
        for group, lr in zip(self.opt.param_groups, self.ref.lr, strict=True):
            assert group["lr"] == pytest.approx(lr, rel=SCALAR_RTOL)

    def slope_tol(self) -> dict[str, float]:
        """A finite-difference slope is (L0 - L) / lambda: one rounding of a loss moves it
        by ~ulp(L) / lambda (~2e-9 at L ~ 1), far above the float64 resolution."""
        if self.ref.config.slope == "finite_difference":
            ulps = 64 * torch.finfo(F64).eps * self.largest_loss
            return {"rel": 1e-9, "abs": ulps / self.ref.config.fd_step}
        return {"rel": 1e-9, "abs": 1e-12}

    def check_weights(self) -> None:
        for i, (p, w) in enumerate(zip(self.flat, self.ref.weights, strict=True)):
            assert p.dtype == F64
            torch.testing.assert_close(p.detach(), w, **W_TOL, msg=lambda m, i=i: f"w[{i}]: {m}")

    def check_step_info(self) -> None:
        info, rec = self.opt.last_step, self.ref.last_step
        assert info.kind == rec.kind
        if self.compare_counters:
            assert (info.trials, info.forwards, info.backwards) == (
                rec.trials,
                rec.forwards,
                rec.backwards,
            )
        assert info.loss == pytest.approx(rec.loss, rel=SCALAR_RTOL, nan_ok=True)
        if rec.kind in ("search", "reuse"):  # failed, unresolved: unspecified
            assert info.step_size == pytest.approx(rec.step_size, rel=SCALAR_RTOL)
        assert info.slope == pytest.approx(rec.slope, **self.slope_tol(), nan_ok=True)
        assert info.loss_decrease == pytest.approx(
            rec.loss_decrease, rel=1e-8, abs=1e-13, nan_ok=True
        )
        assert info.grad_norm == pytest.approx(rec.grad_norm, rel=1e-12, nan_ok=True)
        assert info.capped == rec.polyak_capped
        assert info.loss_rose == rec.loss_rose

    def line_search_state(self) -> dict:
        holders = [
            self.opt.state[p]["line_search"]
            for p in self.flat
            if "line_search" in self.opt.state[p]
        ]
        assert len(holders) == 1
        assert "line_search" in self.opt.state[self.flat[0]]  # on the first parameter
        return holders[0]

    def check_line_search_state(self) -> None:
        ls, st = self.line_search_state(), self.ref.state
        exact = {
            "step": st.step,
            "searches": st.searches,
            "steps_since_search": st.steps_since_search,
            "failed_searches": st.failed_searches,
            "skipped_nonfinite": st.skipped_nonfinite,
            "averaged": st.averaged,
            "floor_hits": st.floor_hits,
            "kinks_passed": st.kinks_passed,
            "kinks_in_a_row": st.kinks_in_a_row,
            **(self.totals if self.compare_counters else {}),
        }
        assert {k: ls[k] for k in exact} == exact
        for key, value in (
            ("step_size", st.step_size),
            ("initial_step_size", st.initial_step_size),
            ("step_size_fast", st.eta_fast),
            ("step_size_slow", st.eta_slow),
        ):
            assert ls[key] == pytest.approx(value, rel=SCALAR_RTOL), key
        decrease_tol = 1e-13
        if self.ref.config.trust_interpolation:
            # D holds predicted decreases x s - k x^2 / 2 = x (1 - x / eta) s + ...: the
            # slope's tolerance, times at most the step size
            largest = max((r.step_size for r in self.records if r.kind == "search"), default=0)
            decrease_tol += self.slope_tol()["abs"] * largest
        assert ls["decrease_avg"] == pytest.approx(st.decrease_avg, rel=1e-8, abs=decrease_tol)
        assert ls["slope_avg"] == pytest.approx(st.slope_avg, **self.slope_tol())
        assert ls["model_steps"] == st.model_steps
        assert ls["loss_samples"] == st.loss_samples
        assert ls["step_size_ceiling"] == pytest.approx(st.step_size_ceiling, rel=SCALAR_RTOL)
        for key in (
            "loss_avg",
            "loss_spread_avg",
            "loss_lowest",
            "step_size_avg",
            "moves_avg",
            "step_size_at_lowest",
            "loss_error_at_lowest",
            "ceiling_loss",
        ):
            assert ls[key] == pytest.approx(getattr(st, key), rel=1e-10, abs=1e-14), key
        for key in ("model_loss_avg", "model_anchor_avg"):
            assert ls[key] == pytest.approx(getattr(st, key), rel=1e-8, abs=1e-10), key

    def check_param_state(self) -> None:
        for i, p in enumerate(self.flat):
            fast = {k: v for k, v in self.opt.state[p].items() if k != "line_search"}
            ref = self.ref.param_state.get(i)
            if not self.ref.config.adam or ref is None:
                if fast and self.ref.config.adam:  # created lazily at their start values
                    assert fast["step"] == 0, f"param {i} has state {fast}"
                    assert not fast["exp_avg"].any() and not fast["exp_avg_sq"].any()
                else:
                    assert not fast, f"param {i} has state {sorted(fast)}"
                continue
            assert fast["step"] == ref.t
            torch.testing.assert_close(fast["exp_avg"], ref.m, **W_TOL)
            torch.testing.assert_close(fast["exp_avg_sq"], ref.v, **W_TOL)


def assert_happened(records: list[StepRecord], expect: set[str]) -> None:
    """The behaviours a case is about did occur (so the comparison is not vacuous)."""
    kinds = [r.kind for r in records]
    checks = {
        "backtracked": any(r.kind in ("search", "failed") and r.trials > 1 for r in records),
        "reuse": "reuse" in kinds,
        # a search during warm-up (it starts at the ramp's value)
        "warmup": any(r.kind == "search" and r.capped for r in records),
        "failed": "failed" in kinds,
        "accepted": "search" in kinds,
        # G <= 0 at a search: the c_h = 1 / c branch of Eq. 8 decided it.
        "c_h_switch": any(r.kind in ("search", "failed") and r.slope_avg <= 0 for r in records),
        "unresolved": "unresolved" in kinds,
        "clipped": any(r.clipped for r in records),
        # a search whose first trial was the Polyak step L0 / s, below the grown eta
        "polyak": any(r.tried and r.tried[0] < r.grown for r in records),
        # a search that took the interpolated step size untested (trust_interpolation)
        "trusted": any(r.trusted for r in records),
        # the Polyak cap on the momentum model cut a step size (loss_floor)
        "polyak_capped": any(r.polyak_capped for r in records),
        # the loss-rise guard found the loss climbing and cut the ceiling (loss_rise_guard)
        "loss_rose": any(r.loss_rose for r in records),
        # the run found its floor wrong and stopped using it (phases 5.2, 5.6)
        "floor_refuted": any(r.floor_refuted for r in records),
        "below_zero": any(r.loss < 0 for r in records),
        # a search whose trials contradicted its slope accepted a trial (phase 5.8)
        "kink": any(r.kink for r in records),
    }
    missing = {e for e in expect if not checks[e]}
    assert not missing, f"never happened: {missing}; kinds={kinds}"


# --------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------

#: MomentumALSALS's defaults, as the paper's configuration plus overrides (checked against
#: ``MomentumALSALS()`` by ``test_the_defaults_case_is_alsals_defaults``).
RECOMMENDED = {
    "slope": "analytic",
    "search_interval": "adaptive",
    "start": "polyak",
    "search_direction": "momentum",
    "growth_interval": math.log(2) / math.log(1.1),
    "backtrack": 0.8,
    "smoothing": 0.9,
    "interpolate": True,
    "trust_interpolation": True,
    "loss_floor": 0.0,
    "loss_rise_guard": 3.0,
}


def test_the_defaults_case_is_alsals_defaults():
    """The reference case ``alsals-defaults`` runs exactly ``MomentumALSALS(params, lr=...)``."""
    defaults = MomentumALSALS([torch.zeros(1, requires_grad=True)]).defaults
    paper = MomentumALSALS.paper([torch.zeros(1, requires_grad=True)], **RECOMMENDED).defaults
    assert defaults == paper


#: a case where the smoothed slope turns negative (c_h = 1 / c) under interpolation
C_H_SWITCH_INTERPOLATE = {
    "lr": 3.0,
    "smoothing": 0.5,
    "betas": (0.99, 0.999),
    "growth_interval": 2,
    "interpolate": True,
}

CASES = [
    (
        "alsals-logistic-polyak",
        "MomentumALSALS",
        "logistic",
        {"lr": 50.0, "start": "polyak", "slope": "analytic", "growth_interval": 7.0},
        20,
        {"accepted", "polyak"},
    ),
    (
        "sls-quadratic-polyak-fd",
        "SLS",
        "quadratic",
        # fd_step 1e-2: the Polyak step (L0 - f*) / s, and so the weights, inherit the
        # finite difference's rounding, ~ulp / fd_step (relative 1e-9 at 5e-8: above W_TOL)
        {"lr": 50.0, "start": "polyak", "slope": "finite_difference", "fd_step": 1e-2},
        20,
        {"accepted", "polyak"},
    ),
    (
        "alsals-logistic-clipped",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, "max_grad_norm": 0.05, "slope": "analytic"},
        20,
        {"backtracked", "accepted", "clipped"},
    ),
    (
        "sls-quadratic-clipped",
        "SLS",
        "quadratic",
        {"max_grad_norm": 1.0},
        20,
        {"backtracked", "accepted", "clipped"},
    ),
    # at the float64 rounding floor of a quadratic every trial is unresolved (phase 5.5)
    ("sls-floor", "SLS", "offset_quadratic", {}, 260, {"unresolved", "accepted"}),
    (
        "alsals-floor",
        "MomentumALSALS",
        "offset_quadratic",
        {"slope": "analytic", "smoothing": 0.0},
        400,
        {"unresolved", "accepted"},
    ),
    (
        "alsals-logistic-preconditioned-search",
        "MomentumALSALS",
        "logistic",
        {"lr": 20.0, "search_direction": "preconditioned", "slope": "analytic", "smoothing": 0.9},
        30,
        {"backtracked", "accepted"},
    ),
    (
        "alsals-defaults",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, **RECOMMENDED},
        80,
        {"backtracked", "reuse", "polyak", "polyak_capped"},
    ),
    # loss_floor's Polyak cap: SLS's is the batch's Polyak step (no momentum); AdamSLS
    # caps its update along the momentum; a floor above 0, clipped gradients, warm-up
    (
        "sls-quadratic-loss-floor",
        "SLS",
        "quadratic",
        {"lr": 50.0, "loss_floor": 0.0, "growth_interval": 2},
        20,
        {"accepted", "polyak_capped"},
    ),
    (
        "adamsls-logistic-loss-floor-wd-lrscale",
        "AdamSLS",
        "logistic",
        {"lr": 5.0, "loss_floor": 0.0, "weight_decay": 0.05, "lr_scale": 2.0},
        40,
        {"accepted", "polyak_capped"},
    ),
    (
        "alsals-logistic-loss-floor-clipped-warmup",
        "MomentumALSALS",
        "logistic",
        {**RECOMMENDED, "lr": 5.0, "loss_floor": 0.1, "max_grad_norm": 0.5, "warmup_steps": 5},
        60,
        {"accepted", "clipped", "warmup", "polyak_capped"},
    ),
    # loss_rise_guard: the batch losses' average climbs (no Polyak cap: the loss cannot
    # reach its floor of 0), the ceiling is cut, searches and reuses stay below it
    (
        "alsals-defaults-noisy-regression-rise",
        "MomentumALSALS",
        "noisy_regression",
        {**RECOMMENDED, "lr": 0.1, "loss_floor": None},
        500,
        {"reuse", "loss_rose"},
    ),
    # a loss that goes below the floor: the Polyak start (and the cap) bring it down to 0
    # and no further until the run refutes the floor and starts afresh
    (
        "alsals-defaults-below-zero",
        "MomentumALSALS",
        "below_zero_quadratic",
        {**RECOMMENDED, "lr": 0.3},
        80,
        {"polyak", "polyak_capped", "floor_refuted", "below_zero"},
    ),
    (
        "alsals-polyak-start-floor-none-below-zero",
        "MomentumALSALS",
        "below_zero_quadratic",
        {**RECOMMENDED, "lr": 1.0, "loss_floor": None},
        60,
        {"polyak", "floor_refuted", "below_zero"},
    ),
    (
        "sls-loss-floor-below-zero",
        "SLS",
        "below_zero_quadratic",
        {"lr": 50.0, "loss_floor": 0.0, "growth_interval": 2},
        60,
        {"polyak_capped", "floor_refuted", "below_zero"},
    ),
    # id, variant, problem, options, steps, behaviours that must occur
    ("sls-quadratic", "SLS", "quadratic", {"growth_interval": 5}, 30, {"backtracked"}),
    (
        "sls-quadratic-fd-smoothing",
        "SLS",
        "quadratic",
        {"slope": "finite_difference", "smoothing": 0.9, "growth_interval": 5},
        30,
        {"backtracked"},
    ),
    (
        "sls-quadratic-failed",
        "SLS",
        "quadratic",
        {"lr": 100.0, "max_trials": 5, "backtrack": 0.5},
        30,
        {"backtracked", "failed", "accepted"},
    ),
    (
        "sls-logistic-interval3-smoothing",
        "SLS",
        "logistic",
        {"lr": 20.0, "search_interval": 3, "smoothing": 0.5, "growth_interval": 10},
        40,
        {"backtracked", "reuse"},
    ),
    (
        "sls-logistic-adaptive",
        "SLS",
        "logistic",
        {"lr": 20.0, "search_interval": "adaptive", "growth_interval": 10},
        150,
        {"backtracked", "reuse"},
    ),
    (
        "sls-logistic-settled",
        "SLS",
        "logistic",
        {"lr": 20.0, "search_interval": "settled", "growth_interval": 10},
        150,
        {"backtracked", "reuse"},
    ),
    (
        "sls-logistic-warmup-wd-lrscale",
        "SLS",
        "logistic",
        {"lr": 60.0, "warmup_steps": 5, "weight_decay": 0.05, "lr_scale": 0.5},
        40,
        {"backtracked", "warmup"},
    ),
    (
        "adamsls-quadratic",
        "AdamSLS",
        "quadratic",
        {"lr": 2.0, "growth_interval": 5},
        40,
        {"backtracked"},
    ),
    (
        "adamsls-quadratic-failed",
        "AdamSLS",
        "quadratic",
        {"lr": 100.0, "max_trials": 5, "backtrack": 0.5},
        30,
        {"backtracked", "failed", "accepted"},
    ),
    (
        "adamsls-logistic-interval3-smoothing-fd",
        "AdamSLS",
        "logistic",
        {"lr": 5.0, "search_interval": 3, "smoothing": 0.9, "slope": "finite_difference"},
        40,
        {"backtracked", "reuse"},
    ),
    (
        "adamsls-logistic-adaptive",
        "AdamSLS",
        "logistic",
        {"lr": 5.0, "search_interval": "adaptive", "growth_interval": 10},
        150,
        {"backtracked", "reuse"},
    ),
    (
        "adamsls-logistic-warmup-wd-lrscale",
        "AdamSLS",
        "logistic",
        {"lr": 5.0, "warmup_steps": 5, "weight_decay": 0.05, "lr_scale": 2.0, "betas": (0.8, 0.99)},
        40,
        {"backtracked", "warmup"},
    ),
    (
        "alsals-quadratic-fd",
        "MomentumALSALS",
        "quadratic",
        {"lr": 2.0, "growth_interval": 5},
        40,
        {"backtracked"},
    ),
    (
        "alsals-quadratic-analytic",
        "MomentumALSALS",
        "quadratic",
        {"lr": 2.0, "slope": "analytic", "growth_interval": 5},
        40,
        {"backtracked"},
    ),
    (
        "alsals-quadratic-failed",
        "MomentumALSALS",
        "quadratic",
        {"lr": 100.0, "max_trials": 5, "backtrack": 0.5, "smoothing": 0.0},
        30,
        {"backtracked", "failed", "accepted"},
    ),
    (
        "alsals-logistic-fd",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, "growth_interval": 10},
        60,
        {"backtracked"},
    ),
    (
        "alsals-logistic-analytic-interval3-nosmoothing-wd",
        "MomentumALSALS",
        "logistic",
        {
            "lr": 5.0,
            "slope": "analytic",
            "smoothing": 0.0,
            "search_interval": 3,
            "weight_decay": 0.02,
        },
        40,
        {"backtracked", "reuse"},
    ),
    (
        # beta1 = 0.99: the momentum direction often points uphill, G <= 0, c_h = 1 / c.
        "alsals-logistic-fd-c_h-switch",
        "MomentumALSALS",
        "logistic",
        {"lr": 1.0, "smoothing": 0.0, "betas": (0.99, 0.999), "growth_interval": 2},
        60,
        {"backtracked", "c_h_switch"},
    ),
    (
        "alsals-logistic-fd-c_h-switch-smoothing-interval3",
        "MomentumALSALS",
        "logistic",
        {
            "lr": 3.0,
            "smoothing": 0.5,
            "betas": (0.99, 0.999),
            "growth_interval": 5,
            "search_interval": 3,
        },
        60,
        {"backtracked", "c_h_switch", "reuse"},
    ),
    (
        # An accepted trial with G <= 0 leaves D < 0, so the next search fails (D' -> b D < 0
        # as eta -> 0); the failure resets the averages and the search after it succeeds.
        "alsals-quadratic-stall",
        "MomentumALSALS",
        "quadratic",
        {"lr": 1.0, "smoothing": 0.5, "betas": (0.99, 0.999), "growth_interval": 5},
        16,
        {"backtracked", "c_h_switch", "failed"},
    ),
    (
        "alsals-logistic-fd-adaptive",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, "search_interval": "adaptive", "growth_interval": 10},
        150,
        {"backtracked", "reuse"},
    ),
    (
        "alsals-logistic-analytic-adaptive",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, "slope": "analytic", "search_interval": "adaptive", "growth_interval": 10},
        150,
        {"backtracked", "reuse"},
    ),
    (
        "alsals-logistic-analytic-settled",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, "slope": "analytic", "search_interval": "settled", "growth_interval": 10},
        150,
        {"backtracked", "reuse"},
    ),
    (
        "sls-quadratic-interpolate",
        "SLS",
        "quadratic",
        {"lr": 50.0, "interpolate": True, "growth_interval": 2},
        30,
        {"backtracked"},
    ),
    (
        "adamsls-logistic-interpolate",
        "AdamSLS",
        "logistic",
        {"lr": 20.0, "interpolate": True, "growth_interval": 3},
        40,
        {"backtracked"},
    ),
    (
        # the recommended settings (smoothing 0.9, Polyak starts, adaptive cadence) with
        # interpolation: the smoothed test's quadratic in eta has a constant term b D
        "alsals-logistic-analytic-defaults-interpolate",
        "MomentumALSALS",
        "logistic",
        {
            "lr": 5.0,
            "slope": "analytic",
            "smoothing": 0.9,
            "c": 0.6,
            "backtrack": 0.8,
            "start": "polyak",
            "search_interval": "adaptive",
            "growth_interval": 2,
            "interpolate": True,
        },
        80,
        {"backtracked", "reuse"},
    ),
    (
        "alsals-logistic-fd-c_h-switch-interpolate",
        "MomentumALSALS",
        "logistic",
        C_H_SWITCH_INTERPOLATE,
        60,
        {"backtracked", "c_h_switch"},
    ),
    (
        "sls-quadratic-trust-interpolation",
        "SLS",
        "quadratic",
        {
            "lr": 50.0,
            "c": 0.5,
            "interpolate": True,
            "trust_interpolation": True,
            "growth_interval": 2,
        },
        30,
        {"backtracked", "trusted"},
    ),
    (
        # MomentumALSALS(params)'s settings: the trusted step's predicted decrease enters D
        "alsals-logistic-analytic-defaults-trust-interpolation",
        "MomentumALSALS",
        "logistic",
        {**RECOMMENDED, "lr": 5.0, "growth_interval": 2},
        80,
        {"backtracked", "reuse", "trusted"},
    ),
    (
        "alsals-logistic-fd-c_h-switch-trust-interpolation",
        "MomentumALSALS",
        "logistic",
        {**C_H_SWITCH_INTERPOLATE, "trust_interpolation": True},
        60,
        {"backtracked", "c_h_switch", "trusted"},
    ),
    # at a tie of two linear pieces the analytic slope predicts a fall no step gives (5.8)
    ("sls-tie", "SLS", "tie", {}, 30, {"kink", "backtracked"}),
    ("adamsls-tie", "AdamSLS", "tie", {}, 30, {"kink", "backtracked"}),
    (
        "alsals-defaults-tie",
        "MomentumALSALS",
        "tie",
        {**RECOMMENDED, "lr": 0.1},
        30,
        {"kink", "reuse"},
    ),
    # ... and where the gradient is not the loss's, only once (then the searches end)
    ("sls-surrogate", "SLS", "surrogate", {}, 8, {"kink", "failed"}),
    (
        "alsals-defaults-surrogate",
        "MomentumALSALS",
        "surrogate",
        {**RECOMMENDED, "lr": 0.1},
        8,
        {"kink", "unresolved"},
    ),
    (
        "alsals-logistic-fd-warmup-wd-lrscale",
        "MomentumALSALS",
        "logistic",
        {"lr": 5.0, "warmup_steps": 5, "weight_decay": 0.05, "lr_scale": 2.0, "eps": 1e-6},
        40,
        {"backtracked", "warmup"},
    ),
]


@pytest.mark.parametrize(
    ("variant", "problem", "options", "steps", "expect"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_trajectory_matches_reference(variant, problem, options, steps, expect):
    run = SideBySide(variant, PROBLEMS[problem](), options)
    run.run(steps)
    assert_happened(run.records, expect)


GROUP_CASES = {
    "SLS": (
        {"lr": 2.0, "weight_decay": 0.01, "growth_interval": 10},
        [{}, {"lr_scale": 0.5, "weight_decay": 0.1}],
    ),
    "AdamSLS": (
        {"lr": 1.0, "weight_decay": 0.01, "growth_interval": 10},
        [{}, {"lr_scale": 0.5, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}],
    ),
    "MomentumALSALS": (
        {"lr": 1.0, "weight_decay": 0.01, "growth_interval": 10},
        [{}, {"lr_scale": 0.5, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}],
    ),
}


@pytest.mark.parametrize("unused_first", [False, True], ids=["unused-inside", "unused-first"])
@pytest.mark.parametrize("slope", ["analytic", "finite_difference"])
@pytest.mark.parametrize("variant", list(CLASSES))
def test_two_groups_and_a_parameter_without_gradient(variant, slope, unused_first):
    options, group_options = GROUP_CASES[variant]
    problem = two_group_problem(unused_first)
    run = SideBySide(variant, problem, {**options, "slope": slope}, group_options)
    run.run(20)
    # Step 0 of the spec: a written group lr sets eta = lr / lr_scale (first such group).
    run.opt.param_groups[1]["lr"] = 0.05
    run.ref.lr[1] = 0.05
    run.run(10, loss_at=lambda k: problem.loss_at(k + 20))
    # Both written: the first group that differs wins.
    run.opt.param_groups[0]["lr"] = 0.2
    run.opt.param_groups[1]["lr"] = 0.05
    run.ref.lr[:] = [0.2, 0.05]
    run.run(10, loss_at=lambda k: problem.loss_at(k + 30))
    assert_happened(run.records, {"backtracked", "accepted"})
    assert [run.records[i].kind for i in (20, 30)] == ["search", "search"]
    assert run.records[20].tried[0] == pytest.approx(0.05 / 0.5 * 2 ** (1 / 10), rel=1e-15)
    assert run.records[30].tried[0] == pytest.approx(0.2 * 2 ** (1 / 10), rel=1e-15)
    unused = run.flat[0 if unused_first else 3]
    torch.testing.assert_close(
        unused.detach(),
        problem.groups[int(not unused_first)][0 if unused_first else 1],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("variant", list(CLASSES))
def test_parameter_with_intermittent_gradient(variant):
    """A parameter with a gradient only on every third step: its Adam ``t`` counts only
    those steps, and it is left alone (no update, no weight decay) on the others."""
    options, group_options = GROUP_CASES[variant]
    problem = two_group_problem(intermittent=True)
    run = SideBySide(variant, problem, options, group_options)
    before = run.ref.weights[3].clone()
    for k in range(24):
        run.step(problem.loss_at(k))
        moved = not torch.equal(run.ref.weights[3], before)
        assert moved == (k % 3 == 0 and run.records[-1].kind in ("search", "reuse"))
        before = run.ref.weights[3].clone()
    assert_happened(run.records, {"backtracked", "accepted"})
    if variant != "SLS":
        assert run.ref.param_state[3].t == 8
        assert run.ref.param_state[0].t == 24


# --------------------------------------------------------------------------------------
# Special steps: non-finite values, zero gradients, a barrier the trials run into.
# --------------------------------------------------------------------------------------


def with_bad_step(loss_at, bad_step: int, kind: str):
    """``loss_at`` with step ``bad_step`` replaced by a NaN loss or a NaN gradient."""

    def wrapped(k: int):
        f = loss_at(k)
        if k != bad_step:
            return f
        if kind == "nan_loss":
            return lambda ws: f(ws) * math.nan
        if kind == "nan_grad":  # finite loss, d/dw 0 * sqrt(w - w) = 0 * inf * 0 = nan
            return lambda ws: f(ws) + 0 * torch.sqrt(ws[0] - ws[0]).sum()
        if kind == "nan_without_grad":  # finite with gradient, NaN as the trials evaluate
            return lambda ws: f(ws) if torch.is_grad_enabled() else f(ws) * math.nan
        if kind == "zero_grad":  # the loss does not depend on the weights: every g is 0
            return lambda ws: 0 * sum(w.sum() for w in ws) + 1.0
        raise ValueError(kind)

    return wrapped


@pytest.mark.parametrize("bad_step", [0, 5])
@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad", "nan_without_grad", "zero_grad"])
@pytest.mark.parametrize("variant", list(CLASSES))
def test_nonfinite_and_zero_gradient_steps(variant, kind, bad_step):
    """A skipped step, at the first search of a run (where the replay check has evaluated
    the starting weights) and later; forward counts compared with the reference."""
    problem = logistic_problem()
    run = SideBySide(variant, problem, {"lr": 5.0, "growth_interval": 10})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.run(12, loss_at=with_bad_step(problem.loss_at, bad_step, kind))
    expected = "zero_grad" if kind == "zero_grad" else "nonfinite"
    assert run.kinds()[bad_step] == expected
    assert run.kinds().count(expected) == 1
    if expected == "nonfinite":
        assert any(issubclass(w.category, RuntimeWarning) for w in caught)
        assert run.ref.state.skipped_nonfinite == 1
    assert run.ref.state.step == 11


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("variant", list(CLASSES))
def test_two_nonfinite_steps_after_an_untested_update_undo_it(variant, interval):
    """Phase 6: the second of two non-finite skips in a row after an untested update (a
    step reusing its step size, AdamSLS's update along the momentum) undoes it from the
    stored moments; SLS's reuse along a gradient it does not keep is not undone. The step
    after the skips searches. Compared with the reference step by step."""
    problem = logistic_problem()
    run = SideBySide(
        variant, problem, {"lr": 5.0, "growth_interval": 10, "search_interval": interval}
    )

    def loss_at(k):
        f = problem.loss_at(k)
        return (lambda ws: f(ws) * math.nan) if k in (4, 5) else f

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.run(10, loss_at=loss_at)
    kinds = run.kinds()
    assert kinds[4:7] == ["nonfinite", "nonfinite", "search"]
    untested = variant == "AdamSLS" or (variant == "MomentumALSALS" and kinds[3] == "reuse")
    assert run.ref.state.undone_updates == int(untested)
    assert run.opt.search_state.undone_updates == int(untested)
    if interval == 2 and variant != "SLS":
        assert untested  # (the case the test is for is reached)


@pytest.mark.parametrize("variant", list(CLASSES))
def test_written_lr_zero_takes_no_update(variant):
    """Phase 0/3/6: a written lr of 0 takes no update, keeps eta, advances the moments."""
    problem = logistic_problem()
    run = SideBySide(variant, problem, {"lr": 0.5})
    run.run(3)
    for group in run.opt.param_groups:
        group["lr"] = 0.0
    run.ref.lr = [0.0 for _ in run.ref.lr]
    run.step(problem.loss_at(3))
    assert run.records[-1].kind == "zero_lr"
    run.run(3, loss_at=lambda k: problem.loss_at(k + 4))
    assert run.kinds()[-3:] == ["search"] * 3


@pytest.mark.parametrize("skipped", ["zero_grad", "nan_loss"])
@pytest.mark.parametrize("variant", list(CLASSES))
def test_written_lr_then_a_skipped_step(variant, skipped):
    """Step 0 runs before a step is skipped, and step 6 after: eta adopts the written lr
    and every group's lr is eta * lr_scale again, although nothing else changes."""
    options, group_options = GROUP_CASES[variant]
    problem = two_group_problem()
    run = SideBySide(variant, problem, options, group_options)
    run.run(3)
    run.opt.param_groups[1]["lr"] = 0.05
    run.ref.lr[1] = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run.step(with_bad_step(problem.loss_at, 3, skipped)(3))
    assert run.records[-1].kind == ("zero_grad" if skipped == "zero_grad" else "nonfinite")
    assert run.ref.state.step_size == pytest.approx(0.1, rel=1e-15)
    assert run.ref.lr == pytest.approx([0.1, 0.05], rel=1e-15)
    run.run(3, loss_at=lambda k: problem.loss_at(k + 4))


def pinned(f, w_init: list[Tensor]):
    """``f`` at the initial weights, ``inf`` anywhere else: every probe and trial fails."""

    def g(ws):
        same = all(torch.equal(w.detach(), w0) for w, w0 in zip(ws, w_init, strict=True))
        return f(ws) if same else f(ws) + math.inf

    return g


@pytest.mark.parametrize("variant", list(CLASSES))
def test_nonfinite_finite_difference_slope(variant):
    """Spec 5.1: a non-finite slope restores w and skips the step: nothing changes, the
    moments included.

    The evaluation counters are left out here (see the xfail test below)."""
    problem = quadratic_problem()
    run = SideBySide(variant, problem, {"lr": 0.5, "slope": "finite_difference"})
    run.compare_counters = False
    with pytest.warns(RuntimeWarning, match="slope"):
        run.step(pinned(problem.loss_at(0), problem.groups[0]))
    assert run.records[0].kind == "nonfinite"
    assert run.records[0].slope == -math.inf
    st = run.ref.state
    assert (st.step, st.searches, st.slope_avg, st.step_size) == (0, 0, 0.0, 0.5)
    assert st.skipped_nonfinite == 1
    assert run.ref.param_state == {}
    if variant != "SLS":
        assert all(run.opt.state[p].get("step", 0) == 0 for p in run.flat)
    run.run(5)  # and it carries on normally


@pytest.mark.parametrize("variant", list(CLASSES))
def test_nonfinite_finite_difference_slope_counts(variant):
    """Spec 5.1: the first trial shares the slope's synchronisation, so it was evaluated
    (after the once-per-optimizer replay check at w0: 1 + 1 + probe + trial)."""
    problem = quadratic_problem()
    run = SideBySide(variant, problem, {"lr": 0.5, "slope": "finite_difference"})
    with pytest.warns(RuntimeWarning, match="slope"):
        run.step(pinned(problem.loss_at(0), problem.groups[0]))
    assert (run.records[0].trials, run.records[0].forwards) == (1, 4)  # the reference
    info = run.opt.last_step
    assert (info.kind, info.trials, info.forwards, info.backwards) == ("nonfinite", 1, 4, 1)


@pytest.mark.parametrize("variant", list(CLASSES))
def test_every_trial_infinite_fails_the_search(variant):
    """Spec 5.3/5.4: an infinite trial loss is never accepted; all fail -> kind failed, and
    since no finite trial said the step was too large, eta stays where the search started.
    Once the loss at the start is found finite (after two infinite trials), each infinite
    trial cuts the next tenfold."""
    problem = quadratic_problem()
    run = SideBySide(variant, problem, {"lr": 0.5, "slope": "analytic", "max_trials": 4})
    run.step(pinned(problem.loss_at(0), problem.groups[0]))
    rec = run.records[0]
    assert (rec.kind, rec.trials) == ("failed", 4)
    assert rec.tried[3] == pytest.approx(0.1 * rec.tried[2], rel=1e-12)
    assert run.ref.state.step_size == 0.5
    run.run(5)
    assert "search" in run.kinds()[1:]


def test_a_failed_search_hands_on_one_backtrack_below_its_last_trial():
    """The next search starts (after its growth) one backtrack below the last trial of a
    failed one: the step size falls from search to search until one is accepted (going on
    from the last trial itself let the growth climb again with few trials)."""
    problem = quadratic_problem()
    run = SideBySide("SLS", problem, {"lr": 100.0, "max_trials": 5, "backtrack": 0.9})
    starts = []
    for k in range(16):
        run.step(problem.loss_at(k))
        record = run.records[-1]
        starts.append(record.tried[0])
        if record.kind == "failed":
            grown = run.line_search_state()["step_size"] * 2 ** (1 / 500)
            assert grown == pytest.approx(record.tried[-1] * 0.9, rel=1e-14)
    failed = [r.kind == "failed" for r in run.records]
    assert failed[0] and "search" in run.kinds()  # failures, then an accepted search
    assert all(b < a for a, b, f in zip(starts, starts[1:], failed, strict=False) if f)


@pytest.mark.parametrize("slope", ["analytic", "finite_difference"])
def test_alsals_recovers_after_a_failed_search(slope):
    """A failed search no longer poisons the averages: training continues (spec 4.4)."""
    a = torch.diag(torch.tensor([1.0, 10.0], dtype=F64))
    problem = Problem(
        "diag", [[torch.ones(2, dtype=F64)]], lambda k: lambda ws: 0.5 * ws[0] @ a @ ws[0]
    )
    run = SideBySide("MomentumALSALS", problem, {"lr": 10.0, "max_trials": 10, "slope": slope})
    run.run(50)
    assert run.records[0].kind == "failed"  # 10 * 0.9^9 > 0.8, the largest passing step
    assert "search" in run.kinds(), f"never accepted; eta = {run.ref.state.step_size:.3g}"


def barrier_problem() -> Problem:
    """The quadratic plus ``inf`` outside the box ``|w_i| <= 4``: big trials hit ``inf``."""
    base = quadratic_problem()
    f = base.loss_at(0)

    def g(ws):
        inside = all(bool((w.detach().abs() <= 4).all()) for w in ws)
        return f(ws) if inside else f(ws) + math.inf

    return Problem("barrier", base.groups, lambda k: g)


@pytest.mark.parametrize("variant", list(CLASSES))
def test_trials_outside_a_barrier(variant):
    run = SideBySide(variant, barrier_problem(), {"lr": 20.0, "slope": "analytic"})
    run.run(20)
    assert_happened(run.records, {"backtracked", "accepted"})
    assert any(math.isinf(loss) for r in run.records for loss in r.trial_losses)


# --------------------------------------------------------------------------------------
# The reference against closed forms
# --------------------------------------------------------------------------------------


def quadratic_start():
    problem = quadratic_problem()
    a, w_star = quadratic_matrix()
    w0 = torch.cat([w.reshape(-1) for w in problem.groups[0]])
    return problem, a, w0, a @ (w0 - w_star)


def first_backtracked(eta_try: float, eta_max: float, backtrack: float) -> tuple[float, int]:
    """The first of ``eta_try * backtrack^j`` not above ``eta_max``, and ``j + 1``."""
    j = 0 if eta_try <= eta_max else math.ceil(math.log(eta_max / eta_try) / math.log(backtrack))
    eta = eta_try * backtrack**j
    assert abs(eta / eta_max - 1) > 1e-6, "too close to the boundary for a clean check"
    return eta, j + 1


@pytest.mark.parametrize("smoothing", [0.0, 0.9])
def test_reference_sls_first_step_closed_form(smoothing):
    """Quadratic, SLS: f(w - eta g) = f0 - eta |g|^2 + eta^2/2 g'Ag, so Armijo (Eq. 1)
    holds iff eta <= 2 (1 - c) |g|^2 / g'Ag. With D, G starting at 0 the smoothing
    multiplies both sides by (1 - b) and changes nothing in the first step."""
    problem, a, w0, g = quadratic_start()
    c, lr = 0.1, 1.0
    ref = ReferenceOptimizer(
        [(problem.groups[0], GroupConfig())], make_config("SLS", smoothing=smoothing)
    )
    ref.step(problem.loss_at(0))
    eta_max = 2 * (1 - c) * float(g @ g) / float(g @ a @ g)
    eta, trials = first_backtracked(lr * 2 ** (1 / 500), eta_max, 0.9)
    assert trials > 1
    rec = ref.last_step
    # first evaluation, the replay check at w0 (first search only), trials
    assert (rec.kind, rec.trials, rec.forwards) == ("search", trials, 2 + trials)
    assert rec.step_size == pytest.approx(eta, rel=1e-14)
    torch.testing.assert_close(torch.cat([w.reshape(-1) for w in ref.weights]), w0 - eta * g)
    decrease = eta * float(g @ g) - 0.5 * eta**2 * float(g @ a @ g)
    assert rec.loss_decrease == pytest.approx(decrease, rel=1e-10)
    assert rec.slope == pytest.approx(float(g @ g), rel=1e-14)
    assert ref.state.slope_avg == pytest.approx((1 - smoothing) * float(g @ g), rel=1e-14)
    assert ref.state.decrease_avg == pytest.approx((1 - smoothing) * decrease, rel=1e-10)
    assert (ref.state.step, ref.state.searches, ref.state.steps_since_search) == (1, 1, 0)
    assert ref.state.eta_fast == pytest.approx(0.1 * eta, rel=1e-14)
    assert ref.state.eta_slow == pytest.approx(0.01 * eta, rel=1e-14)


@pytest.mark.parametrize(
    ("variant", "slope"),
    [
        ("AdamSLS", "analytic"),
        ("AdamSLS", "finite_difference"),
        ("MomentumALSALS", "analytic"),
        ("MomentumALSALS", "finite_difference"),
    ],
)
def test_reference_adam_first_step_closed_form(variant, slope):
    """Adam variants at t = 1: m_hat = g and v_hat = g^2, so the preconditioned and the
    momentum direction are both d = -g / (|g| + eps) and s = sum g^2 / (|g| + eps) (Eq. 5).
    On the quadratic the finite difference (Eq. 6) is exactly s_fd = s - lambda/2 d'Ad.
    With D = G = 0 before, the smoothing cancels, and the test Delta >= c eta s_used with
    Delta = eta s - eta^2/2 d'Ad holds iff eta <= 2 (s - c s_used) / d'Ad."""
    problem, a, w0, g = quadratic_start()
    eps, lr, fd_step = 1e-8, 3.0, 5e-8
    cfg = make_config(variant, lr=lr, slope=slope)
    ref = ReferenceOptimizer([(problem.groups[0], GroupConfig(eps=eps))], cfg)
    ref.step(problem.loss_at(0))
    d = -g / (g.abs() + eps)
    s = float((g * g / (g.abs() + eps)).sum())
    curvature = float(d @ a @ d)
    s_used = s if slope == "analytic" else s - fd_step / 2 * curvature
    eta_max = 2 * (s - cfg.c * s_used) / curvature
    eta, trials = first_backtracked(lr * 2 ** (1 / 500), eta_max, 0.9)
    assert trials > 1
    assert ref.last_step.slope == pytest.approx(s_used, rel=1e-14 if slope == "analytic" else 1e-7)
    assert ref.state.slope_avg == pytest.approx((1 - cfg.smoothing) * ref.last_step.slope)
    assert ref.last_step.trials == trials
    assert ref.last_step.forwards == 2 + trials + (slope == "finite_difference")
    assert ref.state.step_size == pytest.approx(eta, rel=1e-14)
    torch.testing.assert_close(torch.cat([w.reshape(-1) for w in ref.weights]), w0 + eta * d)


def test_reference_weight_decay_and_lr_scale_closed_form():
    """Step 5 with SLS: w1 = w0 - eta lr_scale g - eta lr_scale wd w0, where the search
    direction is -lr_scale g (so s = lr_scale |g|^2); and the group lr is eta lr_scale."""
    problem, a, w0, g = quadratic_start()
    scale, wd, c = 0.25, 0.3, 0.1
    ref = ReferenceOptimizer(
        [(problem.groups[0], GroupConfig(lr_scale=scale, weight_decay=wd))], make_config("SLS")
    )
    ref.step(problem.loss_at(0))
    d = -scale * g
    eta, _ = first_backtracked(2 ** (1 / 500), 2 * (1 - c) * float(g @ -d) / float(d @ a @ d), 0.9)
    assert ref.last_step.slope == pytest.approx(scale * float(g @ g), rel=1e-14)
    assert ref.state.step_size == pytest.approx(eta, rel=1e-14)
    expected = w0 + eta * d - eta * scale * wd * w0
    torch.testing.assert_close(torch.cat([w.reshape(-1) for w in ref.weights]), expected)
    assert ref.lr == [pytest.approx(eta * scale, rel=1e-15)]


def test_reference_warmup_closed_form():
    """Phase 5.2/5.3: during warm-up every step tries eta_init (k + 1) / W first and takes it
    unless the loss rises; D and G stay untouched. After warm-up the search starts from the
    last eta times 2^(1/b_g)."""
    problem = logistic_problem()
    ref = ReferenceOptimizer(
        [(problem.groups[0], GroupConfig())], make_config("MomentumALSALS", lr=0.2, warmup_steps=4)
    )
    for k in range(4):
        ref.step(problem.loss_at(k))
        cap = 0.2 * (k + 1) / 4
        assert ref.last_step.kind == "search"
        assert max(ref.last_step.tried) <= cap * (1 + 1e-15)
        assert ref.last_step.tried[0] == pytest.approx(cap, rel=1e-15)
        # the ramp's step lowers the loss here: it is taken, exactly the paper's ramp
        assert ref.state.step_size == pytest.approx(cap, rel=1e-15)
        assert (ref.state.decrease_avg, ref.state.slope_avg, ref.state.averaged) == (0, 0, 0)
    eta = ref.state.step_size
    ref.step(problem.loss_at(4))
    assert ref.last_step.tried[0] == pytest.approx(eta * 2 ** (1 / 500), rel=1e-15)


def test_reference_failed_search_closed_form():
    """Step 4.4: no trial passes -> w unchanged, eta = eta_0 2^(1/b_g) backtrack^(T-1),
    k unchanged, searches and failed_searches + 1, steps_since_search = 0."""
    problem, _, w0, _ = quadratic_start()
    ref = ReferenceOptimizer(
        [(problem.groups[0], GroupConfig())],
        make_config("SLS", lr=100.0, max_trials=3, backtrack=0.5),
    )
    ref.step(problem.loss_at(0))
    assert ref.last_step.kind == "failed"
    assert ref.last_step.tried == pytest.approx([100 * 2 ** (1 / 500) * 0.5**j for j in range(3)])
    # one backtrack below the last trial, less the growth the next start adds
    assert ref.state.step_size == pytest.approx(100 * 0.25 * 0.5, rel=1e-14)
    assert torch.equal(torch.cat([w.reshape(-1) for w in ref.weights]), w0)
    st = ref.state
    assert (st.step, st.searches, st.failed_searches, st.steps_since_search) == (0, 1, 1, 0)
    assert ref.lr == [st.step_size]


def test_reference_search_interval_cadence():
    """search_interval = 3: the first step searches, then search iff
    steps_since_search + 1 >= 3: search, reuse, reuse, search, ..."""
    problem = logistic_problem()
    ref = ReferenceOptimizer(
        [(problem.groups[0], GroupConfig())], make_config("SLS", search_interval=3)
    )
    kinds, etas = [], []
    for k in range(9):
        ref.step(problem.loss_at(k))
        kinds.append(ref.last_step.kind)
        etas.append(ref.state.step_size)
    assert kinds == ["search", "reuse", "reuse"] * 3
    assert etas[0] == etas[1] == etas[2] != 1.0
    assert etas[3] == etas[4] == etas[5]


def test_reference_adaptive_interval_and_c_h():
    """Step 3 adaptive K and Eq. 8."""
    # With many searches the bias corrections are ~1: K depends on the raw ratio.
    many = 10_000
    assert adaptive_interval(1.0, 1.0, many) == 10
    assert adaptive_interval(1.5, 1.0, many) == pytest.approx(2.0)
    assert adaptive_interval(1.0, 1.5, many) == pytest.approx(2.0)
    assert adaptive_interval(1.05, 1.0, many) == 10  # 1 / 0.05 = 20, capped
    assert adaptive_interval(3.0, 1.0, many) == pytest.approx(0.5)
    # After 10 searches of a constant eta the corrected averages agree: K = 10.
    fast, slow = 1 - 0.9**10, 1 - 0.99**10  # the uncorrected averages of eta = 1
    assert adaptive_interval(fast, slow, 10) == pytest.approx(10)
    assert armijo_constant(0.6, 1e-30) == 0.6
    assert armijo_constant(0.6, 0.0) == pytest.approx(1 / 0.6)
    assert armijo_constant(0.6, -1.0) == pytest.approx(1 / 0.6)


@pytest.mark.parametrize(
    "cls", [SLS, AdamSLS, MomentumALSALS], ids=["SLS", "AdamSLS", "MomentumALSALS"]
)
def test_settled_cadence_stops_searching_every_step_once_a_search_takes_its_first_trial(cls):
    """On a quadratic whose step size the search finds at once, "adaptive" searches in each
    of the first 10 steps; "settled" hands over to the adaptive cadence right after the
    second search takes its first (grown) trial, and both runs agree up to there."""
    runs = {}
    for cadence in ("adaptive", "settled"):
        w = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
        opt = cls([w], lr=0.05, slope="analytic", search_interval=cadence, growth_interval=10)
        kinds = []
        for _ in range(10):
            opt.step(lambda w=w: 0.5 * (w**2).sum())
            kinds.append((opt.last_step.kind, opt.last_step.trials))
        runs[cadence] = kinds
    assert all(kind == "search" for kind, _ in runs["adaptive"])
    settled = runs["settled"]
    second = settled[1]
    assert second == ("search", 1) and settled[:2] == runs["adaptive"][:2]
    assert settled[2][0] == "reuse"
    assert sum(kind == "search" for kind, _ in settled) < 10


def test_settled_is_validated_and_round_trips_in_the_state_dict():
    w = torch.tensor([3.0, -2.0], requires_grad=True)
    opt = MomentumALSALS([w], search_interval="settled")
    for _ in range(3):
        opt.step(lambda: (w**2).sum())
    state = opt.state_dict()
    assert state["state"][0]["line_search"]["settled"] in (0, 1)
    twin = MomentumALSALS([w], search_interval="settled")
    twin.load_state_dict(state)
    assert twin.search_state.settled == opt.search_state.settled
    with pytest.raises(ValueError, match="'adaptive' or 'settled'"):
        MomentumALSALS([w], search_interval="settle")


def test_reference_interpolated_backtracking_closed_form():
    """Quadratic, SLS, a start 1e4 times too large: plain backtracking walks the grid
    ``lr * 0.9^j`` down to the first point below ``eta_max = 2 (1 - c) |g|^2 / g'Ag``, one
    trial per point; with ``interpolate`` the quadratic through the first rejected trial is
    the loss itself, so each rejection goes down at most 10x (the safeguard) along the same
    grid, and the search accepts the same step size in a handful of trials."""
    problem, a, w0, g = quadratic_start()
    c = 0.1
    eta_max = 2 * (1 - c) * float(g @ g) / float(g @ a @ g)
    lr = 1e4 * eta_max / 2 ** (1 / 500)
    eta, trials = first_backtracked(lr * 2 ** (1 / 500), eta_max, 0.9)
    assert trials > 80
    ref = ReferenceOptimizer(
        [(problem.groups[0], GroupConfig())], make_config("SLS", lr=lr, interpolate=True)
    )
    ref.step(problem.loss_at(0))
    rec = ref.last_step
    # 10x per rejection (the floor: 0.9^21 = 0.109) from 1e4 eta_max to 0.1-1 eta_max in
    # 4 rejections, then the exact grid point below eta_max
    assert rec.kind == "search" and rec.trials <= 6
    assert rec.step_size == pytest.approx(eta, rel=1e-12)
    floor_steps = [b / a for a, b in zip(rec.tried, rec.tried[1:], strict=False)]
    assert all(0.1 <= r <= 0.9 * (1 + 1e-12) for r in floor_steps)


@pytest.mark.parametrize(
    "cls", [SLS, AdamSLS, MomentumALSALS], ids=["SLS", "AdamSLS", "MomentumALSALS"]
)
def test_interpolate_accepts_what_plain_backtracking_accepts_in_fewer_trials(cls):
    """The interpolated walk skips only trials the quadratic model fails; on a quadratic
    (where the model is exact) both walks give the same trajectory, one in fewer trials."""
    runs = {}
    for interpolate in (False, True):
        w = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
        scales = torch.tensor([1.0, 4.0, 9.0, 25.0], dtype=torch.float64)
        opt = cls(
            [w], lr=1e3, slope="analytic", start="grown", interpolate=interpolate, growth_interval=2
        )
        trials, path = 0, []
        for _ in range(30):
            opt.step(lambda w=w, s=scales: 0.5 * (s * w**2).sum())
            trials += opt.last_step.trials
            path.append(opt.last_step.step_size)
        runs[interpolate] = (trials, path, w.detach().clone())
    (plain, plain_path, plain_w), (fast, fast_path, fast_w) = runs[False], runs[True]
    assert fast < plain / 2
    assert fast_path == pytest.approx(plain_path, rel=1e-9)
    torch.testing.assert_close(fast_w, plain_w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "cls", [SLS, AdamSLS, MomentumALSALS], ids=["SLS", "AdamSLS", "MomentumALSALS"]
)
def test_trust_interpolation_takes_the_same_steps_with_fewer_forward_passes(cls):
    """On a quadratic the interpolation model is exact, so the step size it predicts passes:
    taking it untested gives the trajectory of testing it (the averages store the very
    decrease the trial would have measured), and saves the second trial of every search
    after the first whose grown trial fails."""
    runs = {}
    for trust in (False, True):
        w = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
        scales = torch.tensor([1.0, 4.0, 9.0, 25.0], dtype=torch.float64)
        opt = cls(
            [w],
            lr=1e3,
            c=0.5,
            slope="analytic",
            start="grown",
            interpolate=True,
            trust_interpolation=trust,
            growth_interval=2,
        )
        path = []
        for _ in range(30):
            opt.step(lambda w=w, s=scales: 0.5 * (s * w**2).sum())
            path.append(opt.last_step.step_size)
        runs[trust] = (opt.search_state.forwards, path, w.detach().clone())
    (tested, tested_path, tested_w), (trusted, trusted_path, trusted_w) = runs[False], runs[True]
    assert trusted < tested
    assert trusted_path == pytest.approx(tested_path, rel=1e-9)
    torch.testing.assert_close(trusted_w, tested_w, rtol=1e-9, atol=1e-12)


def test_trust_interpolation_tests_the_first_search_and_any_trial_that_raised_the_loss():
    """The untested step needs a model fitted to a trial that lowered the loss, after
    a first search that found the scale: the first search, and a search whose first trial
    raised the loss, evaluate every trial as ``interpolate`` does (their decrease is
    measured; an untested step's is ``nan``)."""

    def run(trust: bool) -> list[tuple[int, float]]:
        w = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
        opt = SLS([w], lr=1e3, interpolate=True, trust_interpolation=trust)
        out = []
        for lr in (None, 1e3):  # the second search starts at a written lr, 1e3 too large
            if lr is not None:
                opt.param_groups[0]["lr"] = lr
            opt.step(lambda w=w: 0.5 * (w**2).sum())
            out.append((opt.last_step.trials, opt.last_step.loss_decrease))
        return out

    trusted, tested = run(True), run(False)
    assert trusted == tested
    assert all(trials > 2 and math.isfinite(decrease) for trials, decrease in trusted)


@pytest.mark.parametrize("key", ["interpolate", "trust_interpolation"])
def test_interpolation_options_are_validated_and_round_trip_in_the_state_dict(key):
    """On in ``MomentumALSALS(params)``, off in the paper's three; a non-bool is a ``TypeError``; a
    state saved with the option off keeps it off when loaded (with a warning)."""
    w = torch.tensor([3.0, -2.0], requires_grad=True)
    with pytest.raises(TypeError, match=f"invalid {key}"):
        MomentumALSALS([w], **{key: 1})
    opt = MomentumALSALS([w], **{key: False})
    opt.step(lambda: (w**2).sum())
    twin = MomentumALSALS([w])
    assert twin.defaults[key] is True
    with pytest.warns(UserWarning, match=f"{key}=False"):
        twin.load_state_dict(opt.state_dict())
    assert twin.param_groups[0][key] is False
    assert MomentumALSALS.paper([w]).defaults[key] is False
    assert SLS([w]).defaults[key] is AdamSLS([w]).defaults[key] is False
