"""Everything that shapes the trajectory is in state_dict: a resumed run is bit-identical."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from conftest import SmallNet, bce_closure, make_classification

TOTAL_STEPS, SAVE_AT = 12, 5


def batches():
    x, y = make_classification(n=256)
    gen = torch.Generator().manual_seed(3)
    return [(x[idx], y[idx]) for idx in torch.randint(0, 256, (TOTAL_STEPS, 32), generator=gen)]


def fresh(cls, kwargs):
    torch.manual_seed(0)
    model = SmallNet()
    return model, cls(
        model.parameters(), lr=kwargs.pop("lr", 5.0), buffers=model.buffers(), **kwargs
    )


def train(model, opt, data):
    for x, y in data:
        opt.step(bce_closure(model, x, y))


def run_with_resume(cls, kwargs):
    data = batches()
    model, opt = fresh(cls, dict(kwargs))
    torch.manual_seed(11)
    train(model, opt, data[:SAVE_AT])
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
        buffer,
    )
    del model, opt
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, opt = fresh(cls, dict(kwargs))
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    train(model, opt, data[SAVE_AT:])
    return model, opt


def run_straight(cls, kwargs):
    model, opt = fresh(cls, dict(kwargs))
    torch.manual_seed(11)
    train(model, opt, batches())
    return model, opt


CONFIGS = [
    {},
    {"search_interval": "adaptive"},
    {"warmup_steps": 3, "search_interval": 2, "weight_decay": 0.01},
    {"loss_floor": 0.0},  # the Polyak cap's model is trajectory state (it caps SLS, AdamSLS here)
]


@pytest.mark.parametrize(
    "kwargs", CONFIGS, ids=["defaults", "adaptive", "warmup-interval-wd", "loss-floor"]
)
def test_resumed_run_is_bit_identical(optimizer_class, kwargs):
    resumed_model, resumed_opt = run_with_resume(optimizer_class, kwargs)
    straight_model, straight_opt = run_straight(optimizer_class, kwargs)
    for (name, a), b in zip(
        resumed_model.state_dict().items(), straight_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed_opt.param_groups[0]["lr"] == straight_opt.param_groups[0]["lr"]
    first = next(straight_model.parameters())
    resumed_search = resumed_opt.state[next(resumed_model.parameters())]["line_search"]
    assert resumed_search == straight_opt.state[first]["line_search"]
    assert straight_opt.state[first]["line_search"]["searches"] > 0


def test_state_dict_carries_the_search_state_and_step_size():
    model, opt = fresh(MomentumALSALS, {})
    x, y = make_classification()
    for _ in range(3):
        opt.step(bce_closure(model, x, y))
    saved = opt.state_dict()
    search = saved["state"][0]["line_search"]
    assert search["step"] == 3 and search["step_size"] == opt.param_groups[0]["lr"]
    assert saved["param_groups"][0]["lr"] == search["step_size"]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["state"][0])


def test_a_group_added_after_loading_gets_the_loaded_settings(optimizer_class):
    """The loaded search settings replace this optimizer's, for groups added later too: the
    state_dict stays loadable."""
    a = torch.ones(3, requires_grad=True)
    saved = optimizer_class([a], c=0.3)
    saved.step(lambda: (a**2).sum())
    b = torch.ones(3, requires_grad=True)
    opt = optimizer_class([b])
    with pytest.warns(UserWarning, match="other search settings"):
        opt.load_state_dict(saved.state_dict())
    opt.add_param_group({"params": [torch.ones(2, requires_grad=True)]})
    assert [g["c"] for g in opt.param_groups] == [0.3, 0.3]
    again = optimizer_class(
        [{"params": [torch.ones(3, requires_grad=True)]}, {"params": [torch.ones(2)]}], c=0.3
    )
    again.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
@pytest.mark.parametrize("rebuilt", ["load_state_dict", "deepcopy", "pickle"])
def test_a_group_added_to_a_resumed_optimizer_saves_no_foreign_setting(cls, rebuilt):
    """Resume (or copy), then unfreeze a layer with ``add_param_group``: the new group holds
    this optimizer's settings only (torch's ``__setstate__`` adds ``differentiable`` to the
    defaults), so the next checkpoint loads without a word about another optimizer."""
    a = torch.ones(3, requires_grad=True)
    opt = cls([a])
    opt.step(lambda: (a**2).sum())
    if rebuilt == "load_state_dict":
        resumed = cls([a])
        resumed.load_state_dict(opt.state_dict())
    elif rebuilt == "deepcopy":
        resumed = copy.deepcopy(opt)
    else:
        resumed = pickle.loads(pickle.dumps(opt))
    resumed.add_param_group({"params": [torch.ones(2, requires_grad=True)]})
    assert resumed.param_groups[1].keys() == resumed.param_groups[0].keys()
    fresh = cls([torch.ones(3, requires_grad=True)])
    fresh.add_param_group({"params": [torch.ones(2, requires_grad=True)]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(resumed.state_dict())


@pytest.fixture
def single_rank_group():
    """A one-rank gloo group in this process, destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_a_copy_of_an_optimizer_given_a_process_group_shares_it(cls, single_rank_group):
    """``copy.deepcopy`` of an optimizer built with ``process_group=`` (a trainer that
    copies its optimizer, an EMA or SWA set-up): the copy shares the communicator, which is
    neither copyable nor picklable, and steps as the original does (ALSALS raised a
    TypeError: cannot pickle 'ProcessGroup')."""
    w = torch.ones(3, requires_grad=True)
    opt = cls([w], process_group=single_rank_group)
    opt.step(lambda: (w**2).sum())
    twin_w, copied = copy.deepcopy((w, opt))  # (one memo: the copy steps the copied w)
    assert copied._process_group is single_rank_group
    assert copied.param_groups[0]["params"][0] is twin_w
    opt.step(lambda: (w**2).sum())
    copied.step(lambda: (twin_w**2).sum())
    assert torch.equal(w, twin_w)


def test_a_process_group_that_is_not_one_is_an_error(optimizer_class):
    with pytest.raises(TypeError, match="process_group"):
        optimizer_class([torch.ones(1, requires_grad=True)], process_group="gloo")


def test_a_changed_lr_scale_survives_a_resume(optimizer_class):
    """A group's lr_scale changed, then the state saved and loaded into a fresh optimizer:
    the resumed run searches from the same step size as the uninterrupted one (it used to
    read the saved lr, eta times the old scale, as a written lr)."""
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=1, keepdim=True)

    def build():
        torch.manual_seed(1)
        model = torch.nn.Linear(8, 1).double()
        return model, optimizer_class(model.parameters(), search_interval=1)

    (a, opt_a), (b, opt_b) = build(), build()
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.step(lambda model=model: torch.nn.functional.mse_loss(model(x), y))
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["lr_scale"] = 0.5
    buffer = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b, opt_b = build()
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.step(lambda model=model: torch.nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert opt_a.search_state == opt_b.search_state


def _alsals_run(lr: float, warmup: int = 20):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model.double()
    return model, ALSALS(model.parameters(), lr=lr, warmup_steps=warmup)


def test_alsals_resumed_into_an_optimizer_built_with_another_lr_keeps_its_warmup():
    """The warm-up ramps to the run's own ``lr`` (in its state), not to the one the resuming
    optimizer was built with; and a group added after loading gets the loaded settings."""
    x, y = make_classification(64, features=8, seed=1)
    x, y = x.double(), y.double().unsqueeze(1)

    def closure(model):
        return lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)

    model, opt = _alsals_run(lr=0.05)
    for _ in range(5):
        opt.step(closure(model))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    for _ in range(5):
        opt.step(closure(model))
    straight = [p.detach().clone() for p in model.parameters()]

    resumed_model, resumed = _alsals_run(lr=0.5)
    resumed = ALSALS(resumed_model.parameters(), lr=0.5, warmup_steps=20, c=0.3)
    resumed_model.load_state_dict(saved_model)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for _ in range(5):
        resumed.step(closure(resumed_model))
    for a, b in zip(straight, resumed_model.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    resumed.add_param_group({"params": [torch.zeros(2, dtype=torch.float64, requires_grad=True)]})
    assert [g["c"] for g in resumed.param_groups] == [0.6, 0.6]
    resumed.step(closure(resumed_model))


def _saved_then_resumed(model, opt, closure, warmup: int, steps: int) -> ALSALS:
    """Checkpoint ``model`` and ``opt`` now, take ``steps`` more steps; load the checkpoint
    into a fresh model and ``ALSALS`` and take the same steps: the weights must be equal,
    bit for bit. Returns the resumed optimizer."""
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    for _ in range(steps):
        opt.step(closure(model))
    resumed_model, resumed = _alsals_run(lr=0.1, warmup=warmup)
    resumed_model.load_state_dict(saved_model)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for _ in range(steps):
        resumed.step(closure(resumed_model))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    return resumed


def _bce_closure_of():
    x, y = make_classification(64, features=8, seed=1)
    x, y = x.double(), y.double().unsqueeze(1)
    return lambda model: lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)


def test_alsals_saved_after_an_lr_written_before_its_first_step_resumes_identically():
    """``lr`` written before the first step, the state saved then: the resumed run ramps its
    warm-up to the lr it was built with and adopts the write at its first step, as the
    uninterrupted run does."""
    model, opt = _alsals_run(lr=0.1, warmup=5)
    opt.param_groups[0]["lr"] = 0.05
    resumed = _saved_then_resumed(model, opt, _bce_closure_of(), warmup=5, steps=7)
    assert resumed.search_state.initial_step_size == opt.search_state.initial_step_size == 0.1


def test_alsals_weights_edited_just_before_a_checkpoint_resume_identically():
    """A projection after a step (the weights clamped in place), then a checkpoint of model
    and optimizer: the uninterrupted run restarts ``z`` at the edited weights at its next
    step; the resumed one must too, though its optimizer never saw the weights' versions."""
    closure = _bce_closure_of()
    model, opt = _alsals_run(lr=0.1, warmup=0)
    for _ in range(12):
        opt.step(closure(model))
    with torch.no_grad():
        for p in model.parameters():
            p.clamp_(-0.05, 0.05)
    resumed = _saved_then_resumed(model, opt, closure, warmup=0, steps=3)
    assert resumed.search_state.edits == opt.search_state.edits == 1


@pytest.mark.parametrize("order", ["model first", "optimizer first"])
def test_alsals_checkpoint_loaded_after_train_is_where_the_run_goes_on(order):
    """``train()`` (the weights at ``y``, ``x`` held aside), then a checkpoint of model and
    optimizer loaded, in either order: ``eval()`` shows the checkpoint's weights, and a step
    takes the step a fresh model and optimizer resumed from it take (the held copy of ``x``
    was the old run's: it replaced the loaded weights)."""
    closure = _bce_closure_of()
    model, opt = _alsals_run(lr=0.1, warmup=0)
    for _ in range(3):
        opt.step(closure(model))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(closure(model))

    def load():
        if order == "model first":
            model.load_state_dict(saved_model)
        opt.load_state_dict(copy.deepcopy(saved_opt))
        if order == "optimizer first":
            model.load_state_dict(saved_model)

    opt.train()
    load()
    opt.eval()
    assert all(torch.equal(p, saved_model[n]) for n, p in model.named_parameters())
    fresh_model, fresh = _alsals_run(lr=0.1, warmup=0)
    fresh_model.load_state_dict(saved_model)
    fresh.load_state_dict(copy.deepcopy(saved_opt))
    fresh.step(closure(fresh_model))
    opt.train()
    load()
    opt.step(closure(model))
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("cls", [MomentumALSALS, SLS], ids=["MomentumALSALS", "SLS"])
def test_an_alsals_state_is_refused_by_the_other_optimizers(cls):
    """An ``ALSALS`` state holds ``z`` and Schedule-Free's averaging, not Adam's momentum:
    loading it elsewhere is an error that names it, before anything is loaded."""
    a = torch.ones(3, requires_grad=True)
    saved = ALSALS([a])
    saved.step(lambda: (a**2).sum())
    opt = cls([a])
    with pytest.raises(ValueError, match="saved by ALSALS"):
        opt.load_state_dict(saved.state_dict())
    assert not any(opt.state_dict()["state"].values())


def test_alsals_resumed_after_a_changed_lr_scale_reads_no_written_lr():
    """``lr_scale`` changed between steps, then a checkpoint: the resumed run, like the
    uninterrupted one, reads no written ``lr`` (each group's shown ``lr`` is in the state)."""
    x, y = make_classification(64, features=8, seed=2)
    x, y = x.double(), y.double().unsqueeze(1)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        model.double()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
        return model, ALSALS(groups)

    def closure(model):
        return lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)

    model, opt = build()
    for _ in range(3):
        opt.step(closure(model))
    opt.param_groups[1]["lr_scale"] = 0.5
    saved = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), saved)
    for _ in range(4):
        opt.step(closure(model))
    resumed_model, resumed = build()
    saved.seek(0)
    weights, state = torch.load(saved, weights_only=True)
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    for _ in range(4):
        resumed.step(closure(resumed_model))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_alsals_state_saved_before_its_first_step_resumes_from_its_own_lr():
    """A checkpoint taken before any step, loaded into an optimizer built with another
    ``lr``: the run starts (and warms up) from the checkpoint's."""
    x, y = make_classification(64, features=8, seed=1)
    x, y = x.double(), y.double().unsqueeze(1)
    model, opt = _alsals_run(lr=0.01, warmup=4)
    saved = opt.state_dict()
    other_model, other = _alsals_run(lr=1.0, warmup=4)
    other.load_state_dict(saved)
    sizes = []
    for m, o in ((model, opt), (other_model, other)):
        closure = lambda m=m: torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)  # noqa: E731
        sizes.append([(o.step(closure), o.last_step.step_size)[1] for _ in range(4)])
    assert sizes[0] == sizes[1] and max(sizes[0]) <= 0.01


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, SLS, AdamSLS])
def test_a_state_saved_with_other_search_settings_warns_and_its_settings_are_used(cls):
    """A resumed run built with a changed setting (a Trainer's max_grad_norm) does not get
    it: the saved settings are used, as in torch.optim, and a warning names them."""
    model, opt = fresh(cls, {"c": 0.5})
    train(model, opt, batches()[:2])
    saved = opt.state_dict()
    model, opt = fresh(cls, {"c": 0.6, "max_grad_norm": 1.0})
    with pytest.warns(UserWarning, match=r"other search settings: c=0\.5 \(here 0\.6\)"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["c"] == 0.5 and opt.param_groups[0]["max_grad_norm"] is None


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, SLS, AdamSLS])
def test_numpy_settings_written_into_the_groups_load_with_weights_only(cls):
    """A NumPy-computed lr or weight decay written between steps (a LambdaLR whose lambda
    returns a NumPy number) is saved as a Python number: torch.load's default,
    weights_only=True, refuses NumPy objects."""
    np = pytest.importorskip("numpy")
    model, opt = fresh(cls, {})
    train(model, opt, batches()[:2])
    opt.param_groups[0]["lr"] = np.float64(0.25)
    opt.param_groups[0]["weight_decay"] = np.float64(0.01)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"][0]["lr"] == 0.25
    assert type(loaded["param_groups"][0]["weight_decay"]) is float
    assert type(opt.param_groups[0]["weight_decay"]) is np.float64  # (the groups untouched)


@pytest.mark.parametrize("cls", [MomentumALSALS, AdamSLS, SLS])
def test_an_adamw_state_with_layer_wise_rates_loads_them_as_lr_scale(cls):
    """AdamW's groups with different lrs: one step size is searched for all, so the rates
    become its multiples (as the constructor's error tells a user to write them), not one
    flattened rate that moves the slower group 10x faster."""
    model = SmallNet()
    params = list(model.parameters())
    adamw = torch.optim.AdamW(
        [{"params": params[:2], "lr": 1e-3}, {"params": params[2:], "lr": 1e-4}]
    )
    x, y = make_classification(n=32)
    adamw.zero_grad()
    bce_closure(model, x, y)().backward()
    adamw.step()
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], buffers=model.buffers())
    with pytest.warns(UserWarning, match=r"different lrs \(0\.001, 0\.0001\) become lr_scale"):
        opt.load_state_dict(adamw.state_dict())
    assert [g["lr_scale"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
    opt.step(bce_closure(model, x, y))
    first, second = (g["lr"] for g in opt.param_groups)
    assert second == pytest.approx(first / 10)


def test_alsals_saved_or_copied_between_train_and_the_step_warns():
    """After train() the model holds y; a checkpoint or copy taken then resumes from y as
    if it were x (0.026 apart after 6 steps, in silence): each warns once, naming eval()."""
    model, opt = fresh(ALSALS, {})
    train(model, opt, batches()[:3])
    opt.train()
    with pytest.warns(UserWarning, match=r"state_dict\(\) was taken while train\(\).*eval\(\)"):
        opt.state_dict()
    with pytest.warns(UserWarning, match=r"a copy \(deepcopy, pickle\) was taken while train"):
        copy.deepcopy(opt)
    opt.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.state_dict()
        copy.deepcopy(opt)


OLDER_SETTINGS = {
    "rise_restart": False,
    "warmup_steps": 0,
    "kept_rule": "keep",
    "cut_retry": False,
    "start_rise": False,
    "late_retry": False,
    "regrowth": None,
}


@pytest.mark.parametrize("rebuilt", ["load_state_dict", "pickle"])
def test_alsals_saved_by_a_version_before_its_newer_settings_continues_as_it_ran(rebuilt):
    """A checkpoint (or a pickle) of ``ALSALS`` 0.2.0 lacks the settings added since
    (``rise_restart``, ``warmup_steps``, ``kept_rule``, ``cut_retry``, ``start_rise``,
    ``late_retry``, ``regrowth``): it loads, and goes on as that version
    ran, without them (bit for bit with a run of today's code at those values); a state that
    lacks any other setting is still refused as another optimizer's."""
    data = batches()
    torch.manual_seed(0)
    model = SmallNet()
    start = copy.deepcopy(model.state_dict())
    opt = ALSALS(model.parameters(), buffers=model.buffers(), **OLDER_SETTINGS)
    torch.manual_seed(11)  # (dropout)
    train(model, opt, data)
    expected = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(start)
    opt = ALSALS(model.parameters(), buffers=model.buffers(), **OLDER_SETTINGS)
    torch.manual_seed(11)
    train(model, opt, data[:SAVE_AT])
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in OLDER_SETTINGS:
            del group[key]
    if rebuilt == "pickle":
        for settings in (opt.defaults, *opt.param_groups):  # as 0.2.0 pickled it
            for key in OLDER_SETTINGS:
                del settings[key]
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    else:
        opt = ALSALS(model.parameters(), buffers=model.buffers())  # today's defaults
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.load_state_dict(saved)
        assert [str(c.message) for c in caught] == [
            "the state loaded into ALSALS was saved by a version of alsals before cut_retry, "
            "kept_rule, late_retry, regrowth, rise_restart, start_rise, warmup_steps: it goes "
            "on as that version ran (cut_retry=False, kept_rule='keep', late_retry=False, "
            "regrowth=None, rise_restart=False, start_rise=False, warmup_steps=0)"
        ]
    assert all(opt.param_groups[0][k] == v for k, v in OLDER_SETTINGS.items())
    train(model, opt, data[SAVE_AT:])
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True))

    del saved["param_groups"][0]["first_phase"]
    with pytest.raises(
        ValueError, match="lacks cut_retry, first_phase, kept_rule, late_retry, regrowth"
    ):
        ALSALS(model.parameters()).load_state_dict(saved)


def test_alsals_saved_by_0_2_7_continues_without_regrowth():
    """A checkpoint of 0.2.7 lacks ``regrowth`` in its groups and ``regrow`` /
    ``peak_step_size`` in its search state: it loads with one warning that names that setting
    alone, and goes on bit for bit as a run with ``regrowth=None``."""
    from alsals.schedule_free_state import STATE_KEY

    data = batches()
    torch.manual_seed(0)
    model = SmallNet()
    start = copy.deepcopy(model.state_dict())
    opt = ALSALS(model.parameters(), buffers=model.buffers(), regrowth=None)
    torch.manual_seed(11)
    train(model, opt, data)
    expected = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(start)
    opt = ALSALS(model.parameters(), buffers=model.buffers(), regrowth=None)
    torch.manual_seed(11)
    train(model, opt, data[:SAVE_AT])
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["regrowth"]
    for entry in saved["state"].values():
        if STATE_KEY in entry:
            del entry[STATE_KEY]["regrow"], entry[STATE_KEY]["peak_step_size"]
    opt = ALSALS(model.parameters(), buffers=model.buffers())  # today's defaults
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved)
    assert [str(c.message) for c in caught] == [
        "the state loaded into ALSALS was saved by a version of alsals before regrowth: it "
        "goes on as that version ran (regrowth=None)"
    ]
    assert opt.param_groups[0]["regrowth"] is None
    train(model, opt, data[SAVE_AT:])
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True))


def test_alsals_state_whose_groups_lack_different_newer_settings_is_refused():
    """No version wrote a setting into one group and not another: a state whose groups lack
    different settings (one ``kept_rule``, the other none) is edited, not old, and refused
    with the setting named rather than filled."""
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = ALSALS([{"params": [a]}, {"params": [b]}], kept_rule="shrink")
    opt.step(lambda: (a**2).sum() + (b**2).sum())
    saved = opt.state_dict()
    del saved["param_groups"][0]["kept_rule"]
    fresh_opt = ALSALS([{"params": [a]}, {"params": [b]}], kept_rule="shrink")
    with pytest.raises(ValueError, match=r"lacks kept_rule in param_groups\[0\]"):
        fresh_opt.load_state_dict(saved)
    assert all(g["kept_rule"] == "shrink" for g in fresh_opt.param_groups)
    assert not any(fresh_opt.state_dict()["state"].values())


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS], ids=["ALSALS", "MomentumALSALS"])
def test_a_guard_watch_saved_before_0_2_9_goes_on_with_its_spread(cls):
    """Checkpoints before 0.2.9 hold the guard's EMA of the squared losses (``loss_sq_avg``:
    in ``ALSALS``'s ``watch`` dict, in ``MomentumALSALS``'s search state) where today's hold
    the spread: such a state loads, steps, and goes on with the weights and the spread of
    the run that was never interrupted."""
    from alsals.rise_guard import LOSS_SMOOTHING
    from alsals.schedule_free_state import STATE_KEY

    def watch_of(state_dict):
        (entry,) = [e for e in state_dict["state"].values() if STATE_KEY in e or "line_search" in e]
        if STATE_KEY in entry:
            return entry[STATE_KEY]["watch"], "samples"
        return entry["line_search"], "loss_samples"

    data = batches()
    model, opt = fresh(cls, {})
    torch.manual_seed(11)
    train(model, opt, data[:SAVE_AT])
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    train(model, opt, data[SAVE_AT:])
    expected_watch, _ = watch_of(opt.state_dict())

    watch, samples = watch_of(saved)
    assert watch[samples] == SAVE_AT  # (the watch holds every loss so far)
    spread = watch.pop("loss_spread_avg")
    weight = 1.0 - LOSS_SMOOTHING ** watch[samples]
    watch["loss_sq_avg"] = spread + watch["loss_avg"] ** 2 / weight  # (what 0.2.8 stored)
    resumed, resumed_opt = fresh(cls, {})
    resumed.load_state_dict(weights)
    resumed_opt.load_state_dict(saved)
    torch.set_rng_state(rng)
    train(resumed, resumed_opt, data[SAVE_AT:])
    assert all(
        torch.equal(p, e) for p, e in zip(resumed.parameters(), model.parameters(), strict=True)
    )
    resumed_watch, _ = watch_of(resumed_opt.state_dict())
    assert "loss_sq_avg" not in resumed_watch
    assert resumed_watch["loss_spread_avg"] == pytest.approx(
        expected_watch["loss_spread_avg"], rel=1e-9
    )


# -- torch.distributed.checkpoint's state-dict helpers (FSDP2's checkpointing) ------------------


class WithUnusedFirst(torch.nn.Module):
    """SmallNet behind a parameter no loss uses: the first parameter never gets a gradient
    (a pooler of a fine-tuned encoder); ``frozen``: nor does it require one (a frozen
    embedding), and ``torch.distributed.checkpoint`` saves and loads no state for it."""

    def __init__(self, frozen: bool = False):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(3), requires_grad=not frozen)
        self.net = SmallNet()

    def forward(self, x):
        return self.net(x)


def dcp_fresh(cls, frozen_first: bool = False):
    torch.manual_seed(0)
    model = WithUnusedFirst(frozen_first)
    return model, cls(model.parameters(), buffers=model.buffers())


def assert_same_run(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, AdamSLS, SLS])
@pytest.mark.parametrize("flatten", [True, False], ids=["flattened", "nested"])
@pytest.mark.parametrize("frozen_first", [False, True], ids=["unused-first", "frozen-first"])
def test_a_run_checkpointed_through_get_and_set_state_dict_goes_on_bit_for_bit(
    cls, flatten, frozen_first
):
    """set_state_dict gives an optimizer without state a step without closure, zero
    gradients and lr 0 to create it, and with flatten_optimizer_state_dict loads only the
    entries that created: without them every moment and the search state were lost. (The
    nested form's strict load wants saved state for every trainable parameter, which SLS
    keeps for none but the first: torch's error names strict=False.) A frozen first
    parameter's state is neither saved nor loaded by the tool: the search state, kept
    there before 0.2.17, was lost in both forms."""
    options = {"strict": False} if cls is SLS and not flatten else {}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten, **options)
    data = batches()
    model, opt = dcp_fresh(cls, frozen_first)
    torch.manual_seed(11)
    train(model, opt, data[:SAVE_AT])
    model_state, opt_state = get_state_dict(model, opt, options=options)
    buffer = io.BytesIO()
    torch.save({"model": model_state, "opt": opt_state, "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed = dcp_fresh(cls, frozen_first)
    set_state_dict(
        resumed_model,
        resumed,
        model_state_dict=saved["model"],
        optim_state_dict=saved["opt"],
        options=options,
    )
    assert resumed.search_state == opt.search_state
    torch.set_rng_state(saved["rng"])
    train(resumed_model, resumed, data[SAVE_AT:])
    straight_model, straight = dcp_fresh(cls, frozen_first)
    torch.manual_seed(11)
    train(straight_model, straight, data)
    assert_same_run(resumed_model, straight_model)
    assert resumed.search_state == straight.search_state
    assert resumed.search_state.searches > 0


def holders_of_the_search_state(opt):
    """The state dict's indices of the parameters that hold the search state."""
    return [i for i, entry in opt.state_dict()["state"].items() if opt.STATE_KEY in entry]


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, AdamSLS, SLS])
def test_freezing_and_unfreezing_the_first_parameter_carries_the_search_state_along(cls):
    """The search state lives with the first parameter that requires grad (the one whose
    state torch.distributed.checkpoint keeps): freezing or unfreezing the first parameter
    moves it, and the run goes on with the same search state, held once."""
    data = batches()
    model, opt = dcp_fresh(cls)
    train(model, opt, data[:3])
    assert holders_of_the_search_state(opt) == [0]
    before = opt.search_state
    model.unused.requires_grad_(False)
    assert opt.search_state == before
    assert holders_of_the_search_state(opt) == [1]
    train(model, opt, data[3:6])
    assert holders_of_the_search_state(opt) == [1]
    before = opt.search_state
    assert before.searches > 0
    model.unused.requires_grad_(True)
    assert opt.search_state == before
    assert holders_of_the_search_state(opt) == [0]


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, AdamSLS, SLS])
def test_a_checkpoint_with_the_search_state_on_a_frozen_first_parameter_loads_whole(cls):
    """Before 0.2.17 the search state lived with the first parameter, frozen or not: such a
    checkpoint loads into the run where it left off."""
    data = batches()
    model, opt = dcp_fresh(cls, frozen_first=True)
    torch.manual_seed(11)
    train(model, opt, data[:SAVE_AT])
    saved = copy.deepcopy(opt.state_dict())
    assert holders_of_the_search_state(opt) == [1]
    saved["state"].setdefault(0, {})[opt.STATE_KEY] = saved["state"][1].pop(opt.STATE_KEY)
    weights, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    resumed_model, resumed = dcp_fresh(cls, frozen_first=True)
    resumed_model.load_state_dict(weights)
    resumed.load_state_dict(saved)
    assert resumed.search_state == opt.search_state
    assert holders_of_the_search_state(resumed) == [1]
    for m, o in ((model, opt), (resumed_model, resumed)):
        torch.set_rng_state(rng)
        train(m, o, data[SAVE_AT:])
    assert_same_run(resumed_model, model)
    assert resumed.search_state == opt.search_state


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, AdamSLS, SLS])
@pytest.mark.parametrize("flatten", [True, False], ids=["flattened", "nested"])
def test_a_checkpoint_taken_before_the_first_step_leaves_both_runs_as_they_were(cls, flatten):
    """The entries created for the tool before any step are no step's: the run that saved
    and the run that loaded them go on as a run that never saw them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    data = batches()
    model, opt = dcp_fresh(cls)
    model_state, opt_state = get_state_dict(model, opt, options=options)
    assert all(entry.get("step") == 0 for entry in opt.state.values())  # (created)
    loaded_model, loaded = dcp_fresh(cls)
    set_state_dict(
        loaded_model,
        loaded,
        model_state_dict=model_state,
        optim_state_dict=opt_state,
        options=options,
    )
    straight_model, straight = dcp_fresh(cls)
    for m, o in ((model, opt), (loaded_model, loaded), (straight_model, straight)):
        torch.manual_seed(11)
        train(m, o, data)
    assert_same_run(model, straight_model)
    assert_same_run(loaded_model, straight_model)
    assert opt.search_state == loaded.search_state == straight.search_state


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS])
def test_a_step_without_closure_is_still_refused_where_it_is_no_tools_call(cls):
    torch.manual_seed(0)
    model = SmallNet()
    opt = cls(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.fc1.weight.grad[0, 0] = 1.0  # a gradient: a user's step() without its closure
    for p in model.parameters():
        p.grad = p.grad if p is model.fc1.weight else torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    assert not opt.state


def test_alsals_train_after_the_tools_call_and_an_edit_moves_to_the_edited_weights():
    """The placeholders' z is a copy of the weights at the tool's call: train() (the Hugging
    Face Trainer's, before its backward pass) must not pull y towards it after the weights
    were written (a pretrained checkpoint loaded after get_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    data = batches()
    runs = []
    for tool in (True, False):
        model, opt = dcp_fresh(ALSALS)
        if tool:
            get_state_dict(model, opt)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        opt.train()
        torch.manual_seed(11)
        train(model, opt, data[:3])
        runs.append(model)
    assert_same_run(*runs)


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS])
@pytest.mark.parametrize("after", ["a step that raised", "preview"])
def test_placeholders_dropped_leave_no_empty_entry_for_the_tool_to_take_as_state(cls, after):
    """An optimizer whose placeholders a failed first step (or a preview) dropped holds no
    state at all, as one that never saw the tool: else the tool takes the empty entries for
    state and the flattened load restores nothing."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    if after == "preview" and cls is ALSALS:
        pytest.skip("ALSALS has no preview")
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    data = batches()
    trained_model, trained = dcp_fresh(cls)
    torch.manual_seed(11)
    train(trained_model, trained, data[:SAVE_AT])
    saved = get_state_dict(trained_model, trained, options=options)

    model, opt = dcp_fresh(cls)
    get_state_dict(model, opt, options=options)  # placeholders
    x, y = data[0]
    if after == "preview":
        opt.preview(bce_closure(model, x, y))
    else:

        def failing():
            raise RuntimeError("a bad batch")

        with pytest.raises(RuntimeError, match="a bad batch"):
            opt.step(failing)
    assert not opt.state
    set_state_dict(
        model, opt, model_state_dict=saved[0], optim_state_dict=saved[1], options=options
    )
    assert opt.search_state == trained.search_state


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS])
def test_a_step_without_closure_mid_run_is_refused_even_with_lr_0_and_zero_gradients(cls):
    """The tool calls only where the optimizer holds no state: mid-run, the same call is a
    user's step() without its closure, an error, not a silent no-op."""
    torch.manual_seed(0)
    model = SmallNet()
    opt = cls(model.parameters(), buffers=model.buffers())
    x, y = batches()[0]
    opt.step(bce_closure(model, x, y))
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize("cls", [AdamSLS, MomentumALSALS, ALSALS])
def test_a_state_saved_for_groups_in_another_order_is_refused_before_anything_moves(cls):
    """Groups built in another order on resume: torch's load pairs the saved entries with
    the parameters by position, so a parameter gets another's moments (a broadcasting error
    deep in the step, or silently another layer's where the shapes agree). A stored tensor
    of another shape than its parameter is refused by name at the next step, the weights
    as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    first, last = list(model[0].parameters()), list(model[2].parameters())
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    opt = cls([{"params": first}, {"params": last}])
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    swapped = cls([{"params": last}, {"params": first}])
    swapped.load_state_dict(opt.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"shape \(1, 16\) holds optimizer state .* another order"):
        swapped.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS])
@pytest.mark.parametrize("source", ["SGD", "Adagrad", "AdamW"])
def test_another_optimizer_s_state_lends_only_what_this_one_uses(cls, source):
    """A checkpoint of another torch.optim optimizer: Adam's moments (and their step count)
    carry over where this optimizer uses them; anything else (SGD's momentum_buffer,
    Adagrad's sum and its step count) is dropped with a word, not carried unused into every
    later checkpoint under a warning that said the moments were used."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    make = {
        "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "Adagrad": lambda p: torch.optim.Adagrad(p),
        "AdamW": lambda p: torch.optim.AdamW(p),
    }[source]
    other = make(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    other.step()
    opt = cls(model.parameters())
    with pytest.warns(UserWarning, match="not saved by an alsals optimizer") as caught:
        opt.load_state_dict(other.state_dict())
    message = str(caught[0].message)
    lent = source == "AdamW" and cls is not SLS
    assert ("its Adam moments" in message) == lent
    assert ("per-parameter state" in message) == (not lent)
    expected = {"step", "exp_avg", "exp_avg_sq"} if lent else set()
    assert all(set(entries) == expected for entries in opt.state.values())
    assert len(opt.state) == (2 if lent else 0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    keys = {k for entries in opt.state.values() for k in entries}
    assert keys <= {"step", "exp_avg", "exp_avg_sq", "line_search"}


@pytest.mark.parametrize(
    "entry",
    [
        {"bogus": 1},
        {"loss_error_at_lowest": float("nan")},
        {"step_size_ceiling": 0.0},
        {"step": True},
        {"untested_step_size": -0.1},
        {"ceiling_rise": float("nan")},
        {"ceiling_rise": "high"},
        {"floor_hits": -1},
        {"initial_step_size": 0.0},
    ],
)
def test_a_line_search_state_edited_by_hand_is_refused_naming_the_entry(entry):
    """Each entry of the line searches' stored state is checked on load: an unknown one, a
    statistic that is not finite, a counter that is a bool or negative, a ceiling of 0."""
    from alsals.search_state import SearchState

    with pytest.raises(ValueError, match=next(iter(entry)) if "bogus" not in entry else "unknown"):
        SearchState.from_dict({"step_size": 0.1, "initial_step_size": 0.1, **entry})


def test_an_alsals_state_with_another_optimizer_s_group_key_keeps_its_search_state():
    """A MomentumALSALS state into which something wrote a key of torch.optim's groups
    (``foreach``) is still its own: the key goes, the search state stays (it was taken for
    another optimizer's, and the search started over)."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = MomentumALSALS([w])
    for _ in range(4):
        opt.step(lambda: (w**2).sum())
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["foreach"] = None
    resumed = MomentumALSALS([w])
    with pytest.warns(UserWarning, match=r"holds keys of another optimizer's .*foreach"):
        resumed.load_state_dict(state)
    assert resumed.search_state == opt.search_state
    assert "foreach" not in resumed.param_groups[0]


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS, AdamSLS, SLS])
@pytest.mark.parametrize(
    "wrong, error, named",
    [
        ("model", ValueError, "lacks 'state' and 'param_groups'"),
        ("checkpoint", ValueError, "its keys: 'optimizer'"),
        ("groups only", ValueError, "lacks 'state'"),
        ("list", TypeError, "got list"),
    ],
)
def test_loading_what_is_no_optimizer_state_dict_names_the_mistake(cls, wrong, error, named):
    """A model's state dict, the checkpoint around the optimizer's, or a dict without its
    'state': a clear error before anything is loaded (torch's bare KeyError before)."""
    model, opt = fresh(cls, {})
    x, y = batches()[0]
    opt.step(bce_closure(model, x, y))
    saved = opt.state_dict()
    given = {
        "model": model.state_dict(),
        "checkpoint": {"optimizer": saved},
        "groups only": {"param_groups": saved["param_groups"]},
        "list": [saved],
    }[wrong]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=named):
        opt.load_state_dict(given)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
