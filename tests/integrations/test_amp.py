"""Mixed precision: bf16 autocast inside the closure, fp16 with torch.amp.GradScaler (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.integrations.amp import autocast_closure, step_with_scaler


def make_problem(seed: int = 0, dropout: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 12, generator=gen)
    y = (x[:, :4].sum(dim=1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))
    return model, x, y


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------------------ bf16


def test_bf16_autocast_trains_and_decisions_see_float32_losses():
    model, x, y = make_problem()
    optimizer = MomentumALSALS(model.parameters(), slope="analytic")
    seen = []  # (grad enabled, dtype of the value returned to the optimizer, matmul dtype)

    def loss_fn():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)  # autocast runs it in float32
        seen.append((torch.is_grad_enabled(), logits.dtype))
        return loss

    closure = autocast_closure(loss_fn, device_type="cpu", dtype=torch.bfloat16)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no low-precision warning for a float32 loss
        for _ in range(12):
            loss = optimizer.step(closure)
            assert loss.dtype == torch.float32
            # the decisions use this float32 value (as float64), not a bf16-rounded one
            assert optimizer.last_step.loss == loss.item()
            losses.append(loss.item())
    assert all(dtype == torch.bfloat16 for _, dtype in seen), "the model must run in bf16"
    assert any(not grad for grad, _ in seen), "trial evaluations must have run"
    assert losses[-1] < 0.8 * losses[0]
    kinds = {optimizer.last_step.kind}
    assert kinds <= {"search", "reuse", "failed"}


def test_autocast_closure_keeps_the_backward_form():
    model, x, y = make_problem(dropout=0.0)
    optimizer = AdamSLS(model.parameters())
    calls = []

    def loss_fn(backward: bool):
        calls.append(backward)
        if backward:
            optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    optimizer.step(autocast_closure(loss_fn, "cpu", torch.bfloat16))
    assert calls[0] is True and calls[1:] and not any(calls[1:])
    assert optimizer.last_step.backwards == 1


def test_a_bf16_loss_is_flagged():
    model, x, y = make_problem()
    optimizer = SLS(model.parameters())
    target = nn.functional.one_hot(y, 2).to(torch.bfloat16)

    def loss_fn():  # a hand-written reduction of bf16 tensors stays in bf16
        return ((model(x) - target) ** 2).mean()

    with pytest.warns(RuntimeWarning, match="bfloat16"):
        optimizer.step(autocast_closure(loss_fn, "cpu", torch.bfloat16))


# ----------------------------------------------------------------------- fp16 + scaler


def fp16_loss(model, x, y):
    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.cross_entropy(model(x), y)

    return closure


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS], ids=lambda c: c.__name__)
def test_scaler_unscales_the_gradient_the_search_uses(cls):
    """The search sees the unscaled gradient: it matches the gradient of a run without the
    scaler (up to the fp16 underflow the scale avoids), where a forgotten unscale_ would be
    256x off, and the search takes the same decision."""
    runs = []
    for use_scaler in (True, False):
        model, x, y = make_problem(dropout=0.0)
        optimizer = cls(model.parameters(), slope="analytic")
        closure = fp16_loss(model, x, y)
        if use_scaler:
            step_with_scaler(optimizer, closure, torch.amp.GradScaler("cpu", init_scale=2.0**8))
        else:
            optimizer.step(closure)
        assert optimizer.last_step.kind == "search"
        runs.append((grads(model), optimizer.last_step))
    (scaled, info_scaled), (plain, info_plain) = runs
    torch.testing.assert_close(scaled, plain, rtol=1e-2, atol=1e-3 * plain.abs().max().item())
    assert info_scaled.trials == info_plain.trials
    # the Polyak start L0 / s sees the fp16-rounded gradient: equal up to that rounding
    assert info_scaled.step_size == pytest.approx(info_plain.step_size, rel=1e-4)


def test_sls_through_the_scaler_follows_the_unscaled_trajectory():
    results = []
    for use_scaler in (True, False):
        model, x, y = make_problem(dropout=0.0)
        optimizer = SLS(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        closure = fp16_loss(model, x, y)
        for _ in range(4):
            if use_scaler:
                step_with_scaler(optimizer, closure, scaler)
            else:
                optimizer.step(closure)
        results.append(weights(model))
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-5)


def test_scaler_skips_overflow_steps_and_lowers_the_scale():
    model, x, y = make_problem()
    optimizer = MomentumALSALS(model.parameters(), slope="analytic")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=3)
    closure = fp16_loss(model, x, y)
    kinds, scales, losses = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # overflow skips are silent
        for _ in range(40):
            before = weights(model)
            scale = scaler.get_scale()
            loss = step_with_scaler(optimizer, closure, scaler)
            kinds.append(optimizer.last_step.kind)
            scales.append((scale, scaler.get_scale()))
            losses.append(loss.item())
            if kinds[-1] == "nonfinite":
                assert torch.equal(weights(model), before), "a skipped step changes nothing"
                assert scaler.get_scale() == scale * 0.5  # backoff
            else:
                assert not torch.equal(weights(model), before)
    assert kinds[0] == "nonfinite" and "search" in kinds
    first_ok = kinds.index("search")
    assert all(k == "nonfinite" for k in kinds[:first_ok])
    # three clean steps in a row grow the scale again (growth_interval=3)
    assert any(after == before * 2.0 for before, after in scales[first_ok:])
    state = optimizer.state[next(iter(model.parameters()))]
    assert state["line_search"]["skipped_nonfinite"] == kinds.count("nonfinite")
    assert losses[-1] < losses[first_ok]


def test_schedule_free_search_through_the_scaler_skips_overflows_and_trains():
    """ALSALS under step_with_scaler: an overflow skips the step (nothing
    written) and backs the scale off; the clean steps see the unscaled gradient (the first
    one decides as a run without the scaler does) and train."""
    model, x, y = make_problem(dropout=0.0)
    plain = ALSALS(model.parameters())
    plain.step(fp16_loss(model, x, y))
    reference = plain.last_step

    model, x, y = make_problem(dropout=0.0)
    optimizer = ALSALS(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=3)
    closure = fp16_loss(model, x, y)
    kinds, losses = [], []
    for _ in range(40):
        before, scale = weights(model), scaler.get_scale()
        losses.append(step_with_scaler(optimizer, closure, scaler).item())
        kinds.append(optimizer.last_step.kind)
        if kinds[-1] == "nonfinite":
            assert torch.equal(weights(model), before)
            assert scaler.get_scale() == scale * 0.5
        elif len([k for k in kinds if k != "nonfinite"]) == 1:  # the first clean step
            assert optimizer.last_step.trials == reference.trials
            assert optimizer.last_step.step_size == pytest.approx(reference.step_size, rel=1e-3)
    assert kinds[0] == "nonfinite" and "search" in kinds
    assert optimizer.search_state.skipped_nonfinite == kinds.count("nonfinite")
    first_ok = kinds.index("search")
    assert losses[-1] < 0.7 * losses[first_ok]


def test_scaler_still_warns_about_a_nonfinite_loss():
    model, x, y = make_problem()
    optimizer = SLS(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        step_with_scaler(optimizer, fp16_loss(model, x, y), scaler)
    assert optimizer.last_step.kind == "nonfinite"


def test_scaler_with_a_closure_that_accumulates_micro_batches():
    """closure(backward) form: scaler.scale(loss).backward() per micro-batch."""
    results = []
    for accumulate in (True, False):
        model, x, y = make_problem(dropout=0.0)
        optimizer = SLS(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        halves = [(x[:32], y[:32]), (x[32:], y[32:])]

        def closure(backward, model=model, optimizer=optimizer, halves=halves, scaler=scaler):
            if backward:
                optimizer.zero_grad()
            total = torch.zeros(())
            for xb, yb in halves:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(model(xb), yb) / len(halves)
                if backward:
                    scaler.scale(loss).backward()
                total = total + loss.detach()
            return total

        for _ in range(3):
            step_with_scaler(optimizer, closure if accumulate else fp16_loss(model, x, y), scaler)
        results.append(weights(model))
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-4)


def test_step_with_scaler_rejects_other_optimizers():
    model, x, y = make_problem()
    with pytest.raises(TypeError, match="alsals line-search optimizer"):
        step_with_scaler(
            torch.optim.SGD(model.parameters(), lr=0.1),
            fp16_loss(model, x, y),
            torch.amp.GradScaler("cpu"),
        )


def test_step_with_scaler_looks_through_accelerates_optimizer_wrapper():
    """Accelerate's ``AcceleratedOptimizer`` would run ``scaler.step(optimizer, closure)``,
    which unscales before the closure has run (an error); ``step_with_scaler`` is the way
    and steps the optimizer it wraps (it refused the wrapper, pointing to scaler.step)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    model, x, y = make_problem(dropout=0.0)
    inner = SLS(model.parameters())
    try:
        wrapped = accelerate.Accelerator(cpu=True).prepare(inner)
        step_with_scaler(wrapped, fp16_loss(model, x, y), torch.amp.GradScaler("cpu"))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert wrapped is not inner and inner.last_step.kind == "search"
    assert not wrapped.step_was_skipped


def test_a_skipped_step_through_accelerates_wrapper_is_skipped_for_accelerate_too():
    """An overflow skips the step; Accelerate's ``step_was_skipped``, which its scheduler
    reads to skip its own step, must say so (it said False and the schedule moved on)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    model, x, y = make_problem(dropout=0.0)
    inner = SLS(model.parameters())
    try:
        wrapped = accelerate.Accelerator(cpu=True).prepare(inner)
        step_with_scaler(wrapped, fp16_loss(model, x, y), torch.amp.GradScaler("cpu", 2.0**30))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert inner.last_step.kind == "nonfinite" and wrapped.step_was_skipped


def test_step_with_scaler_refuses_a_scheduler_and_lightnings_wrapper():
    """A scheduler passed by mistake holds the optimizer as ``.optimizer`` too: refused, not
    stepped. Lightning's wrapper counts as the optimizer's class, but its step runs
    Lightning's precision plugin, which calls the closure without arguments."""
    model, x, y = make_problem(dropout=0.0)
    optimizer = SLS(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="alsals line-search optimizer"):
        step_with_scaler(scheduler, fp16_loss(model, x, y), torch.amp.GradScaler("cpu"))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    LightningOptimizer = type("LightningOptimizer", (), {})  # (Lightning's, by name)
    wrapped = type("LightningSLS", (LightningOptimizer, SLS), {})(model.parameters())
    with pytest.raises(TypeError, match="bf16-mixed"):
        step_with_scaler(wrapped, fp16_loss(model, x, y), torch.amp.GradScaler("cpu"))


def test_step_with_scaler_and_autocast_closure_name_a_bad_argument():
    model, x, y = make_problem()
    opt = ALSALS(model.parameters())
    with pytest.raises(TypeError, match="needs a torch.amp.GradScaler, got None"):
        step_with_scaler(opt, fp16_loss(model, x, y), None)
    with pytest.raises(TypeError, match="autocast_closure needs the closure"):
        autocast_closure(None)


def test_autocast_closure_keeps_a_float64_loss_in_float64():
    """Only a half-precision loss is widened: a float64 one keeps the digits the
    comparison of losses needs."""
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    loss = autocast_closure(lambda: (w * (1.0 + 1e-12)).sum())()
    assert loss.dtype == torch.float64 and loss.item() == 3.0 * (1.0 + 1e-12)


def test_a_step_with_scaler_that_raised_in_a_trial_can_be_retried():
    """The exception leaves the scaler as it was: the retry unscales again (it used to fail
    with 'unscale_() has already been called' at every later step)."""
    model, x, y = make_problem(dropout=0.0)
    optimizer = SLS(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        if len(calls) == 2:  # the first trial
            raise RuntimeError("transient")
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.cross_entropy(model(x), y)

    before = weights(model)
    with pytest.raises(RuntimeError, match="transient"):
        step_with_scaler(optimizer, closure, scaler)
    assert torch.equal(weights(model), before) and scaler.get_scale() == 2.0**8
    step_with_scaler(optimizer, closure, scaler)
    step_with_scaler(optimizer, closure, scaler)
    assert optimizer.search_state.step == 2


def test_a_warning_turned_into_an_error_undoes_a_step_with_scaler(buffer_watch):
    """Warnings are not held back and re-emitted after the step: under -W error the step is
    undone and the scaler can go on (it used to move the weights, skip update() and leave
    the scaler unable to unscale)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    optimizer = SLS(model.parameters(), lr=50.0)  # no buffers=: the trials warn

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.cross_entropy(model(x), y)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match="updated its buffers"):
            step_with_scaler(optimizer, closure, scaler)
    assert torch.equal(weights(model), before)
    step_with_scaler(optimizer, closure, scaler)  # warned once: the step goes on
    assert optimizer.search_state.step == 1


def test_overflow_skips_do_not_use_up_the_warning_about_a_nonfinite_loss():
    model, x, y = make_problem()
    optimizer = SLS(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the first step overflows
    step_with_scaler(optimizer, fp16_loss(model, x, y), scaler)
    assert optimizer.last_step.kind == "nonfinite"
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="the loss is not finite"):
        step_with_scaler(optimizer, fp16_loss(model, x, y), scaler)


def test_overflows_in_the_middle_of_an_alsals_run_change_nothing_and_stay_silent():
    """Two GradScaler overflows in a row mid-run: each skips the step as ``scaler.step``
    would, silently (even under ``-W error``); ``z``, the weights and the cadence are as
    before them (a non-finite gradient is not a loss outside its domain)."""
    model, x, y = make_problem(dropout=0.0)
    optimizer = ALSALS(model.parameters(), initial_searches=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    closure = fp16_loss(model, x, y)
    for _ in range(4):
        step_with_scaler(optimizer, closure, scaler)
    z = [optimizer.state[p]["z"].clone() for p in model.parameters()]
    before = weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            scaler.update(2.0**127)  # the scaled gradients overflow float32
            step_with_scaler(optimizer, closure, scaler)
            assert optimizer.last_step.kind == "nonfinite"
    assert torch.equal(weights(model), before)
    assert all(
        torch.equal(optimizer.state[p]["z"], zp)
        for p, zp in zip(model.parameters(), z, strict=True)
    )
    assert optimizer.search_state.restarts == 0
    scaler.update(2.0**10)
    step_with_scaler(optimizer, closure, scaler)
    assert optimizer.last_step.kind == "reuse"  # the cadence goes on: no search forced


@pytest.mark.parametrize("cls", [ALSALS, MomentumALSALS], ids=lambda c: c.__name__)
def test_an_lbfgs_style_closure_through_the_scaler_is_a_clear_error(cls):
    model, x, y = make_problem(dropout=0.0)
    optimizer = cls(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="ran backward itself"):
        step_with_scaler(optimizer, closure, torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("cls", [MomentumALSALS, ALSALS], ids=lambda c: c.__name__)
def test_gradients_computed_outside_a_scaled_closure_step_are_warned_about(cls):
    """``step_with_scaler`` runs a ``closure()`` after setting the gradients to ``None`` (the
    scaler's backward of its loss is the step's gradient): a backward pass outside the step
    is dropped there too, and the optimizer says so once; a ``closure(backward)``, which
    adds to what it finds, keeps it and says nothing."""
    for takes_backward in (False, True):
        model, x, y = make_problem(dropout=0.0)
        optimizer = cls(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

        def closure(backward, model=model, x=x, y=y, scaler=scaler):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x[32:]), y[32:])
            if backward:
                scaler.scale(loss).backward()
            return loss

        step = closure if takes_backward else fp16_loss(model, x[32:], y[32:])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                optimizer.zero_grad()
                scaler.scale(nn.functional.cross_entropy(model(x[:32]), y[:32])).backward()
                step_with_scaler(optimizer, step, scaler)
        dropped = [w for w in caught if "computed since the last step" in str(w.message)]
        assert len(dropped) == (0 if takes_backward else 1)
