"""A loss that can go below the floor of the Polyak cap and start is not held at the floor.

``loss_floor`` (the cap) and ``start="polyak"`` (every search starts no higher than
``(L0 - f*) / s``, with ``f*`` 0 when ``loss_floor`` is ``None``) assume that the loss cannot
go below ``f*``. Where it can (a negative log-likelihood of continuous data, a loss with a
negative constant), both bounds shrink with ``L0 - f*`` while the gradient does not: the
loss creeps up to ``f*`` and stops there, silently. The run reads each search's trials for
the evidence (``alsals.polyak_cap.floor_word``), and after ``FLOOR_HITS`` searches in a row
that showed a loss below the floor it warns once and stops using the floor. The trajectory
is checked against the float64 reference in ``test_reference.py`` (the ``below-zero``
cases).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.polyak_cap import FLOOR_HIT_FRACTION, FLOOR_HITS, floor_word
from alsals.search_state import SearchState

F64 = torch.float64
CLASSES = [SLS, AdamSLS, MomentumALSALS]
IDS = ["SLS", "AdamSLS", "MomentumALSALS"]
#: the floor and the Polyak start on, as MomentumALSALS's defaults have them
FLOORED = {"loss_floor": 0.0, "start": "polyak"}


def _quadratic(offset: float) -> tuple[Tensor, Callable[[], Tensor]]:
    """``sum_i a_i w_i^2 / 2 + offset`` (condition number 10) from a fixed start, float64."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.1, 1.0, 10, dtype=F64)
    w = torch.randn(10, generator=gen, dtype=F64).mul_(3.0).requires_grad_(True)
    return w, lambda: 0.5 * (scales * w * w).sum() + offset


def _run(
    cls, offset: float, steps: int, **options
) -> tuple[MomentumALSALS, Tensor, float, list[str]]:
    w, closure = _quadratic(offset)
    opt = cls([w], **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
    messages = [str(c.message) for c in caught if "floor" in str(c.message)]
    return opt, w, float(closure().detach()) - offset, messages


@pytest.mark.parametrize("offset", [-0.01, -0.5, -5.0])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_loss_below_the_floor_is_not_held_at_it(cls, offset):
    """The loss's minimum is ``offset < 0``: the run reaches it (not 0, where the Polyak
    bounds would hold it), refutes the floor with one warning that names the fix, and takes
    uncapped steps from then on."""
    options = {} if cls is MomentumALSALS else FLOORED  # MomentumALSALS's defaults have both
    opt, _, excess, messages = _run(cls, offset, 400, **options)
    assert excess < 1e-8  # the quadratic part: at the minimum, not at -offset
    assert opt.search_state.floor_refuted
    assert len(messages) == 1
    assert "loss_floor=0" in messages[0] and "loss_floor=None" in messages[0]
    assert not opt.last_step.capped


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_the_polyak_start_alone_is_not_held_at_0(cls):
    """``loss_floor=None`` turns the cap off, but ``start="polyak"`` still bounds the start
    by ``L0 / s`` (floor 0): a loss that goes below 0 reaches its minimum, and where the
    floor was refuted on the way (SLS, whose steps bring the loss to 0 along the gradient)
    the warning names the start."""
    opt, _, excess, messages = _run(cls, -5.0, 400, loss_floor=None, start="polyak")
    assert excess < 1e-8
    if cls is SLS:
        assert opt.search_state.floor_refuted
    if opt.search_state.floor_refuted:
        assert len(messages) == 1 and 'start="polyak"' in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_the_right_floor_is_kept_and_reached(cls):
    """The same loss with its true minimum as ``loss_floor``: never refuted, no warning,
    and the run reaches the minimum with the cap on."""
    opt, _, excess, messages = _run(cls, -5.0, 400, loss_floor=-5.0, start="polyak")
    assert excess < 1e-6
    assert opt.search_state.floor_hits == 0 and messages == []


@pytest.mark.parametrize("batch", [8, 64], ids=["mini-batch", "full-batch"])
@pytest.mark.parametrize("problem", ["least_squares", "separable_logistic", "memorising_mlp"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_right_floor_is_never_refuted(cls, problem, batch):
    """Losses whose floor 0 holds, approached as closely as float32 allows (an
    over-parameterised least squares fit, a separable logistic regression, an MLP that
    memorises random labels): no search ever says the floor is wrong."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    if problem == "least_squares":  # 80 weights, 64 rows
        x = torch.cat([x, torch.randn(64, 63, generator=gen)], dim=1)
        model = nn.Linear(79, 1)
        y = torch.randn(64, generator=gen)

        def loss(idx):
            return 0.5 * ((model(x[idx])[:, 0] - y[idx]) ** 2).mean()

    elif problem == "separable_logistic":
        model = nn.Linear(16, 2)
        y = (x[:, 0] > 0).long()

        def loss(idx):
            return nn.functional.cross_entropy(model(x[idx]), y[idx])
    else:
        model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 3))
        y = torch.randint(0, 3, (64,), generator=gen)

        def loss(idx):
            return nn.functional.cross_entropy(model(x[idx]), y[idx])

    torch.manual_seed(0)
    opt = cls(model.parameters(), **({} if cls is MomentumALSALS else FLOORED))
    initial = float(loss(torch.arange(64)).detach())
    most = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refutation warning would fail the test
        for _ in range(300):
            idx = torch.randperm(64)[:batch]
            opt.step(lambda idx=idx: loss(idx))
            most = max(most, opt.search_state.floor_hits)
    assert most == 0
    assert float(loss(torch.arange(64)).detach()) < initial / 4  # it went towards the floor


def test_floor_word_on_closed_forms():
    """What one trial says: a slice that is quadratic down to the floor ends 1/4 of the way
    above it at the Polyak step, an exponential tail 1/e (both: the floor holds); a straight
    line ends on the floor (suspect: a trial at twice the step decides); below the floor by
    more than the loss's rounding is wrong wherever the trial was, also from a loss at the
    floor; a trial from a loss at the floor that is not below it says nothing."""
    loss0, resolution = 2.0, 1e-12
    quadratic_end = loss0 / 4  # (t - 2)^2 / 2 from t = 0 to its Polyak step t = 1
    assert floor_word(loss0, quadratic_end, 0.0, resolution, at_polyak_step=True) == "holds"
    assert floor_word(loss0, loss0 / math.e, 0.0, resolution, at_polyak_step=True) == "holds"
    linear_end = loss0 * FLOOR_HIT_FRACTION / 2
    assert floor_word(loss0, linear_end, 0.0, resolution, at_polyak_step=True) == "near"
    assert floor_word(loss0, 0.0, 0.0, resolution, at_polyak_step=True) == "near"
    # not at the Polyak step (the search started below it): only a loss below the floor
    assert floor_word(loss0, linear_end, 0.0, resolution, at_polyak_step=False) == "holds"
    assert floor_word(loss0, -0.1, 0.0, resolution, at_polyak_step=False) == "below"
    assert floor_word(loss0, -resolution / 2, 0.0, resolution, at_polyak_step=False) == "holds"
    # the floor elsewhere than 0: the same fractions of L0 - f*
    assert floor_word(loss0 + 7, quadratic_end + 7, 7.0, resolution, True) == "holds"
    assert floor_word(loss0 + 7, linear_end + 7, 7.0, resolution, True) == "near"
    # at the floor within rounding: only a trial below it says something (a critic whose
    # loss is 0 at its start; ignored, every step was cut to 0 for good), a non-finite trial
    # nothing, nor anything from a loss already below the floor (its own warning says so)
    assert floor_word(resolution / 2, -1.0, 0.0, resolution, at_polyak_step=True) == "below"
    assert floor_word(resolution / 2, 0.0, 0.0, resolution, at_polyak_step=True) is None
    assert floor_word(-1.0, -3.0, 0.0, resolution, at_polyak_step=False) is None
    assert floor_word(loss0, math.nan, 0.0, resolution, at_polyak_step=True) is None


@pytest.mark.parametrize("loss", ["l1", "hinge"])
def test_a_kink_at_the_floor_is_not_taken_for_a_wrong_floor(loss):
    """A piecewise-linear loss of one sample (an L1 fit, a multi-class hinge) falls straight
    to 0 at its Polyak step, as a loss through a wrong floor would; the trial at twice the
    step goes back up, so the floor stays, and the Polyak bounds keep their worth (one
    sample at a time: the L1 fit ends near 0; with the floor dropped it ended at 0.3-0.45).
    Float64: the final losses (0.002 and 0.012 against bounds of 0.12 and 0.028) must not
    hang on one CPU's float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=gen, dtype=F64)
    torch.manual_seed(0)
    if loss == "l1":
        y = x @ torch.randn(10, generator=gen, dtype=F64)
        model = nn.Linear(10, 1).double()

        def closure(i):
            return (model(x[i]).squeeze(-1) - y[i]).abs().mean()
    else:
        labels = (x[:, 0] > 0).long()
        model = nn.Linear(10, 2).double()

        def closure(i):
            return nn.functional.multi_margin_loss(model(x[i]), labels[i])

    opt = MomentumALSALS(model.parameters())
    initial = float(closure(torch.arange(64)).detach())
    probed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(400):
            i = torch.randint(0, 64, (1,))
            opt.step(lambda i=i: closure(i))
            info = opt.last_step
            searched = info.kind == "search" and opt.search_state.searches > 1  # no replay
            probed += searched and info.forwards > info.trials + 1  # one more evaluation
            assert opt.search_state.floor_hits == 0
    assert probed > 0  # the suspect searches happened, and were cleared
    assert float(closure(torch.arange(64)).detach()) < initial / 20


def test_refuting_takes_searches_in_a_row():
    """A search that says the floor holds resets the count: the run refutes only after
    ``FLOOR_HITS`` in a row, and then starts its search afresh from the constructor's lr."""
    w, closure = _quadratic(-5.0)
    opt = MomentumALSALS([w], lr=0.3)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while not opt.search_state.floor_refuted:
            opt.step(closure)
            if opt.last_step.kind == "search":
                seen.append(opt.search_state.floor_hits)
            assert len(seen) < 200
    assert seen[-FLOOR_HITS:] == list(range(1, FLOOR_HITS + 1))
    assert all(b in (0, a, a + 1) for a, b in zip(seen, seen[1:], strict=False))
    assert opt.param_groups[0]["lr"] >= 0.3  # afresh: at least the constructor's lr
    state = opt.search_state
    assert state.decrease_avg == state.slope_avg == 0.0 and state.averaged == 0
    # a step size no search accepted: the next step tests it, never reuses it untested
    assert state.unaccepted_in_a_row == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    assert opt.last_step.kind == "search"


def test_a_preview_does_not_count_and_a_resumed_run_is_the_same_run():
    """The count is search state: ``preview`` leaves it, ``state_dict`` carries it (a run
    resumed just before the refuting step refutes at the same step, bit for bit)."""
    w, closure = _quadratic(-5.0)
    opt = MomentumALSALS([w], lr=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while opt.search_state.floor_hits < FLOOR_HITS - 1:
            opt.step(closure)
        checkpoint = copy.deepcopy(opt.state_dict())
        weights = w.detach().clone()
        hits = opt.search_state.floor_hits
        opt.preview(closure)
        assert opt.search_state.floor_hits == hits
        runs = []
        for resume in (False, True):
            if resume:
                with torch.no_grad():
                    w.copy_(weights)
                opt = MomentumALSALS([w], lr=0.3)
                opt.load_state_dict(checkpoint)
            path = []
            for _ in range(30):
                opt.step(closure)
                path.append((opt.search_state.floor_hits, w.detach().clone()))
            runs.append(path)
    assert runs[0][-1][0] == FLOOR_HITS
    for (hits_a, w_a), (hits_b, w_b) in zip(*runs, strict=True):
        assert hits_a == hits_b and torch.equal(w_a, w_b)


def test_a_bad_count_in_a_checkpoint_is_named():
    with pytest.raises(ValueError, match="floor_hits"):
        SearchState.from_dict({"step_size": 0.1, "initial_step_size": 0.1, "floor_hits": -1})


@pytest.mark.parametrize("cls", [MomentumALSALS, ALSALS], ids=["MomentumALSALS", "ALSALS"])
def test_a_critic_whose_loss_starts_at_the_floor_finds_it_wrong_and_trains(cls):
    """A Wasserstein critic initialised at zero: its loss ``E[f(fake)] - E[f(real)]`` is
    exactly 0, the default floor, at the start, and goes negative. Every step was cut to 0
    for good (MomentumALSALS ignored the trials below a floor the loss sat on; ALSALS tried
    none at the floor, and blamed the closure): the minimum of the regularised loss is
    ``-|E[real] - E[fake]|^2 / 2``."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(256, 4, generator=g, dtype=torch.float64) + 1.0
    fake = torch.randn(256, 4, generator=g, dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)

    def closure():
        return (fake @ w).mean() - (real @ w).mean() + 0.5 * (w * w).sum()

    opt = cls([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):
            opt.step(closure)
    gap = real.mean(0) - fake.mean(0)
    assert closure().item() == pytest.approx(-0.5 * float(gap @ gap), rel=1e-3)
    assert any("below loss_floor" in str(m.message) for m in caught)
    assert not any("closure" in str(m.message) for m in caught)
