"""Bad input and faults: nothing is lost, every error names the problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS
from conftest import OPTIMIZER_IDS, OPTIMIZERS, SmallNet, bce_closure, make_classification


def snapshot(model_or_params):
    params = (
        model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    )
    return [p.detach().clone() for p in params]


def assert_unchanged(before, params):
    for a, b in zip(before, params, strict=True):
        assert torch.equal(a, b.detach())


def moment_snapshot(opt):
    return {
        k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items() if n != "line_search"}
        for k, s in opt.state.items()
    }


def test_nonfinite_trial_loss_is_a_failed_trial(optimizer_class):
    w = torch.zeros(4, requires_grad=True)
    opt = optimizer_class([w], lr=100.0)

    def closure():
        loss = ((w - 1.0) ** 2).sum()
        # Far from the start the "model" overflows: a NaN loss there must just be rejected.
        return torch.where(w.detach().abs().max() > 3.0, torch.full_like(loss, float("nan")), loss)

    opt.step(closure)
    assert opt.last_step.kind == "search" and opt.last_step.trials > 1
    assert torch.isfinite(w).all() and (w.abs() <= 3.0).all()
    assert opt.last_step.loss_decrease > 0


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_loss_or_gradient_skips_the_step_and_warns_once(optimizer_class, where):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=0.01, buffers=model.buffers())
    opt.step(bce_closure(model, x, y))  # a normal step first: there is state to protect
    before, state_before = snapshot(model), moment_snapshot(opt)

    def broken():
        loss = bce_closure(model, x, y)()
        if where == "loss":
            return loss * float("inf")
        w = model.fc1.weight[0, 0]
        return loss + torch.sqrt(w - w)  # finite value, non-finite gradient

    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(broken)  # warned once only
    assert opt.last_step.kind == "nonfinite"
    assert opt.state[next(model.parameters())]["line_search"]["skipped_nonfinite"] == 2
    assert_unchanged(before, model.parameters())
    after = moment_snapshot(opt)
    for key, entries in state_before.items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[key][name])), name


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_exception_in_closure_leaves_weights_exactly_as_before(optimizer_class, failing_call):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=50.0, buffers=model.buffers())
    opt.step(bce_closure(model, x, y))
    for group in opt.param_groups:  # a step size this large needs several trials
        group["lr"] = 1e4
    before = snapshot(model)
    buffers_before = [b.clone() for b in model.buffers()]
    calls = 0

    class Interrupted(Exception):
        pass

    def closure():
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise Interrupted
        return bce_closure(model, x, y)()

    with pytest.raises(Interrupted):
        opt.step(closure)
    assert_unchanged(before, model.parameters())
    if failing_call > 1:  # trials ran: the buffers are as the first evaluation left them
        assert model.bn.num_batches_tracked.item() == buffers_before[-1].item() + 1
    for group in opt.param_groups:
        group["lr"] = 0.01
    opt.step(bce_closure(model, x, y))  # and the optimizer keeps working
    assert opt.last_step.kind == "search"


def test_failed_search_leaves_weights_unchanged_and_keeps_the_smallest_step():
    w = torch.tensor([0.5, -0.25], requires_grad=True)
    w0 = w.detach().clone()
    opt = SLS([w], lr=1.0, max_trials=5)

    def closure():  # slope 1 at w0, but every step along -g increases the loss
        return w.sum() + 3.0 * (w - w0).abs().sum()

    opt.step(closure)
    assert opt.last_step.kind == "failed" and opt.last_step.trials == 5
    assert torch.equal(w.detach(), w0)
    expected = 1.0 * 2 ** (1 / 500) * 0.9**4
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert opt.state[w]["line_search"]["failed_searches"] == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"c": 1.0}, "c"),
        ({"c": 0.0}, "c"),
        ({"backtrack": 1.0}, "backtrack"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"smoothing": -0.1}, "smoothing"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"max_trials": 0}, "max_trials"),
        ({"max_trials": 2.5}, "max_trials"),
        ({"slope": "exact"}, "slope"),
        ({"fd_step": 0.0}, "fd_step"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"search_interval": 0}, "search_interval"),
        ({"search_interval": "sometimes"}, "search_interval"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"lr_scale": 0.0}, "lr_scale"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(optimizer_class, kwargs, name):
    with pytest.raises(ValueError, match=f"invalid {name}"):
        optimizer_class([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [AdamSLS, ALSALS], ids=["AdamSLS", "ALSALS"])
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (-0.1, 0.9)}, r"betas\[0\]"),
        ({"betas": 0.9}, "betas"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_invalid_adam_hyperparameters(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"invalid {name}"):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_search_settings_cannot_differ_between_groups(optimizer_class):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="'c' cannot differ"):
        optimizer_class([{"params": [a]}, {"params": [b], "c": 0.3}])
    with pytest.raises(ValueError, match="lr_scale"):
        optimizer_class([{"params": [a]}, {"params": [b], "lr": 0.5}])


def test_sparse_gradients_raise_a_clear_error(optimizer_class):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = optimizer_class(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum())


def test_complex_parameters_are_rejected(optimizer_class):
    with pytest.raises(ValueError, match="complex"):
        optimizer_class([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


def test_parameters_without_gradient_are_left_alone(optimizer_class):
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = optimizer_class([used, unused], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.step(lambda: ((used - 2.0) ** 2).sum())
    assert torch.equal(unused.detach(), torch.ones(3))
    assert unused.grad is None
    assert "exp_avg" not in opt.state[unused]
    assert not torch.equal(used.detach(), torch.ones(3))


def test_zero_gradient_is_a_no_op(optimizer_class):
    w = torch.ones(3, requires_grad=True)
    opt = optimizer_class([w], lr=0.1, weight_decay=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(lambda: (w * 0.0).sum() + 1.0)
    assert loss.item() == 1.0
    assert torch.equal(w.detach(), torch.ones(3))
    assert opt.last_step.kind == "zero_grad"
    assert "exp_avg" not in opt.state[w] or torch.equal(opt.state[w]["exp_avg"], torch.zeros(3))
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_nan_weights_from_outside_are_caught_before_they_spread(cls):
    w = torch.tensor([1.0, float("nan")], requires_grad=True)
    opt = cls([w])
    with pytest.warns(RuntimeWarning):
        opt.step(lambda: (w**2).sum())
    assert opt.last_step.kind == "nonfinite"
