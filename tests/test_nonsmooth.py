"""Nonsmooth losses: a kink where the gradient autograd picks is not a descent direction.

At a tie of ``max(a1 . w, a2 . w)`` autograd's gradient is one piece's, ``a1``; with
``a1 . a2 < 0`` every step along ``-a1`` (or Adam's direction built from it) raises the other
piece, so the loss rises for every step size, while the analytic slope ``-g . d > 0`` says it
should fall. A Polyak-type step lands exactly on such a tie when it brings a piecewise-linear
loss to a kink. Float64, so that the tie is exact on every CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from alsals import SLS, AdamSLS, MomentumALSALS

F64 = torch.float64


def tie_loss(w: torch.Tensor) -> torch.Tensor:
    """``max(w0 + w1, -w0) + 0.01 ||w||^2 + 5``: at ``w = (1, -2)`` both pieces are equal."""
    return torch.stack([w[0] + w[1], -w[0]]).max() + 0.01 * (w**2).sum() + 5.0


def at_a_tie(make_optimizer, steps: int = 30) -> tuple[float, float, list[str]]:
    """From the tie of ``tie_loss``: the loss at the start and at the end, and the step
    kinds."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)

    def loss():
        return tie_loss(w)

    start = float(loss().detach())
    opt = make_optimizer([w])
    kinds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.step(loss)
            kinds.append(opt.last_step.kind)
    return start, float(loss().detach()), kinds


def test_the_papers_finite_difference_slope_passes_the_kink():
    """The finite difference measures the rise (a negative slope), and the paper's
    ``c_h = 1/c`` branch accepts a step through the kink; the loss then falls."""
    start, end, kinds = at_a_tie(MomentumALSALS.paper)
    assert kinds[0] == "search"
    assert end < start - 0.3


ANALYTIC = [MomentumALSALS, SLS, AdamSLS]
ANALYTIC_IDS = ["MomentumALSALS-defaults", "SLS", "AdamSLS"]


@pytest.mark.parametrize("make_optimizer", ANALYTIC, ids=ANALYTIC_IDS)
def test_the_analytic_slope_steps_off_the_tie_without_shrinking_its_step_size(make_optimizer):
    """The trials contradict ``-g . d > 0`` (phase 5.8): the search accepts a step instead of
    ending without one (unresolved, failed: the weights never moved), and the step size it
    hands on is not the tiny trial where the rise fell below the loss's rounding."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = make_optimizer([w])
    lr = opt.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: tie_loss(w))
    assert opt.last_step.kind == "search"
    assert opt.last_step.slope < 0.0  # the slope the trials measured, not -g . d
    assert opt.last_step.step_size >= 0.5 * lr
    assert opt.search_state.kinks_passed == 1
    assert not torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=F64))


@pytest.mark.parametrize("make_optimizer", ANALYTIC, ids=ANALYTIC_IDS)
def test_the_analytic_slope_lowers_the_loss_from_the_tie(make_optimizer):
    start, end, kinds = at_a_tie(make_optimizer)
    assert "unresolved" not in kinds and "failed" not in kinds
    assert end < start - 0.05


def test_the_defaults_pass_the_kink_as_the_papers_finite_difference_does():
    """Adam's momentum averages the two pieces' gradients into a direction along the kink:
    the recommended configuration, like the paper's, then lowers the loss steadily. (SLS
    and Adam + SLS, searching along one piece's gradient, zigzag across the kink with
    shrinking steps: Armijo along gradient directions of a nonsmooth loss.)"""
    start, end, _ = at_a_tie(MomentumALSALS)
    assert end < start - 0.3


def quadratic_along_one_axis(curvature: float) -> tuple[torch.Tensor, object]:
    w = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    return w, lambda: 0.5 * curvature * (w**2).sum() + 1.0


def test_a_smooth_loss_that_every_trial_overshoots_still_fails_its_search():
    """Trials too large for a smooth loss rise like ``eta^2`` at the smallest of them: not a
    kink. With curvature 1e9 every one of SLS's 100 trials from ``lr=1`` overshoots, and the
    search fails as before (the next one starts from its last trial)."""
    w, loss = quadratic_along_one_axis(1e9)
    opt = SLS([w], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(loss)
    assert opt.last_step.kind == "failed"
    assert torch.equal(w.detach(), torch.tensor([1.0, 0.0], dtype=F64))


@pytest.mark.parametrize("make_optimizer", ANALYTIC, ids=ANALYTIC_IDS)
def test_a_gradient_that_is_not_the_losss_is_stepped_through_once_then_named(make_optimizer):
    """A closure whose loss carries a detached term: the gradient is a surrogate's, along
    which the loss rises at every search. The first contradiction is taken for a kink and
    stepped through; the next ones end without a step (the loss climbs no further) and one
    warning names the likely causes."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)

    def closure():
        surrogate = -0.5 * (w**2).sum()
        return ((w**2).sum() + 5.0).detach() + surrogate - surrogate.detach()

    opt = make_optimizer([w])
    with pytest.warns(UserWarning, match="not the loss's own") as record:
        opt.step(closure)
        after_the_first = w.detach().clone()
        for _ in range(9):
            opt.step(closure)
            assert opt.last_step.kind in ("failed", "unresolved")
    assert sum("not the loss's own" in str(r.message) for r in record) == 1
    assert torch.equal(w.detach(), after_the_first)
    state = opt.search_state
    assert (state.kinks_passed, state.kinks_in_a_row) == (1, 1)


def test_a_search_accepted_by_its_own_slope_lets_the_next_kink_through():
    """``kinks_in_a_row`` returns to 0 at the first search that the gradient's slope
    accepts: a run that meets a second tie later passes it too."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = SLS([w])

    def tie():
        return tie_loss(w)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(tie)
        assert opt.search_state.kinks_in_a_row == 1
        opt.step(tie)  # away from the tie: an ordinary search
        assert opt.last_step.kind == "search" and opt.search_state.kinks_in_a_row == 0
        with torch.no_grad():
            w.copy_(torch.tensor([1.0, -2.0], dtype=F64))  # back at the tie
        opt.step(tie)
    assert opt.search_state.kinks_passed == 2


def test_a_resumed_run_remembers_the_kink_it_passed():
    """``kinks_in_a_row`` is in ``state_dict``: a run resumed after passing a contradiction
    does not step through the next one either."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)

    def closure():
        surrogate = -0.5 * (w**2).sum()
        return ((w**2).sum() + 5.0).detach() + surrogate - surrogate.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MomentumALSALS([w])
        opt.step(closure)
        saved = opt.state_dict()
        resumed = MomentumALSALS([w])
        resumed.load_state_dict(saved)
        before = w.detach().clone()
        resumed.step(closure)
    assert resumed.search_state.kinks_in_a_row == 1
    assert resumed.last_step.kind in ("failed", "unresolved")
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("make_optimizer", ANALYTIC, ids=ANALYTIC_IDS)
@pytest.mark.parametrize("lr", [1e6, 1e8])
def test_a_search_from_a_huge_lr_does_not_step_through_the_losss_linear_tail(make_optimizer, lr):
    """From ``lr=1e6`` every trial of the first search lands in the logistic loss's linear
    tail, where the loss rises in proportion to the step size as at a kink. A step through a
    kink may raise the loss by no more than it lies above the floor (0): a larger rise is a
    step too large, so the search fails and the next one goes on down (Adam + SLS took the
    largest trial, 0.69 -> 3e5, and kept it as its step size)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=F64)
    noise = 0.5 * torch.randn(200, generator=gen, dtype=F64)
    y = (x @ torch.randn(5, generator=gen, dtype=F64) + noise > 0).to(F64)
    w = torch.zeros(5, dtype=F64, requires_grad=True)

    def loss():
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)

    start = float(loss().detach())
    opt = make_optimizer([w], lr=lr)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(30):
            opt.step(loss)
            losses.append(float(loss().detach()))
    assert max(losses) <= start
    assert losses[-1] < 0.6 * start  # Adam + SLS from lr=1: 0.35 at this step


@pytest.mark.parametrize("make_optimizer", ANALYTIC, ids=ANALYTIC_IDS)
def test_a_kink_of_a_loss_below_the_floor_is_still_stepped_through(make_optimizer):
    """The bound on a kink step's rise is the loss's distance from the floor, not its height
    above it: at a tie of a loss below 0 (``tie_loss - 15``, about -10) the rule steps
    through as at ``tie_loss`` (a height <= 0 allowed no step: the weights never moved)."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = make_optimizer([w])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: tie_loss(w) - 15.0)
    assert opt.last_step.kind == "search" and opt.search_state.kinks_passed == 1
    assert not torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=F64))
