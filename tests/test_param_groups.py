"""Parameter groups, the reported step size, and per-group settings."""

from __future__ import annotations

import pytest
import torch

from alsals import SLS


def two_group_problem(cls, **group_settings):
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = cls([{"params": [a]}, {"params": [b], **group_settings}], lr=1e-3)
    return a, b, opt


def closure_for(a, b):
    return lambda: ((a - 3.0) ** 2).sum() + ((b + 2.0) ** 2).sum()


def test_lr_shows_the_step_size_in_use_scaled_per_group(optimizer_class):
    a, b, opt = two_group_problem(optimizer_class, lr_scale=0.25)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.25e-3]
    for _ in range(3):
        opt.step(closure_for(a, b))
        eta = opt.last_step.step_size
        assert opt.param_groups[0]["lr"] == eta
        assert opt.param_groups[1]["lr"] == eta * 0.25


def test_lr_scale_scales_the_update_of_its_group():
    a, b, opt = two_group_problem(SLS, lr_scale=0.5)
    opt.step(closure_for(a, b))
    eta = opt.last_step.step_size
    torch.testing.assert_close(a.detach(), 1.0 - eta * 2 * (1.0 - 3.0) * torch.ones(3).double())
    torch.testing.assert_close(
        b.detach(), 1.0 - 0.5 * eta * 2 * (1.0 + 2.0) * torch.ones(3).double()
    )


def test_weight_decay_applies_per_group_in_decoupled_form():
    a, b, opt = two_group_problem(SLS, weight_decay=0.1)
    opt.step(closure_for(a, b))
    eta = opt.last_step.step_size
    torch.testing.assert_close(a.detach(), (1.0 + eta * 4.0) * torch.ones(3).double())
    torch.testing.assert_close(
        b.detach(), (1.0 - eta * 6.0 - eta * 0.1 * 1.0) * torch.ones(3).double()
    )


def test_writing_lr_sets_where_the_next_search_starts(paper_class):
    a, b, opt = two_group_problem(paper_class)
    opt.step(closure_for(a, b))
    for group in opt.param_groups:
        group["lr"] = 1e-5
    opt.step(closure_for(a, b))
    assert opt.last_step.trials == 1
    assert opt.last_step.step_size == pytest.approx(1e-5 * 2 ** (1 / 500), rel=1e-12)


def test_a_torch_scheduler_can_drive_the_step_size_and_monitors_read_it(paper_class):
    a, b, opt = two_group_problem(paper_class)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 * (k + 1))
    for k in range(1, 4):
        opt.step(closure_for(a, b))
        assert opt.last_step.step_size == pytest.approx(1e-4 * k * 2 ** (1 / 500), rel=1e-12)
        scheduler.step()  # writes lr = 1e-3 * 0.1 * (k + 1): the next search starts there
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * (k + 1))
    opt.step(closure_for(a, b))
    assert opt.last_step.trials == 1
    assert opt.last_step.step_size == pytest.approx(4e-4 * 2 ** (1 / 500), rel=1e-12)
    assert opt.param_groups[0]["lr"] == opt.last_step.step_size


def test_groups_may_use_different_adam_settings():
    from alsals import ALSALS

    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = ALSALS([{"params": [a]}, {"params": [b], "betas": (0.5, 0.9), "eps": 1e-6}])
    opt.step(lambda: (a**2).sum() + (b**2).sum())
    assert opt.param_groups[1]["betas"] == (0.5, 0.9)
    assert opt.state[b]["step"] == 1


def test_adding_a_group_later_keeps_the_current_step_size(paper_class):
    a = torch.ones(3, requires_grad=True)
    opt = paper_class([a], lr=1e-3)
    opt.step(lambda: ((a - 3.0) ** 2).sum())
    eta = opt.param_groups[0]["lr"]
    b = torch.ones(2, requires_grad=True)
    opt.add_param_group({"params": [b], "lr_scale": 2.0})
    assert opt.param_groups[1]["lr"] == 2.0 * eta
    opt.step(lambda: ((a - 3.0) ** 2).sum() + (b**2).sum())
    assert opt.last_step.step_size == pytest.approx(eta * 2 ** (1 / 500), rel=1e-12)
