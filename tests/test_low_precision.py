"""Weights and losses in float16 / bfloat16: the optimizers' own sums do not overflow or
round away, and a loss too coarse for the Armijo test to judge says so instead of stalling
in silence."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from conftest import PaperALSALS

#: float16 cannot hold Adam's default eps = 1e-8 (a clear error says so): 1e-4 it can.
HALF_EPS = {"eps": 1e-4}
ALL = [
    (SLS, {}),
    (AdamSLS, HALF_EPS),
    (PaperALSALS, HALF_EPS),
    (MomentumALSALS, HALF_EPS),
    (ALSALS, HALF_EPS),
]
ALL_IDS = ["SLS", "AdamSLS", "MomentumALSALS-paper", "MomentumALSALS", "ALSALS"]


def half_linear_problem():
    """A float16 layer whose gradient has small entries (below 10) and a squared norm above
    float16's largest value (65504): a dot product ending in float16 overflows."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 256).half()
    x, y = torch.randn(32, 256).half(), torch.randn(32, 256).half()

    def closure():
        return 4.0 * ((layer(x).float() - y.float()) ** 2).sum(1).mean()

    return layer, closure


@pytest.mark.parametrize(("cls", "kwargs"), ALL, ids=ALL_IDS)
def test_float16_weights_whose_squared_gradient_norm_exceeds_float16_train(cls, kwargs):
    layer, closure = half_linear_problem()
    closure().backward()
    g = layer.weight.grad.reshape(-1)
    assert g.abs().max() < 10 and g.double().square().sum() > 65504
    assert torch.isinf(torch.dot(g, g)), "the problem must overflow a float16 dot product"
    layer.zero_grad(set_to_none=True)
    opt = cls(layer.parameters(), **kwargs)
    with torch.no_grad():
        first = float(closure())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step skipped with a warning blaming a NaN/inf
        for _ in range(3):
            opt.step(closure)
            assert opt.last_step.kind not in ("nonfinite", "zero_grad"), opt.last_step
    if isinstance(opt, ALSALS):
        opt.eval()
    with torch.no_grad():
        assert float(closure()) < 0.9 * first


def bf16_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).bfloat16()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    y = x[:, :3].sum(1, keepdim=True).sin()
    return model, x.bfloat16(), y.bfloat16()


@pytest.mark.parametrize("cls", [SLS, AdamSLS], ids=["SLS", "AdamSLS"])
def test_a_loss_too_coarse_to_judge_warns_and_a_float32_loss_trains(cls):
    """bfloat16 weights and a bfloat16 loss: its rounding (4 units in the last place, 3% of
    the loss) hides every decrease the trials could show once the loss has fallen a little,
    and each search ends unresolved, without a step. That must not be silent; the same
    weights with the loss cast to float32 train on."""
    model, x, y = bf16_regression()
    opt = cls(model.parameters())
    with pytest.warns(UserWarning, match=r"ended unresolved.*bfloat16.*float32"):
        for _ in range(60):
            opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert opt.last_step.kind == "unresolved"

    model, x, y = bf16_regression()
    opt = cls(model.parameters())
    first = float(((model(x).float() - y.float()) ** 2).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(60):
            loss = opt.step(lambda: ((model(x).float() - y.float()) ** 2).mean())
    assert float(loss) < 0.5 * first


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SLS(p, lr=1e39),
        lambda p: AdamSLS(p, lr=1e39),
        lambda p: ALSALS(p, lr=1e39, loss_floor=None),
    ],
    ids=["SLS", "AdamSLS", "ALSALS-no-floor"],
)
def test_a_start_beyond_what_float32_weights_hold_backtracks_instead_of_crashing(make):
    """An lr above float32's largest value (3.4e38): torch refuses such a factor for float32
    tensors, which crashed the step; now no trial goes above it, the trials that overflow are
    cut, and the run trains."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    w = torch.nn.Parameter(torch.zeros(3))
    opt = make([w])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(40):
            opt.step(lambda: ((x @ w - y) ** 2).mean())
    assert torch.isfinite(w).all()
    assert ((x @ w.detach() - y) ** 2).mean() < 0.5 * (y**2).mean()


def test_float16_weights_with_a_gradient_entry_above_256_move_it():
    """float16 weights, a gradient entry of 300: ``v' = 0.001 g^2 = 90`` holds, but
    ``v' / (1 - beta2)`` overflows float16, so ``u = g / sqrt(inf)`` was 0 there and that
    weight never moved (no skip, no warning). ``sqrt(v') / sqrt(1 - beta2^t)``, Adam's order,
    holds: both weights move at the first step, as torch.optim.Adam's do."""
    w = torch.tensor([1.0, 1.0], dtype=torch.float16, requires_grad=True)
    scale = torch.tensor([300.0, 1.0], dtype=torch.float16)
    opt = ALSALS([w], lr=1e-3, eps=1e-4)
    opt.step(lambda: (w * scale).sum().float())
    assert opt.last_step.kind == "search"
    assert (w.detach() < 1.0).all()
    assert torch.isfinite(opt.state[w]["exp_avg_sq"]).all()


def test_a_bfloat16_loss_at_its_floor_ends_searches_early_and_idles_after_two():
    """``(1 + (w - 3)^2)`` rounded to bfloat16 at ``w = 3.03``: the loss is 1.0 at the start,
    trials that overshoot raise it by an ulp or two, smaller ones leave it at exactly 1.0.
    A search ends at the first such trial (it walked on to ``max_trials``, 100 trials a
    step); the next step searches again from the rejected trial (idling after the first one
    idled 12% of a bfloat16 model's steps where one batch rounded so), and only after two
    such searches in a row do the steps until the cadence take the averaging move alone.
    (A scalar weight: no matrix product whose rounding differs between CPUs.)"""
    w = nn.Parameter(torch.tensor([3.03]))
    opt = ALSALS([w], initial_searches=1)
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the loss no longer changes)
        for _ in range(12):
            opt.step(lambda: (1 + ((w - 3) ** 2).sum()).bfloat16())
            steps.append((opt.last_step.kind, opt.last_step.trials, opt.last_step.step_size))
    assert all(trials <= 5 for _, trials, _ in steps)
    assert steps[0][0] == steps[1][0] == "exhausted"  # (the second searches: no idle yet)
    assert steps[2] == ("reuse", 0, 0.0)  # idle after two


def test_the_factor_warning_names_coarse_weights_as_a_cause():
    """Weights of bfloat16 (a model converted with ``.bfloat16()``) round each trial's move
    to their grid, so the loss follows the gradient's promise only in part: the warning that
    blames the closure's gradient scale also names the weights' dtype and the fix
    (float32 weights under autocast); float32 weights get no such hint."""
    from alsals.line_search import overstated_message

    coarse = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2)]
    fine = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)]
    assert "the weights are torch.bfloat16" in overstated_message("ALSALS", 2.8, coarse)
    assert "torch.autocast" in overstated_message("ALSALS", 2.8, coarse)
    assert "the weights are" not in overstated_message("ALSALS", 2.8, fine)
