"""Parameter groups, the reported step size, and per-group settings."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS


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
    from alsals import MomentumALSALS

    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    # loss_floor's model averages with one beta1: per-group beta1 needs it off
    opt = MomentumALSALS(
        [{"params": [a]}, {"params": [b], "betas": (0.5, 0.9), "eps": 1e-6}], loss_floor=None
    )
    opt.step(lambda: (a**2).sum() + (b**2).sum())
    assert opt.param_groups[1]["betas"] == (0.5, 0.9)
    assert opt.state[b]["step"] == 1
    # with the defaults, beta2 and eps may still differ
    opt = MomentumALSALS([{"params": [a]}, {"params": [b], "betas": (0.9, 0.9), "eps": 1e-6}])
    opt.step(lambda: (a**2).sum() + (b**2).sum())
    assert opt.param_groups[1]["betas"] == (0.9, 0.9)


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


def test_changing_lr_scale_is_not_read_as_a_written_lr(optimizer_class):
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = optimizer_class([{"params": [a]}, {"params": [b]}], lr=1e-3, search_interval=1)
    opt.step(closure_for(a, b))
    eta = opt.search_state.step_size
    opt.param_groups[1]["lr_scale"] = 0.1  # one group's share, not the step size
    opt.step(closure_for(a, b))
    assert opt.last_step.step_size < 2 * eta  # searched from eta, not from eta / 0.1
    new = opt.search_state.step_size
    assert opt.param_groups[0]["lr"] == new
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * new, rel=1e-15)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("weight_decay", float("nan")),
        ("lr_scale", 0.0),
        ("lr_scale", -1.0),
        ("betas", (1.5, 0.9)),
        ("eps", 0.0),
        ("c", 2.0),
        ("backtrack", 0.0),
        ("interpolate", "yes"),
        ("trust_interpolation", 1),
        ("max_trials", 0),
        ("slope", "bogus"),
        ("search_interval", "bogus"),
        ("growth_interval", 0.0),
        ("max_grad_norm", -1.0),
        ("lr", float("nan")),
    ],
)
def test_a_bad_setting_written_into_a_group_is_an_error_before_anything_changes(
    optimizer_class, key, value
):
    a, b, opt = two_group_problem(optimizer_class)
    opt.step(closure_for(a, b))
    if key not in opt.param_groups[1]:
        pytest.skip(f"{optimizer_class.__name__} has no {key}")
    weights = [a.detach().clone(), b.detach().clone()]
    state = opt.state_dict()
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=rf"param_groups\[1\].*{key}"):
        opt.step(closure_for(a, b))
    assert torch.equal(a, weights[0]) and torch.equal(b, weights[1])
    assert opt.state_dict()["state"] == state["state"]


def test_a_search_setting_written_into_one_group_only_is_an_error(optimizer_class):
    a, b, opt = two_group_problem(optimizer_class)
    opt.param_groups[1]["c"] = 0.3
    with pytest.raises(ValueError, match=r"param_groups\[1\]: 'c' differs from the first"):
        opt.step(closure_for(a, b))
    for group in opt.param_groups:  # the same setting written everywhere is a change
        group["c"] = 0.3
    opt.step(closure_for(a, b))


def test_a_copy_of_a_group_can_be_added(optimizer_class):
    a = torch.ones(3, requires_grad=True)
    opt = optimizer_class([a], lr=1e-3)
    opt.step(lambda: ((a - 3.0) ** 2).sum())
    b = torch.ones(2, requires_grad=True)
    opt.add_param_group({**opt.param_groups[0], "params": [b]})  # lr: the step size shown
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="per-group 'lr'"):
        opt.add_param_group({"params": [torch.ones(1, requires_grad=True)], "lr": 0.5})


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_groups_copied_from_adamw_carry_over_with_its_rate_as_the_start(cls):
    """``ALSALS(adamw.param_groups)``: the groups carry one lr, AdamW's, which becomes where
    the first search starts (a group's setting overrides the constructor's, as in
    torch.optim); AdamW's own keys are dropped with a warning, weight decay stays per group.
    Groups with different rates are still the error that names ``lr_scale``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
    with pytest.warns(UserWarning, match="parameter-group settings of another optimizer"):
        opt = cls(adamw.param_groups)
    assert opt.defaults["lr"] == 3e-4
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all("fused" not in g and "amsgrad" not in g for g in opt.param_groups)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert opt.last_step.kind in ("search", "kept", "unresolved")
    assert opt.last_step.trials >= 1
    layerwise = [{"params": decay, "lr": 1e-3}, {"params": no_decay, "lr": 1e-2}]
    with pytest.raises(ValueError, match="lr_scale"):
        cls(layerwise)


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
@pytest.mark.parametrize("zero_in", [0, 1])
def test_a_zero_written_into_one_group_stops_every_group_whatever_else_was_written(cls, zero_in):
    """One step size for all groups: a 0 written into either group stops the step for all,
    also where another group's lr was written at the same time (the first written group
    decided, so a 0 in the second was lost: the step ran and moved the group holding 0).
    Every written value is checked, not only the first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        return nn.functional.mse_loss(model(x), y)

    for _ in range(3):
        opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[zero_in]["lr"] = 0.0
    opt.param_groups[1 - zero_in]["lr"] = 0.05
    opt.step(closure)
    assert opt.last_step.kind == "zero_lr"
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    opt.param_groups[0]["lr"] = 0.05
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\].*lr"):
        opt.step(closure)


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_an_lr_written_into_one_group_only_warns_that_it_sets_every_groups(cls):
    """AdamW's idioms, a backbone frozen by lr 0 or slowed by lr *= 0.01 in its group, set
    the one step size of every group here: the write is taken as documented, and a warning
    names lr_scale and requires_grad_(False). A write that keeps the groups' ratio (what a
    scheduler writes) does not warn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = cls(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr_scale": 2.0}]
    )
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        return nn.functional.mse_loss(model(x), y)

    for _ in range(3):
        opt.step(closure)
    for group in opt.param_groups:  # a scheduler's write: both groups, their ratio kept
        group["lr"] *= 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    opt.param_groups[0]["lr"] *= 0.01
    with pytest.warns(UserWarning, match=r"param_groups\[0\]'s write.*lr_scale.*requires_grad_"):
        opt.step(closure)
    opt.param_groups[1]["lr"] = 0.0
    with pytest.warns(UserWarning, match=r"param_groups\[1\]'s write"):
        opt.step(closure)
    assert opt.last_step.kind == "zero_lr"


def _alsals_two_groups(**kwargs):
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([{"params": [a]}, {"params": [b]}], lr=1e-3, **kwargs)
    for _ in range(3):
        opt.step(closure_for(a, b))
    return a, b, opt


@pytest.mark.parametrize("group", [0, 1])
def test_alsals_reads_an_lr_written_into_any_group(group):
    """A write into the second group counts as one into the first (each shows the step
    size times its ``lr_scale``): the next search starts from it."""
    a, b, opt = _alsals_two_groups()
    assert opt.search_state.step_size > 1e-5
    opt.param_groups[group]["lr"] = 1e-6
    opt.step(closure_for(a, b))
    assert opt.last_step.kind == "search"
    assert opt.last_step.step_size <= 1.1e-6 * (1 + 1e-12)


def test_alsals_reads_a_changed_lr_scale_as_a_share_not_as_a_written_lr():
    """Between searches a changed ``lr_scale`` leaves the step size as it is (a written
    ``lr`` would make the step search, from ``lr / lr_scale``)."""
    a, b, opt = _alsals_two_groups(initial_searches=1, search_interval=100)
    eta = opt.search_state.step_size
    opt.param_groups[0]["lr_scale"] = 4.0
    opt.step(closure_for(a, b))
    assert opt.last_step.kind == "reuse" and opt.search_state.step_size == eta
    assert opt.param_groups[0]["lr"] == 4.0 * eta and opt.param_groups[1]["lr"] == eta


@pytest.mark.parametrize(
    "setting",
    [
        {"weight_decay": np.float32(0.01)},
        {"betas": (np.float32(0.9), 0.999)},
        {"eps": np.float64(1e-8)},
        {"lr_scale": torch.tensor(0.5)},
    ],
    ids=["numpy-weight_decay", "numpy-beta1", "numpy-eps", "tensor-lr_scale"],
)
def test_alsals_stores_numpy_and_tensor_group_settings_as_floats(setting, tmp_path):
    """Settings given as numpy or 0-dim tensor values are held as Python floats, so the
    state dict loads with ``weights_only=True`` and the search runs in float64."""
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([{"params": [a]}, {"params": [b], **setting}])
    opt.step(closure_for(a, b))
    for group in opt.param_groups:
        for key in ("lr", "eps", "weight_decay", "lr_scale"):
            assert type(group[key]) is float
        assert all(type(beta) is float for beta in group["betas"])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = ALSALS([{"params": [a]}, {"params": [b]}])
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_frozen_integer_parameter_is_left_alone(cls):
    """``model.parameters()`` of a model with a frozen int8 weight (what 8-bit quantized
    layers hold): skipped as torch.optim skips it, not a ``torch.finfo`` TypeError."""
    torch.manual_seed(0)
    quantized = nn.Parameter(torch.randint(-127, 127, (4, 4), dtype=torch.int8), False)
    head = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = cls([quantized, *head.parameters()])
    kept = quantized.detach().clone()

    def loss():
        return ((head(x @ (quantized.float() * 0.01)) - y) ** 2).mean()

    start = loss().item()
    for _ in range(5):
        opt.step(loss)
    assert torch.equal(quantized, kept)
    assert loss().item() < start


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_step_never_writes_a_frozen_parameter(cls):
    """A frozen base (a LoRA model's) passed with ``model.parameters()``: no step writes it
    (its version counter stays), so that it costs no copy either (ALSALS copied and wrote
    back every frozen weight twice a step: a 7B base's size of extra memory)."""
    torch.manual_seed(0)
    base, adapter = nn.Linear(8, 8), nn.Linear(8, 1)
    base.requires_grad_(False)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    opt = cls([*base.parameters(), *adapter.parameters()])
    versions = [p._version for p in base.parameters()]
    for _ in range(3):
        opt.step(lambda: ((adapter(base(x)) - y) ** 2).mean())
    assert [p._version for p in base.parameters()] == versions


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_frozen_base_built_under_inference_mode_trains_its_head(cls):
    """A base built (or loaded) under ``torch.inference_mode()``, frozen, passed with the
    head's parameters, as AdamW takes it (ALSALS read every parameter's version counter,
    which an inference tensor has none of: torch's "Inference tensors do not track version
    counter")."""
    torch.manual_seed(0)
    with torch.inference_mode():
        base = nn.Linear(8, 8)
    head = nn.Linear(8, 1)
    base.requires_grad_(False)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    opt = cls([*base.parameters(), *head.parameters()])
    kept, before = [p.clone() for p in base.parameters()], head.weight.detach().clone()
    for _ in range(3):
        opt.step(lambda: ((head(torch.relu(base(x))) - y) ** 2).mean())
    assert all(torch.equal(a, b) for a, b in zip(kept, base.parameters(), strict=True))
    assert not torch.equal(before, head.weight)


def test_a_parameter_unfrozen_after_train_takes_its_step():
    """``train()`` holds the weights at ``y`` while a frozen parameter stays at ``x``; one
    unfrozen before the step gets a gradient and steps like the others, and ``eval()``
    leaves every weight at its average."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = ALSALS([*first.parameters(), *second.parameters()])
    first.requires_grad_(False)
    opt.step(lambda: ((second(first(x)) - y) ** 2).mean())
    frozen = first.weight.detach().clone()
    opt.train()
    assert torch.equal(first.weight, frozen)  # (held at x: not moved to y)
    first.requires_grad_(True)
    opt.step(lambda: ((second(first(x)) - y) ** 2).mean())
    assert opt.last_step.kind != "zero_grad"
    moved = first.weight.detach().clone()
    assert not torch.equal(moved, frozen)
    opt.eval()
    assert torch.equal(first.weight, moved)


def _two_group_run(cls, steps: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = cls([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}])

    def closure():
        return nn.functional.mse_loss(model(x), y)

    for _ in range(steps):
        opt.step(closure)
    return model, opt, closure


def _steps_taken(search) -> int:
    return search.steps if hasattr(search, "steps") else search.step  # (ALSALS's / others')


def _surgery(opt, how):
    """Model surgery between steps: the first group, or the first parameter (with its state,
    as torch's state_dict needs), taken out of the optimizer."""
    if how == "group":
        del opt.param_groups[0]
    else:
        first = opt.param_groups[0]["params"].pop(0)
        if how == "parameter-and-state":
            del opt.state[first]


@pytest.mark.parametrize("how", ["group", "parameter", "parameter-and-state"])
@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_taking_out_the_first_group_or_parameter_keeps_the_search_state(cls, how):
    """The search state lives in the first parameter's state: surgery that takes that one
    out leaves the run's search where it was (not a first search from ``lr`` again), and
    the state it stores next round-trips; a cleared state starts afresh."""
    if cls is SLS and how == "parameter-and-state":
        pytest.skip("SLS holds no per-parameter state: a state without entries is a new run")
    _, opt, closure = _two_group_run(cls, steps=12)
    before = opt.search_state
    assert before.step_size != opt.defaults["lr"]  # (the run moved it)
    _surgery(opt, how)
    assert opt.search_state == before
    opt.step(closure)
    after = opt.search_state
    assert _steps_taken(after) == _steps_taken(before) + 1
    assert after.searches <= before.searches + 1  # (no first phase of searches again)
    if how == "parameter-and-state":  # (torch's state_dict needs the state taken out too)
        saved = opt.state_dict()
        resumed = cls(opt.param_groups)
        resumed.load_state_dict(saved)
        assert resumed.search_state == after
    opt.state.clear()  # a reset
    assert _steps_taken(opt.search_state) == 0


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
@pytest.mark.parametrize("copied", ["as-is", "deepcopy", "pickle"])
def test_a_first_group_taken_out_and_put_back_later_does_not_roll_the_search_back(cls, copied):
    """The first group's parameter held the search state; taken out, the run went on
    without it; put back first, it holds no stale copy that would take the run back (also
    in a copy of the model and optimizer, taken before)."""
    model, opt, _ = _two_group_run(cls)
    if copied == "deepcopy":  # (a copy taken before the surgery continues the run)
        model, opt = copy.deepcopy((model, opt))
    elif copied == "pickle":
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def closure():
        return nn.functional.mse_loss(model(x), y)

    removed = opt.param_groups.pop(0)
    for _ in range(4):
        opt.step(closure)
    went_on = opt.search_state
    opt.param_groups.insert(0, removed)
    assert opt.search_state == went_on
    opt.step(closure)
    assert _steps_taken(opt.search_state) == _steps_taken(went_on) + 1


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_surgery_right_after_a_resume_keeps_the_loaded_search_state(cls):
    """A resumed optimizer whose first group is taken out before its first step goes on
    from the loaded search state, not from ``lr``."""
    model, opt, closure = _two_group_run(cls)
    saved = opt.state_dict()
    resumed = cls(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    )
    resumed.load_state_dict(saved)
    loaded = resumed.search_state
    del resumed.param_groups[0]
    assert resumed.search_state == loaded
    resumed.step(closure)
    assert _steps_taken(resumed.search_state) == _steps_taken(loaded) + 1


@pytest.mark.parametrize(
    "cls", [ALSALS, MomentumALSALS, AdamSLS], ids=["ALSALS", "MomentumALSALS", "AdamSLS"]
)
def test_a_load_keeps_nothing_of_the_state_it_replaces_alive(cls):
    """``load_state_dict`` (a rollback to a checkpoint mid-run) frees the state it
    replaces: two copies of the moments on a GPU would be an out-of-memory."""
    model, opt, closure = _two_group_run(cls)
    saved = copy.deepcopy(opt.state_dict())
    opt.step(closure)
    old = [
        weakref.ref(v) for entry in opt.state.values() for v in entry.values() if torch.is_tensor(v)
    ]
    assert old  # (the moments: SLS keeps none)
    opt.load_state_dict(saved)
    gc.collect()
    assert all(ref() is None for ref in old)


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_cleared_state_given_a_checkpointing_tools_entries_starts_afresh(cls):
    """``optimizer.state.clear()`` resets the run, also where a checkpointing tool then
    creates the state's entries before the next step (its call: no closure, lr 0, zero
    gradients)."""
    model, opt, closure = _two_group_run(cls)
    opt.state.clear()
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # (torch.distributed.checkpoint's _init_optim_state)
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    assert _steps_taken(opt.search_state) == 0


@pytest.mark.parametrize("how", ["group", "parameter-and-state"])
@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_checkpoint_taken_right_after_surgery_carries_the_search_state(cls, how):
    """Surgery, then ``state_dict()`` before any step: the checkpoint holds the run's
    search state (with the new first parameter), and the resumed run takes the live
    run's next step."""
    if cls is SLS and how == "parameter-and-state":
        pytest.skip("SLS holds no per-parameter state: a state without entries is a new run")
    model, opt, closure = _two_group_run(cls)
    if how == "group":
        for p in opt.param_groups.pop(0)["params"]:
            opt.state.pop(p, None)  # (torch's state_dict needs them out)
    else:
        opt.state.pop(opt.param_groups[0]["params"].pop(0), None)
    live = opt.search_state
    saved = copy.deepcopy(opt.state_dict())  # (a load shares the tensors, as torch's does)
    twin = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    twins = list(twin.parameters())
    resumed = cls(
        [{"params": [twins[index[id(p)]] for p in g["params"]]} for g in opt.param_groups]
    )
    resumed.load_state_dict(saved)
    assert resumed.search_state == live
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    resumed.step(lambda: nn.functional.mse_loss(twin(x), y))
    assert resumed.search_state == opt.search_state
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "cls",
    [ALSALS, MomentumALSALS, AdamSLS, SLS],
    ids=["ALSALS", "MomentumALSALS", "AdamSLS", "SLS"],
)
def test_a_state_restored_into_optimizer_state_by_hand_is_the_runs(cls):
    """A rollback that puts a snapshot of ``optimizer.state`` back entry by entry (no
    ``load_state_dict``) rolls the search back with it: the remembered search state of the
    steps since does not win over it."""
    model, opt, closure = _two_group_run(cls)
    snapshot = {p: copy.deepcopy(entries) for p, entries in opt.state.items()}
    before = opt.search_state
    for _ in range(5):
        opt.step(closure)
    assert opt.search_state != before
    for p, entries in snapshot.items():
        opt.state[p] = entries
    assert opt.search_state == before
    saved = opt.state_dict()
    key = opt.STATE_KEY
    assert saved["state"][0][key]["step_size"] == before.step_size
