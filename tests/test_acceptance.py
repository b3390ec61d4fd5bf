"""Accepted steps satisfy each optimizer's acceptance test, recomputed here independently."""

from __future__ import annotations

import math

import pytest
import torch

from alsals import SLS, AdamSLS, MomentumALSALS
from conftest import PAPER, PAPER_IDS, make_classification


def logistic_problem():
    x, y = make_classification(n=64, features=5, seed=1)
    x, y = x.double(), y.double()

    def loss_at(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)

    return loss_at


def search_direction(opt, w0: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The search direction of the step just taken, from the optimizer's moment buffers."""
    if isinstance(opt, SLS):
        return -g
    state = opt.state[w]
    beta1, beta2 = opt.param_groups[0]["betas"]
    t = state["step"]
    denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + opt.param_groups[0]["eps"]
    if isinstance(opt, AdamSLS):
        return -g / denom
    return -(state["exp_avg"] / (1 - beta1**t)) / denom


@pytest.mark.parametrize("cls", PAPER, ids=PAPER_IDS)
@pytest.mark.parametrize("slope", ["analytic", "finite_difference"])
def test_accepted_step_passes_and_previous_trial_fails(cls, slope):
    loss_at = logistic_problem()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=1e3, slope=slope)  # large: forces backtracking early on
    c, smoothing, backtrack = (
        opt.defaults["c"],
        opt.defaults["smoothing"],
        opt.defaults["backtrack"],
    )
    backtracked = 0
    for _ in range(25):
        w0 = w.detach().clone()
        w_probe = w0.clone().requires_grad_(True)
        f0 = loss_at(w_probe)
        (g,) = torch.autograd.grad(f0, w_probe)
        f0 = f0.detach()
        before = dict(opt.state[w].get("line_search", {"decrease_avg": 0.0, "slope_avg": 0.0}))

        opt.step(lambda: loss_at(w))
        info, after = opt.last_step, opt.state[w]["line_search"]
        assert info.kind == "search"
        d = search_direction(opt, w0, g, w)
        if slope == "analytic":
            s = float(-(g @ d))
        else:
            with torch.no_grad():
                probe = float(loss_at(w0 + opt.defaults["fd_step"] * d))
            s = (float(f0) - probe) / opt.defaults["fd_step"]
        slope_avg = smoothing * before["slope_avg"] + (1 - smoothing) * s
        assert after["slope_avg"] == pytest.approx(slope_avg, rel=1e-9, abs=1e-12)

        @torch.no_grad()
        def passes(eta: float, f0=f0, w0=w0, d=d, d_avg=before["decrease_avg"], g_avg=slope_avg):
            decrease = float(f0) - float(loss_at(w0 + eta * d))
            avg = smoothing * d_avg + (1 - smoothing) * decrease
            c_h = c if g_avg > 0 else 1 / c
            return avg >= c_h * eta * g_avg

        eta = info.step_size
        assert passes(eta)
        if info.trials > 1:
            backtracked += 1
            assert not passes(eta / backtrack)
    assert backtracked > 0, "the problem must make the search backtrack at least once"


@pytest.mark.parametrize("cls", PAPER, ids=PAPER_IDS)
def test_step_size_grows_by_two_to_one_over_b_when_first_trial_passes(cls):
    loss_at = logistic_problem()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    # SLS on the full-batch logistic loss accepts 1e-3 at once; Adam steps of 1e-4 too.
    opt = cls([w], lr=1e-3 if cls is SLS else 1e-4, growth_interval=10)
    etas = []
    for _ in range(12):
        opt.step(lambda: loss_at(w))
        assert opt.last_step.trials == 1
        etas.append(opt.last_step.step_size)
    ratios = [b / a for a, b in zip(etas, etas[1:], strict=False)]
    assert ratios == pytest.approx([2 ** (1 / 10)] * len(ratios), rel=1e-12)
    assert etas[9] / etas[0] * 2 ** (1 / 10) == pytest.approx(2.0)
    assert opt.param_groups[0]["lr"] == etas[-1]


@pytest.mark.parametrize("cls", PAPER, ids=PAPER_IDS)
def test_backtracks_from_a_step_size_that_is_too_large(cls):
    # f(w) = 0.5 * 4 * ||w - 1||^2 from w = 0: SLS accepts eta <= 2 (1 - c) / 4 only.
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=1e4)

    def closure():
        return 2.0 * ((w - 1.0) ** 2).sum()

    opt.step(closure)
    info = opt.last_step
    assert info.kind == "search" and info.trials > 1
    expected = 1e4 * 2 ** (1 / 500) * 0.9 ** (info.trials - 1)
    assert info.step_size == pytest.approx(expected, rel=1e-12)
    if cls is SLS:  # closed form: largest eta in the geometric sequence with eta <= 0.45
        k = math.ceil(math.log(0.45 / (1e4 * 2 ** (1 / 500))) / math.log(0.9))
        assert info.trials == k + 1
        assert torch.allclose(w.detach(), torch.full((3,), 4 * info.step_size, dtype=torch.float64))
    assert info.loss_decrease > 0


def test_alsals_accepts_a_loss_increase_when_the_smoothed_slope_is_negative():
    """Eq. 8: with G <= 0, c_h = 1/c and the test allows an increase of up to eta*|G|/c.
    (Only along the momentum direction can the slope be negative.)"""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=1e-3, smoothing=0.0, search_direction="momentum")
    target = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for _ in range(5):  # builds momentum towards target
        opt.step(lambda: 10 * ((w - target) ** 2).sum())
    # Now a weak loss pulls the other way: the momentum direction ascends it.
    opt.step(lambda: 0.01 * ((w + target) ** 2).sum())
    info = opt.last_step
    assert info.slope < 0
    c = opt.defaults["c"]
    assert info.loss_decrease >= (1 / c) * info.step_size * info.slope


@pytest.mark.parametrize("eta", [1.0, 1e-160, 1e-300, 5e-324])
def test_the_interpolation_model_never_raises_and_predicts_the_quadratic_boundary(eta):
    """``largest_passing`` on a trial of the quadratic ``q(x) = s x - k x^2 / 2`` returns the
    boundary of the plain Armijo test, ``2 (1 - c) s / k``, where that is representable, and
    ``nan`` (no prediction) rather than an exception where ``eta^2`` underflows."""
    from alsals.acceptance import ArmijoTest, SearchTest

    s, k, c = 3.0, 1e6 / eta, 0.1
    test = SearchTest(ArmijoTest(c=c, smoothing=0.0), 10.0, 0.0, 0.0, 0.0)
    test.set_slope(s)
    test.judge(10.0 - (s * eta - 0.5 * k * eta * eta), eta)
    predicted = test.largest_passing()
    expected = 2 * (1 - c) * s / k
    if math.isfinite(predicted):
        assert predicted == pytest.approx(expected, rel=1e-9)
        # and the decrease the quadratic predicts there is the one the test asks for
        assert test.predicted_decrease(predicted) == pytest.approx(c * predicted * s, rel=1e-6)
    else:
        assert eta < 1e-300


def trials_of(rise, etas: list[float], loss0: float = 5.0) -> list[tuple[float, float]]:
    return [(eta, loss0 + rise(eta)) for eta in etas]


TENFOLD = [10.0**-k for k in range(1, 8)]  # 0.1 .. 1e-7, as interpolation walks down


def test_a_rise_in_proportion_to_eta_measures_the_kinks_slope():
    """A kink of rate 0.5 (plus some curvature): the secant of the smallest firm rise."""
    from alsals.acceptance import measured_slope

    trials = trials_of(lambda eta: 0.5 * eta + 2.0 * eta**2, TENFOLD)
    # 1e-7's rise is within the resolution, 1e-6's resolved but not firm (< 8e-7)
    assert measured_slope(trials, 5.0, 1e-7) == pytest.approx(-(0.5 + 2e-5), rel=1e-6)


@pytest.mark.parametrize(
    "rise",
    [
        lambda eta: 3.0 * eta**2 - 1e-3 * eta,  # smooth, overshooting: like eta^2 and faster
        lambda eta: 0.02,  # a rise that does not scale with eta: noise, a cliff
        lambda eta: 0.5 * eta if eta > 1e-4 else -0.5 * eta,  # falls at the smallest: fine
        # below an overshoot, rounding noise of 1.5 and 6 resolutions: by chance it grows
        # like eta^0.6 between the two smallest trials, but no noise is a firm rise
        lambda eta: 3.0 * eta**2 + (1.5e-9 if eta < 5e-7 else 6e-9 if eta < 5e-6 else 0.0),
    ],
    ids=["overshoot", "constant", "falls-below", "noise-below-an-overshoot"],
)
def test_rises_that_are_not_first_order_measure_nothing(rise):
    from alsals.acceptance import measured_slope

    assert math.isnan(measured_slope(trials_of(rise, TENFOLD), 5.0, 1e-9))


def test_a_slope_measured_negative_accepts_the_largest_trial_eq_8_allows():
    """Rejudged with ``s < 0`` (no history): ``c_h = 1/c`` accepts a rise of up to ``eta |s| / c``;
    the largest such trial is taken, and the search's own test is left as it was."""
    from alsals.acceptance import ArmijoTest, SearchTest

    c, s = 0.5, -1.0
    test = SearchTest(ArmijoTest(c=c, smoothing=0.0), 5.0, 1e-12, 0.0, 0.0)
    test.set_slope(2.0)
    trials = [(1.0, 5.0 + 2.5), (0.5, 5.0 + 0.9), (0.25, 5.0 + 0.3)]  # rises 2.5, 1.8, 1.2 x eta
    rejudged = test.rejudged(trials, s)
    assert rejudged is not None and rejudged.tried == 0.5  # 0.9 <= 0.5 * 1 / 0.5; 2.5 > 2
    assert test.slope == 2.0 and math.isnan(test.tried)
    assert test.rejudged([(1.0, 5.0 + 2.5)], s) is None
