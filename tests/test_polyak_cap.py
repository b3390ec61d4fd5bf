"""``loss_floor``: every update's step size at most the Polyak step on MoMo's momentum model.

The trajectory is checked against the float64 reference in ``test_reference.py``; here are
the closed forms, the invariances, what it does on a noisy problem, and its corners: a loss
below the floor, a model at the floor, bad settings. (That a run resumed from ``state_dict``
with the cap is bit-identical: ``tests/test_state_dict.py``.)
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from alsals import SLS, AdamSLS, MomentumALSALS

F64 = torch.float64
CLASSES = [SLS, AdamSLS, MomentumALSALS]
IDS = ["SLS", "AdamSLS", "MomentumALSALS"]


def test_sls_takes_the_batchs_polyak_step_where_the_search_allows_more():
    """SLS has no momentum: the model is the batch's linearisation and the cap is the
    Polyak step ``(L0 - f*) / ||g||^2``. On ``||w||^2 / 2`` the search accepts ``eta = 1``
    (the minimiser along ``-g``); the cap takes ``1/2``, and ``lr`` keeps the search's."""
    start = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=F64)
    w = start.clone().requires_grad_(True)
    opt = SLS([w], lr=1.0, loss_floor=0.0, growth_interval=math.inf)
    opt.step(lambda: 0.5 * (w * w).sum())
    assert opt.last_step.kind == "search" and opt.last_step.capped
    assert opt.last_step.step_size == pytest.approx(0.5, rel=1e-15)
    torch.testing.assert_close(w.detach(), 0.5 * start, rtol=1e-15, atol=0)
    assert opt.param_groups[0]["lr"] == 1.0  # the search's step size goes on
    assert math.isnan(opt.last_step.loss_decrease)  # measured at 1, not at the step taken

    uncapped = start.clone().requires_grad_(True)
    opt = SLS([uncapped], lr=1.0, growth_interval=math.inf)
    opt.step(lambda: 0.5 * (uncapped * uncapped).sum())
    assert not opt.last_step.capped
    assert uncapped.detach().abs().max() == 0.0


def test_alsals_first_step_cap_is_the_loss_over_the_preconditioned_slope():
    """At the first step Adam's ``m_hat = g`` and ``v_hat = g^2``: the cap is
    ``(L0 - f*) / sum g^2 / (|g| + eps)``, and the update is ``-cap g / (|g| + eps)``."""
    start = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=F64)
    floor = 2.0
    w = start.clone().requires_grad_(True)
    # lr: a first trial far above the cap, which the (unsmoothed) test accepts
    opt = MomentumALSALS([w], lr=3.0, loss_floor=floor, start="grown", smoothing=0.0, c=0.01)
    opt.step(lambda: 0.5 * (w * w).sum() + 5.0)
    loss0 = 0.5 * float((start * start).sum()) + 5.0
    g = start
    q = g.abs() + 1e-8
    cap = (loss0 - floor) / float((g * g / q).sum())
    assert opt.last_step.capped and opt.last_step.step_size == pytest.approx(cap, rel=1e-14)
    torch.testing.assert_close(w.detach(), start - cap * g / q, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_constant_in_the_loss_and_the_same_floor_change_nothing(cls):
    """The cap (and the Polyak start) see ``f - f*``: ``f + 3`` with ``loss_floor=3``
    takes the steps of ``f`` with ``loss_floor=0`` (float64, to rounding)."""
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=F64)
    y = (x @ torch.randn(5, dtype=F64) + 0.5 * torch.randn(64, dtype=F64) > 0).to(F64)
    start = 0.1 * torch.randn(5, dtype=F64)
    runs = []
    for offset in (0.0, 3.0):
        w = start.clone().requires_grad_(True)
        opt = cls([w], lr=5.0, loss_floor=offset)
        capped = 0
        for k in range(40):
            batch = slice(16 * (k % 4), 16 * (k % 4 + 1))

            def closure(batch=batch, offset=offset, w=w):
                logits = x[batch] @ w
                return (
                    torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch]) + offset
                )

            opt.step(closure)
            capped += opt.last_step.capped
        assert capped > 0
        runs.append(w.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)


def _noisy_regression_run(loss_floor: float | None) -> tuple[float, float]:
    """Over-parameterised linear regression on noisy targets with mini-batches of 8 (float64;
    an exact fit reaches 0). Returns the final full-data loss and the mean step size taken
    over the last 100 steps."""
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 96
    x = torch.randn(n, d, dtype=F64, generator=gen) / math.sqrt(d)
    y = x @ torch.randn(d, dtype=F64, generator=gen) + torch.randn(n, dtype=F64, generator=gen)
    w = torch.zeros(d, dtype=F64, requires_grad=True)
    opt = MomentumALSALS([w], loss_floor=loss_floor, loss_rise_guard=None)  # the cap alone
    order = torch.randperm(n, generator=gen)
    taken = []
    for k in range(600):
        idx = order[8 * (k % 8) : 8 * (k % 8 + 1)]
        opt.step(lambda idx=idx: 0.5 * ((x[idx] @ w - y[idx]) ** 2).mean())
        taken.append(opt.last_step.step_size)
    with torch.no_grad():
        full = float(0.5 * ((x @ w - y) ** 2).mean())
    return full, sum(taken[-100:]) / 100


def test_on_noisy_batches_the_cap_shrinks_the_step_and_fits_further():
    """Where the batches disagree, the linear models of the recent batches fall below the
    loss at the current weights and the cap cuts the step size the search found: the
    learning-rate decay that a batch line search cannot see. Without the cap, each search's
    own batch passes the grown trial, the step size grows 10% per search, and the steps that
    reuse it on the other batches throw the full-data loss up again after it had reached ~0
    (about step 400 here); with the cap the run stays at the fit."""
    capped_loss, capped_step = _noisy_regression_run(0.0)
    free_loss, free_step = _noisy_regression_run(None)
    assert capped_step < 0.5 * free_step
    assert capped_loss < 0.5 * free_loss
    assert capped_loss < 1e-6


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_loss_below_the_floor_warns_once_and_takes_the_uncapped_step(cls):
    """The floor is the model's premise: a loss below it turns the cap off for that step
    (no stall on a loss that can be negative) with one warning that names the fix."""
    start = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    results = []
    for floor in (0.0, None):
        w = start.clone().requires_grad_(True)
        opt = cls([w], lr=0.3, loss_floor=floor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(lambda w=w: 0.5 * (w * w).sum() - 10.0)
                assert not opt.last_step.capped
        messages = [str(c.message) for c in caught if "loss_floor" in str(c.message)]
        if floor is None:
            assert messages == []
        else:
            assert len(messages) == 1
            assert "below loss_floor=0" in messages[0] and "loss_floor=None" in messages[0]
            assert "policy gradient" in messages[0]  # (a loss with no lower bound at all)
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_model_at_the_floor_holds_the_weights_and_keeps_the_step_size(cls):
    """A model at (or below) ``f*`` allows no step: the weights stay, Adam's moments and
    the model still take the batch in, and the search's step size is kept."""
    start = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    w = start.clone().requires_grad_(True)
    loss0 = 0.5 * float((start * start).sum())
    opt = cls([w], lr=0.3, loss_floor=loss0)
    opt.step(lambda: 0.5 * (w * w).sum())
    info = opt.last_step
    assert info.kind == "search" and info.capped and info.step_size == 0.0
    assert torch.equal(w.detach(), start)
    state = opt.state[w]["line_search"]
    assert state["model_steps"] == 1 and state["step"] == 1
    assert opt.param_groups[0]["lr"] > 0.0
    if cls is not SLS:
        assert state and opt.state[w]["step"] == 1


@pytest.mark.parametrize(
    ("value", "error"),
    [(math.nan, ValueError), (math.inf, ValueError), ("0", TypeError), (True, TypeError)],
)
def test_loss_floor_is_validated(value, error):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(error, match="loss_floor"):
        MomentumALSALS([w], loss_floor=value)


def test_loss_floor_needs_one_beta1_for_all_groups():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    groups = [{"params": [a]}, {"params": [b], "betas": (0.8, 0.999)}]
    with pytest.raises(ValueError, match=r"betas\[0\] differs.*loss_floor"):
        MomentumALSALS(groups)
    MomentumALSALS(groups, loss_floor=None)  # without the cap, per-group betas are fine


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_batch_at_its_floor_lowers_the_step_size_carried_on_tenfold_at_most(cls):
    """The Polyak start bounds a search's first trial by ``(L0 - f*) / s``: on a batch whose
    loss is almost at the floor (one sample of an L1 fit, fitted exactly but for 1e-9) that
    is almost 0. The bound is the batch's, not the landscape's: the step size carried to the
    next search falls tenfold at most (interpolation's safeguard), not to the bound (it used
    to, and a run of an L1 fit then took hundreds of steps to grow it back)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=gen, dtype=F64)
    y = torch.randn(16, generator=gen, dtype=F64)
    w = torch.zeros(5, dtype=F64, requires_grad=True)
    opt = cls([w], lr=0.1, start="polyak", loss_floor=None)
    for k in range(6):
        i = k % 16
        opt.step(lambda i=i: (x[i] @ w - y[i]).abs())
    eta = opt.search_state.step_size
    start = eta * 2 ** (1 / opt.defaults["growth_interval"])
    target = float(x[0] @ w.detach()) + 1e-9  # the batch is at its floor, but for 1e-9
    opt.step(lambda: (x[0] @ w - target).abs())
    info = opt.last_step
    assert info.kind == "search" and info.trials == 1
    assert info.step_size < 1e-6 * eta  # the bound set the trial, and it was accepted
    assert opt.search_state.step_size == pytest.approx(0.1 * start, rel=1e-12)


def test_parameters_that_drop_out_under_the_cap_warn_once():
    """A branch whose parameters get no gradient on some steps (mixture-of-experts routing):
    the cap's model, over every parameter's momentum, no longer matches its running average
    of ``w . g``; the user is told once, with the fix. Without the cap, no warning."""
    for floor, expected in ((0.0, 1), (None, 0)):
        torch.manual_seed(0)
        a = torch.randn(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        opt = MomentumALSALS([a, b], loss_floor=floor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(6):
                used = [a, b] if step % 2 == 0 else [a]  # b drops out on odd steps
                opt.step(lambda used=used: sum((w - 1.0).pow(2).sum() for w in used))
        messages = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
        assert len(messages) == expected
        if expected:
            assert "loss_floor=None" in messages[0]


def test_a_forgotten_backward_is_not_taken_for_parameters_that_dropped_out():
    """A ``closure(backward)`` that forgets ``loss.backward()`` leaves every gradient
    ``None``: the step is skipped with the warning that names the forgotten call, and not
    also the one about parameters dropping out (mixture-of-experts routing), whose advice
    (``loss_floor=None``) is wrong there and which, once given, a later real case would not
    get."""
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w])
    for _ in range(3):
        opt.step(lambda: (w - 1.0).pow(2).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(lambda backward: (w - 1.0).pow(2).sum())  # (backward forgotten)
    messages = [str(c.message) for c in caught]
    assert any("call loss.backward() in the closure" in m for m in messages)
    assert not any("got no gradient" in m for m in messages)
