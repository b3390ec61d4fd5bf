"""What a user switching from AdamW runs into: a schedule left in the loop, clipping,
warm-up, the cost of the first search, closures that do not replay their randomness,
BatchNorm without ``buffers=``. Each mistake is either made harmless or said once, with the
fix."""

from __future__ import annotations

import logging
import math
import random
import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.integrations.amp import step_with_scaler
from alsals.messages import OVERSTATED_OUTCOMES
from alsals.schedule_free import SearchResult
from conftest import SmallNet, make_classification


def regression(seed: int = 0, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(6, generator=gen, dtype=torch.float64))
    return x, y


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def mse_closure(model, x, y):
    return lambda: nn.functional.mse_loss(model(x).squeeze(-1), y)


# ------------------------------------------------------------ a schedule left in the loop


def test_a_schedule_overwriting_lr_every_step_warns_once_with_the_fix(optimizer_class):
    model = mlp()
    x, y = regression()
    opt = optimizer_class(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="schedule") as caught:
        for k in range(6):
            for group in opt.param_groups:
                group["lr"] = 0.01 * (1 - k / 10)
            opt.step(mse_closure(model, x, y))
    assert sum("schedule" in str(w.message) for w in caught) == 1
    assert "delete the schedule" in str(caught[0].message)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, threshold=1.0),
    ],
    ids=["StepLR", "ReduceLROnPlateau"],
)
def test_a_schedule_that_lowers_lr_now_and_then_warns_once(optimizer_class, make_scheduler):
    """Writes that are never on consecutive steps compound with the search's own cuts: the
    step size falls far below what the search finds, so they are warned about too."""
    model = mlp()
    x, y = regression()
    opt = optimizer_class(model.parameters(), lr=0.01)
    scheduler = make_scheduler(opt)
    with pytest.warns(UserWarning, match="ReduceLROnPlateau") as caught:
        for _ in range(12):
            loss = opt.step(mse_closure(model, x, y))
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(float(loss))  # (threshold=1: no step counts as better)
            else:
                scheduler.step()
    assert sum("schedule" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("cls", ["engine", "ALSALS"])
def test_writes_now_and_then_that_do_not_cut_lr_do_not_warn(optimizer_class, cls):
    """A start written before the first step, a write that raises the searched step size,
    one cut much later: no schedule. (Three cuts, or three writes in a row, would be.)"""
    from alsals import ALSALS

    model = mlp()
    x, y = regression()
    build = ALSALS if cls == "ALSALS" else optimizer_class
    opt = build(model.parameters(), lr=0.01)
    factors = {0: 2.0, 1: 2.0, 30: 0.5}  # of the lr the groups show then
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(40):
            if k in factors:
                opt.param_groups[0]["lr"] *= factors[k]
            opt.step(mse_closure(model, x, y))


def test_writing_lr_once_does_not_warn(optimizer_class):
    model = mlp()
    x, y = regression()
    opt = optimizer_class(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(6):
            if k == 2:
                opt.param_groups[0]["lr"] = 1e-3
            opt.step(mse_closure(model, x, y))


# -------------------------------------------------------------------------- clipping


def test_clipping_moves_the_update_and_keeps_the_true_slope_in_the_test(optimizer_class):
    """max_grad_norm clips the gradient the update is built from, as clip_grad_norm_ would;
    the Armijo test keeps the true gradient's slope: at the first step the searched
    direction is the one a closure that clips would give, and its analytic slope is that
    closure's divided by the clip factor (clipping in the closure makes the test that much
    laxer: a reviewer's MLP with max_grad_norm=0.1 ended at 0.65 against 0.20 unclipped)."""
    x, y = regression()
    models = [mlp(), mlp()]
    settings = {"lr": 0.5, "slope": "analytic"}
    clipped = optimizer_class(models[0].parameters(), max_grad_norm=0.05, **settings)
    manual = optimizer_class(models[1].parameters(), **settings)

    def clipping_closure(backward: bool):
        loss = nn.functional.mse_loss(models[1](x).squeeze(-1), y)
        if backward:
            manual.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.05)
        return loss.detach()

    clipped.step(mse_closure(models[0], x, y))
    manual.step(clipping_closure)
    norm = clipped.last_step.grad_norm
    assert norm > 0.05  # the clip acted
    factor = 0.05 / (norm + 1e-6)
    assert clipped.last_step.slope == pytest.approx(manual.last_step.slope / factor, rel=1e-9)


@pytest.mark.parametrize("max_norm", [1e3])
def test_clipping_matches_clip_grad_norm_before_a_step(optimizer_class, max_norm):
    """A max_grad_norm the gradient never reaches changes nothing: the optimizer with it
    equals one without it whose closure calls clip_grad_norm_."""
    x, y = regression()
    models = [mlp(), mlp()]
    clipped = optimizer_class(models[0].parameters(), lr=0.5, max_grad_norm=max_norm)
    manual = optimizer_class(models[1].parameters(), lr=0.5)

    def clipping_closure(backward: bool):
        loss = nn.functional.mse_loss(models[1](x).squeeze(-1), y)
        if backward:
            manual.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
        return loss.detach()

    for _ in range(4):
        clipped.step(mse_closure(models[0], x, y))
        manual.step(clipping_closure)
        norm = clipped.last_step.grad_norm
        assert math.isfinite(norm) and 0 < norm < max_norm  # the limit never clipped
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_clipping_a_gradient_whose_float32_norm_overflows(optimizer_class):
    """Entries of 1e20 in float32: the squares' sum overflows float32, not float64. The
    norm max_grad_norm divides by is taken in float64, so the clip factor is the right
    one; SLS, AdamSLS and MomentumALSALS took a float32 norm, clipped by 0 and skipped every
    step ("the slope estimate is not finite")."""
    w = torch.ones(3, requires_grad=True)
    opt = optimizer_class([w], max_grad_norm=1.0)
    for _ in range(3):
        norm = math.sqrt(3) * 2e20 * abs(w[0].item() - 0.5)  # (the entries stay equal)
        opt.step(lambda: 1e20 * ((w - 0.5) ** 2).sum())
        assert opt.last_step.kind == "search"
        assert opt.last_step.grad_norm == pytest.approx(norm, rel=1e-5)
    assert (w.detach() < 1.0).all()


def test_clipping_applies_to_the_accumulated_gradient(optimizer_class):
    """Accumulating 4 micro-batches in closure(backward) and clipping in the optimizer is
    one clipped step on the whole batch (clipping per micro-batch would not be)."""
    x, y = regression(n=64)
    models = [mlp(), mlp()]
    accumulated = optimizer_class(models[0].parameters(), lr=0.5, max_grad_norm=0.05)
    whole = optimizer_class(models[1].parameters(), lr=0.5, max_grad_norm=0.05)

    def micro_batches(backward: bool):
        if backward:
            accumulated.zero_grad()
        total = 0.0
        for xb, yb in zip(x.split(16), y.split(16), strict=True):
            loss = nn.functional.mse_loss(models[0](xb).squeeze(-1), yb) / 4
            if backward:
                loss.backward()
            total = total + loss.detach()
        return total

    for _ in range(3):
        accumulated.step(micro_batches)
        whole.step(mse_closure(models[1], x, y))
    assert accumulated.last_step.grad_norm > 0.05
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler")
def test_clipping_with_gradscaler_clips_the_unscaled_gradient():
    """With fp16-style loss scaling the optimizer clips after the scaler's unscale_: the
    clipped step equals the unscaled one (the scale is 2^10 here, far above the limit)."""
    x, y = regression()
    models = [mlp(), mlp()]
    scaled_opt = MomentumALSALS(
        models[0].parameters(), lr=0.05, max_grad_norm=0.1, slope="analytic"
    )
    plain_opt = MomentumALSALS(models[1].parameters(), lr=0.05, max_grad_norm=0.1, slope="analytic")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        step_with_scaler(scaled_opt, mse_closure(models[0], x, y), scaler)
        plain_opt.step(mse_closure(models[1], x, y))
    assert scaled_opt.last_step.grad_norm == pytest.approx(plain_opt.last_step.grad_norm)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_max_grad_norm_is_validated(optimizer_class):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="invalid max_grad_norm"):
        optimizer_class([w], max_grad_norm=0.0)
    with pytest.raises(TypeError, match="invalid max_grad_norm"):
        optimizer_class([w], max_grad_norm="1.0")


# --------------------------------------------------------------------------- warm-up


def test_warmup_ramps_to_lr_and_the_search_can_only_shorten_it(optimizer_class):
    """warmup_steps with a far too large lr (nanoGPT's warmup_iters mapped onto it) can no
    longer stall training: the search decides below the ramp."""
    model = mlp()
    x, y = regression()
    opt = optimizer_class(model.parameters(), lr=10.0, warmup_steps=10)
    first = nn.functional.mse_loss(model(x).squeeze(-1), y).item()
    for k in range(10):
        opt.step(mse_closure(model, x, y))
        info = opt.last_step
        assert info.kind == "search"
        assert info.step_size <= 10.0 * (k + 1) / 10 * (1 + 1e-12)
    assert nn.functional.mse_loss(model(x).squeeze(-1), y).item() < first


# ---------------------------------------------------------------------- the first search


def test_the_first_search_reports_its_cost_in_the_log(caplog):
    model = mlp()
    x, y = regression()
    opt = MomentumALSALS.paper(
        model.parameters(), lr=100.0, slope="analytic"
    )  # too large: many trials
    with caplog.at_level(logging.INFO, logger="alsals"):
        opt.step(mse_closure(model, x, y))
        opt.step(mse_closure(model, x, y))
    records = [r for r in caplog.records if r.name == "alsals"]
    assert len(records) == 1  # the first search only
    assert records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "first search took" in message and "pass lr=" in message


# ------------------------------------------------------------- randomness and buffers


def test_a_closure_that_draws_new_data_each_call_is_reported_once(optimizer_class):
    x, y = regression(n=256)
    model = mlp()
    opt = optimizer_class(model.parameters(), lr=0.01)
    rng = random.Random(0)

    def closure():  # draws its batch from Python's random: not replayed by the optimizer
        idx = torch.tensor(rng.sample(range(256), 16))
        return nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])

    with pytest.warns(UserWarning, match="does not replay its randomness"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)  # once only


def test_a_closure_with_dropout_from_torch_is_not_reported(optimizer_class):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    x, y = regression()
    opt = optimizer_class(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(mse_closure(model, x, y))


def test_batchnorm_without_buffers_is_reported_once_with_the_fix(optimizer_class, buffer_watch):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=0.05)

    def closure():
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    with pytest.warns(UserWarning, match=r"BatchNorm1d.*buffers=model\.buffers\(\)"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    protected = optimizer_class(model.parameters(), lr=0.05, buffers=model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        protected.step(closure)


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS])
def test_max_grad_norm_is_a_constructor_argument_of_every_optimizer(cls):
    assert "max_grad_norm" in cls.__init__.__code__.co_varnames
    assert "max_grad_norm" in cls.__doc__


def test_the_first_search_log_names_the_step_size_it_started_from(caplog):
    model = mlp()
    x, y = regression()
    opt = MomentumALSALS.paper(model.parameters(), lr=1e-3, slope="analytic")
    for group in opt.param_groups:
        group["lr"] = 1e4  # written before the first step: the search starts here
    with caplog.at_level(logging.INFO, logger="alsals"):
        opt.step(mse_closure(model, x, y))
    assert "from lr=1e+04" in caplog.records[0].getMessage()


def test_one_time_warnings_point_at_the_users_line(optimizer_class):
    model = mlp()
    x, y = regression()
    opt = optimizer_class(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="schedule") as caught:
        for _ in range(4):
            opt.param_groups[0]["lr"] = 0.01 * (1 + _)
            opt.step(mse_closure(model, x, y))
    assert caught[0].filename == __file__


def accumulating_closure(model, opt, chunks, divide: bool):
    """Gradient accumulation over micro-batches in a ``closure(backward)`` that returns the
    mean loss; ``divide=False`` forgets to divide each micro-batch's loss by their number."""

    def closure(backward):
        if backward:
            opt.zero_grad()
        total = 0.0
        for x, y in chunks:
            loss = nn.functional.mse_loss(model(x), y)
            if backward:
                (loss / len(chunks) if divide else loss).backward()
            total = total + loss.detach()
        return total / len(chunks)

    return closure


@pytest.mark.parametrize("network", ["linear", "mlp"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS], ids=["ALSALS", "MomentumALSALS"])
def test_a_gradient_k_times_the_returned_loss_is_named_with_its_factor(cls, k, network):
    """Accumulation over ``k`` micro-batches without dividing by ``k``: every trial lowers the
    loss by ``1/k`` of the promise, no trial can pass ``c = 0.6``, and no step is taken (AdamW
    does not notice: its update ignores the gradient's scale). It was silent (ALSALS: called
    converged at the starting loss); the warning names the factor, and a stall warning that
    follows suspects the closure. The same loop dividing by ``k`` trains without a warning.
    On a network whose loss curves along the move (``"mlp"``) the first search's largest
    trials fall far short of ``1/k`` too, and the warning stayed silent at ``k = 2`` before
    0.2.13 (it compared the smallest trial's shortfall with the largest's)."""
    torch.manual_seed(0)
    x = torch.randn(64, 10, dtype=torch.float64)
    y = x @ torch.randn(10, 1, dtype=torch.float64) + 0.1 * torch.randn(64, 1, dtype=torch.float64)
    if network == "mlp":  # (targets no function of the inputs: the loss curves early)
        y = torch.randn(64, 1, dtype=torch.float64)
    chunks = list(zip(x.chunk(k), y.chunk(k), strict=True))
    for divide in (False, True):
        torch.manual_seed(1)
        if network == "linear":
            model = nn.Linear(10, 1).double()
        else:
            model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        start = nn.functional.mse_loss(model(x), y).item()
        opt = cls(model.parameters())
        closure = accumulating_closure(model, opt, chunks, divide)
        kinds = []  # (the kind of the step whose warning names the factor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(10):
                said = len(caught)
                opt.step(closure)
                new = [str(m.message) for m in caught[said:]]
                kinds += [opt.last_step.kind for m in new if "the gradient is about" in m]
        messages = [str(m.message) for m in caught]
        final = nn.functional.mse_loss(model(x), y).item()
        if divide:
            assert messages == [] and final < 0.8 * start
            continue
        named = [m for m in messages if "the gradient is about" in m]
        assert len(named) == 1 and final > (1 - 1e-6) * start
        # what the warning says the search did is what it did: passed no trial, or one that
        # did not lower the loss by more than its rounding resolves
        assert OVERSTATED_OUTCOMES[kinds[0] == "search"] in named[0], kinds
        factor = float(named[0].split("the gradient is about ")[1].split("x")[0])
        assert factor == pytest.approx(k, rel=0.1)
        assert "micro-batches" in named[0] and "kink" in named[0]  # (both causes named)
        assert all("converged" not in m for m in messages)


@pytest.mark.parametrize("averaging", [-1.0, -1e-3], ids=["averaging-large", "averaging-small"])
def test_alsals_judges_the_gradients_scale_only_on_trials_the_step_along_u_promises(averaging):
    """``ALSALS``'s promise has two parts: the averaging move's (``y`` towards ``z``, which
    may promise a rise) and the step's along ``u``. Near where they cancel, the fraction of
    the promise a trial lowered the loss by says nothing about the gradient's scale (a
    BiGRU with CTC loss, its gradient exact, was told its gradient was 17x its loss): only
    trials whose averaging part is at most a quarter of the step's are judged. The same
    fractions (1/5 of the promise at step sizes 1, 4, 16) with a small averaging part are
    the overstatement they are."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w])
    group = opt.param_groups[0]
    group["lr_max"], group["weight_sum"] = 16.0, 9.0 * 16.0**2  # (alpha 0.1 at every trial)
    slope = [1.0]
    loss0 = 10.0
    trials = []
    for gamma in (1.0, 4.0, 16.0):
        promise = opt._promised(gamma, [averaging], slope)
        assert promise > 0.0
        trials.append((gamma, loss0 - promise / 5.0))
    result = SearchResult("kept", 16.0, len(trials))
    ratio, passed = opt._overstated_slope(loss0, result, trials, [averaging], slope, torch.float64)
    assert not passed
    if averaging == -1.0:  # (its part is 0.53 of the step's at gamma 1: two trials left)
        assert math.isnan(ratio)
    else:
        assert ratio == pytest.approx(0.2)


@pytest.mark.parametrize("cls", [SLS, AdamSLS], ids=["SLS", "AdamSLS"])
def test_a_search_passed_by_rounding_below_a_kink_does_not_call_the_gradient_overstated(cls):
    """A correct gradient, a ReLU piece a few of the loss's resolutions from its kink plus a
    gentle linear part: every trial above the kink lowers the loss by about a tenth of the
    promise, and the search passes one below it by a change the rounding hides. With
    ``c = 0.1`` the shortfalls' comparison said nothing, and an accepted search looked at
    for any rounding-level pass, whatever its place among the trials, warned that the
    gradient is 64x the loss's (a review's case; one-element float32 tensors: the same
    rounding everywhere)."""
    w = torch.zeros(1, requires_grad=True)
    v = torch.zeros(1, requires_grad=True)
    opt = cls([w, v], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = 1.0 + torch.relu(w + 1.4e-6).sum() - 0.1 * v.sum()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
    assert opt.last_step.kind == "search" and v.item() > 0.0  # (it trains on)
    assert not [m for m in caught if "the gradient is about" in str(m.message)]


def test_a_first_search_passed_by_rounding_still_names_a_gradient_twice_the_loss():
    """``MomentumALSALS``'s first search, judged by the plain test, fails every trial that
    the loss's rounding resolves (each lowers it by half the promise) and passes the
    smallest by a change below it: the warning names the factor and says that the trial it
    passed did not lower the loss by more than its rounding resolves (0.2.12 said nothing;
    a first fix said no step was taken). One-element float64 arithmetic; 32 draws, each
    warned at its first step, by a failed or unresolved search or by one passed so (which
    of them takes the rounding's path is the rounding's word: 8 of the 32 here)."""
    kinds = []
    for seed in range(32):
        g = torch.Generator().manual_seed(seed)
        a = torch.rand(1, dtype=torch.float64, generator=g) + 0.5
        w = (torch.rand(1, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
        opt = MomentumALSALS([w])

        def closure(backward, a=a, w=w, opt=opt):
            loss = (0.5 * a * w * w + 0.25 * w * w * w * w).sum()
            if backward:
                opt.zero_grad()
                (2.0 * loss).backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(closure)
        named = [str(m.message) for m in caught if "the gradient is about" in str(m.message)]
        assert len(named) == 1, seed
        assert float(named[0].split("the gradient is about ")[1].split("x")[0]) == pytest.approx(
            2.0, rel=0.1
        )
        assert OVERSTATED_OUTCOMES[opt.last_step.kind == "search"] in named[0]
        kinds.append(opt.last_step.kind)
    assert "search" in kinds  # (the accepted search's path was taken)


def test_a_clamp_at_the_loss_floor_stalls_with_a_warning_that_names_the_kink():
    """A loss exactly at ``loss_floor`` whose gradient promises a change (a clamp at its
    bound: autograd's gradient is the other side's) is no minimum, and the searches run;
    every trial gives the same loss, and the stall warning names a kink along the move
    among its causes (it suspected the closure alone)."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.step(lambda: torch.clamp(w, min=0.0).sum())
    stalled = [
        str(m.message) for m in caught if "did not change when the weights" in str(m.message)
    ]
    assert len(stalled) == 1 and "kink" in stalled[0] and "clamp" in stalled[0]
    assert torch.equal(w, torch.zeros(3, dtype=torch.float64))
