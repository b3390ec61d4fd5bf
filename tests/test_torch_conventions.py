"""Where torch.optim users go: copies, pickles, odd groups, schedulers, argument types,
state_dict round trips and tampered checkpoints. Every property holds for all three
optimizers."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import conftest
from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from conftest import PaperALSALS, SmallNet, bce_closure, make_classification


def quadratic(w):
    return lambda: ((w - 3.0) ** 2).sum()


def trained(optimizer_class, steps: int = 3, **kwargs):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=0.05, buffers=model.buffers(), **kwargs)
    for _ in range(steps):
        opt.step(bce_closure(model, x, y))
    return model, opt, x, y


# ----------------------------------------------------------------------- copies and pickles


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(optimizer_class, how):
    model, opt, x, y = trained(optimizer_class)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))  # one memo: the copy steps the copied model
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model2, opt2 = torch.load(buffer, weights_only=False)
    assert repr(opt2.last_step) == repr(opt.last_step)  # nan fields compare by repr
    assert opt2.protected_buffers and all(
        any(b is c for c in model2.buffers()) for b in opt2.protected_buffers
    )
    torch.manual_seed(1)
    opt.step(bce_closure(model, x, y))
    torch.manual_seed(1)
    opt2.step(bce_closure(model2, x, y))
    assert repr(opt2.last_step) == repr(opt.last_step)  # nan fields compare by repr
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.buffers(), model2.buffers(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- odd groups


def test_an_empty_first_group_is_accepted_as_torch_adam_accepts_it(optimizer_class):
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch.optim.Adam([{"params": []}, {"params": [w]}])  # the convention
    opt = optimizer_class([{"params": []}, {"params": [w], "weight_decay": 0.1}], lr=0.01)
    for _ in range(3):
        opt.step(quadratic(w))
    assert opt.last_step.kind == "search"
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == opt.last_step.step_size
    state = opt.state_dict()
    fresh = optimizer_class([{"params": []}, {"params": [w], "weight_decay": 0.1}], lr=0.01)
    fresh.load_state_dict(state)
    assert fresh.search_state == opt.search_state


def test_no_trainable_parameter_makes_step_a_no_op(optimizer_class):
    model = nn.Linear(3, 1)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = optimizer_class(model.parameters())
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(4, 3)
    loss = opt.step(lambda: model(x).pow(2).mean())
    assert loss.item() == pytest.approx(model(x).pow(2).mean().item())
    assert opt.last_step.kind == "zero_grad"
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_failed_add_param_group_leaves_the_groups_as_they_were(optimizer_class):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = optimizer_class([a])
    for bad in ({"params": [b], "lr_scale": -1.0}, {"params": [b], "weight_decay": "x"}):
        with pytest.raises((ValueError, TypeError)):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})  # b was not left behind in a rejected group
    assert len(opt.param_groups) == 2


def test_the_same_parameter_twice_in_a_group_is_rejected(optimizer_class):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="twice"):
        optimizer_class([w, w])
    opt = optimizer_class([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
@pytest.mark.parametrize("source", ["groups", "state"])
def test_maximize_from_another_optimizer_is_refused_not_dropped(cls, source):
    """``maximize=True`` in AdamW's groups, or in its checkpoint: every alsals optimizer
    minimises the closure's loss, so dropping the key with the others (as it was, under the
    same warning as ``maximize=False``) descended the objective the run meant to ascend.
    Refused by name, with the fix; nothing loaded (ALSALS refuses any AdamW state)."""
    model = nn.Linear(3, 1)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, maximize=True)
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    if source == "groups":
        with pytest.raises(ValueError, match=r"maximize=True: .* negated"):
            cls(adamw.param_groups)
        return
    opt = cls(model.parameters())
    before = opt.state_dict()
    with pytest.raises(ValueError, match="maximize=True" if cls is not ALSALS else "another"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.state_dict() == before


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_a_group_frozen_by_lr_0_is_refused_with_the_way_to_freeze(cls):
    """AdamW's idiom of freezing a group by ``lr=0`` has no ``lr_scale`` (it must be > 0):
    the error names ``requires_grad_(False)``. An AdamW checkpoint with such a group used to
    load with every group at ``lr_scale`` 1, and the frozen layer trained from the second
    step; now refused, nothing loaded."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[1].parameters()}]
    with pytest.raises(ValueError, match=r"lr 0 .*requires_grad_\(False\)"):
        cls(groups, lr=1e-3)
    if cls is ALSALS:  # (it refuses any AdamW state)
        return
    adamw = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[1].parameters()}],
        lr=1e-3,
    )
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    opt = cls([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"lr 0 in param_groups\[0\].*requires_grad_"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.state_dict() == before


def test_groups_built_for_adamw_warn_about_the_keys_alsals_does_not_use(optimizer_class):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    adamw = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "weight_decay": 0.1},
            {"params": model[1].parameters(), "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    with pytest.warns(UserWarning, match="amsgrad") as caught:
        opt = optimizer_class(adamw.param_groups, lr=1e-3)
    assert "maximize" in str(caught[0].message)
    assert all("amsgrad" not in g and "fused" not in g for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="lr_scale"):
        optimizer_class(
            [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[1].parameters()}],
            lr=1e-2,
        )


# ------------------------------------------------------------------------------ lr = 0


def test_a_cosine_schedule_down_to_zero_never_crashes_and_lr_zero_means_no_update(
    optimizer_class,
):
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = optimizer_class([w], lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)  # eta_min=0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the schedule warning, tested elsewhere
        for _ in range(4):
            opt.step(quadratic(w))
            scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.0  # the scheduler wrote 0
    before = w.detach().clone()
    eta = opt.search_state.step_size
    steps = {k: v for k, v in opt.state[w].items() if k == "step"}
    opt.step(quadratic(w))
    assert opt.last_step.kind == "zero_lr"
    assert torch.equal(w.detach(), before)
    assert opt.search_state.step_size == eta  # the search's step size is kept
    assert opt.param_groups[0]["lr"] == eta
    if steps:  # the moments advance as torch.optim.Adam's do with lr=0
        assert opt.state[w]["step"] == steps["step"] + 1
    opt.step(quadratic(w))
    assert opt.last_step.kind == "search"


def test_a_negative_written_lr_is_a_clear_error(optimizer_class):
    w = torch.zeros(3, requires_grad=True)
    opt = optimizer_class([w])
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match="lr"):
        opt.step(quadratic(w))
    assert torch.equal(w.detach(), torch.zeros(3))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        ({"lr": "0.1"}, "lr", TypeError),
        ({"lr": None}, "lr", TypeError),
        ({"lr": True}, "lr", TypeError),
        ({"c": "0.5"}, "c", TypeError),
        ({"smoothing": None}, "smoothing", TypeError),
        ({"backtrack": [0.9]}, "backtrack", TypeError),
        ({"growth_interval": "500"}, "growth_interval", TypeError),
        ({"max_trials": "100"}, "max_trials", TypeError),
        ({"max_trials": True}, "max_trials", TypeError),
        ({"fd_step": None}, "fd_step", TypeError),
        ({"warmup_steps": 2.0}, "warmup_steps", ValueError),
        ({"max_trials": 20.0}, "max_trials", ValueError),
        ({"max_trials": torch.tensor(20.0)}, "max_trials", ValueError),  # as 20.0
        ({"max_trials": torch.tensor(True)}, "max_trials", TypeError),
        ({"max_trials": torch.tensor([20, 20])}, "max_trials", TypeError),
        ({"warmup_steps": torch.tensor(-1)}, "warmup_steps", ValueError),
        ({"search_interval": torch.tensor(2.0)}, "search_interval", ValueError),
        ({"weight_decay": "0"}, "weight_decay", TypeError),
        ({"lr_scale": None}, "lr_scale", TypeError),
        ({"lr": 10**400}, "lr", ValueError),  # an int beyond float's range
    ],
)
def test_bad_arguments_raise_an_error_naming_them(optimizer_class, kwargs, name, error):
    with pytest.raises(error, match=f"invalid {name}"):
        optimizer_class([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("kwargs", [{"lr": 1e300}, {"lr_scale": 1e300}, {"lr": 10**400}], ids=str)
def test_alsals_refuses_a_step_size_whose_square_overflows(kwargs):
    with pytest.raises(ValueError, match=f"invalid {next(iter(kwargs))}"):
        ALSALS([torch.zeros(2, requires_grad=True)], **kwargs)


def test_any_real_number_type_works_and_the_state_dict_stays_plain(optimizer_class, tmp_path):
    w = torch.zeros(3, requires_grad=True)
    extra = {"betas": (np.float32(0.9), np.float64(0.99))} if optimizer_class is not SLS else {}
    opt = optimizer_class(
        [w],
        lr=np.float32(0.05),
        c=np.float64(0.5),
        max_trials=np.int64(100),
        growth_interval=torch.tensor(250.0),
        weight_decay=np.float32(0.01),
        **extra,
    )
    opt.step(quadratic(w))
    assert type(opt.param_groups[0]["c"]) is float
    assert type(opt.param_groups[0]["max_trials"]) is int
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = optimizer_class([w])
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["c"] == 0.5


@pytest.mark.parametrize("as_type", [torch.tensor, np.int32], ids=["0-dim tensor", "numpy"])
def test_integer_arguments_take_integer_tensors_and_the_state_dict_stays_plain(
    optimizer_class, as_type, tmp_path
):
    w = torch.zeros(3, requires_grad=True)
    opt = optimizer_class(
        [w], max_trials=as_type(20), warmup_steps=as_type(3), search_interval=as_type(2)
    )
    for _ in range(2):
        opt.step(quadratic(w))
    group = opt.param_groups[0]
    assert (group["max_trials"], group["warmup_steps"], group["search_interval"]) == (20, 3, 2)
    assert all(type(group[k]) is int for k in ("max_trials", "warmup_steps", "search_interval"))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = optimizer_class([w])
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert fresh.param_groups[0]["search_interval"] == 2


def test_named_buffers_or_a_module_as_buffers_is_a_clear_error(optimizer_class):
    model = SmallNet()
    with pytest.raises(TypeError, match="named_buffers"):
        optimizer_class(model.parameters(), buffers=model.named_buffers())
    with pytest.raises(TypeError, match=r"model\.buffers\(\)"):
        optimizer_class(model.parameters(), buffers=model)


# ----------------------------------------------------------------- the two closure forms


def test_a_one_argument_closure_under_any_name_is_the_backward_form(optimizer_class):
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = optimizer_class([w])
    calls = []

    def closure(do_backward):
        calls.append(do_backward)
        loss = (w**2).sum()
        if do_backward:
            opt.zero_grad()
            loss.backward()
        return loss.detach()

    opt.step(closure)
    assert calls[0] is True and calls[1:] and not any(calls[1:])
    assert opt.last_step.kind == "search"


def test_a_closure_with_two_required_arguments_is_a_clear_error(optimizer_class):
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = optimizer_class([w])
    with pytest.raises(TypeError, match=r"closure\(backward\)"):
        opt.step(lambda a, b: (w**2).sum())


# ------------------------------------------------------------- tampered and foreign state


@pytest.mark.parametrize("bad", [-0.5, 0.0, float("inf"), float("nan"), "0.1"])
def test_a_tampered_step_size_is_rejected_on_load_and_nothing_is_loaded(optimizer_class, bad):
    model, opt, x, y = trained(optimizer_class)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["line_search"]["step_size"] = bad
    fresh_model, fresh, *_ = trained(optimizer_class, steps=1)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="step_size"):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"][0]["line_search"] == before["state"][0]["line_search"]


@pytest.mark.parametrize(
    ("key", "value"), [("c", 2.0), ("smoothing", -1.0), ("max_trials", 0), ("lr_scale", 0.0)]
)
def test_tampered_hyperparameters_are_rejected_on_load(optimizer_class, key, value):
    _, opt, *_ = trained(optimizer_class)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=key):
        trained(optimizer_class, steps=1)[1].load_state_dict(state)


def test_a_state_from_another_optimizer_class_warns():
    _, alsals_opt, *_ = trained(MomentumALSALS)
    _, adam_sls, *_ = trained(AdamSLS)
    with pytest.warns(UserWarning, match="other search settings: c=0.1"):
        trained(MomentumALSALS, steps=1)[1].load_state_dict(adam_sls.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained(MomentumALSALS, steps=1)[1].load_state_dict(alsals_opt.state_dict())


def test_a_state_searching_along_a_direction_the_class_cannot_is_rejected():
    """AdamSLS searches along the preconditioned gradient only: the paper's MomentumALSALS state
    (momentum search) does not load into it, and nothing is loaded."""
    _, paper, *_ = trained(PaperALSALS)
    _, adam_sls, *_ = trained(AdamSLS, steps=1)
    before = copy.deepcopy(adam_sls.state_dict())
    with pytest.raises(ValueError, match="cannot search along 'momentum'"):
        adam_sls.load_state_dict(paper.state_dict())
    assert adam_sls.state_dict()["param_groups"] == before["param_groups"]


def test_an_adamw_state_dict_warns_and_keeps_no_adamw_setting(optimizer_class):
    model = nn.Linear(4, 2)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    model(torch.randn(3, 4)).sum().backward()
    adamw.step()
    opt = optimizer_class(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="not saved by an alsals optimizer") as caught:
        opt.load_state_dict(adamw.state_dict())
    assert caught[0].filename == __file__  # the warning points at the user's line
    assert not {"amsgrad", "fused", "maximize"} & set(opt.param_groups[0])
    assert opt.param_groups[0]["lr"] == 1e-3  # where the search starts
    if opt.uses_moments:  # torch's tensor step counts are read once, here, not every step
        assert all(type(opt.state[p]["step"]) is int for p in model.parameters())
        assert opt.state[model.weight]["step"] == 1


@pytest.mark.parametrize("cadence", ["adaptive", "settled", 5])
def test_a_written_lr_is_searched_from_not_reused_untested(cadence):
    """Where the cadence would reuse the step size, a step size written into ``lr`` is where
    the next search starts: that step searches (a twin without the write reuses)."""
    w = torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], search_interval=cadence)
    closure = lambda: 0.5 * (w**2).sum()  # noqa: E731
    for _ in range(40):
        twin = copy.deepcopy(opt)
        twin_w = twin.param_groups[0]["params"][0]
        twin.step(lambda twin_w=twin_w: 0.5 * (twin_w**2).sum())
        if twin.last_step.kind == "reuse":
            break
        opt.step(closure)
    assert twin.last_step.kind == "reuse", "the cadence never reused: nothing to test"
    written = 0.5 * opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = written
    opt.step(closure)
    assert opt.last_step.kind == "search"


def test_groups_copied_from_adamw_warn_at_the_users_line(optimizer_class):
    model = nn.Linear(4, 2)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    groups = [{k: v for k, v in g.items() if k != "lr"} for g in adamw.param_groups]
    here = (__file__, conftest.__file__)  # conftest: MomentumALSALS.paper's test class
    with pytest.warns(UserWarning, match="settings of another optimizer") as caught:
        optimizer_class(groups)
    assert caught[0].filename in here
    with pytest.warns(UserWarning, match="does not use the parameter-group keys") as caught:
        optimizer_class([{"params": [torch.ones(1, requires_grad=True)], "mine": 1}])
    assert caught[0].filename in here


ALL_FIVE = [*conftest.OPTIMIZERS, ALSALS]
ALL_FIVE_IDS = [*conftest.OPTIMIZER_IDS, "ALSALS"]


@pytest.mark.parametrize("cls", ALL_FIVE, ids=ALL_FIVE_IDS)
def test_a_set_of_parameters_is_refused_as_torch_refuses_it(cls):
    """A set's order changes between runs, so a checkpoint's state could be matched to
    other parameters on resume: torch.optim refuses it, and so do these."""
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="ordered collections"):
        cls([{"params": {w}}])
    opt = cls([torch.zeros(1, requires_grad=True)])
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {w}})


@pytest.mark.parametrize("cls", ALL_FIVE, ids=ALL_FIVE_IDS)
def test_named_parameters_are_accepted_as_torch_accepts_them(cls):
    model = nn.Linear(3, 1)
    opt = cls(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    x = torch.randn(8, 3)
    opt.step(lambda: model(x).pow(2).mean())
    assert opt.last_step.kind not in ("nonfinite", "zero_grad")


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_a_lazy_module_before_its_first_forward_is_a_clear_error(cls):
    """``nn.LazyLinear``'s weight does not exist before a forward pass: building the
    optimizer then failed inside a torch call on the uninitialised parameter; the error now
    says to run a forward pass first, after which the optimizer builds and steps."""
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="lazy module.*forward pass"):
        cls(model.parameters())
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    model(x)
    opt = cls(model.parameters())
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert opt.last_step.kind != "zero_grad"


@pytest.mark.parametrize("cls", ALL_FIVE, ids=ALL_FIVE_IDS)
def test_parameters_on_the_meta_device_are_a_clear_error_before_the_closure_runs(cls):
    """A model built under ``torch.device("meta")`` holds no values: the step failed inside
    a host copy ("Cannot copy out of meta tensor"); it is a ``ValueError`` that says to
    materialise the model first, before the closure runs. Materialised with ``to_empty``
    and initialised, the same model's optimizer steps."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    calls = []

    def closure():
        calls.append(1)
        return nn.functional.mse_loss(model(x), y)

    with pytest.raises(ValueError, match="meta device.*to_empty"):
        cls(model.parameters()).step(closure)
    assert calls == []
    model.to_empty(device="cpu")
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    opt = cls(model.parameters())
    opt.step(closure)
    assert opt.last_step.kind != "zero_grad"
