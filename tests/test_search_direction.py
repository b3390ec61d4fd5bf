"""MomentumALSALS's ``search_direction``: what the trials move along, and what it does to the step
size on a noisy problem (``benchmarks/docs/method.md``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alsals import PAPER_ALSALS, SLS, AdamSLS, MomentumALSALS

F64 = torch.float64


def noisy_regression_run(direction: str, seed: int) -> tuple[float, float]:
    """Linear regression with label noise of variance 4 (the loss floor), batches of 8:
    the mean step size over the last 50 of 300 steps, and the loss on all the data."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 20, generator=gen, dtype=F64)
    y = x @ torch.randn(20, 1, generator=gen, dtype=F64)
    y += 2.0 * torch.randn(2048, 1, generator=gen, dtype=F64)
    torch.manual_seed(seed)
    model = nn.Linear(20, 1).to(F64)
    opt = MomentumALSALS(model.parameters(), search_direction=direction)
    etas = []
    for _ in range(300):
        index = torch.randint(0, 2048, (8,), generator=gen)

        def closure(backward: bool = False, index: torch.Tensor = index) -> torch.Tensor:
            loss = ((model(x[index]) - y[index]) ** 2).mean()
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        opt.step(closure)
        etas.append(opt.search_state.step_size)
    with torch.no_grad():
        return sum(etas[-50:]) / 50, ((model(x) - y) ** 2).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_preconditioned_search_lowers_the_step_size_where_noise_dominates(seed):
    """Near the noise floor the momentum search keeps accepting the step sizes that lower
    each batch's loss; the preconditioned search, whose slope carries the batch's noise,
    settles at smaller ones and ends closer to the floor."""
    eta_preconditioned, loss_preconditioned = noisy_regression_run("preconditioned", seed)
    eta_momentum, loss_momentum = noisy_regression_run("momentum", seed)
    assert eta_preconditioned < 0.7 * eta_momentum
    assert loss_preconditioned < loss_momentum


def test_alsals_searches_along_momentum_unless_told_and_adam_sls_along_the_preconditioned():
    w = [torch.zeros(3, requires_grad=True)]
    assert MomentumALSALS(w).defaults["search_direction"] == "momentum"
    assert MomentumALSALS.paper(w).defaults["search_direction"] == "momentum"
    assert PAPER_ALSALS["search_direction"] == "momentum"
    assert SLS(w).defaults["search_direction"] == "gradient"
    assert AdamSLS(w).defaults["search_direction"] == "preconditioned"


def test_the_trial_moves_along_the_chosen_direction():
    """The first trial of the first step sits at ``w0 + eta d``: ``d = -g / (sqrt(v') + eps)``
    for "preconditioned", ``-m' / (sqrt(v') + eps)`` for "momentum" (the same at t = 1 up to
    eps), and the preview reports that direction."""
    target = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    curvature = torch.tensor([1.0, 4.0, 9.0], dtype=F64)
    for direction in ("preconditioned", "momentum"):
        w = torch.zeros(3, dtype=F64, requires_grad=True)
        opt = MomentumALSALS([w], search_direction=direction, betas=(0.5, 0.9))
        closure = quadratic(w, target, curvature)

        opt.step(closure)
        opt.step(closure)  # t = 2: the two directions differ
        g = torch.autograd.grad(closure(), w)[0]
        state = opt.state[w]
        beta1, beta2 = 0.5, 0.9
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        denominator = (v / (1 - beta2**3)).sqrt() + 1e-8
        expected = -(g if direction == "preconditioned" else m / (1 - beta1**3)) / denominator
        preview = opt.preview(closure)
        torch.testing.assert_close(preview.direction[0], expected, rtol=1e-12, atol=1e-15)


def quadratic(w: torch.Tensor, target: torch.Tensor, curvature: torch.Tensor):
    """The closure ``sum(curvature * (w - target)^2)`` (no arguments: ``step`` runs backward)."""

    def closure() -> torch.Tensor:
        return (curvature * (w - target) ** 2).sum()

    return closure


@pytest.mark.parametrize("direction", ["gradient", "sideways", 3])
def test_an_unknown_or_unsupported_direction_is_rejected_by_name(direction):
    with pytest.raises(ValueError, match="search"):
        MomentumALSALS([torch.zeros(2, requires_grad=True)], search_direction=direction)


def test_the_direction_survives_a_state_dict_round_trip():
    w = torch.zeros(2, requires_grad=True)
    opt = MomentumALSALS([w], search_direction="momentum")
    opt.step(lambda: ((w - 1.0) ** 2).sum())
    fresh = MomentumALSALS([torch.zeros(2, requires_grad=True)], search_direction="momentum")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["search_direction"] == "momentum"
    assert fresh.search_direction.value == "momentum"
