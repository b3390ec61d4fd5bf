"""Decisions of the line-search family (SLS, AdamSLS, MomentumALSALS) that a mutation audit
found unpinned: each test changes one input of one decision and checks the step it leads to,
on a small problem (float64 wherever precision matters) whose answer does not hang on one
CPU's rounding."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from alsals import SLS, AdamSLS, MomentumALSALS
from alsals.acceptance import ArmijoTest

F64 = torch.float64

# The configurations whose default slope is the analytic one (the kink rule of phase 5.8).
ANALYTIC = [SLS, AdamSLS, MomentumALSALS]
ANALYTIC_IDS = ["SLS", "AdamSLS", "MomentumALSALS"]


def quadratic(w: torch.Tensor) -> torch.Tensor:
    """``0.5 sum(k_i w_i^2)`` with curvatures 1 .. 4: its minimum is 0 at ``w = 0``."""
    scales = torch.arange(1, w.numel() + 1, dtype=w.dtype)
    return 0.5 * (scales * w * w).sum()


def start_weights() -> torch.Tensor:
    return torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=F64, requires_grad=True)


def tie_loss(w: torch.Tensor) -> torch.Tensor:
    """``max(w0 + w1, -w0) + 0.01 ||w||^2 + 5``: at ``w = (1, -2)`` both pieces are equal,
    and autograd's gradient (the first piece's) is no descent direction (tests/test_nonsmooth)."""
    return torch.stack([w[0] + w[1], -w[0]]).max() + 0.01 * (w**2).sum() + 5.0


# -- phase 2: a step skipped for Adam's second moment --------------------------------------


@pytest.mark.parametrize(
    "make_optimizer", [AdamSLS, MomentumALSALS], ids=["AdamSLS", "MomentumALSALS"]
)
def test_a_square_that_overflows_just_above_the_largest_root_skips_the_step(make_optimizer):
    """``beta2 = 0``: ``v' = g^2``, which overflows float32 from ``|g| = sqrt(3.4e38) =
    1.84e19``. Gradient entries of 3e19 lie between that root and twice it: the step is
    skipped (a non-finite moment), the moments left finite, the weights where they were."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)  # float32: to overflow
    opt = make_optimizer([w], lr=0.01, betas=(0.9, 0.0))

    def small():
        return (w**2).sum()

    opt.step(small)
    before = w.detach().clone()

    def huge():
        return 3e19 * (w.sum() + 10.0)  # (above the floor 0 of MomentumALSALS's cap)

    with pytest.warns(RuntimeWarning, match="second moment"):
        opt.step(huge)
    assert opt.last_step.kind == "nonfinite"
    assert torch.equal(w.detach(), before)
    assert torch.isfinite(opt.state[w]["exp_avg_sq"]).all()


# -- phase 3: when a step searches, and what a step that does not search reports -----------


def test_the_first_step_after_warm_up_follows_the_cadence(optimizer_class):
    """Warm-up searches at each of its ``warmup_steps`` steps; the step after it is the
    cadence's (``search_interval=2``: the step after a search reuses its step size), not one
    more warm-up search."""
    w = start_weights()
    opt = optimizer_class([w], warmup_steps=3, search_interval=2)

    def closure():
        return quadratic(w)

    kinds = []
    for _ in range(4):
        opt.step(closure)
        kinds.append(opt.last_step.kind)
    assert kinds == ["search", "search", "search", "reuse"]


@pytest.mark.parametrize("make_optimizer", ANALYTIC, ids=ANALYTIC_IDS)
def test_a_step_size_accepted_through_a_kink_is_searched_again_not_reused(make_optimizer):
    """A step size that only the slope the trials measured accepted (phase 5.8) is no better
    than a guess: the next step searches, where ``search_interval=5`` would reuse."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = make_optimizer([w], search_interval=5)

    def closure():
        return tie_loss(w)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
        assert opt.search_state.kinks_in_a_row == 1
        opt.step(closure)
    assert opt.last_step.kind == "search"


def test_a_trusted_first_trial_does_not_settle_the_step_size():
    """``search_interval="settled"`` ends the first phase of the cadence once a search takes
    its first trial as tested. A first trial that failed the test and was replaced by the
    interpolated step size, taken untested (``trust_interpolation``), is no such trial: the
    step size has not settled, and the next step searches."""
    w = start_weights()
    opt = MomentumALSALS(
        [w], lr=0.1, search_interval="settled", loss_floor=None, loss_rise_guard=None,
        start="grown",
    )  # fmt: skip

    def closure():
        return quadratic(w)

    opt.step(closure)
    opt.param_groups[0]["lr"] = 4.0 * opt.param_groups[0]["lr"]  # the next start overshoots
    opt.step(closure)
    assert opt.last_step.kind == "search" and opt.last_step.trials == 1
    assert math.isnan(opt.last_step.loss_decrease)  # trusted: the step size was not evaluated
    assert opt.search_state.settled == 0
    opt.step(closure)
    assert opt.last_step.kind == "search"


def test_a_step_that_takes_no_update_reports_step_size_zero(optimizer_class):
    """``lr`` 0 written between steps: the step takes no update, and ``last_step.step_size``
    (the ``eta`` applied) is 0, not the search state's step size, which is kept."""
    w = start_weights()
    opt = optimizer_class([w], lr=0.1)

    def closure():
        return quadratic(w)

    opt.step(closure)
    kept = opt.search_state.step_size
    before = w.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.step(closure)
    assert opt.last_step.kind == "zero_lr"
    assert opt.last_step.step_size == 0.0
    assert torch.equal(w.detach(), before)
    assert opt.search_state.step_size == kept


# -- phase 5.1: the finite-difference slope ------------------------------------------------


def test_a_probe_that_leaves_a_zero_loss_at_zero_says_nothing_of_the_slope():
    """The paper's finite difference at ``L0 = 0`` whose probe gives 0 again (the change is
    at the loss's resolution, 0 here, not beyond it): the probe says nothing, and the first
    search's slope is ``-g . d`` (a fitted batch that still has a gradient), not ``0 / lambda``.
    """
    w = start_weights()
    opt = MomentumALSALS.paper([w])

    def closure():
        total = (w * w).sum()
        return total - total.detach()  # exactly 0 everywhere, gradient 2 w

    # Adam's first direction is -g / (|g| + eps): -g . d = ||g||_1 (up to eps)
    expected = float((2.0 * w.detach()).abs().sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    assert opt.last_step.slope == pytest.approx(expected, rel=1e-6)


# -- phase 5.2: the floor's word -----------------------------------------------------------


def test_a_trial_near_the_floor_is_checked_at_twice_the_polyak_step():
    """A first trial at the Polyak step that ends at the floor is checked once more at
    twice that step: a loss that goes below the floor there (and not yet at 1.5 times it)
    counts as a search whose trials went below the floor."""
    w = torch.zeros(1, dtype=F64, requires_grad=True)

    def closure():
        t = w[0]
        # an L1 fit of one sample (its kink at the floor 0, the Polyak step t = 1) that
        # drops below the floor from t = 1.75 on
        return (1.0 - t).abs() - 10.0 * torch.relu(t - 1.75)

    opt = SLS([w], lr=1.0, start="polyak")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    assert opt.last_step.kind == "search"
    assert opt.last_step.step_size == pytest.approx(1.0)
    assert opt.search_state.floor_hits == 1


# -- phase 5.3: the Armijo test of Eqs. 1, 8 and 9; trusted interpolation ------------------


def test_a_decrease_exactly_at_the_armijo_bound_passes():
    """Eqs. 1 and 9 accept at equality, ``D' >= c_h eta G``, for either sign of the slope
    (numbers exact in binary: ``c = 0.5``, ``c_h = 2`` for a negative slope)."""
    test = ArmijoTest(c=0.5, smoothing=0.0)
    assert test.accepts(1.0, 1.0, 2.0)  # 1 >= 0.5 * 1 * 2
    assert not test.accepts(1.0 - 2**-40, 1.0, 2.0)
    assert test.accepts(-1.0, 0.5, -1.0)  # -1 >= 2 * 0.5 * -1
    assert not test.accepts(-1.0 - 2**-40, 0.5, -1.0)


def test_a_zero_slope_takes_the_inverse_constant():
    """Eq. 8: ``c_h = c`` where ``f_a > 0``, ``1 / c`` where ``f_a <= 0`` (zero included)."""
    test = ArmijoTest(c=0.5, smoothing=0.9)
    assert test.factor(1e-300) == 0.5
    assert test.factor(0.0) == 2.0
    assert test.factor(-1.0) == 2.0


def test_a_trial_whose_decrease_is_within_the_rounding_is_not_trusted():
    """``trust_interpolation`` takes the interpolated step size untested only after a trial
    that lowered the loss measurably. A trial at ``eta = 2 - 2^-52`` on ``w^2 / 2`` from
    ``w = 1`` lands at ``-(1 - 2^-52)``: the loss falls by ``2^-52``, below its resolution
    (4 ulps of 0.5), and the interpolated step size is evaluated before it is taken.
    Exact float64 arithmetic (growth 1: the trial is the written step size itself)."""
    w = torch.ones(1, dtype=F64, requires_grad=True)
    opt = SLS([w], lr=0.5, interpolate=True, trust_interpolation=True, growth_interval=math.inf)

    def closure():
        return 0.5 * (w * w).sum()

    opt.step(closure)  # (a first search: trust needs one)
    with torch.no_grad():
        w.fill_(1.0)
    opt.param_groups[0]["lr"] = 2.0 - 2.0**-52
    opt.step(closure)
    assert opt.last_step.kind == "search"
    assert opt.last_step.trials == 2
    assert opt.last_step.loss_decrease > 0.0  # measured: the step size was evaluated


# -- phase 5.7: the loss-rise guard's ceiling ----------------------------------------------


def test_switching_the_rise_guard_off_lifts_its_ceiling(optimizer_class):
    """``loss_rise_guard=None`` turns the guard off, its ceiling with it (the guard's log
    line says so): a ceiling left in the search state no longer bounds the search."""
    w = start_weights()
    opt = optimizer_class([w], lr=0.05, loss_rise_guard=3.0, loss_floor=None, search_interval=1)

    def closure():
        return quadratic(w)

    opt.step(closure)
    ceiling = 1e-3 * opt.search_state.step_size
    opt.state[w]["line_search"]["step_size_ceiling"] = ceiling
    guarded = copy.deepcopy(opt)
    guarded_w = guarded.param_groups[0]["params"][0]

    def guarded_closure():
        return quadratic(guarded_w)

    guarded.step(guarded_closure)
    assert guarded.last_step.step_size <= ceiling  # the ceiling holds while the guard is on
    opt.param_groups[0]["loss_rise_guard"] = None
    opt.step(closure)
    assert opt.last_step.kind == "search"
    assert opt.last_step.step_size > 10 * ceiling


def test_the_rise_guard_sets_no_ceiling_on_a_step_that_did_not_move(optimizer_class):
    """``loss_rise_guard`` judges a rise on a step that moved the weights: a search that
    failed (no update) at the batch that makes the rise measurable sets no ceiling, where a
    twin whose search accepts a step does."""

    def judged_step(lr, max_trials):
        """A step with ``lr`` and ``max_trials`` at a watch primed to see a rise."""
        w = start_weights()
        opt = optimizer_class(
            [w], lr=lr, max_trials=max_trials, loss_rise_guard=3.0, loss_floor=None,
            search_interval=1, start="grown",
        )  # fmt: skip

        def closure():
            return quadratic(w)  # about 10.5: the average of losses of 1 climbs measurably

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)  # (the state is stored from the first step on)
            # a watch of 200 batch losses of exactly 1 whose average step size grew tenfold
            samples = 200
            opt.state[w]["line_search"].update(
                loss_avg=1.0 - 0.99**samples,
                loss_spread_avg=0.0,
                loss_samples=samples,
                loss_lowest=1.0,
                step_size_avg=0.1,
                moves_avg=1.0,
                step_size_at_lowest=0.01,
                loss_error_at_lowest=0.0,
                watch_from_start=False,
            )
            opt.step(closure)
        return opt

    for lr, max_trials, moved in ((10.0, 1, False), (1e-3, 100, True)):
        opt = judged_step(lr, max_trials)  # 10.0 with one trial: a failed search
        assert (opt.last_step.kind == "search") is moved
        assert opt.last_step.loss_rose is moved
        assert (opt.search_state.step_size_ceiling < float("inf")) is moved
