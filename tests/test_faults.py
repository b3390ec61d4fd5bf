"""Bad input and faults: nothing is lost, every error names the problem."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from conftest import (
    OPTIMIZER_IDS,
    OPTIMIZERS,
    SmallNet,
    assert_bitwise_same,
    bce_closure,
    make_classification,
)


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


def assert_moments_unchanged(before, opt):
    after = moment_snapshot(opt)
    for key, entries in before.items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[key][name])), name


def overflowing_far_out(w, value: float):
    """``||w - 1||^2``, and ``value`` (NaN or inf) where some ``|w_i| > 3``: a "model"
    that overflows far from the start."""

    def closure():
        loss = ((w - 1.0) ** 2).sum()
        return torch.where(w.detach().abs().max() > 3.0, torch.full_like(loss, value), loss)

    return closure


def test_nonfinite_trial_loss_is_a_failed_trial(paper_class):
    w = torch.zeros(4, requires_grad=True)
    opt = paper_class([w], lr=100.0)
    opt.step(overflowing_far_out(w, float("nan")))  # a NaN trial must just be rejected
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
    assert opt.last_step.kind == "nonfinite"
    assert_unchanged(before, model.parameters())
    assert_moments_unchanged(state_before, opt)
    # AdamSLS's first update was untested: a second non-finite *loss* in a row undoes it,
    # with a warning of its own (tests/test_untested_updates.py); anything else changes nothing
    undone = optimizer_class is AdamSLS and where == "loss"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "AdamSLS: the loss was not finite on two steps")
        opt.step(broken)  # warned once only
    assert opt.last_step.kind == "nonfinite"
    state = opt.state[next(model.parameters())]["line_search"]
    assert state["skipped_nonfinite"] == 2
    assert state["undone_updates"] == int(undone)
    if not undone:
        assert_unchanged(before, model.parameters())
    assert_moments_unchanged(state_before, opt)


@pytest.mark.parametrize("first_search", [True, False], ids=["first-search", "later"])
@pytest.mark.parametrize("form", ["closure()", "closure(backward)"])
def test_a_closure_that_fails_without_gradient_skips_in_a_few_passes(
    optimizer_class, form, first_search
):
    """Trials evaluate the closure without gradient; one whose loss is NaN there (and finite
    with gradient) fails for every step size. After two non-finite trials the search looks
    at the starting weights the trials' way (at the first search of a run the replay check
    has evaluated them already: no further pass), skips the step with a warning that says
    so, and does not spend ``max_trials`` passes per step; nothing changes."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=0.01, buffers=model.buffers())
    normal = bce_closure(model, x, y)
    if not first_search:
        opt.step(normal)  # state to protect
    before, state_before = snapshot(model), moment_snapshot(opt)

    if form == "closure()":

        def broken():
            loss = normal()
            return loss if torch.is_grad_enabled() else loss * float("nan")
    else:

        def broken(backward):
            opt.zero_grad()
            loss = normal()
            if backward:
                loss.backward()
                return loss
            return loss * float("nan")

    # The paper's finite-difference slope is itself an evaluation without gradient: the
    # skip comes one pass earlier and names the slope.
    finite_difference = opt.defaults["slope"] == "finite_difference"
    culprit = "the slope estimate" if finite_difference else "without gradient"
    with pytest.warns(RuntimeWarning, match=culprit):
        opt.step(broken)
    info = opt.last_step
    assert info.kind == "nonfinite"
    # gradient, two trials, w0 again (first search: gradient, replay, two trials); finite
    # difference: gradient, (replay,) probe, first trial
    expected = (1, 4 if first_search else 3) if finite_difference else (2, 4)
    assert (info.trials, info.forwards) == expected
    assert_unchanged(before, model.parameters())
    assert_moments_unchanged(state_before, opt)
    opt.step(normal)  # and it goes on
    assert opt.last_step.kind in ("search", "reuse")


def test_trials_that_overflow_only_far_out_still_backtrack(optimizer_class):
    """The look at the starting weights finds a finite loss there when only the large
    trials overflow: the search goes on and accepts a smaller step."""
    w = torch.zeros(4, requires_grad=True)
    opt = optimizer_class([w], lr=1000.0)
    opt.step(overflowing_far_out(w, float("inf")))
    info = opt.last_step
    assert info.kind == "search" and info.loss_decrease > 0
    assert torch.isfinite(w).all() and (w.abs() <= 3.0).all()


@pytest.mark.parametrize(
    "make_optimizer",
    [SLS, AdamSLS, lambda params, **kw: MomentumALSALS(params, start="grown", **kw)],
    ids=["SLS", "AdamSLS", "MomentumALSALS-grown"],
)
def test_the_look_at_the_start_costs_one_pass_when_the_step_is_to_blame(make_optimizer):
    """After the first search (no replay value to read), a search from a written lr of 1000
    whose first trials overflow looks at ``w0`` once (one forward pass: the loss is finite
    there), backtracks on and accepts."""
    w = torch.zeros(4, requires_grad=True)
    opt = make_optimizer([w], lr=0.01)
    closure = overflowing_far_out(w, float("inf"))
    opt.step(closure)
    for group in opt.param_groups:
        group["lr"] = 1000.0
    opt.step(closure)
    info = opt.last_step
    assert info.kind == "search" and info.trials > 2
    assert info.forwards == 1 + info.trials + 1  # gradient, trials, w0 once
    assert torch.isfinite(w).all() and (w.abs() <= 3.0).all()


def full_state(opt):
    """Everything the optimizer carries from step to step, cloned."""
    state = {
        id(k): {n: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for n, v in s.items()}
        for k, s in opt.state.items()
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups


COUNTERS = {
    "forwards",
    "backwards",
    "trials",
    "skipped_nonfinite",
    "skipped_zero_grad",
    "nonfinite_losses_in_a_row",
}


def assert_same_state(a, b, *, counters=True):
    """Equal optimizer states; ``counters=False`` ignores the evaluation/skip counters."""
    (state_a, groups_a), (state_b, groups_b) = a, b
    if not counters:
        for state in (state_a, state_b):
            for entries in state.values():
                for search in ("line_search", "schedule_free_search"):
                    if search in entries:
                        entries[search] = {
                            k: v for k, v in entries[search].items() if k not in COUNTERS
                        }
    assert groups_a == groups_b
    assert state_a.keys() == state_b.keys()
    for key, entries in state_a.items():
        assert entries.keys() == state_b[key].keys()
        for name, value in entries.items():
            if torch.is_tensor(value):
                assert torch.equal(value, state_b[key][name]), name
            else:
                assert value == state_b[key][name], name


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_exception_in_closure_leaves_everything_as_before_the_step(optimizer_class, failing_call):
    """Weights, moments, step counters, search state, group lr, buffers and the random state
    are as before the step, whichever evaluation raised; retrying takes the same step as
    an uninterrupted run."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    # every trial evaluated (no step size taken on the interpolation's word), so that the
    # third evaluation is a trial
    settings = {"lr": 50.0, "trust_interpolation": False}
    opt = optimizer_class(model.parameters(), buffers=model.buffers(), **settings)
    opt.step(bce_closure(model, x, y))
    for group in opt.param_groups:  # a step size this large needs several trials
        group["lr"] = 1e4
    twin_model = copy.deepcopy(model)
    twin = optimizer_class(twin_model.parameters(), buffers=twin_model.buffers(), **settings)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # no tensor shared with opt
    before = snapshot(model)
    buffers_before = [b.clone() for b in model.buffers()]
    state_before = full_state(opt)
    last_before = opt.last_step
    calls = 0

    class Interrupted(Exception):
        pass

    def closure():
        nonlocal calls
        calls += 1
        torch.rand(3)  # the closure draws random numbers before it fails
        if calls == failing_call:
            raise Interrupted
        return bce_closure(model, x, y)()

    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    with pytest.raises(Interrupted):
        opt.step(closure)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert_unchanged(before, model.parameters())
    for a, b in zip(buffers_before, model.buffers(), strict=True):
        assert torch.equal(a, b)
    assert_same_state(state_before, full_state(opt))
    assert opt.last_step is last_before

    calls = -(10**6)  # the retry succeeds, and equals the twin's uninterrupted step
    opt.step(closure)
    rng_after_retry = torch.get_rng_state()
    torch.manual_seed(123)
    twin_calls = 0

    def twin_closure():
        nonlocal twin_calls
        twin_calls += 1
        torch.rand(3)
        return bce_closure(twin_model, x, y)()

    twin.step(twin_closure)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert repr(opt.last_step) == repr(twin.last_step)  # nan fields compare by repr
    assert torch.equal(rng_after_retry, torch.get_rng_state())


@pytest.mark.parametrize(
    "make",
    [
        lambda w: AdamSLS([w], lr=0.01, slope="analytic"),
        lambda w: MomentumALSALS([w], lr=0.01, slope="analytic"),
        lambda w: ALSALS([w], lr=0.01),
    ],
    ids=["AdamSLS", "MomentumALSALS", "ALSALS"],
)
def test_a_gradient_whose_square_overflows_skips_the_step_and_spares_the_moments(make):
    """g = 1e30 in float32: g*g overflows Adam's second moment (not g, the loss or
    u = g / sqrt(v'), which is 0 there: ALSALS's z stopped for good). The step is skipped
    like a non-finite gradient, the state untouched, and training goes on."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = make(w)  # float32 (to overflow); no rounding hazard
    opt.step(lambda: (w**2).sum())
    before, state_before = w.detach().clone(), full_state(opt)
    with pytest.warns(RuntimeWarning, match="second moment"):
        opt.step(lambda: (w**2).sum() * 1e30)
    assert opt.last_step.kind == "nonfinite"
    assert torch.equal(w.detach(), before)
    assert_same_state(state_before, full_state(opt), counters=False)
    for _ in range(20):
        opt.step(lambda: (w**2).sum())
        assert opt.last_step.kind in ("search", "reuse", "kept")
    assert torch.isfinite(opt.state[w]["exp_avg_sq"]).all()
    assert (w**2).sum().item() < 5.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alsals_trains_where_the_bias_corrected_moment_would_overflow(dtype):
    """Gradient entries of 4e19: v' = (1 - beta2) g^2 = 1.6e36 holds, but v' / (1 - beta2^t),
    which the direction formed before its square root, does not (float32's and bfloat16's
    largest is 3.4e38): u was 0, every trial passed with the loss unchanged and the step
    size ran up to 1e98, the weights never moving (0.2.16); a first fix skipped the step,
    and then every later one (Adam's t stays 1 on a skipped step). The root is now taken
    first, as torch.optim.Adam takes it, and the run trains as Adam's does."""
    w = torch.ones(3, dtype=dtype, requires_grad=True)
    opt = ALSALS([w])
    for _ in range(30):
        opt.step(lambda: 2e19 * ((w.float() - 0.5) ** 2).sum())
        assert opt.last_step.kind != "nonfinite"  # (bfloat16 reaches 0.5 exactly: zero_grad)
        assert opt.last_step.step_size < 1e3
    assert opt.search_state.skipped_nonfinite == 0
    opt.eval()
    assert (w.detach().float() - 0.5).abs().max().item() < 0.1


def test_the_root_first_order_is_kept_across_a_resume_and_taken_only_after_a_huge_gradient():
    """The order Adam's bias correction is taken in is state: a run that saw a gradient near
    the largest float resumes in it (the first step after a resume would otherwise divide
    before the root again, and overflow), and a run that never saw one keeps the order its
    runs always took."""
    calm = torch.ones(3, requires_grad=True)
    opt = ALSALS([calm])
    for _ in range(5):
        opt.step(lambda: ((calm - 0.5) ** 2).sum())
    assert opt.search_state.root_first is False

    def scaled_loss(w, scale):
        return lambda: scale * ((w - 0.5) ** 2).sum()

    def run(w, opt, scales):
        for scale in scales:
            opt.step(scaled_loss(w, scale))

    # 4e19 at t = 1: v' / (1 - beta2^t) is about 1.6e39 / t, past float32's 3.4e38 up to
    # t = 4, so the first steps after the resume (t = 4, 5) overflow in the other order
    w = torch.ones(3, requires_grad=True)
    opt = ALSALS([w])
    run(w, opt, [4e19, 1.0, 1.0])
    assert opt.search_state.root_first is True
    saved, weights = copy.deepcopy(opt.state_dict()), w.detach().clone()
    run(w, opt, [1.0] * 6)
    resumed_w = weights.clone().requires_grad_(True)
    resumed = ALSALS([resumed_w])
    resumed.load_state_dict(saved)
    run(resumed_w, resumed, [1.0] * 6)
    assert torch.equal(resumed_w.detach(), w.detach())
    assert resumed.search_state == opt.search_state
    saved["state"][0]["schedule_free_search"]["root_first"] = False  # (as if not stored)
    forgetful_w = weights.clone().requires_grad_(True)
    forgetful = ALSALS([forgetful_w])
    forgetful.load_state_dict(saved)
    run(forgetful_w, forgetful, [1.0] * 6)
    # (what the flag is for: u 0 where v' / (1 - beta2^t) overflowed, and a "search" whose
    # trials left the loss unchanged accepted a step that moved nothing; root first, the
    # moves are below the loss's rounding, and the searches say so: "exhausted")
    forgotten = {**vars(forgetful.search_state), "root_first": True}
    assert forgotten != vars(opt.search_state)


def scaled_cross_entropy(model, x, y, scale):
    return lambda: scale * torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    "settings",
    [{}, {"weight_decay": 0.1}, {"max_grad_norm": 1.0}, {"max_grad_norm": 1.0, "groups": True}],
    ids=["plain", "weight_decay", "clipped", "clipped-groups"],
)
@pytest.mark.parametrize("huge_at", [0, 3])
def test_the_step_that_finds_a_huge_gradient_moves_as_the_root_first_order_would(
    settings, huge_at, monkeypatch
):
    """The step that first finds a gradient near the largest float forms u again, root
    first, and reads its slopes again: it and the steps after it are bit for bit those of a
    run that took the root first from that step on (u formed so from the start), with
    clipping, weight decay and groups of their own betas, lr_scale and weight decay."""
    from alsals.schedule_free import ALSALS as Implementation

    stored = Implementation._stored_search_state

    def run(forced: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        kwargs = {k: v for k, v in settings.items() if k != "groups"}
        params = (
            [
                {"params": model[0].parameters(), "betas": (0.8, 0.99), "lr_scale": 0.5,
                 "weight_decay": 0.1},
                {"params": model[2].parameters(), "betas": (0.95, 0.9999), "lr_scale": 2.0},
            ]
            if settings.get("groups")
            else model.parameters()
        )  # fmt: skip
        opt = ALSALS(params, **kwargs)
        gen = torch.Generator().manual_seed(1)
        kinds = []
        for k in range(8):
            if forced and k == huge_at:

                def root_first(self):
                    search = stored(self)
                    search.root_first = True
                    return search

                monkeypatch.setattr(Implementation, "_stored_search_state", root_first)
            scale = 3e20 if k == huge_at else 1.0
            x = torch.randn(16, 4, generator=gen)
            y = torch.randint(0, 2, (16,), generator=gen)
            opt.step(scaled_cross_entropy(model, x, y, scale))
            kinds.append((opt.last_step.kind, opt.last_step.step_size, opt.last_step.trials))
        monkeypatch.setattr(Implementation, "_stored_search_state", stored)
        assert opt.search_state.root_first
        return model, opt, kinds

    rebuilt_model, rebuilt, rebuilt_kinds = run(forced=False)
    forced_model, forced, forced_kinds = run(forced=True)
    assert rebuilt_kinds == forced_kinds
    assert rebuilt_kinds[huge_at][0] != "nonfinite"
    for a, b in zip(rebuilt_model.parameters(), forced_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_bitwise_same(rebuilt.state_dict(), forced.state_dict())


def test_a_huge_float16_gradient_beside_float32_weights_keeps_the_usual_order():
    """float16's bias correction is taken after the square root anyway: a gradient that is
    large for float16 alone (norm 1000, above a quarter of its largest 65504) is no reason
    to change the order for the float32 weights beside it (their run would change in its
    last bits), nor is a step that writes nothing (a trial's loss not finite)."""
    w = torch.tensor([3.0, 1.0, -1.0], requires_grad=True)
    h = torch.ones(2, dtype=torch.float16, requires_grad=True)
    opt = ALSALS([w, h], eps=1e-4)
    for _ in range(3):
        opt.step(lambda: 100.0 * ((w - 0.5) ** 2).sum() + (h.float() ** 2).sum())
        assert opt.last_step.kind != "nonfinite"
    assert w.grad.norm() > 128.0
    assert opt.search_state.root_first is False
    v = torch.ones(2, requires_grad=True)
    opt = ALSALS([v])

    def closure():  # a huge gradient at v, a non-finite loss at every trial
        return 4e19 * (v**2).sum() if torch.is_grad_enabled() else (v**2).sum() / 0.0

    opt.step(closure)
    assert opt.last_step.kind == "nonfinite"
    assert opt.search_state.root_first is False


def test_a_large_fp16_gradient_that_does_not_overflow_the_moment_is_not_skipped():
    """The overflow rule is exact: |g| = 300 in float16 exceeds sqrt(max) = 256, but
    (1 - beta2) g^2 does not overflow in the order the moment update computes it."""
    w = torch.tensor([1.0, -2.0], dtype=torch.float16, requires_grad=True)
    opt = MomentumALSALS([w], lr=1e-3, slope="analytic", eps=1e-4)
    opt.step(lambda: (w * torch.tensor([300.0, 1.0], dtype=torch.float16)).sum())
    assert opt.last_step.kind == "search"
    assert torch.isfinite(opt.state[w]["exp_avg_sq"]).all()


ADAM_VARIANTS = [c for c in OPTIMIZERS if c is not SLS]
ADAM_IDS = [i for c, i in zip(OPTIMIZERS, OPTIMIZER_IDS, strict=True) if c is not SLS]


def _half_problem():
    """float16 weights, half of them a dead unit: their gradient entries are exactly 0."""
    w = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=torch.float16, requires_grad=True)
    return w, lambda: (w[:2].float() ** 2).sum()


@pytest.mark.parametrize("cls", ADAM_VARIANTS, ids=ADAM_IDS)
def test_an_eps_that_is_zero_in_the_parameters_dtype_is_a_clear_error(cls):
    """eps = 1e-8 is 0 in float16: the direction would be 0/0 on the dead unit and every
    step skipped as non-finite (a stall). The step says so and changes nothing."""
    w, loss = _half_problem()
    before = w.detach().clone()
    opt = cls([w])
    with pytest.raises(ValueError, match=r"eps=1e-08 is 0 in torch.float16.*eps >= 6.1e-05"):
        opt.step(loss)
    assert torch.equal(w.detach(), before)
    assert not opt.state.get(w)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_float16_parameters_with_a_dead_unit_train(cls):
    """With an eps float16 can hold (SLS has none), no step is skipped and the loss falls."""
    w, loss = _half_problem()
    opt = cls([w], **({} if cls is SLS else {"eps": 1e-4}))
    start = float(loss())
    for _ in range(20):
        opt.step(loss)
        assert opt.last_step.kind in ("search", "reuse")
    assert float(loss()) < 0.5 * start
    assert torch.equal(w[2:].detach(), torch.tensor([0.5, 0.25], dtype=torch.float16))


def test_zero_grad_inside_a_closure_cannot_change_the_searched_direction(optimizer_class):
    """optimizer.zero_grad(set_to_none=False) inside closure() zeroes .grad in place; a trial
    must not be able to change the direction (it used to make SLS search along 0)."""
    torch.manual_seed(0)
    x, y = make_classification()
    runs = []
    for zeroing in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        opt = optimizer_class(model.parameters(), lr=50.0)

        def closure(model=model, opt=opt, zeroing=zeroing):
            if zeroing:
                opt.zero_grad(set_to_none=False)
            logits = model(x.double()).squeeze(-1).float()
            return nn.functional.binary_cross_entropy_with_logits(logits, y)

        for _ in range(3):
            opt.step(closure)
        runs.append((snapshot(model), opt.last_step))
    (plain_weights, plain_info), (zeroing_weights, zeroing_info) = runs
    assert repr(zeroing_info) == repr(plain_info) and plain_info.kind == "search"
    for a, b in zip(plain_weights, zeroing_weights, strict=True):
        assert torch.equal(a, b)


ALL_CLASSES = [*OPTIMIZERS, ALSALS]
ALL_IDS = [*OPTIMIZER_IDS, "ALSALS"]


def _logistic_run(cls, style: str, steps: int = 6, warmup: int = 0):
    """Weights and step records of ``steps`` steps of ``cls`` on a float64 logistic
    regression whose closure is written in ``style``: ``"plain"`` (returns the loss, no
    backward), ``"lbfgs"`` (``zero_grad(); loss.backward(); return loss``, torch.optim.LBFGS's),
    ``"lbfgs-item"`` (the same, returning ``loss.item()``) or ``"declared"`` (the LBFGS
    style passed with ``closure_runs_backward=True``); and how often backward ran."""
    x, y = make_classification()
    x = x.double()
    w = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = cls([w], warmup_steps=warmup) if warmup else cls([w])
    calls = {"backward": 0}
    w.register_hook(lambda grad: calls.__setitem__("backward", calls["backward"] + 1))

    def plain():
        return nn.functional.binary_cross_entropy_with_logits(x @ w, y.double())

    def lbfgs():
        opt.zero_grad()
        loss = plain()
        loss.backward()
        return loss.item() if style == "lbfgs-item" else loss

    infos = []
    for _ in range(steps):
        if style == "plain":
            opt.step(plain)
        else:
            opt.step(lbfgs, closure_runs_backward=True if style == "declared" else None)
        infos.append(repr(opt.last_step))
    return w.detach().clone(), infos, calls["backward"]


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("style", ["lbfgs", "lbfgs-item", "declared"])
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=ALL_IDS)
def test_a_closure_that_runs_backward_itself_takes_the_same_steps(cls, style, warmup):
    """The torch.optim.LBFGS style (zero_grad; loss.backward(); return loss), with or without
    declaring it, returning the tensor or ``.item()``: its own gradients are the step's
    (never doubled by a second backward of ours) and its backward call in a trial, under
    ``torch.no_grad()``, does nothing. The run is the plain closure's, bit for bit
    (float64), and backward ran once per step, in the closure."""
    plain_w, plain_infos, plain_backwards = _logistic_run(cls, "plain", warmup=warmup)
    w, infos, backwards = _logistic_run(cls, style, warmup=warmup)
    assert infos == plain_infos
    assert torch.equal(w, plain_w)
    assert backwards == plain_backwards == 6
    assert any("trials=" in i and "trials=0" not in i for i in infos)  # trials did run


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=ALL_IDS)
def test_an_lbfgs_style_closure_failing_in_a_trial_leaves_the_weights(cls):
    """An exception raised by an LBFGS-style closure in a trial (here: it reads the gradient
    the trial hides) propagates, and the weights and gradients are as before the step."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = cls([w])
    calls = {"n": 0}

    def reads_grad():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the closure failed in a trial")
        return loss

    with pytest.raises(RuntimeError, match="failed in a trial"):
        opt.step(reads_grad)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_failed_search_leaves_weights_unchanged_and_starts_the_next_below_the_smallest():
    w = torch.tensor([0.5, -0.25], requires_grad=True)
    w0 = w.detach().clone()
    opt = SLS([w], lr=1.0, max_trials=5)

    def closure():  # slope 1 at w0, but every step along -g increases the loss
        return w.sum() + 3.0 * (w - w0).abs().sum()

    opt.step(closure)
    assert opt.last_step.kind == "failed" and opt.last_step.trials == 5
    assert torch.equal(w.detach(), w0)
    expected = 1.0 * 0.9**5  # the next start, one backtrack below the last trial, less growth
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert opt.state[w]["line_search"]["failed_searches"] == 1


def test_a_start_far_too_large_whose_trials_overflow_comes_down_in_one_search(paper_class):
    """A start so large that 100 plain backtracks (0.9^100 = 2.7e-5) would all overflow:
    once the loss at the start is found finite, each overflowing trial cuts the next
    tenfold, so the first search reaches step sizes that pass (it failed, and kept its
    start, for every later search too)."""
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = paper_class([w], lr=1e25)
    closure = overflowing_far_out(w, float("inf"))
    opt.step(closure)
    assert opt.last_step.kind == "search" and opt.last_step.trials < 40
    assert opt.param_groups[0]["lr"] < 3.0
    for _ in range(50):
        opt.step(closure)
    assert closure().item() < 1e-2  # from 4


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
        ({"growth_interval": 1e-9}, "growth_interval"),  # (2^(1/b) overflowed at the step)
        ({"lr": 1e300}, "lr"),  # (every trial overflowed, every step failed, silently)
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


@pytest.mark.parametrize("lr_scale", [1.0, 10.0])
def test_a_step_size_grown_to_the_largest_is_shown_and_taken_again(optimizer_class, lr_scale):
    """An unbounded loss (a linear one) whose searches grow the step size 2^100 a search:
    no search starts above 1e100, and the lr a step shows there (1e100 times lr_scale) is
    not refused by the next step's check of the groups (a review found it refused: the cap
    was inclusive and the check, meant for the constructor's lr, exclusive)."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = optimizer_class([{"params": [w], "lr_scale": lr_scale}], growth_interval=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(12):
            opt.step(lambda: -w.sum())
    assert opt.search_state.step_size == 1e100
    assert opt.param_groups[0]["lr"] == 1e100 * lr_scale


def test_searches_that_fail_in_a_row_warn_with_where_the_next_starts(paper_class):
    """A growth per search of 2^1000 (``growth_interval=0.001``, accepted) starts every
    search at the largest step size (1e100), from which ``max_trials`` backtracks do not
    reach one the loss accepts: every step fails, which said nothing but a log line."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, dtype=torch.float64, generator=g)
    y = x @ torch.randn(4, dtype=torch.float64, generator=g)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = paper_class([w], growth_interval=0.001)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.step(lambda: ((x @ w - y) ** 2).mean())
            assert opt.last_step.kind == "failed"
    said = [str(m.message) for m in caught if "none passed the Armijo test" in str(m.message)]
    assert len(said) == 1 and "growth_interval" in said[0], [str(m.message) for m in caught]
    assert torch.equal(w, torch.zeros_like(w))


@pytest.mark.parametrize("cls", [AdamSLS, MomentumALSALS], ids=["AdamSLS", "MomentumALSALS"])
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


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_complex_parameters_are_rejected_with_the_way_that_works(cls):
    """A complex parameter is refused, with the fix: hold it as real (real, imaginary) pairs
    and view it as complex where the model uses it, which trains."""
    with pytest.raises(ValueError, match="complex parameters.*view_as_complex"):
        cls([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    pairs = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1 + 2j, -1j, 0.5], dtype=torch.complex128)
    opt = cls([pairs])

    def loss():
        return (torch.view_as_complex(pairs) - target).abs().pow(2).sum()

    first = float(loss())
    for _ in range(20):
        opt.step(loss)
    assert float(loss()) < 0.5 * first


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


def test_a_warning_turned_into_an_error_leaves_everything_as_before_the_step(optimizer_class):
    """Under ``-W error`` a warning is an exception; it is issued before the step writes
    anything, so the step is undone like any other exception (it used to escape after the
    weights had moved, with last_step unset)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = optimizer_class(model.parameters())
    calls = []

    def closure():  # a different loss at every call: the first search warns
        calls.append(1)
        return nn.functional.mse_loss(model(x), y) * (1.0 + 0.1 * len(calls))

    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="does not replay its randomness"):
            opt.step(closure)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict() == state
    assert opt.last_step is None
    opt.step(closure)  # warned once: the retry runs the step
    assert opt.last_step is not None and opt.search_state.searches == 1


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=ALL_IDS)
@pytest.mark.parametrize("kind", ["search", "zero_grad"])
def test_a_warning_about_the_step_turned_into_an_error_writes_nothing(cls, kind):
    """The warnings issued once a step has decided what to do (held gradients dropped)
    are an exception under ``-W error`` too: the weights, the state and ``last_step`` are
    as before the step, and the retry takes it as an uninterrupted step does (ALSALS wrote
    the move first, and the undo put back x' in place of x)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = cls(model.parameters())
    scale = 0.0 if kind == "zero_grad" else 1.0  # (a zero gradient: the averaging move)

    def closure():
        return nn.functional.mse_loss(model(x), y) * scale + (model.bias * 0.0).sum()

    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    twin_model = copy.deepcopy(model)
    twin = cls(twin_model.parameters())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # a backward pass outside step()
    weights, state, last = snapshot(model), full_state(opt), opt.last_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="held gradients computed since the last step"):
            opt.step(closure)
    assert_unchanged(weights, model.parameters())
    assert_same_state(state, full_state(opt))
    assert opt.last_step is last
    for p in model.parameters():
        p.grad = None
    opt.step(closure)  # warned once: the retry takes the step
    twin.step(lambda: nn.functional.mse_loss(twin_model(x), y) * scale)
    assert opt.last_step.kind == twin.last_step.kind == kind
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_under_inference_mode_is_a_clear_error(optimizer_class):
    w = torch.ones(3, requires_grad=True)
    opt = optimizer_class([w])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        opt.step(lambda: (w**2).sum())
    assert torch.equal(w, torch.ones(3)) and opt.search_state.step == 0


def test_alsals_under_inference_mode_names_it_not_the_closure():
    w = torch.ones(3, requires_grad=True)
    opt = ALSALS([w])
    opt.step(lambda: ((w - 2.0) ** 2).sum())
    weights, z = w.detach().clone(), opt.state[w]["z"].clone()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"ALSALS.*inference_mode"):
        opt.step(lambda: ((w - 2.0) ** 2).sum())
    assert torch.equal(w, weights) and torch.equal(opt.state[w]["z"], z)
    assert opt.search_state.steps == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda p: MomentumALSALS(p, slope="finite_difference"),
        lambda p: SLS(p, slope="finite_difference", start="polyak", fd_step=1e-3),
    ],
    ids=["MomentumALSALS-fd-polyak", "SLS-fd-polyak"],
)
def test_a_nonfinite_finite_difference_probe_leaves_the_weights_where_they_were(make):
    """With the Polyak start the slope is read before any trial; a NaN at the probe skips
    the step and puts the weights back from the probe point (they stayed at w0 + fd_step d)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    opt = make(model.parameters())
    calls, poison = [], [False]

    def closure():
        calls.append(1)
        loss = nn.functional.mse_loss(model(x), y)
        return loss + float("nan") if poison[0] and len(calls) == 2 else loss

    opt.step(closure)
    calls.clear()
    poison[0] = True  # the second evaluation of this step is the probe
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert opt.last_step.kind == "nonfinite"
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_weight_decay_never_overshoots_past_zero():
    """The search does not test the decoupled decay: with eta * weight_decay > 1 the decay
    takes at most the whole of w0 (it used to flip and grow the weights until they overflowed)."""
    w = torch.tensor([2.0, -3.0], dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=10.0, weight_decay=0.5, search_interval=1)
    opt.step(lambda: 1e-6 * (w**2).sum())  # a flat loss: the search accepts a large eta
    eta = opt.last_step.step_size
    assert eta * 0.5 > 1.0
    g = 2e-6 * torch.tensor([2.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), -eta * g)  # w0 - w0 + eta d


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=ALL_IDS)
def test_a_retried_step_keeps_the_gradients_accumulated_outside_the_closure(cls):
    """Micro-batches' backward passes run before ``step()``; ``closure(backward)`` only
    returns the loss. A trial raises (a transient error) and the step is retried: the retry
    takes the same step as an uninterrupted one (the accumulated gradients are the user's,
    not the failed attempt's, and are kept)."""
    x, y = make_classification(32, features=6, seed=3)
    x, y = x.double(), y.double()

    def attempt(fail_once: bool):
        torch.manual_seed(0)
        model = nn.Linear(6, 1).double()
        opt = cls(model.parameters())
        if isinstance(opt, ALSALS):
            opt.train()  # the backward passes below run at y
        for xm, ym in zip(x.split(8), y.split(8), strict=True):
            loss = nn.functional.binary_cross_entropy_with_logits(model(xm).squeeze(1), ym)
            (loss / 4).backward()
        calls = [0]

        def closure(backward):
            calls[0] += 1
            if fail_once and calls[0] == 2:
                raise RuntimeError("transient failure in a trial")
            with torch.no_grad():
                return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)

        if fail_once:
            with pytest.raises(RuntimeError, match="transient"):
                opt.step(closure)
        opt.step(closure)
        return opt.last_step.kind, snapshot(model)

    kind, weights = attempt(fail_once=True)
    assert kind not in ("zero_grad", "nonfinite")
    assert_unchanged(attempt(fail_once=False)[1], weights)


class LazyObserver(nn.Module):
    """A running maximum that starts empty and takes its shape at the first training forward
    (as quantization-aware training's per-channel observers do)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.register_buffer("running_max", torch.empty(0))

    def forward(self, x):
        h = self.linear(x)
        if self.training:
            with torch.no_grad():
                current = h.abs().amax(0)
                if self.running_max.numel() == 0:
                    self.running_max.resize_(current.shape).copy_(current)
                else:
                    self.running_max.copy_(torch.maximum(self.running_max, current))
        return h.sum(1, keepdim=True)


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_an_exception_after_a_buffer_took_its_shape_is_the_one_raised(cls):
    """An interrupt in a trial of the step whose first forward resized a protected buffer:
    the user's exception propagates (not a size mismatch from putting the buffer back), and
    weights and buffer are as before the step; a plain step afterwards trains."""
    torch.manual_seed(0)
    model = LazyObserver()
    opt = cls(model.parameters(), buffers=model.buffers())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    calls = 0

    def interrupted():
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt("in a trial")
        return ((model(x) - y) ** 2).mean()

    weight = model.linear.weight.detach().clone()
    with pytest.raises(KeyboardInterrupt, match="in a trial"):
        opt.step(interrupted)
    assert torch.equal(model.linear.weight, weight)
    assert model.running_max.shape == (0,)
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert model.running_max.shape == (8,)
    assert not torch.equal(model.linear.weight, weight)


def test_a_float16_weight_given_its_gradient_by_hand_is_checked_for_overflow():
    """A float16 tensor that does not require grad but gets a ``.grad`` written by hand takes
    part in the step: its dtype sets the overflow check's threshold too (``0.001 g^2``
    overflows float16 at ``g = 9000``), so the step is skipped, not ``v`` stored as inf."""
    w = torch.zeros(3, requires_grad=True)
    h = torch.ones(2, dtype=torch.float16)
    opt = ALSALS([w, h], lr=1e-3, eps=1e-4)

    def closure():
        h.grad = torch.tensor([9000.0, 1.0], dtype=torch.float16)
        return ((w - 1) ** 2).sum()

    with pytest.warns(RuntimeWarning, match="second moment"):
        opt.step(closure)
    assert opt.last_step.kind == "nonfinite"
    assert "exp_avg_sq" not in opt.state.get(h, {})


def _one_weight():
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": torch.tensor(True)}, TypeError, "lr"),
        ({"c": 1.0}, ValueError, "c"),
        ({"backtrack": 1.0}, ValueError, "backtrack"),
        ({"smoothing": 1.0}, ValueError, "smoothing"),
        ({"loss_rise_guard": 0.0}, ValueError, "loss_rise_guard"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ({"interpolate": 1}, TypeError, "interpolate"),
        ({"search_interval": 0}, ValueError, "search_interval"),
        ({"loss_floor": float("-inf")}, ValueError, "loss_floor"),
        ({"start": "bogus"}, ValueError, "start"),
        ({"fd_step": 0.0}, ValueError, "fd_step"),
    ],
)
def test_each_bad_line_search_setting_is_refused_by_name(kwargs, error, match):
    """The line searches' settings at the edges of their ranges (a bool tensor is no
    number, the open upper bounds, a guard of 0 standard errors, an unknown start: a typo
    would otherwise act as the default)."""
    with pytest.raises(error, match=match):
        SLS(_one_weight(), **kwargs)


@pytest.mark.parametrize("cls", [AdamSLS, MomentumALSALS, ALSALS])
def test_adam_without_momentum_is_a_valid_setting(cls):
    """``betas=(0.0, beta2)``: RMSprop-like, no momentum (for ``ALSALS``, Schedule-Free's
    Polyak-Ruppert end: gradients at ``z``, ``x`` its average); accepted, and it descends."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = cls([w], betas=(0.0, 0.999))
    losses = []
    for _ in range(20):
        z = opt.state[w].get("z", w.detach()).clone()
        losses.append(opt.step(lambda: (w**2).sum()).item())
        if cls is ALSALS:  # the closure ran at y = (1 - beta1) z + beta1 x, z itself
            assert losses[-1] == pytest.approx((z**2).sum().item(), rel=1e-9)
    assert opt.last_step.kind in ("search", "kept", "reuse")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=ALL_IDS)
@pytest.mark.parametrize("where", ["halfway-through-backward", "after-zero_grad"])
def test_a_closure_backward_failing_before_its_backward_completes_leaves_the_gradients(cls, where):
    """A ``closure(backward)`` that zeroes the gradients and raises before its backward pass
    completed (a hook failing halfway through it, or an error right after ``zero_grad()``):
    ``.grad`` is as before the step, also where the optimizer had not set it to ``None``
    itself (a first step; gradients a backward pass outside the step computed). They were
    left half computed, or lost. A retry then takes the uninterrupted step."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = cls([w, b])
    outside = where == "after-zero_grad"
    if outside:  # gradients held before the step, none of this optimizer's
        ((w + 1.0) ** 2).sum().backward()
        (b * 3.0).sum().backward()
    before = [p.grad for p in (w, b)]
    failing = [True]

    def fail_in_backward(grad):
        if failing[0]:
            raise RuntimeError("failed halfway through backward")
        return grad

    w.register_hook(fail_in_backward)

    def closure(backward):
        if backward:
            opt.zero_grad()
            if outside and failing[0]:
                raise RuntimeError("failed after zero_grad")
        loss = ((w - 1.0) ** 2).sum() + ((b - 2.0) ** 2).sum()
        if backward:
            loss.backward()  # b's gradient first, then w's hook raises
        return loss

    with pytest.raises(RuntimeError, match="failed"):
        opt.step(closure)
    assert all(p.grad is g for p, g in zip((w, b), before, strict=True))  # (or None)
    assert torch.equal(w.detach(), torch.zeros(3, dtype=torch.float64))
    failing[0] = False
    opt.step(closure)
    twin_w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    twin_b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    twin = cls([twin_w, twin_b])
    twin.step(lambda: ((twin_w - 1.0) ** 2).sum() + ((twin_b - 2.0) ** 2).sum())
    assert torch.equal(w.detach(), twin_w.detach()) and torch.equal(b.detach(), twin_b.detach())
