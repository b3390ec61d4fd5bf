"""Updates that no evaluation tested: undone when the loss is not finite where they land.

A step that reuses the last search's step size, and AdamSLS's update along the momentum
(its search tests the preconditioned gradient), move the weights to a point where the loss
was never evaluated. Where the loss has a domain (a log or a square root of the weights),
such an update can cross its boundary; every later batch is then non-finite. Phase 6 undoes
the update on the second non-finite skip in a row after it (``docs/algorithms.md``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from alsals import SLS, AdamSLS, MomentumALSALS

UNDONE = "the loss was not finite on two steps in a row after an update that no evaluation"


def barrier_run(make_optimizer, seed: int, steps: int = 400) -> tuple[list[str], torch.Tensor]:
    """A noisy quadratic whose minimum lies outside the log barrier's domain ``||w|| < 1``:
    the optimum sits near the boundary, and beyond it the loss is NaN. The step kinds and
    the final weights."""
    torch.manual_seed(seed)
    c = torch.randn(8, dtype=torch.float64)
    c = 1.5 * c / c.norm()
    w = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([w])
    kinds = []
    for _ in range(steps):
        noise = 0.3 * torch.randn(8, dtype=torch.float64)

        def closure(noise=noise):
            return ((w - c - noise) ** 2).sum() - 0.05 * torch.log(1 - (w**2).sum())

        opt.step(closure)
        kinds.append(opt.last_step.kind)
    return kinds, w.detach()


def longest_run(kinds: list[str], kind: str) -> int:
    longest = current = 0
    for k in kinds:
        current = current + 1 if k == kind else 0
        longest = max(longest, current)
    return longest


@pytest.mark.parametrize(
    ("make_optimizer", "seeds"),
    [(MomentumALSALS, range(10)), (AdamSLS, range(4))],
    ids=["MomentumALSALS-reuse-step", "AdamSLS-momentum-update"],
)
def test_an_untested_update_across_a_domain_boundary_is_undone(make_optimizer, seeds):
    """Before the undo, runs got stuck outside the domain, every later step skipped (in
    float32 on 20 seeds: MomentumALSALS(params) on 10-12 by the CPU, AdamSLS on 19; see
    benchmarks/scripts/losses_with_a_domain.py). Now no run skips more than
    the two steps that trigger the undo in a row, and every run ends inside the domain."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in seeds:
            kinds, w = barrier_run(make_optimizer, seed)
            assert longest_run(kinds, "nonfinite") <= 2, seed
            assert (w**2).sum() < 1.0, seed
    assert any(UNDONE in str(w.message) for w in caught)  # the case was reached


@pytest.mark.parametrize(
    "make_optimizer", [SLS, MomentumALSALS.paper], ids=["SLS", "MomentumALSALS-paper"]
)
def test_updates_that_were_tested_where_they_land_stay_inside_a_domain(make_optimizer):
    """The same problem, where every update is the tested trial (a search at every step,
    along the update's own direction): never outside the domain."""
    for seed in (0, 5):
        assert "nonfinite" not in barrier_run(make_optimizer, seed)[0]


# -- the undo, step by step, on a quadratic -------------------------------------------------

A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def quadratic(w: torch.Tensor):
    return lambda: 0.5 * ((A @ w - B) ** 2).sum()


def nan_loss(w: torch.Tensor):
    return lambda: quadratic(w)() * float("nan")


def moments(opt, w):
    state = opt.state[w]
    return state["exp_avg"].clone(), state["exp_avg_sq"].clone(), state["step"]


# MomentumALSALS with a fixed cadence: step 1 searches, step 2 reuses its step size (untested).
# AdamSLS searches every step and updates along the momentum (untested).
UNTESTED = [
    pytest.param(
        lambda p, **kw: MomentumALSALS(p, search_interval=2, **kw), id="MomentumALSALS-reuse"
    ),
    pytest.param(lambda p, **kw: AdamSLS(p, **kw), id="AdamSLS"),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("make_optimizer", UNTESTED)
def test_the_second_nonfinite_skip_after_an_untested_update_undoes_it(make_optimizer, weight_decay):
    """The weights go back to where the update started (float64: to rounding), the moments
    stay as that update wrote them, the next search starts from ``backtrack * eta`` and the
    step after the undo searches; one warning says what happened."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([w], lr=0.1, weight_decay=weight_decay)
    opt.step(quadratic(w))
    before_update = w.detach().clone()
    opt.step(quadratic(w))
    assert opt.last_step.kind in ("reuse", "search")
    eta = opt.last_step.step_size
    assert opt.search_state.untested_step_size == eta > 0
    landed, written = w.detach().clone(), moments(opt, w)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip's own warning
        opt.step(nan_loss(w))  # one bad batch: skipped, nothing undone
        assert torch.equal(w.detach(), landed)
        with pytest.warns(UserWarning, match=UNDONE):
            opt.step(nan_loss(w))
    assert opt.last_step.kind == "nonfinite"
    torch.testing.assert_close(w.detach(), before_update, rtol=1e-12, atol=1e-15)
    assert not torch.equal(w.detach(), landed)
    for now, then in zip(moments(opt, w), written, strict=True):
        assert torch.equal(torch.as_tensor(now), torch.as_tensor(then))
    state = opt.search_state
    assert (state.undone_updates, state.untested_step_size, state.skipped_nonfinite) == (1, 0, 2)
    assert state.step_size == pytest.approx(opt.defaults["backtrack"] * eta, rel=1e-15)
    assert opt.param_groups[0]["lr"] == state.step_size

    opt.step(quadratic(w))
    assert opt.last_step.kind == "search"
    assert opt.search_state.nonfinite_losses_in_a_row == 0


@pytest.mark.parametrize("make_optimizer", UNTESTED)
def test_the_undo_resumes_from_a_saved_state_dict(make_optimizer):
    """Between the two skips the record lives in ``state_dict``: a run resumed from a
    checkpoint taken after the first skip undoes exactly as the uninterrupted run."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([w], lr=0.1)
    for closure in (quadratic(w), quadratic(w)):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(nan_loss(w))
        saved_weights, saved_state = w.detach().clone(), copy.deepcopy(opt.state_dict())
        opt.step(nan_loss(w))
        w2 = saved_weights.clone().requires_grad_(True)
        resumed = make_optimizer([w2], lr=0.1)
        resumed.load_state_dict(saved_state)
        resumed.step(nan_loss(w2))
    assert torch.equal(w2.detach(), w.detach())
    assert resumed.search_state == opt.search_state


def test_a_nonfinite_batch_after_an_untested_update_makes_the_next_step_search():
    """One bad batch undoes nothing, but the step after it searches instead of reusing
    the step size (it may be what made the loss non-finite)."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=0.1, search_interval=3)
    opt.step(quadratic(w))
    opt.step(quadratic(w))
    assert opt.last_step.kind == "reuse"
    landed = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(nan_loss(w))
    assert torch.equal(w.detach(), landed)
    opt.step(quadratic(w))  # without the skip, the cadence would reuse here
    assert opt.last_step.kind == "search"
    assert opt.search_state.undone_updates == 0


def test_a_parameter_left_out_of_the_update_keeps_it_from_being_undone():
    """An update that some parameter holding moments took no part in (no gradient) cannot
    be rebuilt from the moments alone: it is not recorded, and two skips change nothing."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w, u], lr=0.1, search_interval=2)
    opt.step(lambda: quadratic(w)() + (u**2).sum())  # both get moments
    opt.zero_grad(set_to_none=True)
    opt.step(quadratic(w))  # a reuse step that moves w alone
    assert opt.last_step.kind == "reuse"
    assert opt.search_state.untested_step_size == 0.0
    landed = [w.detach().clone(), u.detach().clone()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(lambda: nan_loss(w)() + (u**2).sum())
        opt.step(lambda: nan_loss(w)() + (u**2).sum())
    assert all(torch.equal(a, b.detach()) for a, b in zip(landed, [w, u], strict=True))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(
            lambda p: MomentumALSALS(p, lr=0.1, search_interval=2), id="MomentumALSALS-search"
        ),
        pytest.param(lambda p: SLS(p, lr=0.1, search_interval=2), id="SLS-reuse"),
    ],
)
def test_updates_that_are_tested_or_cannot_be_rebuilt_are_not_undone(make_optimizer):
    """After an update that landed on an evaluated trial (MomentumALSALS's search), or one that the
    state cannot rebuild (SLS reuses along a gradient it does not keep), two non-finite
    skips leave the weights where they are."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([w])
    opt.step(quadratic(w))
    if opt.last_step.kind == "search" and isinstance(opt, SLS):
        opt.step(quadratic(w))  # SLS: the reuse step
    assert opt.search_state.untested_step_size == 0.0
    landed = w.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(nan_loss(w))
        opt.step(nan_loss(w))
    assert torch.equal(w.detach(), landed)
    assert opt.search_state.undone_updates == 0


@pytest.mark.parametrize("make_optimizer", UNTESTED)
def test_nonfinite_gradients_with_a_finite_loss_undo_nothing(make_optimizer):
    """GradScaler's overflows (an inf gradient, the loss finite), several in a row as at the
    start of fp16 training, say nothing about where the weights are: no undo, and the
    cadence goes on as before."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([w], lr=0.1)
    opt.step(quadratic(w))
    opt.step(quadratic(w))
    assert opt.search_state.untested_step_size > 0
    landed = w.detach().clone()

    def overflowing_gradient():  # d/dw of sqrt(w - w) at 0 is inf; the value stays finite
        return quadratic(w)() + 0.0 * torch.sqrt(w[0] - w[0])

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            opt.step(overflowing_gradient)
            assert opt.last_step.kind == "nonfinite"
    assert torch.equal(w.detach(), landed)
    state = opt.search_state
    assert (state.undone_updates, state.nonfinite_losses_in_a_row) == (0, 0)


def test_a_preview_of_the_undoing_step_changes_nothing():
    """``preview`` runs the step without committing it: the undo is phase 6's, so the
    preview leaves the weights and state alone, and the step itself then undoes."""
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = AdamSLS([w], lr=0.1)
    opt.step(quadratic(w))
    opt.step(quadratic(w))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(nan_loss(w))
        landed, state = w.detach().clone(), opt.search_state
        preview = opt.preview(nan_loss(w))
        assert preview.info.kind == "nonfinite"
        assert torch.equal(w.detach(), landed) and opt.search_state == state
        opt.step(nan_loss(w))
    assert opt.search_state.undone_updates == 1
    assert not torch.equal(w.detach(), landed)
