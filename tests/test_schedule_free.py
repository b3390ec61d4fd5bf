"""ALSALS: Schedule-Free AdamW's dynamics, its step size set by an Armijo search.

The reference below writes Schedule-Free AdamW in its explicit form (``x``, ``z`` and ``y``
kept apart, as in Defazio et al.'s Algorithm 1); the optimizer keeps ``z`` and, in the
weights between steps, ``x``.
Replaying the step sizes the optimizer chose through the reference must give its weights,
and every accepted step must pass the Armijo test the optimizer claims, computed here from
the gradient and the losses directly. Everything runs in float64.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import alsals.schedule_free
from alsals import ALSALS
from alsals.schedule_free import SearchResult, trailing_beyond_chance
from alsals.schedule_free_state import STATE_KEY, SearchState


def logistic_problem(seed: int = 0, n: int = 128, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, 1, generator=g, dtype=torch.float64) > 0).double()
    return x, y


def make_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def batches(x, y, steps: int, size: int = 32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, len(x), (size,), generator=g) for _ in range(steps)]


def loss_of(model, x, y):
    return nn.functional.binary_cross_entropy_with_logits(model(x), y)


class Reference:
    """Schedule-Free AdamW, explicit form, float64; ``step(grads, gamma)``."""

    def __init__(self, weights, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, scales=None):
        self.scales = scales or [1.0] * len(weights)
        self.x = [w.clone() for w in weights]
        self.z = [w.clone() for w in weights]
        self.v = [torch.zeros_like(w) for w in weights]
        self.beta1, self.beta2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.t = 0
        self.weight_sum = 0.0
        self.lr_max = 0.0

    def y(self):
        return [(1 - self.beta1) * z + self.beta1 * x for x, z in zip(self.x, self.z, strict=True)]

    def step(self, grads, gamma):
        self.t += 1
        y = self.y()
        self.lr_max = max(self.lr_max, gamma)
        weight = self.lr_max**2
        self.weight_sum += weight
        alpha = weight / self.weight_sum
        for i, g in enumerate(grads):
            self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * g * g
            v_hat = self.v[i] / (1 - self.beta2**self.t)
            u = g / (v_hat.sqrt() + self.eps) + self.wd * y[i]
            self.z[i] = self.z[i] - gamma * self.scales[i] * u
            self.x[i] = (1 - alpha) * self.x[i] + alpha * self.z[i]


def run(opt_kwargs=None, steps=40, seed=0):
    """Train with the optimizer, replay its step sizes through the reference, and record
    each step's (y, g, loss at y, loss at y', kind, step size)."""
    x, y = logistic_problem(seed)
    model = make_model()
    opt = ALSALS(model.parameters(), **(opt_kwargs or {}))
    ref = Reference(
        [p.detach() for p in model.parameters()],
        weight_decay=(opt_kwargs or {}).get("weight_decay", 0.0),
    )
    records = []
    for idx in batches(x, y, steps):

        def closure(idx=idx):
            return loss_of(model, x[idx], y[idx])

        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        info = opt.last_step
        with torch.no_grad():
            after_loss = float(closure())
        records.append((before, grads, info, after_loss))
        if info.kind not in ("nonfinite", "zero_grad"):
            ref.step(grads, info.step_size)
    return model, opt, ref, records


def test_weights_follow_schedule_free_adamw_at_the_step_sizes_it_chose():
    """Between steps the weights are the average ``x``; the gradient of each step is taken
    at ``y`` (the reference's, replayed with the same step sizes)."""
    model, opt, ref, records = run({"weight_decay": 0.01})
    for p, x in zip(model.parameters(), ref.x, strict=True):
        torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-12)
    for (_, grads, _, _), at_y in zip(records, gradients_at_y(records), strict=True):
        for g, gy in zip(grads, at_y, strict=True):
            torch.testing.assert_close(g, gy, rtol=1e-9, atol=1e-12)
    kinds = {info.kind for _, _, info, _ in records}
    assert "search" in kinds and "reuse" in kinds


def gradients_at_y(records, seed=0):
    """Each recorded step's gradient recomputed at the reference's ``y`` of that step."""
    x, y = logistic_problem(seed)
    model = make_model()
    ref = Reference([p.detach() for p in model.parameters()], weight_decay=0.01)
    out = []
    for idx, (_, _, info, _) in zip(batches(x, y, len(records)), records, strict=True):
        with torch.no_grad():
            for p, yr in zip(model.parameters(), ref.y(), strict=True):
                p.copy_(yr)
        model.zero_grad()
        loss_of(model, x[idx], y[idx]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        out.append(grads)
        if info.kind not in ("nonfinite", "zero_grad"):
            ref.step(grads, info.step_size)
    return out


def test_lr_scale_moves_each_group_by_its_multiple_of_the_searched_step_size():
    """Two groups, the second at lr_scale 0.1: the weights follow the reference with each
    tensor's z moving by gamma * scale (the averaging weights are scale-free), and each
    group's lr shows the searched step size times its scale."""
    x, y = logistic_problem(1)
    model = make_model(2)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = ALSALS([{"params": first}, {"params": second, "lr_scale": 0.1}])
    ref = Reference(
        [p.detach() for p in model.parameters()], scales=[1.0] * len(first) + [0.1] * len(second)
    )
    for idx in batches(x, y, 25, seed=3):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        ref.step([p.grad.detach().clone() for p in model.parameters()], opt.last_step.step_size)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    for p, xr in zip(model.parameters(), ref.x, strict=True):
        torch.testing.assert_close(p.detach(), xr, rtol=1e-9, atol=1e-12)


def test_a_changed_lr_scale_weighs_the_average_by_the_group_s_largest_move():
    """The averaging weight is the square of the group's largest move, ``gamma * lr_scale``
    (Schedule-Free AdamW's ``lr_max``, at the lr the group shows): where ``lr_scale`` goes
    from 1 to 4 mid-run the weights follow the reference replayed at ``gamma * lr_scale``
    (weighed by ``gamma^2`` alone, the later steps weigh 16x too little in the average)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = ALSALS([w], lr=1e-2, initial_searches=1, search_interval=100)
    ref = Reference([w.detach()])
    for step in range(12):
        if step == 6:
            opt.param_groups[0]["lr_scale"] = 4.0
        opt.step(lambda: ((x @ w - y) ** 2).mean())
        move = opt.last_step.step_size * opt.param_groups[0]["lr_scale"]
        ref.step([w.grad.detach().clone()], move)
    torch.testing.assert_close(w.detach(), ref.x[0], rtol=1e-9, atol=1e-12)


def test_accepted_steps_pass_and_their_predecessors_fail_the_test():
    """Recompute the move from the reference for the accepted step size and for
    ``gamma / backtrack``: the first passes Armijo's test, the second (when the search
    backtracked past it) does not."""
    x, y = logistic_problem(3)
    model = make_model(4)
    # no Polyak start and a large lr: the searches backtrack, trial by trial
    opt = ALSALS(
        model.parameters(),
        lr=30.0,
        growth=3.0,
        loss_floor=None,
        interpolate=False,
        first_phase="never",
    )
    probe = make_model(4)
    ref = Reference([p.detach() for p in model.parameters()])
    checked_pass = checked_fail = 0
    for idx in batches(x, y, 40, seed=5):

        def closure(idx=idx):
            return loss_of(model, x[idx], y[idx])

        ref_before = copy.deepcopy(ref)
        opt.step(closure)
        info = opt.last_step
        grads = [p.grad.detach().clone() for p in model.parameters()]
        if info.kind == "search":
            for gamma, should_pass in ((info.step_size, True), (info.step_size / 0.8, False)):
                if not should_pass and info.trials == 1:
                    continue
                trial = copy.deepcopy(ref_before)
                trial.step(grads, gamma)
                y0, y1 = ref_before.y(), trial.y()
                promised = -sum(
                    float((g * (b - a)).sum()) for g, a, b in zip(grads, y0, y1, strict=True)
                )
                with torch.no_grad():
                    for p, w in zip(probe.parameters(), y1, strict=True):
                        p.copy_(w)
                    drop = info.loss - float(loss_of(probe, x[idx], y[idx]))
                assert (drop >= 0.6 * promised) == should_pass, (gamma, drop, promised)
                checked_pass += should_pass
                checked_fail += not should_pass
        if info.kind not in ("nonfinite", "zero_grad"):
            ref.step(grads, info.step_size)
    assert checked_pass >= 5
    assert checked_fail >= 3


def test_interpolation_takes_the_step_size_of_plain_backtracking_in_fewer_trials():
    """On a quadratic the fitted model is exact: the trials it skips are ones that fail."""
    curvatures = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)

    def first_search(interpolate):
        w = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
        opt = ALSALS([w], lr=100.0, loss_floor=None, interpolate=interpolate)
        opt.step(lambda: 0.5 * (curvatures * w * w).sum())
        return opt.last_step

    plain, interpolated = first_search(False), first_search(True)
    assert interpolated.step_size == pytest.approx(plain.step_size, rel=1e-12)
    assert plain.trials >= 10
    assert interpolated.trials <= plain.trials // 3


def test_searches_on_the_first_steps_then_every_interval():
    settings = {"initial_searches": 4, "search_interval": 5, "first_phase": "never"}
    _, opt, _, records = run(settings, steps=30)
    kinds = [info.kind for _, _, info, _ in records]
    searching = [k != "reuse" for k in kinds]
    assert all(searching[:4])
    # afterwards exactly one search in every 5 steps
    assert [i for i, s in enumerate(searching) if s and i >= 4] == [8, 13, 18, 23, 28]
    state = opt.search_state
    assert state.searches == sum(searching)
    assert state.forwards == sum(info.forwards for _, _, info, _ in records)


@pytest.mark.parametrize("first_phase", ["kept", "settled"])
def test_the_first_phase_ends_at_the_first_search_that_says_so(first_phase):
    """``"kept"``: a search that kept the step size ends the searches of the first steps;
    ``"settled"``: that, or a search after the first that took its first trial."""
    settings = {"initial_searches": 12, "search_interval": 5, "first_phase": first_phase}
    _, _, _, records = run(settings, steps=40)
    infos = [info for _, _, info, _ in records]

    def ends(i, info):
        settled = info.kind == "search" and info.trials == 1 and i >= 1
        return info.kind == "kept" or (first_phase == "settled" and settled)

    end = next((i for i, info in enumerate(infos[:12]) if ends(i, info)), None)
    if first_phase == "settled":
        assert end is not None and end < 11, "the run must show the rule acting"
    if end is None:
        end = 11
    searching = [info.kind != "reuse" for info in infos]
    assert all(searching[: end + 1])
    later = [i for i, s in enumerate(searching) if s and i > end]
    assert later == list(range(end + 5, 40, 5))


def test_max_grad_norm_clips_the_update_s_gradient_as_clip_grad_norm_does():
    """The reference fed the gradient clip_grad_norm_ leaves gives the optimizer's weights;
    the norm before clipping is reported."""
    x, y = logistic_problem(2)
    model = make_model(3)
    opt = ALSALS(model.parameters(), max_grad_norm=0.05)
    ref = Reference([p.detach() for p in model.parameters()])
    twin = make_model(3)
    clipped_steps = 0
    for idx in batches(x, y, 30, seed=4):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        info = opt.last_step
        grads = [p.grad.detach().clone() for p in model.parameters()]
        for p, g in zip(twin.parameters(), grads, strict=True):
            p.grad = g.clone()
        norm = float(nn.utils.clip_grad_norm_(twin.parameters(), 0.05))
        assert info.grad_norm == pytest.approx(norm, rel=1e-9)
        clipped_steps += norm > 0.05
        ref.step([p.grad for p in twin.parameters()], info.step_size)
    assert clipped_steps >= 10
    for p, xr in zip(model.parameters(), ref.x, strict=True):
        torch.testing.assert_close(p.detach(), xr, rtol=1e-9, atol=1e-12)


def test_max_grad_norm_scales_each_gradient_in_its_own_dtype():
    """The clipping factor, a float64 number, multiplies each gradient in that gradient's
    dtype: a float64 group listed after a bfloat16 one is not clipped by a factor rounded to
    bfloat16's 8 bits."""
    low = torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    wide = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([{"params": [low]}, {"params": [wide]}], max_grad_norm=0.1)
    opt.step(lambda: (low.double() ** 2).sum() + ((wide - 0.3) ** 2).sum() / 3)
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in (low, wide)))
    assert norm > 1.0, "the step must clip"
    expected = (1.0 - 0.999) * (wide.grad * (0.1 / (norm + 1e-6))) ** 2
    # (the bfloat16 gradient's norm is taken in float32: 1e-7; bfloat16's rounding: 4e-3)
    torch.testing.assert_close(opt.state[wide]["exp_avg_sq"], expected, rtol=1e-6, atol=0.0)


def test_a_parameter_frozen_mid_run_stays_at_its_value_inside_the_step():
    """``requires_grad=False`` on a parameter that has ``z``: the step evaluates the model
    with it where it is evaluated and saved (``x``), not at ``y``, while the others train."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    plan = batches(x, y, 30)
    for idx in plan[:10]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    frozen, *trained = model.parameters()
    assert not torch.equal(opt.state[frozen]["z"], frozen), "y would differ from x"
    frozen.requires_grad_(False)
    held = frozen.detach().clone()
    before = [p.detach().clone() for p in trained]
    seen = []

    def closure(idx):
        seen.append(torch.equal(frozen, held))
        return loss_of(model, x[idx], y[idx])

    for idx in plan[10:]:
        opt.step(lambda idx=idx: closure(idx))
    assert len(seen) >= 20 and all(seen)
    assert torch.equal(frozen, held)
    assert all(not torch.equal(p, b) for p, b in zip(trained, before, strict=True))


def test_state_dict_round_trips_the_trajectory():
    x, y = logistic_problem(0)
    model = make_model()
    # settings other than the defaults: the state carries them
    opt = ALSALS(model.parameters(), weight_decay=0.01, c=0.5, search_interval=3)
    plan = batches(x, y, 30)

    def train(m, o, idxs):
        for idx in idxs:
            o.step(lambda idx=idx: loss_of(m, x[idx], y[idx]))

    train(model, opt, plan[:13])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, plan[13:])

    clone = make_model(99)
    clone.load_state_dict(saved_model)
    opt2 = ALSALS(clone.parameters())  # other settings come from the state
    opt2.load_state_dict(saved_opt)
    train(clone, opt2, plan[13:])
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.search_state == opt2.search_state


def _first_evaluation_weights(model, opt, x, y, idx):
    """Take one step; return the weights the closure saw at its first evaluation (``y``)."""
    seen = []

    def closure():
        if not seen:
            seen.append([p.detach().clone() for p in model.parameters()])
        return loss_of(model, x[idx], y[idx])

    opt.step(closure)
    return seen[0]


@pytest.mark.parametrize("order", ["model-then-step", "train-then-step"])
def test_weights_loaded_into_the_model_alone_are_where_the_run_continues(order):
    """A checkpoint loaded into the model but not the optimizer (here: the initial weights,
    after 12 steps) is the new average: the next gradient is taken at exactly those weights
    (``z`` restarted there, so ``y = x``), not at a ``y`` pulled back towards the old ``z``,
    and the averaging restarts (``x' = z'`` after the step, as at a run's first)."""
    x, y = logistic_problem(0)
    model = make_model()
    initial = copy.deepcopy(model.state_dict())
    opt = ALSALS(model.parameters())
    plan = batches(x, y, 14)
    for idx in plan[:12]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    assert opt.search_state.edits == 0
    model.load_state_dict(initial)
    if order == "train-then-step":
        opt.train()  # (the Hugging Face Trainer's order: train(), backward, step())
        assert all(
            torch.equal(p, initial[k]) for k, p in zip(initial, model.parameters(), strict=True)
        )
    at = _first_evaluation_weights(model, opt, x, y, plan[12])
    assert all(torch.equal(a, initial[k]) for k, a in zip(initial, at, strict=True))
    assert opt.search_state.edits == 1
    for p in model.parameters():
        assert torch.equal(p.detach(), opt.state[p]["z"])
    _first_evaluation_weights(model, opt, x, y, plan[13])
    assert opt.search_state.edits == 1  # the optimizer's own writes are not edits


def test_an_edit_of_some_parameters_restarts_their_z_alone():
    """A re-initialised layer: its ``z`` restarts at its new weights, the other layer's
    ``z`` and the group's averaging go on (after the step, ``x' != z'`` everywhere)."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    plan = batches(x, y, 11)
    for idx in plan[:10]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    first, second = model[0], model[2]
    with torch.no_grad():
        nn.init.zeros_(first.weight)
        nn.init.zeros_(first.bias)
    at = _first_evaluation_weights(model, opt, x, y, plan[10])
    assert torch.equal(at[0], torch.zeros_like(at[0])) and torch.equal(at[1], torch.zeros(8))
    assert not torch.equal(at[2], second.weight.detach())  # y != x: z still leads there
    assert opt.search_state.edits == 1
    for p in model.parameters():
        assert not torch.equal(p.detach(), opt.state[p]["z"])


@pytest.mark.parametrize("model_first", [True, False])
def test_a_rollback_of_model_and_optimizer_together_is_not_an_edit(model_first):
    """Loading the model and the optimizer from one checkpoint into the live objects, in
    either order, continues bit for bit as the run did from there."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    plan = batches(x, y, 20)
    train = [lambda idx=idx: loss_of(model, x[idx], y[idx]) for idx in plan]
    for closure in train[:10]:
        opt.step(closure)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for closure in train[10:]:
        opt.step(closure)
    straight = [p.detach().clone() for p in model.parameters()]
    if model_first:
        model.load_state_dict(saved_model)
    opt.load_state_dict(copy.deepcopy(saved_opt))
    if not model_first:
        model.load_state_dict(saved_model)
    for closure in train[10:]:
        opt.step(closure)
    assert opt.search_state.edits == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight, strict=True))


def test_a_state_saved_by_another_optimizer_is_refused_by_name():
    from alsals import MomentumALSALS

    model = make_model()
    other = MomentumALSALS(model.parameters())
    opt = ALSALS(model.parameters())
    with pytest.raises(ValueError, match="lacks .*weight_sum.* saved by another optimizer"):
        opt.load_state_dict(other.state_dict())
    assert opt.param_groups[0]["weight_sum"] == 0.0  # nothing was loaded


def test_schedule_free_s_eval_and_train_leave_the_weights_and_the_run_as_they_are():
    """A loop written for Schedule-Free calls ``eval()`` / ``train()`` around evaluation:
    here they change nothing, and the run continues bit for bit as one without them."""
    x, y = logistic_problem(0)
    runs = []
    for swap in (False, True):
        model = make_model()
        opt = ALSALS(model.parameters())
        for i, idx in enumerate(batches(x, y, 15)):
            opt.step(lambda idx=idx, model=model: loss_of(model, x[idx], y[idx]))
            if swap and i % 4 == 0:
                before = [p.detach().clone() for p in model.parameters()]
                opt.eval()
                opt.eval()
                assert all(
                    torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
                )
                opt.train()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


class TrialFailure(Exception):
    pass


def test_an_exception_in_a_trial_leaves_weights_state_and_random_stream_as_they_were():
    x, y = logistic_problem(0)
    model, opt, _, _ = run(steps=5)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()

    def closure():
        if not torch.is_grad_enabled():
            raise TrialFailure
        torch.rand(3)  # the closure draws random numbers
        return loss_of(model, x[:32], y[:32])

    with pytest.raises(TrialFailure):
        opt.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for key, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][key][name], value)
            else:
                assert after["state"][key][name] == value


@pytest.mark.parametrize("failing", ["copy of x", "v' at the commit"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_an_allocation_that_fails_in_a_step_leaves_every_group_as_it_was(
    failing, max_grad_norm, monkeypatch
):
    """An allocation that fails (out of memory) where the step moves the weights to ``y``,
    at the second group's copy of ``x`` (the first group had moved: it stayed at ``y``), or
    at the commit's ``v'``, which is allocated before anything is written."""
    x, y = logistic_problem(0)
    model = make_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = ALSALS([{"params": first}, {"params": second}], max_grad_norm=max_grad_norm)
    for idx in batches(x, y, 12):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    calls = [0]
    if failing == "copy of x":
        original = alsals.schedule_free.detached_copies

        def allocate(tensors):
            calls[0] += 1
            if calls[0] == 2:
                raise torch.OutOfMemoryError("no memory for the copy")
            return original(tensors)

        monkeypatch.setattr(alsals.schedule_free, "detached_copies", allocate)
    else:
        original = ALSALS._commit

        def commit(self, groups, gamma, restart):
            with monkeypatch.context() as patched:
                mul = torch._foreach_mul

                def failing_mul(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == 2:  # (the second group's v')
                        raise torch.OutOfMemoryError("no memory for v'")
                    return mul(*args, **kwargs)

                patched.setattr(torch, "_foreach_mul", failing_mul)
                return original(self, groups, gamma, restart)

        monkeypatch.setattr(ALSALS, "_commit", commit)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step(lambda: loss_of(model, x[:32], y[:32]))
    assert calls[0] == 2
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for key, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][key][name], value), (key, name)
            else:
                assert after["state"][key][name] == value, (key, name)


@pytest.mark.parametrize("bad", ["nan_loss", "nan_grad"])
def test_a_step_without_usable_gradient_is_skipped_and_writes_nothing(bad):
    """Such steps write nothing, two in a row neither: ``z`` restarts only where the loss
    at ``y`` is not finite and the one at ``x`` is (here it is not finite at ``x`` either, or
    only the gradient is not finite)."""
    x, y = logistic_problem(0)
    model, opt, _, _ = run(steps=3)
    weights = [p.detach().clone() for p in model.parameters()]
    z = [opt.state[p]["z"].clone() for p in model.parameters()]

    def closure():
        loss = loss_of(model, x[:32], y[:32])
        if bad == "nan_loss":
            return loss * float("nan")
        if bad == "nan_grad":
            t = model[0].weight[0, 0]
            return loss + 0.0 * (t - t.detach()).sqrt()  # finite, with a NaN gradient
        return loss * 0.0

    culprit = {"nan_loss": "the loss is not finite", "nan_grad": "the gradient (or Adam's"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
        assert all(
            torch.equal(opt.state[p]["z"], w) for p, w in zip(model.parameters(), z, strict=True)
        )
        opt.step(closure)  # a second skip: no second warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and culprit[bad] in messages[0]
    assert opt.last_step.kind == "nonfinite"
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    z_after = [opt.state[p]["z"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(z_after, z, strict=True))
    assert opt.search_state.restarts == 0


@pytest.mark.parametrize("floor", [0.0, None])
def test_a_gradient_of_exactly_zero_still_moves_the_average_towards_z(floor):
    """A connected loss whose gradient at ``y`` is exactly 0 (a loss that reached 0 there,
    or its rounding): no slope to search, but Schedule-Free's averaging move is taken, as
    Schedule-Free AdamW's step would take it. Skipping it left ``y``, and so the zero
    gradient, in place for good: with ``loss_floor=None`` a separable logistic regression
    stalled for 2,000 steps at a loss of 4.5 at ``x``, 0 at ``y``."""
    x, y = logistic_problem(0)
    model, opt, _, _ = run({"loss_floor": floor}, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    z = [opt.state[p]["z"].clone() for p in model.parameters()]
    idx = batches(x, y, 1, seed=9)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero gradient of a connected loss is no error
        opt.step(lambda: loss_of(model, x[idx], y[idx]) * 0.0)
    assert opt.last_step.kind == "zero_grad"
    for p, x0, z0 in zip(model.parameters(), before, z, strict=True):
        assert torch.equal(opt.state[p]["z"], z0)  # no gradient: z stays
        apart = (z0 - x0).abs() > 1e-6
        assert apart.any()
        share = (p.detach() - x0)[apart] / (z0 - x0)[apart]
        assert share.min() > 0 and share.max() < 1  # on the segment from x to z
        torch.testing.assert_close(share, share.mean().expand_as(share), rtol=1e-6, atol=0)


def test_a_loss_that_reaches_no_parameter_warns_after_three_skipped_steps():
    """A closure computing the loss of another model: every step is skipped (no gradient),
    and after three in a row the user is told why, once."""
    model, other = make_model(), make_model(5)
    opt = ALSALS(model.parameters())
    x = torch.randn(8, 6, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            opt.step(lambda: other(x).pow(2).mean())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "does not depend on the parameters" in messages[0]
    assert opt.search_state.skipped_zero_grad == 5


def test_a_search_whose_trials_all_fail_keeps_the_step_size_and_takes_no_gradient_step():
    """Trials that never pass (their loss 1 above the training pass's): ``max_trials`` fail,
    the weights stay (at a first step there is no averaging move) and the step size is not
    left at ``backtrack^max_trials`` of itself, where growth would take thousands of steps."""
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=0.5, max_trials=7)

    def closure():
        return (w * w).sum() + (0.0 if torch.is_grad_enabled() else 1.0)

    with pytest.warns(UserWarning, match="does not replay its randomness"):
        opt.step(closure)
    assert opt.last_step.kind == "exhausted"
    assert opt.last_step.trials == 7 and opt.last_step.step_size == 0.0
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert opt.search_state.step_size == 0.5 and opt.search_state.exhausted == 1
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("max_trials", [1, 2, 3])
def test_a_search_makes_at_most_max_trials_evaluations(max_trials):
    """``max_trials`` bounds a search's evaluations, the averaging move's test included
    (with 1 it made two: the failed trial, then that test); a search whose trials all fail
    within it ends "exhausted" or "kept", its step size kept."""
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=0.5, max_trials=max_trials, search_interval=1)
    failing = False

    def closure():
        return (w * w).sum() + (1.0 if failing and not torch.is_grad_enabled() else 0.0)

    for k in range(8):
        failing = k >= 3
        before = opt.search_state.forwards
        opt.step(closure)
        info = opt.last_step
        replay = k == 0  # (the first step evaluates its closure twice at y)
        assert info.trials <= max_trials and info.forwards <= max_trials + 1 + replay
        assert opt.search_state.forwards - before == info.forwards
        if failing:
            assert info.kind in ("exhausted", "kept") and opt.param_groups[0]["lr"] > 0.0


def test_a_search_whose_averaging_move_fails_keeps_the_step_size():
    """From step 4 on every trial fails (the trials' loss is 1 above the training pass's):
    the averaging move alone fails as well, and the search ends "kept" after two
    evaluations. The step is taken at the last step size, which stays: ``z`` moves by that
    step size times Adam's preconditioned gradient."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=0.5, polyak_cap=False)
    failing = False

    def closure():
        penalty = 1.0 if failing and not torch.is_grad_enabled() else 0.0
        return (w * w).sum() + penalty

    for _ in range(3):
        opt.step(closure)
    searched = opt.param_groups[0]["lr"]
    z_before = opt.state[w]["z"].clone()
    failing = True
    opt.step(closure)
    info = opt.last_step
    assert info.kind == "kept" and info.trials == 2
    assert opt.param_groups[0]["lr"] == searched
    assert info.step_size == searched
    state = opt.state[w]
    v_hat = state["exp_avg_sq"] / (1 - 0.999 ** state["step"])
    u = w.grad / (v_hat.sqrt() + 1e-8)  # w.grad: the gradient at y, which the step used
    torch.testing.assert_close(state["z"], z_before - info.step_size * u, rtol=1e-12, atol=0)


def test_a_written_lr_sets_where_the_next_search_starts():
    """Half the searched step size written: a search is due at once, starts there, and its
    first trial passes (no larger step size is tried)."""
    model, opt, _, _ = run(steps=15)
    written = 0.5 * opt.param_groups[0]["lr"]
    for group in opt.param_groups:
        group["lr"] = written
    x, y = logistic_problem(0)
    opt.step(lambda: loss_of(model, x[:32], y[:32]))
    assert opt.last_step.kind == "search" and opt.last_step.trials == 1
    assert opt.last_step.step_size <= 1.1 * written * (1 + 1e-12)


def noisy_regression_with_a_written_lr(factor: float) -> tuple[int, float]:
    """60 steps of a noisy least-squares regression in batches of 16, ``lr`` multiplied by
    ``factor`` (a user's manual cut), 60 more: the steps after the write that took no step
    size, and the full-data loss at the end."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen, dtype=torch.float64)
    noise = 0.5 * torch.randn(512, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, generator=gen, dtype=torch.float64) + noise
    w = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w])
    idle = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(120):
            if step == 60:
                for group in opt.param_groups:
                    group["lr"] *= factor
            idx = torch.randint(0, 512, (16,), generator=gen)
            opt.step(lambda idx=idx: ((x[idx] @ w - y[idx]) ** 2).mean())
            idle += step >= 60 and opt.last_step.step_size == 0.0
    return idle, ((x @ w - y) ** 2).mean().item()


@pytest.mark.parametrize("factor", [0.1, 1e-3])
def test_a_written_lr_too_small_to_pay_for_the_averaging_move_climbs(factor):
    """A written ``lr`` whose move along ``u`` promises less than the averaging move
    (``z`` trailing ``x``) raises: ``P(gamma) <= 0``. Its trial fails as too small, not as
    too large: the search climbs from it until a trial promises a decrease. (It backtracked
    below it instead, and every later step resumed lower: 60 steps of 60 took the averaging
    move alone, x drifting to z, the loss 1.51 against 0.23.)"""
    idle, loss = noisy_regression_with_a_written_lr(factor)
    _, unwritten = noisy_regression_with_a_written_lr(1.0)
    assert idle <= 2
    assert loss < 1.2 * unwritten


def test_the_first_search_starts_no_higher_than_the_polyak_step():
    """A loss whose linear model reaches 0 at a small step: the first trial is there, not
    at ``lr``."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1e-3, -2e-3, 1e-3], dtype=torch.float64)
    opt = ALSALS([w], lr=10.0)
    opt.step(lambda: ((w - target) ** 2).sum())
    g = 2 * (-target)
    u = g / (g.abs() + 1e-8)  # Adam's first preconditioned step: the sign
    polyak = float((target**2).sum()) / float((g * u).sum())
    assert opt.last_step.step_size <= polyak * (1 + 1e-9)
    assert opt.last_step.trials <= 3


def test_the_polyak_cap_takes_the_step_where_the_batch_s_linear_model_reaches_the_floor():
    """``polyak_cap``: a capped step lands where ``L0 - g . (y - y') = 0`` (``loss_floor``),
    recomputed from the explicit-form reference; the searched step size is kept."""
    x, y = logistic_problem(6)
    model = make_model(7)
    opt = ALSALS(model.parameters(), polyak_cap=True)
    ref = Reference([p.detach() for p in model.parameters()])
    checked = 0
    for idx in batches(x, y, 150, seed=8):
        ref_before = copy.deepcopy(ref)
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        info = opt.last_step
        grads = [p.grad.detach().clone() for p in model.parameters()]
        searched = opt.param_groups[0]["lr"]
        assert info.step_size <= searched
        if info.capped:
            assert info.step_size < searched
            if searched <= ref_before.lr_max:  # the same averaging weight at both sizes
                trial = copy.deepcopy(ref_before)
                trial.step(grads, info.step_size)
                promised = -sum(
                    float((g * (b - a)).sum())
                    for g, a, b in zip(grads, ref_before.y(), trial.y(), strict=True)
                )
                assert promised == pytest.approx(info.loss, rel=1e-9)
                checked += 1
        ref.step(grads, info.step_size)
    for p, xr in zip(model.parameters(), ref.x, strict=True):
        torch.testing.assert_close(p.detach(), xr, rtol=1e-9, atol=1e-12)
    assert checked >= 5


@pytest.mark.parametrize("restart", [True, False])
def test_the_loss_rise_guard_sets_a_ceiling_when_the_loss_climbs_while_the_step_grows(restart):
    """An offset added to the closure's loss (the same at every trial of a step, so the
    search does not see it) climbs after step 150 while the step size keeps growing: the
    guard sets a ceiling on the step size. With ``rise_restart`` it restarts ``z`` at the
    first measurable rise (before the step size's average has grown past its level at the
    lowest loss), then sets the ceiling once the watch, begun afresh, sees the rise again.
    (``start_rise`` off: the climb goes far above the run's start level, where that rule
    would halve the step size first.)"""
    x, y = logistic_problem(0, n=512)

    def train(guard):
        model = make_model()
        opt = ALSALS(
            model.parameters(), loss_rise_guard=guard, rise_restart=restart, start_rise=False
        )
        rose, peaks = [], []
        for k, idx in enumerate(batches(x, y, 300, size=64)):
            offset = 0.0 if k < 150 else 0.05 * (k - 150)
            opt.step(lambda idx=idx, offset=offset: loss_of(model, x[idx], y[idx]) + offset)
            rose.append(opt.last_step.loss_rose)
            peaks.append(opt.search_state.peak_step_size)
        return opt, rose, peaks

    guarded, rose, peaks = train(3.0)
    assert any(rose) and not any(rose[:150])
    assert guarded.search_state.step_size_ceiling < math.inf
    assert guarded.search_state.step_size <= guarded.search_state.step_size_ceiling
    # nor does regrowth lead back above it: the largest step size it leads back to, above
    # the ceiling before, is lowered to it
    assert guarded.search_state.peak_step_size <= guarded.search_state.step_size_ceiling
    assert max(peaks) > guarded.search_state.step_size_ceiling
    assert (
        (guarded.search_state.restarts == sum(rose))
        if restart
        else (guarded.search_state.restarts == 0)
    )
    unguarded, rose, _ = train(None)
    assert not any(rose)
    assert unguarded.search_state.step_size_ceiling == math.inf
    assert unguarded.search_state.restarts == 0


def test_rise_restart_stops_the_average_climbing_towards_a_z_that_went_astray():
    """The long-run failure it guards against: ``z`` far from where the loss is low and a
    step size too small to bring it back (here ``z`` is moved far and ``lr`` written small
    at step 150, with one trial per search, too few to climb from it), so the average ``x``
    climbs towards ``z`` at ``alpha ~ 1 / t`` per step
    while the step size does not grow. With ``rise_restart`` the guard, once the loss
    average has risen measurably, restarts ``z`` at ``x`` (the state's ``z`` equals the
    weights right after) and the climb stops there; without it the loss climbs on."""
    noise = torch.randn(400, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def train(restart: bool):
        w = nn.Parameter(torch.ones(4, dtype=torch.float64))
        opt = ALSALS([w], rise_restart=restart)
        losses, fired = [], []
        for k in range(400):
            if k == 150:
                with torch.no_grad():
                    opt.state[w]["z"].add_(20.0)
                opt.param_groups[0]["lr"] = 1e-6
                opt.param_groups[0]["max_trials"] = 1
            losses.append(float(opt.step(lambda k=k: 0.5 * ((w - 0.3 * noise[k]) ** 2).sum())))
            if opt.last_step.loss_rose:
                fired.append(k)
                assert torch.equal(opt.state[w]["z"], w.detach()) == restart
        return losses, fired, opt

    losses, fired, opt = train(True)
    assert fired and fired[0] > 150 and opt.search_state.restarts == len(fired)
    assert max(losses[fired[0] + 1 :]) <= losses[fired[0]]  # no more climbing
    climbing, _, unrestarted = train(False)
    assert unrestarted.search_state.restarts == 0
    assert climbing[-1] > 1.2 * losses[-1]


def test_a_ceiling_set_where_the_data_shift_is_lifted_once_the_loss_stays_above_that():
    """Noisy regression, then the targets move 100x farther with 10x the noise (new data
    whose loss floor lies far above the old lowest). The loss jumps and the guard fires at
    the jump (the step size's average had crept up a little since the lowest loss),
    setting a ceiling at the old problem's step size (1.25); the loss never gets back below
    the old lowest, so the fall that lifts a ceiling never comes. Under the ceiling the
    loss average stays measurably above even the level that set it: the rise was not the
    step size's doing, and one horizon later the ceiling is lifted (and ``start_rise``,
    which stays out while the guard's ceiling stands, takes the new data's start level).
    The new targets need a step size about 100x the old one, which growth of 10% per search
    reaches some 500 steps after the lift; over steps +700 to +800 after the shift the
    full-data loss is 1.02x the unguarded run's (before the lift existed the ceiling held
    for good and the loss was 28x). A run resumed under the ceiling lifts it at the same
    step."""
    pre, post, n, d = 1500, 800, 512, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    old = x @ torch.randn(d, dtype=torch.float64, generator=gen)
    old = old + 0.5 * torch.randn(n, dtype=torch.float64, generator=gen)
    new = x @ (100.0 * torch.randn(d, dtype=torch.float64, generator=gen))
    new = new + 5.0 * torch.randn(n, dtype=torch.float64, generator=gen)
    picks = torch.randint(0, n, (pre + post, 16), generator=torch.Generator().manual_seed(1))

    def train(w, opt, steps):
        fired, lifted, full = [], None, []
        for k in steps:
            idx, y = picks[k], (old if k < pre else new)
            opt.step(lambda idx=idx, y=y: ((x[idx] @ w - y[idx]) ** 2).mean())
            fired += [k] if opt.last_step.loss_rose else []
            search = opt.search_state
            ceiling = search.step_size_ceiling
            if ceiling < math.inf:  # start_rise stays out of a rise the guard has in hand
                assert search.start_ceiling == math.inf
            if k > pre and ceiling == math.inf and lifted is None:
                lifted = k
                if opt.param_groups[0]["loss_rise_guard"] is not None:
                    # new data: start_rise takes its start level afresh (this step's loss)
                    assert search.start_watch["start_samples"] == 1
            with torch.no_grad():
                full.append(float(((x @ w - new) ** 2).mean()))
        return fired, lifted, sum(full[-100:]) / 100

    w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = ALSALS([w])
    fired, _, _ = train(w, opt, range(pre + 50))
    assert pre in fired and opt.search_state.step_size_ceiling < 2.0  # the shift fired it
    saved = copy.deepcopy(opt.state_dict()), w.detach().clone()
    _, lifted, guarded = train(w, opt, range(pre + 50, pre + post))
    assert lifted is not None and lifted <= pre + 2 * 100, "the ceiling was never lifted"

    unguarded_w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    fired, _, unguarded = train(
        unguarded_w, ALSALS([unguarded_w], loss_rise_guard=None), range(pre + post)
    )
    assert not fired
    assert guarded < 1.5 * unguarded

    resumed = nn.Parameter(saved[1].clone())
    again = ALSALS([resumed])
    again.load_state_dict(saved[0])
    _, lifted_again, _ = train(resumed, again, range(pre + 50, pre + post))
    assert lifted_again == lifted and torch.equal(resumed.detach(), w.detach())


def test_trials_leave_batchnorm_statistics_as_the_training_pass_left_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = ALSALS(model.parameters(), buffers=model.buffers())
    for _ in range(3):
        twin = copy.deepcopy(model)
        with torch.no_grad():  # at y = (1 - beta1) z + beta1 x, where the step evaluates
            for p, t in zip(model.parameters(), twin.parameters(), strict=True):
                if "z" in opt.state[p]:
                    t.lerp_(opt.state[p]["z"], 0.1)
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
        nn.functional.mse_loss(twin(x), y)  # one training pass at the same weights
        assert opt.last_step.trials >= 1
        torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
        torch.testing.assert_close(model[1].running_var, twin[1].running_var)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c": 1.5}, "c"),
        ({"lr": 0.0}, "lr"),
        ({"backtrack": 1.0}, "backtrack"),
        ({"growth": 0.5}, "growth"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"search_interval": 0}, "search_interval"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"lead_rule": "on"}, "lead_rule"),
        ({"kept_rule": "shrinks"}, "kept_rule"),
        ({"polyak_start": "never"}, "polyak_start"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"regrowth": 0.5}, "regrowth"),
        ({"regrowth": float("nan")}, "regrowth"),
        ({"loss_rise_guard": 0.0}, "loss_rise_guard"),  # (as MomentumALSALS's guard)
        ({"loss_rise_guard": -1.0}, "loss_rise_guard"),
        ({"loss_floor": float("nan")}, "invalid loss_floor: nan"),
        ({"loss_floor": float("inf")}, "invalid loss_floor: inf"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALSALS([torch.zeros(2, requires_grad=True)], **kwargs)


def test_an_eps_that_is_zero_in_the_weights_dtype_is_refused_before_anything_moves():
    """float16 weights with the default eps 1e-8: Adam's direction would be 0/0 on a dead
    unit and every step skipped; the step says so instead, and writes nothing."""
    w = torch.tensor([1.0, 0.0], dtype=torch.float16, requires_grad=True)
    opt = ALSALS([w])
    with pytest.raises(ValueError, match="eps=1e-08 is 0 in torch.float16"):
        opt.step(lambda: (w.float() * torch.tensor([1.0, 0.0])).sum() ** 2)
    assert torch.equal(w.detach(), torch.tensor([1.0, 0.0], dtype=torch.float16))
    assert opt.state[w] == {}


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"lr": 0.5}, "one step size"), ({"c": 0.3}, "setting of the optimizer"),
     ({"lr_scale": 0.0}, "lr_scale"), ({"betas": (0.9, 1.5)}, "betas")],
)  # fmt: skip
def test_a_group_setting_that_would_be_ignored_is_refused_and_nothing_is_added(extra, match):
    """A per-group lr or search setting would be silently overridden by the one searched
    step size: refused, and the optimizer keeps the groups it had. Per-group weight decay
    and betas are fine."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = ALSALS([a], weight_decay=0.1)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [b], **extra})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "weight_decay": 0.0, "betas": (0.95, 0.99)})
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_a_module_instead_of_its_parameters_is_refused():
    with pytest.raises(TypeError, match="parameters"):
        ALSALS(nn.Linear(2, 1))


def test_z_trails_only_beyond_what_a_fair_coin_gives():
    """The sign test: 9 trailing of 10 has probability 11/1024 under a fair coin (trails),
    8 of 10 56/1024 (does not); 5 of 5 1/32, 4 of 4 1/16; leading signs never trail."""
    assert trailing_beyond_chance(1, 9) and trailing_beyond_chance(0, 10)
    assert not trailing_beyond_chance(2, 8)
    assert trailing_beyond_chance(0, 5) and not trailing_beyond_chance(0, 4)
    assert not trailing_beyond_chance(10, 0) and not trailing_beyond_chance(0, 0)


@pytest.mark.parametrize("rule", ["keep", "shrink"])
def test_a_run_of_kept_searches_longer_than_a_float_s_range_goes_on(rule):
    """A full-batch run keeps at every search (``kept_rule``'s test counts them): from the
    1024th in a row the fair coin's ``2^-n`` is below float64's range, which raised an
    OverflowError at every later search (the run dead after some 10,000 steps at the
    defaults). The count is stored one search short of it; the searches after it keep, and
    ``"shrink"`` shrinks at each."""
    a, b, _ = least_squares_problem()
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], kept_rule=rule, search_interval=1, loss_rise_guard=None)
    for _ in range(300):
        opt.step(lambda: 0.5 * ((a @ w - b) ** 2).mean())
        if opt.last_step.kind == "kept":  # (z circles the minimum: every search keeps)
            break
    assert opt.last_step.kind == "kept", "the problem must keep"
    (stored,) = opt.state.values()
    stored[STATE_KEY]["kept_in_a_row"] = 1023
    lr = opt.param_groups[0]["lr"]
    for _ in range(3):
        opt.step(lambda: 0.5 * ((a @ w - b) ** 2).mean())
        assert opt.last_step.kind == "kept"
    assert opt.search_state.kept_in_a_row == 1026
    expected = lr / 1.1**3 if rule == "shrink" else lr
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert trailing_beyond_chance(0, 5000) and trailing_beyond_chance(400, 700)
    assert not trailing_beyond_chance(600, 500)
    # (term by term from the largest, stopping past the level: a near-even split of 100,000
    # signs answers at once, where a sum of binomials took seconds)
    assert not trailing_beyond_chance(49_950, 50_050)


@pytest.mark.parametrize("rule", ["off", "hold", "shrink"])
def test_lead_rule_starts_each_search_by_where_z_led_since_the_last(rule):
    """Each step counts whether its batch found ``z`` downhill of ``y`` (``g . (y - z) >
    0``, computed here from the weights and ``z`` before the step) or uphill; a search
    starts at ``growth`` times the last step size unless ``z`` trailed beyond chance since
    the last search, where it starts at 1 (``"hold"``) or ``1 / growth`` (``"shrink"``)
    times it (``"off"``: always ``growth``). Seen on the searches that took their first
    trial (no Polyak start, no guard), both cases among them."""
    x, y = logistic_problem(3)
    model = make_model()
    settings = {"lr": 2.0, "c": 0.05, "initial_searches": 3, "search_interval": 8}
    opt = ALSALS(
        model.parameters(),
        lead_rule=rule,
        loss_floor=None,
        loss_rise_guard=None,
        regrowth=None,  # (the lead rule's own factors)
        **settings,
    )
    leading = trailing = 0
    seen = set()
    for idx in batches(x, y, 400):
        params = list(model.parameters())
        z_before = [
            opt.state[p]["z"].clone() if "z" in opt.state[p] else p.detach().clone() for p in params
        ]  # y = (1 - beta1) z + beta1 x, x the weights between steps
        y_before = [0.1 * zb + 0.9 * p.detach() for p, zb in zip(params, z_before, strict=True)]
        lr_before = opt.param_groups[0]["lr"]
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        info = opt.last_step
        lead = sum(
            float((p.grad * (yb - zb)).sum())
            for p, yb, zb in zip(params, y_before, z_before, strict=True)
        )
        leading += lead > 0.0
        trailing += lead < 0.0
        if info.kind == "reuse":
            assert (opt.search_state.leading, opt.search_state.trailing) == (leading, trailing)
            continue
        assert (opt.search_state.leading, opt.search_state.trailing) == (0, 0)
        if info.kind == "search" and info.trials == 1 and opt.search_state.searches > 1:
            trails = trailing_beyond_chance(leading, trailing)
            factor = {"off": 1.1, "hold": 1.0, "shrink": 1 / 1.1}[rule] if trails else 1.1
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_before * factor, rel=1e-12)
            seen.add(trails)
        leading = trailing = 0
    assert seen == {True, False}, "the run must show both cases"


def least_squares_problem(seed: int = 0, n: int = 50, d: int = 20):
    """A full-batch, well-conditioned least-squares problem in float64 and its minimum."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    solution = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    return a, b, float(0.5 * ((a @ solution - b) ** 2).mean())


@pytest.mark.parametrize("rule", ["keep", "shrink"])
def test_kept_rule_shrinks_the_step_size_after_a_run_of_kept_searches_beyond_chance(rule):
    """Each search counts the searches in a row whose averaging move alone failed the test
    (``"kept"``); any other search ends the run. From the 5th in a row (a fair coin gives 5
    heads with probability 1/32, beyond the 5% level) ``"shrink"`` divides the step size by
    ``growth`` at each kept search; ``"keep"`` leaves it. Seen on a full-batch least-squares
    problem, where ``z`` circles the minimum at a step size too large to settle."""
    a, b, _ = least_squares_problem()
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], kept_rule=rule, loss_rise_guard=None)  # (no ceiling on the step size)
    in_a_row, longest, shrunk = 0, 0, 0
    for _ in range(400):
        lr_before = opt.param_groups[0]["lr"]
        opt.step(lambda: 0.5 * ((a @ w - b) ** 2).mean())
        info = opt.last_step
        if info.kind == "reuse":
            assert opt.search_state.kept_in_a_row == in_a_row
            continue
        in_a_row = in_a_row + 1 if info.kind == "kept" else 0
        longest = max(longest, in_a_row)
        assert opt.search_state.kept_in_a_row == in_a_row
        if info.kind == "kept":
            beyond = in_a_row >= 5 and rule == "shrink"
            expected = lr_before / 1.1 if beyond else lr_before
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
            shrunk += beyond
    assert longest >= 6, "the run must show runs beyond chance"
    assert rule == "keep" or shrunk > 0


@pytest.mark.parametrize("seed", [0, 2])
def test_kept_rule_shrink_lets_a_deterministic_problem_reach_its_minimum(seed):
    """Full batch, float64: with the step size kept where every search keeps it, ``z``
    circles the minimum and only the average converges (slowly: 3.5e-8 and 5.4e-9 above it,
    relative, after 3000 steps); shrinking it after a run of kept searches takes the loss to
    its minimum within float64's resolution (not steadily: on seed 2 a search that passes
    grows the step size again, and the gap at 1000 steps is the default's)."""
    a, b, minimum = least_squares_problem(seed)
    gaps = {}
    for rule in ("keep", "shrink"):
        w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
        opt = ALSALS([w], kept_rule=rule)
        for _ in range(3000):
            opt.step(lambda w=w: 0.5 * ((a @ w - b) ** 2).mean())
        gaps[rule] = (float(0.5 * ((a @ w.detach() - b) ** 2).mean()) - minimum) / minimum
    assert gaps["shrink"] < 1e-13
    assert gaps["keep"] > 1e-10


def test_kept_rule_counts_only_searches_whose_averaging_move_failed():
    """The run counts the searches that tested the averaging move and kept; the decay's
    ``"kept"`` (no trial: the move along ``u`` promises no decrease) and any other search
    end it, and only a kept search with a step size to keep shrinks (one of 0, after a
    written or resumed start, counts but takes the averaging move alone)."""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], kept_rule="shrink")
    search = SearchState(step_size=1.0, kept_in_a_row=4)
    shrunk = opt._after_kept_run(search, SearchResult("kept", 1.0, 2))
    assert (search.kept_in_a_row, shrunk.step_size, shrunk.sets_step_size) == (5, 1.0 / 1.1, True)
    zero = opt._after_kept_run(search, SearchResult("kept", 0.0, 2, resume=0.5))
    assert (search.kept_in_a_row, zero.step_size) == (6, 0.0)
    decay = opt._after_kept_run(search, SearchResult("kept", 1.0, 0))
    assert (search.kept_in_a_row, decay.step_size) == (0, 1.0)


def test_a_shrink_of_kept_rule_lowers_where_regrowth_may_lead_back():
    """A step size ``kept_rule`` shrank on many searches' evidence is no cut one batch made:
    regrowth's ceiling (the largest step size a search set) comes down with it, as the lead
    rule's shrink takes it."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = ALSALS([w], kept_rule="shrink")
    search = SearchState(step_size=1.0, peak_step_size=10.0, kept_in_a_row=20)
    result = opt._after_kept_run(search, SearchResult("kept", 1.0, 3))
    assert result.sets_step_size and result.step_size < 1.0
    assert search.peak_step_size == result.step_size
    search.kept_in_a_row = 7
    passed = opt._after_kept_run(search, SearchResult("search", 1.0, 1, True))
    assert (search.kept_in_a_row, passed.step_size) == (0, 1.0)


def later_first_trial_passes(**settings):
    """A logistic regression whose floor (0.45) lowers some searches' starts by the Polyak
    bound (no cap, no guard: the step taken is the searched one): for each later search that
    passed its first trial, the step size before it, its ``last_step`` and the optimizer."""
    x, y = logistic_problem(5)
    model = make_model()
    opt = ALSALS(
        model.parameters(),
        lr=1.0,
        loss_floor=0.45,
        polyak_cap=False,
        loss_rise_guard=None,
        initial_searches=3,
        search_interval=2,
        late_retry=False,  # (a retry starts where the search that cut did, not grown)
        **settings,
    )
    for idx in batches(x, y, 300):
        before = opt.param_groups[0]["lr"]
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        info = opt.last_step
        if info.kind == "search" and info.trials == 1 and opt.search_state.searches > 1:
            yield before, info, opt


@pytest.mark.parametrize("polyak_start", ["sets", "trial"])
def test_polyak_start_trial_keeps_the_step_size_where_only_the_bound_lowered_the_start(
    polyak_start,
):
    """A later search whose start the Polyak bound lowered, and which passed there at once,
    keeps the step size it grew from (``"trial"``); with ``"sets"`` the bounded start
    becomes the step size. A start the bound did not lower is the grown one either way.
    (No cap, no guard: the step taken is the searched one.)"""
    seen = set()
    # (no regrown start either)
    for before, info, opt in later_first_trial_passes(polyak_start=polyak_start, regrowth=None):
        after = opt.param_groups[0]["lr"]
        bounded = info.step_size < before * 1.1 * (1 - 1e-12)
        seen.add(bounded)
        if bounded and polyak_start == "trial":
            assert after == before
        else:
            assert after == pytest.approx(info.step_size, rel=1e-12)
        if not bounded:
            assert info.step_size == pytest.approx(before * 1.1, rel=1e-12)
    assert seen == {True, False}, "the run must show both"


# ------------------------------------------------------------- the name and its neighbours


def test_alsals_is_the_schedule_free_search_and_paper_builds_the_paper_s_configuration():
    from alsals import PAPER_ALSALS, MomentumALSALS

    model = make_model()
    recommended = ALSALS(model.parameters())
    assert recommended.defaults["lr"] == 0.1 and recommended.defaults["search_interval"] == 10
    assert not isinstance(recommended, MomentumALSALS)
    paper = ALSALS.paper(model.parameters())
    assert isinstance(paper, MomentumALSALS)
    for key, value in PAPER_ALSALS.items():
        assert paper.defaults[key] == value, key
    assert ALSALS.paper(model.parameters(), lr=0.5).defaults["lr"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slope": "analytic"}, r"ALSALS got slope: argument\(s\) of MomentumALSALS"),
        (
            {"smoothing": 0.5, "search_direction": "preconditioned"},
            r"got search_direction, smoothing: .*MomentumALSALS\(params, search_direction",
        ),
        ({"learning_rate": 0.1}, "unexpected keyword argument 'learning_rate'"),
    ],
)
def test_arguments_of_the_momentum_search_are_refused_with_the_class_that_takes_them(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ALSALS(make_model().parameters(), **kwargs)


def test_the_old_name_still_builds_alsals_with_a_deprecation_warning():
    import alsals

    with pytest.warns(DeprecationWarning, match="ScheduleFreeALSALS is now alsals.ALSALS"):
        assert alsals.ScheduleFreeALSALS is ALSALS
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = alsals.NoSuchThing


def test_another_optimizer_s_group_settings_are_dropped_with_a_warning_that_says_why():
    model = make_model()
    groups = [{"params": list(model.parameters()), "amsgrad": False, "fused": None}]
    with pytest.warns(UserWarning, match="ignores .*amsgrad: not supported; fused"):
        opt = ALSALS(groups)
    assert "amsgrad" not in opt.param_groups[0] and "fused" not in opt.param_groups[0]
    with pytest.warns(UserWarning, match=r"does not use the parameter-group keys \['tag'\]"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "tag": "x"})


def test_a_schedule_writing_lr_before_every_step_is_warned_about_once():
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, idx in enumerate(batches(x, y, 6)):
            opt.param_groups[0]["lr"] = 0.05 / (i + 1)
            opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
            if i < 2:
                assert not caught
    assert [str(w.message).count("overwritten before 3 steps") for w in caught] == [1]


def test_lr_written_now_and_then_is_warned_about_once():
    """Writes never on consecutive steps (StepLR, ReduceLROnPlateau) compound with the
    search's cuts: the third is warned about."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, idx in enumerate(batches(x, y, 12)):
            if i % 4 == 3:
                opt.param_groups[0]["lr"] *= 0.5
            opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
            if i < 11:
                assert not caught
    assert [str(w.message).count("overwritten before 3 steps") for w in caught] == [1]


def test_a_loss_below_the_floor_is_warned_about_before_anything_is_written():
    """A loss that can be negative (here the logistic loss minus 1): one warning, raised
    before the step writes anything, so that under ``-W error`` the step is undone."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    idx = batches(x, y, 1)[0]
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="below loss_floor=0(.|\n)*policy gradient"):
            opt.step(lambda: loss_of(model, x[idx], y[idx]) - 1.0)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert all(torch.equal(after["state"][k]["z"], state["state"][k]["z"]) for k in state["state"])
    opt.step(lambda: loss_of(model, x[idx], y[idx]) - 1.0)  # (warned once already)
    assert opt.last_step.kind in ("search", "reuse") and not opt.last_step.capped
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_trials_that_change_unprotected_batchnorm_statistics_are_warned_about_once(buffer_watch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = ALSALS(model.parameters())
    weights = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="BatchNorm1d updated its buffers"):
            opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert opt.search_state.steps == 0
    guarded = ALSALS(model.parameters(), buffers=model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # protected buffers: no warning
        for _ in range(3):
            guarded.step(lambda: nn.functional.mse_loss(model(x), y))
    assert guarded.search_state.steps == 3 and guarded.last_step.trials >= 1


@pytest.mark.parametrize("warm", [False, True])
def test_a_closure_whose_evaluation_without_gradient_is_nan_skips_the_step_at_once(warm):
    """Trials evaluate without gradient; a closure that gives NaN there (and not with
    gradient) is found out at the first step before any trial (the replay check evaluates y
    again without gradient) and after the first trial later (the averaging move alone): the
    step is skipped, nothing written, one warning naming the closure's evaluation without
    gradient."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    idx = batches(x, y, 1)[0]
    if warm:
        for _ in range(3):
            opt.step(lambda: loss_of(model, x[idx], y[idx]))
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())

    def closure():
        loss = loss_of(model, x[idx], y[idx])
        return loss if torch.is_grad_enabled() else loss * float("nan")

    with pytest.warns(RuntimeWarning, match="loss without gradient .* is not finite"):
        opt.step(closure)
    assert opt.last_step.kind == "nonfinite"
    assert opt.last_step.forwards == 1 + (2 if warm else 1)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert opt.state_dict()["param_groups"] == state["param_groups"]


def test_a_closure_that_draws_new_data_each_call_is_reported_once_before_anything_moves():
    """A closure that draws its batch from Python's random is evaluated again at ``y`` at the
    run's first search and gives another loss: one warning (the line search would compare
    losses of different batches), issued before the step writes anything (under ``-W error``
    the step is undone); a closure whose randomness is torch's (dropout) is replayed and
    says nothing."""
    import random

    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    rng = random.Random(0)

    def fresh_batch():
        idx = torch.tensor(rng.sample(range(len(x)), 16))
        return loss_of(model, x[idx], y[idx])

    weights = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="does not replay its randomness"):
            opt.step(fresh_batch)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert opt.last_step is None and not any(opt.state_dict()["state"].values())
    opt.step(fresh_batch)  # warned once: the retry runs the step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(fresh_batch)  # once only
    assert opt.search_state.steps == 2

    dropped = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    opt = ALSALS(dropped.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(lambda: loss_of(dropped, x, y))
    # the check costs one forward pass, once per run
    assert opt.search_state.forwards == 2 + 1 + opt.search_state.trials


@pytest.mark.parametrize("floor", [0.0, None])
def test_the_first_search_looks_upwards_from_a_start_that_passes_at_once(floor):
    """``lr`` is only where the first search starts: a user's AdamW rate (1e-3 .. 1e-6) or a
    value so small that the loss does not move (1e-12) passes at once, or says nothing, and
    the run used to keep it (growing 10% per search: 1e-5 needed about 400 steps to reach
    the step size the default start finds). The first search now looks upwards by
    ``EXPANSION`` per trial until a trial fails, then narrows the bracket between the last
    trial that passed and the first that failed to ``EXPANDED_BRACKET`` (a start 1000x too
    low kept a step size 4x below the limit for hundreds of steps), so its step size is
    within that factor of the one a start from above finds; the step it takes still passes
    the Armijo test. A warm-up ramp stays a ceiling."""
    from alsals.schedule_free import EXPANDED_BRACKET, EXPANSION

    x, y = logistic_problem(0)
    idx = batches(x, y, 1)[0]

    def first_step(**settings):
        model = make_model()
        opt = ALSALS(model.parameters(), loss_floor=floor, **settings)
        before = loss_of(model, x[idx], y[idx]).item()
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
        return opt, before

    reference, _ = first_step()  # from lr = 0.1: it backtracks
    assert reference.last_step.trials > 1
    for lr in (1e-12, 1e-6, 1e-3):
        opt, before = first_step(lr=lr)
        info = opt.last_step
        assert info.kind == "search"
        assert info.step_size > reference.last_step.step_size / EXPANDED_BRACKET
        assert info.trials >= math.log(info.step_size / lr, EXPANSION)
        assert info.loss_decrease > 0.0
        assert opt.search_state.step_size == info.step_size
    warm, _ = first_step(lr=1e-6, warmup_steps=5)
    assert warm.last_step.step_size <= 1e-6 / 5


def behind_a_wall(w, wall, loss_of):
    """A closure of ``loss_of(w)`` whose evaluations without gradient rise by 1 where ``w``
    has moved from where it is now by more than ``wall`` times the first such evaluation's
    move (max norm: no square to underflow), a slice no quadratic fits; it records the
    evaluations short of the wall as (distance, loss) in ``closure.below``."""
    start = w.detach().clone()
    unit: list[float] = []
    below: list[tuple[float, float]] = []

    def closure():
        loss = loss_of(w)
        distance = float((w.detach() - start).abs().max())
        if torch.is_grad_enabled() or distance == 0.0:  # (the replay check at the start)
            return loss
        if not unit:
            unit.append(distance)
        if distance > wall * unit[0]:
            return loss + 1.0
        below.append((distance, float(loss)))
        return loss

    closure.below = below
    return closure


@pytest.mark.parametrize(
    ("lr", "wall", "scale"),
    [(1e-6, 80.0, 1.0), (1e-6, 50.0, 1.0), (1e-6, 30.0, 1.0), (1e-164, 80.0, 1e150)],
    ids=["wall-80", "wall-50", "wall-30", "tiny-lr"],
)
def test_a_first_search_from_far_below_narrows_its_bracket(lr, wall, scale):
    """A loss that rises by 1 beyond a wall at ``wall`` times the first trial's distance
    from ``y`` (a slice no quadratic fits: the interpolated trial after the failure lands
    near the last pass): from ``lr`` the expansions pass at ``lr`` and ``10 lr`` and fail at
    ``100 lr``; the bracket narrows to ``EXPANDED_BRACKET``, so the step size ends within it
    of the wall (it kept ``10 lr``, 8x below, for the growth of the searches after it to
    make up), with the decrease of the trial it took. Step sizes near 1e-164, whose product
    underflows, narrow by the same geometric middles (a linear loss of slope 1e150, which
    such steps move)."""
    from alsals.schedule_free import EXPANDED_BRACKET

    a, b, _ = float64_regression()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=lr, loss_floor=None)

    def loss_of(w):
        return 0.5 * ((a @ w - b) ** 2).mean() if scale == 1.0 else -(w * scale).sum()

    closure = behind_a_wall(w, wall, loss_of)
    loss0 = float(opt.step(closure))
    info = opt.last_step
    assert info.kind == "search"
    # the decrease reported is that of the trial taken, the farthest short of the wall
    assert info.loss_decrease == pytest.approx(loss0 - max(closure.below)[1], rel=1e-9)
    assert wall * lr / EXPANDED_BRACKET <= opt.param_groups[0]["lr"] < wall * lr
    assert info.trials <= 3 + 3  # (three expansions, then at most three more)


def test_max_trials_ends_the_narrowing_at_the_largest_trial_that_passed():
    """With room for one trial after the failed expansion (``max_trials=4``), the search
    makes exactly that one and takes the largest trial that passed."""
    a, b, _ = float64_regression()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=1e-6, max_trials=4)
    opt.step(behind_a_wall(w, 80, lambda w: 0.5 * ((a @ w - b) ** 2).mean()))
    assert opt.last_step.kind == "search" and opt.last_step.trials == 4
    assert 1e-5 <= opt.param_groups[0]["lr"] < 80e-6


def test_a_resumed_search_narrows_its_bracket_as_the_first_does():
    """A search whose trials all failed (twenty allowed here) resumes at the next step below
    its last trial and looks upwards from there, never above the step size it started
    from: where an expansion fails (a wall at 0.05 in step size), the bracket narrows to
    ``EXPANDED_BRACKET`` as at a run's first search."""
    from alsals.schedule_free import EXPANDED_BRACKET

    a, b, _ = float64_regression()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=1.0, max_trials=20, loss_floor=None)

    def loss_of(w):
        return 0.5 * ((a @ w - b) ** 2).mean()

    opt.step(behind_a_wall(w, 0.0, loss_of))  # (every trial fails)
    resume = opt.search_state.resume
    assert opt.last_step.kind == "exhausted" and 0.0 < resume < 0.05 / 10
    assert torch.equal(w, torch.zeros_like(w))  # (no step: the start is where it was)
    opt.param_groups[0]["max_trials"] = 100
    opt.step(behind_a_wall(w, 0.05 / resume, loss_of))
    assert opt.last_step.kind == "search"
    assert 0.05 / EXPANDED_BRACKET <= opt.param_groups[0]["lr"] < 0.05


def test_step_without_a_closure_says_what_to_pass():
    opt = ALSALS(make_model().parameters())
    with pytest.raises(TypeError, match=r"needs a closure: call optimizer.step\(closure\)"):
        opt.step()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (lambda p: [p, p], "appears twice in one parameter group"),
        (lambda p: [torch.zeros(3, dtype=torch.complex64, requires_grad=True)], "complex"),
    ],
)
def test_parameters_it_cannot_update_are_refused_by_name(params, match):
    weight = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        ALSALS(params(weight))


def test_a_loss_that_does_not_follow_the_weights_ends_each_search_at_once_and_warns():
    """A loss whose value does not move with the weights but whose gradient is not 0 (here
    a straight-through term, ``w - w.detach()``: the value of a stale loss, the gradient of
    a surrogate): every evaluation gives the starting loss, so no trial can judge a step
    size. Each search ends after two evaluations (not max_trials), takes no step along the
    gradient (``z`` stays), and the third such search in a row warns."""
    model = make_model()
    opt = ALSALS(model.parameters())

    def closure():
        return torch.tensor(0.7, dtype=torch.float64) + sum(
            (p - p.detach()).sum() for p in model.parameters()
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            z_before = [opt.state[p]["z"].clone() for p in model.parameters()] if step else None
            opt.step(closure)
            # the training pass, two evaluations, and at a run's first step the replay check
            assert opt.last_step.kind == "exhausted"
            assert opt.last_step.forwards == (4 if step == 0 else 3)
            if z_before:  # z moves only with a step size: it stays
                assert all(
                    torch.equal(opt.state[p]["z"], zb)
                    for p, zb in zip(model.parameters(), z_before, strict=True)
                )
            messages = [str(w.message) for w in caught if "did not change" in str(w.message)]
            assert len(messages) == (1 if step == 2 else 0)
    assert "(0.7; 0.7 at the run's first step)" in messages[0]
    assert "call the model inside the closure" in messages[0]


def test_a_loss_that_converged_below_its_rounding_is_called_converged():
    """A run whose loss fell far below its start and now changes by less than its rounding
    (here: a float32 loss of 1e-8 whose dependence on the weights is 1e-9 of it) ends its
    searches without a step size, as a closure that ignores the weights does; the warning
    says the run has converged, with the two losses, and does not blame the closure."""
    w = nn.Parameter(torch.ones(4))
    opt = ALSALS([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(60):
            if k < 5:
                opt.step(lambda: ((w - 3.0) ** 2).sum())
            else:
                opt.step(lambda: 1e-8 * (1.0 - 1e-9 * w.sum()))
    messages = [str(c.message) for c in caught if "ALSALS: the loss" in str(c.message)]
    assert len(messages) == 1
    assert "the run has converged" in messages[0] and "at 1e-08, against 16" in messages[0]
    assert "inside the closure" not in messages[0]


@pytest.mark.parametrize(
    ("index", "key", "value", "match"),
    [
        (1, "weight_decay", float("nan"), r"param_groups\[1\]: invalid weight_decay"),
        (1, "lr_scale", 0.0, r"param_groups\[1\]: invalid lr_scale"),
        (1, "betas", (1.5, 0.9), r"param_groups\[1\]: invalid betas\[0\]"),
        (0, "eps", 0.0, r"param_groups\[0\]: invalid eps"),
        (0, "c", 2.0, r"param_groups\[0\]: invalid c"),
        (0, "max_trials", 0, r"param_groups\[0\]: invalid max_trials"),
        (0, "lead_rule", "bogus", r"param_groups\[0\]: invalid lead_rule"),
        (0, "kept_rule", "bogus", r"param_groups\[0\]: invalid kept_rule"),
        (0, "regrowth", 0.5, r"param_groups\[0\]: invalid regrowth"),
        (1, "lr", float("nan"), r"param_groups\[1\]: invalid lr"),
        (1, "c", 0.3, r"param_groups\[1\]\['c'\] = 0.3 differs from param_groups\[0\]"),
    ],
)
def test_a_bad_setting_written_between_steps_is_an_error_before_anything_moves(
    index, key, value, match
):
    """A loop may write any group setting between steps; a value the step cannot use (or a
    search setting that differs between groups) is an error naming the group and the
    setting, raised before the weights, the state or the random stream change."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    idx = batches(x, y, 2)
    opt.step(lambda: loss_of(model, x[idx[0]], y[idx[0]]))
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.param_groups[index][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step(lambda: loss_of(model, x[idx[1]], y[idx[1]]))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k]["z"], state[k]["z"]) for k in state if "z" in state[k])


def test_an_empty_first_group_is_accepted_as_torch_adam_accepts_it():
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS([{"params": []}, {"params": model.parameters()}])
    for idx in batches(x, y, 3):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    assert opt.last_step.kind == "search" and opt.search_state.steps == 3


def test_train_puts_the_weights_at_y_for_a_backward_pass_outside_the_step():
    """The Hugging Face Trainer's pattern: ``optimizer.train()``, forward and backward
    outside ``step()``, then a closure whose gradient evaluation only returns the loss. The
    run is the one whose closure runs backward itself, bit for bit; ``train()`` twice moves
    once, and ``eval()`` without a step puts the weights back exactly."""
    x, y = logistic_problem(0)
    inside, outside = make_model(), make_model()
    opt_in, opt_out = ALSALS(inside.parameters()), ALSALS(outside.parameters())
    for idx in batches(x, y, 12):

        def closure_in(backward, idx=idx):
            if backward:
                opt_in.zero_grad()
            loss = loss_of(inside, x[idx], y[idx])
            if backward:
                loss.backward()
            return loss.detach()

        opt_in.step(closure_in)
        opt_out.train()
        opt_out.train()
        opt_out.zero_grad()
        loss = loss_of(outside, x[idx], y[idx])
        loss.backward()  # at y

        def closure_out(backward, idx=idx, loss=loss):
            return loss.detach() if backward else loss_of(outside, x[idx], y[idx])

        opt_out.step(closure_out)
        assert opt_out.last_step.kind == opt_in.last_step.kind
        for a, b in zip(inside.parameters(), outside.parameters(), strict=True):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    weights = [p.detach().clone() for p in outside.parameters()]
    opt_out.train()
    assert not all(torch.equal(p, w) for p, w in zip(outside.parameters(), weights, strict=True))
    opt_out.eval()
    opt_out.eval()
    assert all(torch.equal(p, w) for p, w in zip(outside.parameters(), weights, strict=True))


def test_a_process_group_that_is_not_one_is_an_error():
    with pytest.raises(TypeError, match="process_group"):
        ALSALS(make_model().parameters(), process_group="gloo")


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("group", "c", 2.0),
        ("group", "max_trials", 0),
        ("group", "lr_scale", 0.0),
        ("group", "lr", float("nan")),
        ("search", "step_size", -0.5),
        ("search", "step_size", float("inf")),
        ("search", "step_size", None),
        ("search", "step_size_ceiling", -1.0),
        ("search", "start_ceiling", 0.0),
        ("search", "searches", -3),
        ("search", "steps", "x"),
        ("search", "kept_in_a_row", 2.0),
        ("search", "first_phase_over", 1),
        ("search", "first_loss", "abc"),
        ("search", "resume", float("nan")),
        ("search", "bogus", 1.0),
        ("search", "watch", {"bogus": 1.0}),
        ("search", "watch", {"loss_avg": "1"}),
        ("search", "start_watch", 3.0),
    ],
)
def test_a_tampered_state_is_refused_on_load_and_nothing_is_loaded(where, key, value):
    """A checkpoint edited by hand is refused by a ``ValueError`` naming the entry, before
    anything loads (a ceiling of -1 used to load, and every later step size collapsed to
    the smallest float without a word; a string, at the next step, as a TypeError)."""
    model, opt, _, _ = run(steps=4)
    state = copy.deepcopy(opt.state_dict())
    if where == "group":
        state["param_groups"][0][key] = value
    else:
        first = next(iter(k for k, v in state["state"].items() if "schedule_free_search" in v))
        state["state"][first]["schedule_free_search"][key] = value
        if value is None:
            del state["state"][first]["schedule_free_search"][key]
    fresh = ALSALS(make_model().parameters())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(state)
    assert fresh.state_dict() == before


def test_last_step_reports_the_accepted_trial_s_loss_decrease():
    """``loss_decrease`` is ``f(y) - f(y')`` at the accepted trial, ``nan`` where the step
    did not search. At the first step ``x = z = y`` before and ``x' = z' = y'`` after (its
    averaging weight is 1), so both losses are the model's own."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), polyak_cap=False)
    idx = batches(x, y, 1)[0]
    with torch.no_grad():
        before = float(loss_of(model, x[idx], y[idx]))
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    with torch.no_grad():
        after = float(loss_of(model, x[idx], y[idx]))
    assert opt.last_step.kind == "search" and opt.last_step.loss_decrease > 0
    assert opt.last_step.loss_decrease == pytest.approx(before - after, rel=1e-9)
    for idx in batches(x, y, 12, seed=5):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        if opt.last_step.kind == "reuse":
            assert math.isnan(opt.last_step.loss_decrease)


def test_a_copy_of_a_group_can_be_added_and_starts_its_own_average():
    """``{**opt.param_groups[0], "params": new}`` (the group's shown lr, its averaging
    weights) adds a group whose averaging starts afresh: its first step moves x to z'."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model[0].parameters())
    for idx in batches(x, y, 3):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    opt.add_param_group({**opt.param_groups[0], "params": list(model[2].parameters())})
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[1]["weight_sum"] == 0.0
    idx = batches(x, y, 1, seed=9)[0]
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    for p in model[2].parameters():  # alpha = 1 at the group's first step: x' = z'
        assert torch.equal(p.detach(), opt.state[p]["z"])
    with pytest.raises(ValueError, match="lr_scale = its lr / the base lr"):
        opt.add_param_group({"params": [torch.ones(1, requires_grad=True)], "lr": 0.5})


def test_warmup_searches_every_step_from_the_ramp_and_never_above_it():
    """With ``warmup_steps=N`` step ``k < N`` searches from ``lr (k + 1) / N``: the step
    size taken never exceeds the ramp and equals it where the first trial passes."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), lr=0.5, warmup_steps=8, polyak_cap=False, loss_floor=None)
    on_the_ramp = 0
    for k, idx in enumerate(batches(x, y, 14)):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        info = opt.last_step
        if k < 8:
            ramp = 0.5 * (k + 1) / 8
            assert info.kind != "reuse" and info.step_size <= ramp * (1 + 1e-12)
            if info.kind == "search" and info.trials == 1:
                assert info.step_size == pytest.approx(ramp, rel=1e-12)
                on_the_ramp += 1
    assert on_the_ramp >= 4 and opt.search_state.steps == 14


def test_a_step_size_that_no_search_accepted_is_never_reused():
    """``lr`` far too large for ``max_trials``: the first search runs out of trials. The
    next step resumes below its last trial (looking upwards from there), and no step reuses
    a step size that no search accepted: the loss falls instead of blowing up."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), lr=1e3, loss_floor=None, max_trials=5)
    start = loss_of(model, x, y).item()
    accepted = []
    for k, idx in enumerate(batches(x, y, 30)):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        info = opt.last_step
        if k == 0:
            assert info.kind == "exhausted" and info.step_size == 0.0
            assert opt.search_state.resume < 1e3 * 0.8**4  # below the last trial
        if info.kind == "search":
            accepted.append(info.step_size)
        if info.kind in ("reuse", "kept"):
            assert accepted and info.step_size <= max(accepted)
    assert opt.search_state.resume == 0.0 and max(accepted) < 1.0
    assert loss_of(model, x, y).item() < start


def test_failed_searches_then_one_below_the_rounding_do_not_reuse_the_rejected_step_size():
    """At a cliff (``+100`` where ``sum(w) > 6``; the smooth part's minimum lies beyond it)
    every trial of the searches after the first steps crosses it and fails, and the next one
    moves ``w`` below float32's resolution: the loss stays exactly as it was. A search ends
    there (it walked on to max_trials, 100 trials a step), and the step size those searches
    rejected is not reused after one that found only such trials: the weights stay before
    the cliff (they crossed it for good at step 13, before)."""

    def cliff(w):
        return ((w - 3.0) ** 2).sum() + 100.0 * (w.sum() > 6.0).float()

    w = nn.Parameter(torch.zeros(4))
    opt = ALSALS([w])
    kinds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the stall warning: the loss no longer changes)
        for _ in range(60):
            opt.step(lambda: cliff(w))
            kinds.append(opt.last_step.kind)
            assert cliff(w.detach()).item() < 100.0
            assert opt.last_step.trials <= 10
    assert "exhausted" in kinds  # the searches at the cliff failed


def test_after_a_plateau_below_the_rounding_the_searches_still_look_upwards():
    """300 steps of ``1 + 1e-12 |w|^2`` (float32: exactly 1 unless a trial moves ``w`` to
    ~1e3): the first search's expansion rejects a far trial, and every later one finds only
    trials the rounding hides. They resume from the rejected one, looking upwards from below
    it as a resumed search does, so that when a loss that follows the weights arrives the
    step size climbs at once (30 steps: 0.03, where the searches grew it 10% each and the
    loss was 5.2)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    opt = ALSALS([w])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the loss no longer changes)
        for _ in range(300):
            opt.step(lambda: 1.0 + 1e-12 * (w**2).sum())
        for _ in range(30):
            opt.step(lambda: ((w - 1) ** 2).sum())
    assert ((w.detach() - 1) ** 2).sum().item() < 0.5


def test_a_trial_whose_loss_is_not_finite_never_lets_the_search_keep_its_step_size():
    """A later search whose first trial is NaN and whose averaging move alone fails does
    not take the last step size untested beside the diverged trial: "kept" takes only the
    averaging move, and the next step searches from below the diverged trial."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    idx = batches(x, y, 1)[0]
    for _ in range(12):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
    for group in opt.param_groups:  # a written lr: this step searches
        group["lr"] *= 3
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(model, x[idx], y[idx])
        if calls[0] == 2:  # the first trial diverges
            return loss * float("nan")
        return loss + 1.0 if calls[0] == 3 else loss  # the averaging move alone fails

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the search handles it
        opt.step(closure)
    first_trial = opt.param_groups[0]["lr"] * opt.param_groups[0]["growth"]
    assert opt.last_step.kind == "kept" and opt.last_step.trials == 2
    assert opt.last_step.step_size == 0.0 and 0.0 < opt.search_state.resume < first_trial
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    assert opt.last_step.kind == "search" and opt.search_state.resume == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def barrier_loss(w: torch.Tensor) -> torch.Tensor:
    """``sum 1 - log(1 - w) - 2 w``: minimum at ``w = 0.5``, no value at ``w >= 1``."""
    return (1.0 - torch.log1p(-w) - 2.0 * w).sum()


def z_past_the_barrier():
    """An ``ALSALS`` run on the log barrier whose ``z`` lies past it (``y`` outside the
    loss's domain, ``x`` inside), with a switch that makes every batch bad (a NaN)."""
    w = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w])
    bad = {"batch": False}

    def closure():
        return barrier_loss(w) + (float("nan") if bad["batch"] else 0.0)

    for _ in range(5):
        opt.step(closure)
    opt.state[w]["z"].fill_(20.0)
    return w, opt, bad, closure


def test_a_bad_batch_at_the_average_does_not_end_the_restarts_looks_for_good():
    """``z`` past a log barrier while a bad batch (a NaN in the data) makes the loss at ``x``
    not finite either when the second skipped step looks there: the third, whose ``x`` is
    finite, restarts ``z`` (it looked only at the second before, and every later step stayed
    skipped: a stall)."""
    w, opt, bad, closure = z_past_the_barrier()
    x = w.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
        bad["batch"] = True  # at y and at x alike
        opt.step(closure)
        assert opt.last_step.kind == "nonfinite" and opt.search_state.restarts == 0
        bad["batch"] = False
        opt.step(closure)  # y still past the barrier, x finite again
    assert opt.last_step.kind == "nonfinite" and opt.search_state.restarts == 1
    assert torch.equal(opt.state[w]["z"], x)
    opt.step(closure)
    assert opt.last_step.kind != "nonfinite"


def test_after_a_restart_at_the_average_the_next_non_finite_step_does_not_look_at_x_again():
    """A restart puts ``z`` at ``x``, so ``y`` is ``x``: the next non-finite loss at ``y`` is
    one at ``x`` too, and looking there again costs a forward pass for nothing."""
    w, opt, bad, closure = z_past_the_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
        opt.step(closure)  # restarts z at x (the loss at x is finite)
        assert opt.search_state.restarts == 1
        bad["batch"] = True
        opt.step(closure)
    assert opt.last_step.kind == "nonfinite" and opt.last_step.forwards == 1


def test_the_restart_at_the_average_covers_a_parameter_frozen_since_it_stepped():
    """``z := x`` for every parameter that has stepped, also one frozen since (it holds no
    copy in the step, being at ``x``): else, unfrozen, ``y`` would pull it back to the old
    ``z``."""
    w = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w, v])
    for _ in range(5):
        opt.step(lambda: barrier_loss(w) + (v**2).sum())
    v.requires_grad_(False)
    v.grad = None
    opt.state[w]["z"].fill_(20.0)  # y outside the barrier's domain, x inside
    opt.state[v]["z"].fill_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            opt.step(lambda: barrier_loss(w) + (v**2).sum())
    assert opt.search_state.restarts == 1
    assert torch.equal(opt.state[v]["z"], v.detach())
    assert torch.equal(opt.state[w]["z"], w.detach())


def test_a_loss_that_leaves_its_domain_at_y_restarts_z_at_the_average():
    """A log barrier (``-log(1 - w)``): ``z`` past the barrier puts ``y`` outside the loss's
    domain while the average ``x`` is inside. The first skipped step writes nothing; the
    second in a row restarts ``z`` at ``x``, and the run goes on with finite losses."""
    w = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w])

    def closure():
        return barrier_loss(w)

    for _ in range(5):
        opt.step(closure)
    opt.state[w]["z"].fill_(20.0)  # where a step size reused too large would leave z
    x = w.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
        assert opt.last_step.kind == "nonfinite" and opt.search_state.restarts == 0
        opt.step(closure)
    assert opt.last_step.kind == "nonfinite" and opt.search_state.restarts == 1
    assert torch.equal(w.detach(), x) and torch.equal(opt.state[w]["z"], x)
    for _ in range(20):
        opt.step(closure)
        assert opt.last_step.kind != "nonfinite"
    assert torch.allclose(w.detach(), torch.full((2,), 0.5, dtype=torch.float64), atol=0.05)


def test_a_written_lr_of_zero_moves_nothing_and_keeps_the_step_size():
    """``CosineAnnealingLR`` writes 0 at its end: that step takes no update (weights, ``z``
    and the moments stay), the step size is kept, and the next step goes on from it."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    idx = batches(x, y, 1)[0]
    for _ in range(4):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
    step_size = opt.search_state.step_size
    before = copy.deepcopy(opt.state_dict()["state"])
    weights = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    assert opt.last_step.kind == "zero_lr" and opt.last_step.step_size == 0.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    for key, entry in before.items():
        for name in ("z", "exp_avg_sq"):
            assert torch.equal(opt.state_dict()["state"][key][name], entry[name])
    assert opt.param_groups[0]["lr"] == step_size
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    assert opt.last_step.kind in ("search", "reuse") and opt.last_step.step_size > 0.0


def test_an_exception_after_train_leaves_the_weights_at_y_and_a_group_can_join_there():
    """After ``train()`` the weights are ``y``: a step that raises leaves them there (as they
    were), and a group added while they are held joins the step that follows."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(list(model[0].parameters()))
    idx = batches(x, y, 1)[0]
    for _ in range(3):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
    opt.train()
    at_y = [p.detach().clone() for p in model.parameters()]

    def failing():
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(failing)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), at_y, strict=True))
    opt.add_param_group({"params": list(model[2].parameters())})
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), at_y, strict=True))
    opt.step(lambda: loss_of(model, x[idx], y[idx]))
    assert all("z" in opt.state[p] for p in model.parameters())


def test_a_written_lr_that_no_trial_can_judge_is_not_taken_untested():
    """``lr`` written far too large, no Polyak bound: where the first trial and the averaging
    move alone both fail, the written step size is not taken ("kept" moves by the averaging
    alone) and the next steps search down from below it."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), loss_floor=None)
    idx = batches(x, y, 1)[0]
    for _ in range(12):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
    before = loss_of(model, x[idx], y[idx]).item()
    for group in opt.param_groups:
        group["lr"] = 50.0
    calls = [0]

    def closure():
        calls[0] += 1
        loss = loss_of(model, x[idx], y[idx])
        return loss + 1.0 if calls[0] == 3 else loss  # the averaging move alone fails

    opt.step(closure)
    assert opt.last_step.kind == "kept" and opt.last_step.step_size == 0.0
    for _ in range(10):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
        assert opt.last_step.kind != "reuse" or opt.search_state.resume == 0.0
    assert opt.search_state.resume == 0.0 and opt.search_state.step_size < 50.0
    assert loss_of(model, x[idx], y[idx]).item() < 3 * before  # no blow-up (50 taken: 450x)


@pytest.mark.parametrize("skipped", ["nonfinite", "zero_grad"])
def test_a_written_lr_stays_untested_over_a_skipped_step(skipped):
    """``lr`` written, then a step the optimizer skips (a non-finite gradient, or none): the
    next step that can search searches from the written lr, as it would have without the
    skipped step; the written lr is never reused untested."""
    x, y = logistic_problem(0)
    idx = batches(x, y, 1)[0]

    def step_after_write(skip: bool):
        model = make_model()
        opt = ALSALS(model.parameters(), polyak_cap=False)
        for _ in range(12):  # past the first phase: most steps reuse
            opt.step(lambda: loss_of(model, x[idx], y[idx]))
        for group in opt.param_groups:
            group["lr"] = 1e6
        if skip:
            if skipped == "nonfinite":
                weight = next(model.parameters())
                opt.step(lambda: loss_of(model, x[idx], y[idx]) + (weight * math.nan).sum())
            else:
                opt.step(lambda: torch.ones((), dtype=torch.float64, requires_grad=True))
            assert opt.last_step.kind == skipped
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
        return opt.last_step, [p.detach().clone() for p in model.parameters()]

    straight, straight_weights = step_after_write(skip=False)
    after_skip, weights = step_after_write(skip=True)
    assert straight.kind != "reuse" and straight.trials >= 1
    assert after_skip.kind == straight.kind and after_skip.step_size == straight.step_size
    for a, b in zip(straight_weights, weights, strict=True):
        assert torch.equal(a, b)


def test_a_written_lr_lowered_by_the_polyak_bound_is_replaced_by_the_trial_that_passed():
    """A written lr far above the Polyak step: the search starts at the bound, and the trial
    that passes there becomes the step size (no search accepted the written one, which
    would otherwise be reused untested on the next steps and grown from)."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), polyak_cap=False)  # (the cap would hide a reused 1e3)
    for idx in batches(x, y, 12):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    for group in opt.param_groups:
        group["lr"] = 1e3
    for k, idx in enumerate(batches(x, y, 10, seed=5)):
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        if k == 0:
            assert opt.last_step.kind == "search" and opt.last_step.step_size < 1e3
            accepted = opt.last_step.step_size
            assert opt.param_groups[0]["lr"] == accepted
        else:
            assert opt.param_groups[0]["lr"] <= accepted * 1.1 * (1 + 1e-12)
            assert opt.last_step.step_size <= accepted * 1.1 * (1 + 1e-12)


def test_a_retried_step_after_one_written_lr_is_no_schedule():
    """One written lr, then a step that raises twice before it succeeds: one write, not a
    schedule left in the loop; no warning."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    idx = batches(x, y, 1)[0]
    for _ in range(3):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
    opt.param_groups[0]["lr"] = 0.05
    failures = [2]

    def flaky():
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("transient")
        return loss_of(model, x[idx], y[idx])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            try:
                opt.step(flaky)
            except RuntimeError as err:
                assert "transient" in str(err)
        for _ in range(3):
            opt.step(lambda: loss_of(model, x[idx], y[idx]))
    assert failures[0] == 0


def test_z_restarts_at_the_average_even_where_the_closure_leaves_no_gradient():
    """A ``closure(backward)`` that skips its backward pass on a non-finite loss (a common
    guard) leaves no gradient: the restart of ``z`` at ``x`` does not need one."""
    w = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w])

    def closure(backward):
        loss = barrier_loss(w)
        if backward and torch.isfinite(loss):
            loss.backward()
        return loss.detach()

    for _ in range(5):
        opt.step(closure)
    opt.state[w]["z"].fill_(20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            opt.step(closure)
    assert opt.search_state.restarts == 1 and torch.equal(opt.state[w]["z"], w.detach())
    opt.step(closure)
    assert opt.last_step.kind != "nonfinite"


def test_a_loss_computed_before_the_closure_is_a_clear_error():
    """The model ran outside the closure: ALSALS moves the weights to ``y`` before the
    backward pass, so from the second step autograd finds them changed; the error says
    what to do, and the weights are as before the step."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    opt.step(lambda: loss_of(model, x, y))  # a proper step: z now differs from x
    weights = [p.detach().clone() for p in model.parameters()]
    loss = loss_of(model, x, y)
    with pytest.raises(RuntimeError, match="Call the model inside the closure"):
        opt.step(lambda: loss)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_an_exception_in_the_restart_check_undoes_the_step():
    """The evaluation at ``x`` that decides the restart of ``z`` raises: everything is as
    before the step (weights, state, random stream), and the retry is the uninterrupted
    step."""

    def setup():
        w = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
        opt = ALSALS([w])
        for _ in range(5):
            opt.step(lambda: barrier_loss(w))
        opt.state[w]["z"].fill_(20.0)
        return w, opt

    def closure_of(w, fail_at=None):
        calls = [0]

        def closure():
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("failed at x")
            return barrier_loss(w)

        return closure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w, opt = setup()
        opt.step(closure_of(w))  # the first non-finite loss at y
        state = copy.deepcopy(opt.state_dict())
        before, rng = w.detach().clone(), torch.get_rng_state()
        with pytest.raises(RuntimeError, match="failed at x"):
            opt.step(closure_of(w, fail_at=2))  # the second: the evaluation at x raises
        assert torch.equal(w.detach(), before) and torch.equal(torch.get_rng_state(), rng)
        assert opt.state_dict()["state"][0]["z"].equal(state["state"][0]["z"])
        assert opt.state_dict()["state"][0][STATE_KEY] == state["state"][0][STATE_KEY]
        opt.step(closure_of(w))
        opt.step(closure_of(w))
        ref_w, ref = setup()
        for _ in range(3):
            ref.step(closure_of(ref_w))
    assert opt.search_state.restarts == ref.search_state.restarts == 1
    assert torch.equal(w.detach(), ref_w.detach()) and opt.search_state.edits == 0


def test_weights_loaded_while_train_holds_them_at_y_are_the_new_average():
    """``train()``, then a checkpoint loaded into the model: ``eval()`` keeps the loaded
    weights (the new ``x``, as a load between steps is) instead of the copy of the old one,
    and a step then takes the same step as after a load between steps."""
    x, y = logistic_problem(0)
    idx = batches(x, y, 1)[0]

    def run(held: bool):
        model = make_model()
        opt = ALSALS(model.parameters())
        for _ in range(4):
            opt.step(lambda: loss_of(model, x[idx], y[idx]))
        checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(3):
            opt.step(lambda: loss_of(model, x[idx], y[idx]))
        if held:
            opt.train()
        model.load_state_dict(checkpoint)
        if held:
            opt.eval()
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in checkpoint.items())
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
        return [p.detach().clone() for p in model.parameters()], opt.search_state.edits

    (held, edits_held), (between, edits_between) = run(True), run(False)
    assert edits_held == edits_between == 1
    assert all(torch.equal(a, b) for a, b in zip(held, between, strict=True))


def test_the_first_phase_does_not_end_during_warmup():
    """``first_phase="settled"`` ends at a search after the first that takes its first trial;
    during warm-up the ramp's start usually does, and says nothing: the phase goes on."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), warmup_steps=5, first_phase="settled", initial_searches=30)
    idx = batches(x, y, 1)[0]
    for _ in range(5):
        opt.step(lambda: loss_of(model, x[idx], y[idx]))
        assert not opt.search_state.first_phase_over


def test_a_closure_that_returns_zero_from_the_first_step_is_not_called_converged():
    """A closure whose accumulation lost every term (``total + loss`` for ``total +=``)
    returns 0 while its backward passes compute the gradient: the searches find the loss
    unchanged at its floor from the first step, which is no convergence, and the warning
    suspects the closure."""
    x, y = logistic_problem(n=64)
    model = make_model()
    opt = ALSALS(model.parameters())

    def closure(backward):
        total = 0.0
        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
            loss = loss_of(model, xb, yb) / 4
            if backward:
                loss.backward()
            total + loss.detach()  # noqa: B018 (the user's bug: the sum is dropped)
        return torch.tensor(total, dtype=torch.float64)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.step(closure)
    messages = [
        str(w.message)
        for w in caught
        if "did not change" in str(w.message) or "no longer changes" in str(w.message)
    ]
    assert messages, [str(w.message) for w in caught]
    assert all("closure" in m and "converged" not in m for m in messages), messages


def test_a_run_converged_to_a_loss_above_zero_is_not_blamed_on_its_closure():
    """A float32 full-batch regression whose minimum is 0.84: once it converges, searches
    see the loss unchanged; earlier searches saw it follow the weights, so the warning is
    the converged one, not the one that suspects the closure (which needed the loss 1e4
    below its first)."""
    from alsals.messages import unchanged_message

    assert "converged" in unchanged_message(0.84, 5.6, followed=True, predicted=False)
    assert "closure" in unchanged_message(0.84, 5.6, followed=False, predicted=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = x @ torch.randn(5, generator=g) + torch.randn(200, generator=g)
    w = torch.nn.Parameter(torch.zeros(5))
    opt = ALSALS([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(600):
            opt.step(lambda: ((x @ w - y) ** 2).mean())
    assert opt.search_state.loss_followed
    assert all("closure" not in str(m.message) for m in caught), caught[0].message


@pytest.mark.parametrize("lr", [None, 1e-300], ids=["offset-1e9", "lr-1e-300"])
def test_a_run_that_never_got_anywhere_is_not_called_converged(lr):
    """A float32 regression with a constant of 1e9 in its loss (whose rounding, 64, hides
    every move the first searches try but the largest, which they reject), or one started
    at a step size of 1e-300: no step a search took ever lowered the loss, so the warning
    suspects the closure and the loss's rounding; it said "the run has converged. Nothing is
    wrong" (an audit's finding: the first search's rejected trials had counted as the loss
    following the weights)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, generator=g) + 0.3 * torch.randn(512, generator=g)
    w = torch.nn.Parameter(torch.zeros(8))
    opt = ALSALS([w]) if lr is None else ALSALS([w], lr=lr)
    offset = 1e9 if lr is None else 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            opt.step(lambda: ((x @ w - y) ** 2).mean() + offset)
    assert not opt.search_state.loss_followed
    messages = [str(m.message) for m in caught if "loss" in str(m.message)]
    assert messages and all("converged" not in m for m in messages), messages
    assert any("wider dtype" in m for m in messages)


def test_searches_that_collapsed_the_step_size_are_not_called_converged():
    """Searches that find the loss unchanged at a step size collapsed far below the run's
    largest (a written lr of 1e-9, after which the closure's loss no longer follows the
    weights: its value stays, its gradient, along ``x - z``, promises a decrease) are no
    converged run's, though earlier searches saw the loss follow them."""
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([3.0, -2.0, 5.0])
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w])
    for _ in range(5):
        opt.step(lambda: ((x @ w - y) ** 2).mean())
    assert opt.search_state.loss_followed and opt.param_groups[0]["lr"] > 1e-3
    opt.param_groups[0]["lr"] = 1e-9
    direction = w.detach() - opt.state[w]["z"]

    def stale():
        return torch.tensor(2.0) + ((w - w.detach()) * direction).sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            opt.step(stale)
    messages = [str(m.message) for m in caught if "loss" in str(m.message)]
    assert opt.search_state.loss_followed and messages
    assert all("converged" not in m for m in messages)


def test_a_loss_computed_outside_the_closure_after_some_steps_is_not_called_converged():
    """A linear model (autograd saves no weight, so no error) whose loop, after three correct
    steps, computes the loss before the closure: the searches find it unchanged where its
    gradient predicts a change far above float32's rounding. The warning suspects the
    closure; it said "the run has converged. Nothing is wrong" (the loss had fallen 1.7x)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    model = nn.Linear(6, 1)
    opt = ALSALS(model.parameters())
    for _ in range(3):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert opt.search_state.loss_followed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            outside = ((model(x) - y) ** 2).mean()
            opt.step(lambda outside=outside: outside)
    messages = [str(m.message) for m in caught if "loss" in str(m.message)]
    assert messages and all("converged" not in m for m in messages)
    assert "does not compute the loss from the model's current weights" in messages[0]


class StaleLoss(torch.autograd.Function):
    """Returns a fixed value with the gradient of the loss it is given: a loss that no longer
    follows the weights while its gradient does."""

    @staticmethod
    def forward(ctx, loss, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_one_bfloat16_parameter_does_not_make_a_stale_loss_converged(bias_dtype):
    """A regression whose loss stops following the weights after 5 steps (its gradient still
    promises a decrease far above float32's rounding) is suspected, not called converged,
    also where one parameter (the bias) is bfloat16: only weights that are all coarser than
    float32 may hide such a move."""
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = x @ torch.randn(5) + torch.randn(200)
    w = nn.Parameter(torch.zeros(5))
    b = nn.Parameter(torch.zeros((), dtype=bias_dtype))
    opt = ALSALS([w, b])

    def real():
        return ((x @ w + b.float() - y) ** 2).mean()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(40):
            opt.step(real if step < 5 else lambda: StaleLoss.apply(real(), torch.tensor(3.0)))
    messages = [str(m.message) for m in caught if "loss" in str(m.message)]
    assert messages and all("converged" not in m for m in messages)


def target_beyond_the_decay(lr_scale: float = 1.0):
    """A 3-weight least-squares fit to [30, -20, 50] with weight_decay=0.1, from 0: AdamW's
    equilibrium (``g_hat = -wd w``) lies at ``|w| <= 1 / wd = 10``, far short of the
    target, and the first search's Polyak bound at about 19."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, dtype=torch.float64)
    y = x @ torch.tensor([30.0, -20.0, 50.0], dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ALSALS([w], weight_decay=0.1, lr_scale=lr_scale)
    return w, opt, lambda: ((x @ w - y) ** 2).mean()


def test_a_decay_and_lr_scale_whose_product_underflows_train():
    """``weight_decay=1e-300`` with ``lr_scale=1e-90``: their product is 0 in float64, and the
    decay's cap on the step size (``1 / (lr_scale * weight_decay)``) raised
    ``ZeroDivisionError``; the cap is infinite there, and the step searches."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([{"params": [w], "weight_decay": 1e-300, "lr_scale": 1e-90}])
    opt.step(lambda: ((w - 1.0) ** 2).sum())
    assert opt.last_step.kind == "search"


@pytest.mark.parametrize("lr_scale", [1.0, 2.0])
def test_no_step_decays_more_than_the_whole_of_the_weights(lr_scale):
    """No trial takes ``gamma * lr_scale * weight_decay > 1``, where the move's decay term
    overshoots 0 and flips the weights (the AdamW form of the other optimizers caps the
    decay's factor at 1): the first search's expansion stops at ``1 / (lr_scale * wd)``,
    not at the Polyak step (19, past AdamW's equilibrium ``|w| = 1 / wd``)."""
    w, opt, closure = target_beyond_the_decay(lr_scale)
    for _ in range(30):
        opt.step(closure)
        step = opt.last_step.step_size * lr_scale * 0.1
        assert step <= 1.0 + 1e-12, step
        assert w.detach().abs().max() <= 10.0 + 1e-9
    assert opt.search_state.step_size * lr_scale * 0.1 == pytest.approx(1.0)


def test_a_move_whose_decay_outweighs_the_gradient_keeps_the_step_size():
    """Where the decay's share outweighs the gradient's (``g . u <= 0``: the move raises the
    loss to first order, at and beyond AdamW's equilibrium), no trial can pass but one the
    loss's rounding hides; the trials (with the cap alone) took the step size from 10 to
    1e-14 and the weights never moved again. The search keeps the step size and takes
    Schedule-Free's move: the run goes on towards AdamW's equilibrium."""
    w, opt, closure = target_beyond_the_decay()
    sizes, points = [], []
    for _ in range(100):
        opt.step(closure)
        sizes.append(opt.search_state.step_size)
        points.append(w.detach().clone())
    assert min(sizes) >= 1e-4 * max(sizes), (min(sizes), max(sizes))
    assert opt.search_state.kept > 0
    assert not torch.equal(points[1], points[-1])
    # (the weights settle inside |w| = 1 / wd, moving less and less)
    assert (points[-1] - points[-2]).abs().max() < (points[2] - points[1]).abs().max()
    assert points[-1].abs().max() < 10.0


def test_a_move_at_adamw_s_exact_equilibrium_tries_no_step_size():
    """At AdamW's equilibrium exactly (``g . u = 0``: the decay cancels Adam's direction,
    here ``u = 1 / (1 + eps) + wd * w = 0.5 - 0.5``) the move promises no decrease: no trial
    is made and the step size is kept. Trials there all return the starting loss and say
    nothing, yet each passes ``0 >= c * 0``: they raised the step size 20x, to the decay's
    cap ``1 / wd``."""
    w = torch.nn.Parameter(torch.tensor([-1.0], dtype=torch.float64))
    opt = ALSALS([w], lr=0.1, eps=1.0, weight_decay=0.5)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        return w.sum() + 2.0  # (g = 1)

    opt.step(closure)
    assert opt.last_step.kind == "kept"
    assert calls == 2  # the loss at y and its replay, which a run's first search makes
    assert opt.search_state.step_size == 0.1


def test_a_tiny_float32_gradient_is_no_zero_gradient():
    """A loss scaled by 1e-25: its float32 gradient's squared entries underflow, but the
    gradient is not 0 and Adam's direction does not depend on the scale: the steps search
    and move (they were skipped as "zero_grad", silently)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w])
    for _ in range(30):
        opt.step(lambda: 1e-25 * ((x @ w - y) ** 2).mean())
        assert opt.last_step.kind != "zero_grad"
    assert ((x @ w.detach() - y) ** 2).mean() < 0.5 * (y**2).mean()


def test_a_gradient_whose_float32_norm_overflows_is_no_nonfinite_gradient():
    """Four million entries near 1e16: the squares' sum overflows float32 (the gradient's
    norm is taken in float32 for speed) but not float64, nor Adam's second moment: the
    steps search and move (decided again in float64), as they do at scale 1."""
    target = torch.randn(2000, 2000, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.zeros(2000, 2000))
    opt = ALSALS([w])

    def closure():
        return 1e16 * ((w - target) ** 2).mean() * w.numel()

    start = closure().item()
    opt.step(closure)
    assert not math.isfinite(w.grad.norm().item())  # (its float32 norm overflows)
    for _ in range(10):
        assert opt.last_step.kind not in ("nonfinite", "zero_grad")
        opt.step(closure)
    assert closure().item() < 0.5 * start


def test_a_loss_at_its_floor_takes_no_trial_and_no_step():
    """A float32 loss that is exactly 0 (its floor) while the gradient is not: no trial can
    pass a test that asks for a decrease below 0. Each search ends at once (it took 100
    trials, 101 passes per step) and no step moves the weights away from where the loss is 0."""
    scale = torch.tensor([1.0, 100.0])
    w = torch.nn.Parameter(torch.tensor([1e-24, 1e-24]))  # w^2 underflows: the loss is 0
    opt = ALSALS([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            assert float(opt.step(lambda: 0.5 * (scale * w * w).sum())) == 0.0
    assert torch.equal(w.detach(), torch.tensor([1e-24, 1e-24]))
    assert opt.search_state.forwards <= 41  # one per step, and the replay check
    assert [m for m in caught if "converged" in str(m.message)]


def test_a_zero_gradient_takes_no_step_size_that_no_search_accepted():
    """Before the first search the step size is the user's lr, untested: a zero gradient
    there moves nothing (with weight decay, lr=30 and wd=0.1 turned w into -2w); during
    warm-up it follows the ramp."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 1.5], dtype=torch.float64))
    opt = ALSALS([w], lr=30.0, weight_decay=0.1)
    for _ in range(3):
        opt.step(lambda: (w * 0.0).sum() + 1.0)  # (above the floor)
        assert opt.last_step.kind == "zero_grad" and opt.last_step.step_size == 0.0
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 1.5], dtype=torch.float64))

    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), lr=1.0, warmup_steps=100)
    plan = batches(x, y, 4)
    for idx in plan[:3]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    opt.step(lambda: loss_of(model, x[plan[3]], y[plan[3]]) * 0.0 + 0.5)  # (above the floor)
    assert opt.last_step.kind == "zero_grad"
    assert 0.0 < opt.last_step.step_size <= 4 / 100  # (the ramp at the fourth step)


def float64_regression():
    """``one_sharp_batch_run``'s regression: 64 rows of 5 features (float64), their targets
    without noise, and the generator that drew them (its noise comes next)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 5, generator=g, dtype=torch.float64)
    return a, a @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64), g


def one_sharp_batch_run(
    cut_retry: bool,
    sharp_steps: dict | tuple,
    steps: int,
    writes: dict | None = None,
    steeper: tuple = (),
    states: list | None = None,
    group_writes: dict | None = None,
    **kwargs,
):
    """A float64 regression whose batches at ``sharp_steps`` are sharp for the trials alone (its
    loss rises by ``1e4 |d|^2``, ``d`` the part of the move from the point of the gradient
    ``y`` across the averaging direction ``z - y``, which the averaging move alone leaves
    0), as an outlier batch is: that search cuts the step size far below its start (a dict
    gives each sharp step its own factor for ``1e4``). ``writes``: an ``lr`` written before
    each of those steps; ``steeper``: steps whose loss gains ``(w - y) . 1``, the same loss at
    ``y`` with a steeper slope (a lower Polyak bound). ``late_retry`` is off unless given
    (``cut_retry`` alone). The optimizer, the searched step size after each step, and each
    step's ``last_step`` (and in ``states`` the search state after each step;
    ``group_writes``: settings written into the group before a step)."""
    sharpness = sharp_steps if isinstance(sharp_steps, dict) else dict.fromkeys(sharp_steps, 1e4)
    a, b, g = float64_regression()
    b = b + 0.3 * torch.randn(64, generator=g, dtype=torch.float64)
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], cut_retry=cut_retry, **{"late_retry": False, **kwargs})
    sizes, infos = [], []
    for k in range(steps):
        idx = torch.arange(16 * (k % 4), 16 * (k % 4 + 1))
        at_y = []
        if k in (writes or {}):
            opt.param_groups[0]["lr"] = writes[k]
        opt.param_groups[0].update((group_writes or {}).get(k, {}))

        def closure(k=k, idx=idx, at_y=at_y):
            loss = 0.5 * ((a[idx] @ w - b[idx]) ** 2).mean()
            if torch.is_grad_enabled():
                z = opt.state[w]["z"] if opt.state[w] else w.detach()
                at_y.append((w.detach().clone(), z - w.detach()))
            elif k in sharpness:
                y, towards_z = at_y[0]
                move = w - y
                if towards_z.norm() > 0:
                    unit = towards_z / towards_z.norm()
                    move = move - (move @ unit) * unit
                loss = loss + sharpness[k] * (move**2).sum()
            if k in steeper:
                loss = loss + (w - at_y[0][0]).sum()
            return loss

        opt.step(closure)
        sizes.append(opt.param_groups[0]["lr"])
        infos.append(opt.last_step)
        if states is not None:
            states.append(opt.search_state)
    return opt, sizes, infos


@pytest.mark.parametrize(
    ("sharp_step", "initial_searches"), [(1, 10), (10, 1)], ids=["first-phase", "cadence"]
)
def test_cut_retry_checks_one_batchs_cut_on_the_next(sharp_step, initial_searches):
    """With ``cut_retry``, the search at the sharp batch sets the step size more than 10x
    below its start, and the next step (at the cadence a reuse otherwise) searches again
    from that start: the next batch is not sharp, its first trial passes, and the step size
    is back. Without it the step size stays cut until growth wins it back (early in a run,
    the collapse of section 32's LSTM)."""
    settings = {"steps": sharp_step + 3, "initial_searches": initial_searches}
    _, plain, plain_infos = one_sharp_batch_run(False, (sharp_step,), **settings)
    _, retried, infos = one_sharp_batch_run(True, (sharp_step,), **settings)
    cut = sharp_step
    assert plain_infos[cut].kind == infos[cut].kind == "search"
    assert retried[cut] == plain[cut] < retried[cut - 1] / 10  # (the same cut)
    retry = infos[cut + 1]
    assert retry.kind == "search" and retry.trials == 1
    start = retried[cut - 1] * 1.1  # where the search that cut started (grown)
    assert retried[cut + 1] == pytest.approx(start, rel=1e-12)
    assert plain[cut + 1] < plain[cut - 1] / 5  # (without: still cut)
    if initial_searches == 1:  # at the cadence: one search, then the cadence goes on
        assert plain_infos[cut + 1].kind == "reuse" and infos[cut + 2].kind == "reuse"


@pytest.mark.parametrize("late_retry", [False, True])
def test_cut_retry_checks_once_and_not_a_run_s_first_search(late_retry):
    """A run's first search, which starts from the user's guess, cuts as far as it must
    without a retry; a retry that cuts as well sets the larger of the two cuts (its step is
    the trial it passed), and makes no second retry (with ``late_retry`` as well)."""
    _, _, infos = one_sharp_batch_run(
        True, (), steps=3, lr=1e6, loss_floor=None, late_retry=late_retry
    )
    assert infos[0].kind == "search" and infos[0].step_size < 1e4  # (cut far from lr)
    assert infos[1].trials == 1  # the second search starts grown from the first's
    # a sharp batch, then a sharper one: the retry cuts further
    opt, sizes, infos = one_sharp_batch_run(
        True,
        {10: 1e4, 11: 1e7},
        steps=14,
        initial_searches=1,
        polyak_cap=False,
        late_retry=late_retry,
    )
    assert infos[11].step_size < sizes[10]  # (the retry's trial, below the first cut)
    assert [i.kind for i in infos[10:]] == ["search", "search", "reuse", "reuse"]
    assert sizes[11] == max(sizes[10], infos[11].step_size) < sizes[9] / 10
    assert sizes[13] == sizes[11] and opt.search_state.retry_from == 0.0


def test_late_retry_cut_retry_and_regrowth_are_defaults():
    """Both checks of a cut, and the way back after one, are on unless switched off."""
    w = torch.zeros(2, requires_grad=True)
    assert ALSALS([w]).defaults["late_retry"] is True
    assert ALSALS([w]).defaults["cut_retry"] is True
    assert ALSALS([w]).defaults["regrowth"] == 2.0


@pytest.mark.parametrize(("sharpness", "retried"), [(30.0, False), (100.0, True)])
def test_cut_retry_acts_on_cuts_beyond_10x_only(sharpness, retried):
    """A cut of 7.5x (a sharp batch of factor 30) is left; one of 18x (100) is retried."""
    _, sizes, infos = one_sharp_batch_run(True, {10: sharpness}, steps=12, initial_searches=1)
    cut = sizes[9] * 1.1 / sizes[10]  # (the search's start: the last step size grown)
    assert (cut > 10.0) == retried and (5.0 < cut < 30.0), cut
    assert infos[11].kind == ("search" if retried else "reuse")


@pytest.mark.parametrize("late_retry", [False, True])
@pytest.mark.parametrize(
    "case", ["retry-cuts-again", "written-lr", "warm-up", "written-while-pending", "switched-off"]
)
def test_cut_retry_arms_no_retry_from_a_retry_a_written_lr_or_warm_up(case, late_retry):
    """A cut beyond 10x arms no retry where it is itself a retry's (here 22x below its
    start, above the first cut: the step size is the retry's), a search from a written
    ``lr``, or one in warm-up; and a written ``lr`` drops a retry pending (the next search
    starts from the user's value), as does ``cut_retry`` written ``False`` (with
    ``late_retry`` written ``False`` too where it is on): the same with ``late_retry``."""
    settings: dict = {"steps": 13, "initial_searches": 1, "late_retry": late_retry}
    if case == "retry-cuts-again":
        opt, sizes, infos = one_sharp_batch_run(True, {10: 1e4, 11: 1e3}, **settings)
        assert sizes[10] < sizes[11] < sizes[9] * 1.1 / 10  # (the retry cut, above the cut)
        assert [i.kind for i in infos[10:]] == ["search", "search", "reuse"]
    elif case == "written-lr":
        opt, sizes, infos = one_sharp_batch_run(True, (10,), writes={10: 0.6}, **settings)
        assert sizes[10] < 0.06 and [i.kind for i in infos[10:]] == ["search", "reuse", "reuse"]
    elif case == "warm-up":  # (read right after the cut: warm-up's ramp sets the next start)
        settings["steps"] = 10
        opt, sizes, infos = one_sharp_batch_run(True, (9,), warmup_steps=11, **settings)
        assert sizes[9] < sizes[8] / 10 and infos[9].kind == "search"
    elif case == "written-while-pending":
        opt, sizes, infos = one_sharp_batch_run(True, (10,), writes={11: 0.05}, **settings)
        assert infos[11].kind == "search" and sizes[11] < 0.1  # (not back at the retry's start)
    else:  # cut_retry written False into the group while a retry is pending: none runs
        settings["steps"] = 11
        opt, sizes, infos = one_sharp_batch_run(True, (10,), **settings)
        assert opt.search_state.retry_from > 0.0
        opt.param_groups[0]["cut_retry"] = False
        opt.param_groups[0]["late_retry"] = False
        (w,) = opt.param_groups[0]["params"]
        opt.step(lambda: (w**2).sum())
        assert opt.last_step.kind == "reuse"
    assert opt.search_state.retry_from == 0.0


def test_a_retry_whose_start_the_polyak_bound_lowered_sets_the_step_size():
    """The retry's batch has a steeper slope (a lower Polyak bound) and its lowered start
    passes, far above the cut: the step size becomes that trial's, although a lowered start
    that passes sets nothing elsewhere (``polyak_start="trial"``)."""
    _, sizes, infos = one_sharp_batch_run(
        True, (10,), steps=13, initial_searches=1, steeper=(11,), polyak_cap=False
    )
    assert infos[11].kind == "search" and infos[11].trials == 1
    assert sizes[10] * 10 < infos[11].step_size == sizes[11] < sizes[9] * 1.1


@pytest.mark.parametrize("cut_retry", [True, False])
@pytest.mark.parametrize("sharpness", [3.0, 30.0])
def test_late_retry_checks_every_cut_after_the_first_phase(cut_retry, sharpness):
    """After the first phase (``initial_searches=1``: from the second step on) a cut of any
    factor (1.25x, 7.5x: below ``cut_retry``'s 10x) is checked on the next batch: its first
    trial, the start of the search that cut, passes and the step size is back, once (with
    or without ``cut_retry``). Without ``late_retry`` the cut stands."""
    settings = {"steps": 13, "initial_searches": 1}
    _, plain, plain_infos = one_sharp_batch_run(cut_retry, {10: sharpness}, **settings)
    _, sizes, infos = one_sharp_batch_run(cut_retry, {10: sharpness}, late_retry=True, **settings)
    start = sizes[9] * 1.1  # where the search that cut started (grown)
    assert sizes[10] == plain[10] and 1.2 < start / sizes[10] < 10  # (the same cut)
    assert plain_infos[11].kind == "reuse" and plain[11] == plain[10]
    assert infos[11].kind == "search" and infos[11].trials == 1
    assert sizes[11] == pytest.approx(start, rel=1e-12)
    assert infos[12].kind == "reuse"


@pytest.mark.parametrize(
    ("first_phase", "sharp_step", "retried"), [("never", 5, False), ("settled", 11, True)]
)
def test_late_retry_waits_for_the_end_of_the_first_phase(first_phase, sharp_step, retried):
    """With ``initial_searches=20`` a 5x cut at step 5 of a first phase that searches
    every step (``"never"`` ends it early) stands: the next search starts from the cut,
    grown. Where the phase ended early (``"settled"``: at the second search, step 1), a cut
    at step 11, the cadence's search, is checked on the next batch although fewer than 20
    steps have run."""
    opt, sizes, infos = one_sharp_batch_run(
        False,
        {sharp_step: 30.0},
        steps=sharp_step + 3,
        initial_searches=20,
        first_phase=first_phase,
        late_retry=True,
    )
    assert infos[sharp_step].kind == "search" and sizes[sharp_step] < sizes[sharp_step - 1] / 3
    after = infos[sharp_step + 1]
    assert after.kind == "search" and after.trials == 1
    grown = sizes[sharp_step + 1] / sizes[sharp_step]
    if retried:  # back at the start of the search that cut, then the cadence's reuse
        assert sizes[sharp_step + 1] == pytest.approx(sizes[sharp_step - 1] * 1.1, rel=1e-12)
        assert infos[sharp_step + 2].kind == "reuse"
    else:  # a search of the first phase, from the cut grown by 10%
        assert grown == pytest.approx(1.1, rel=1e-12)


def test_a_pending_cut_retry_resumes_from_a_checkpoint():
    """The retry a cut left pending is in the state: a run resumed from a checkpoint taken
    right after the cut retries as the uninterrupted run does."""
    opt, _, _ = one_sharp_batch_run(True, (10,), steps=11, initial_searches=1)
    assert opt.search_state.retry_from > 0.0
    (w,) = opt.param_groups[0]["params"]
    resumed_w = w.detach().clone().requires_grad_()
    resumed = ALSALS([resumed_w], cut_retry=True, initial_searches=1)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.search_state.retry_from == opt.search_state.retry_from
    a, b, _ = float64_regression()
    for optimizer, weights in ((opt, w), (resumed, resumed_w)):
        optimizer.step(lambda weights=weights: 0.5 * ((a @ weights - b) ** 2).mean())
        assert optimizer.last_step.kind == "search"  # (a reuse at the cadence otherwise)
    assert torch.equal(w, resumed_w)


# ------------------------------------------------------------- regrowth: the way back after a cut


@pytest.mark.parametrize(("c", "regrowth"), [(0.6, 2.0), (0.3, 2.0), (0.6, 3.0)])
def test_regrowth_s_test_puts_the_armijo_limit_regrowth_squared_times_above_the_trial(c, regrowth):
    """Along a quadratic slice ``f(gamma) = f - s gamma + h gamma^2 / 2`` the Armijo test's
    limit is ``2 (1 - c) s / h``; a first trial that passed counts as linear exactly where
    that limit lies at least ``regrowth^2`` times above it (1% either side of the border),
    and never where the promise is not a decrease or the rule is off."""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], c=c, regrowth=regrowth)
    s, h = 1.7, 3.1
    limit = 2 * (1 - c) * s / h
    for ratio, linear in ((regrowth**2 * 1.01, True), (regrowth**2 / 1.01, False)):
        gamma = limit / ratio
        decrease, promise = s * gamma - h * gamma**2 / 2, s * gamma
        assert opt._passed_as_linear(decrease, promise) is linear
    assert not opt._passed_as_linear(-1e-3, -1e-3)  # (a promise that is no decrease)
    assert not ALSALS([w], regrowth=None)._passed_as_linear(1.0, 1.0)


def cut_then_regrowth_run(regrowth, writes=None):
    """``one_sharp_batch_run``'s regression with a sharp batch at step 10 (a cut of about 7x
    at a search of the cadence) that stands (no retry, no guard): the step size after each
    step, the steps that searched, and the search state after each step."""
    states: list = []
    _, sizes, infos = one_sharp_batch_run(
        False,
        {10: 30.0},
        steps=81,
        initial_searches=1,
        loss_rise_guard=None,
        regrowth=regrowth,
        writes=writes,
        states=states,
    )
    return sizes, [k for k, info in enumerate(infos) if info.kind != "reuse"], states


def test_regrowth_brings_a_cut_step_size_back_in_a_few_searches_never_above_the_peak():
    """After the cut, a search whose first trial passed as the linear model promised lets
    the next start at twice the step size, but not above the largest step size a search set
    (the peak); any other at 1.1 times: back within 20% of the peak by step 80, where growth
    by 10% per search (``regrowth=None``) is still 3x below it."""
    sizes, searches, states = cut_then_regrowth_run(2.0)
    plain, _, _ = cut_then_regrowth_run(None)
    peak = sizes[9]
    assert sizes[10] < peak / 5 and plain[10] == sizes[10]  # (the same cut)
    assert sizes[80] > peak / 1.2 and plain[80] < peak / 3
    assert states[80].peak_step_size == peak
    regrown = 0
    for before, k in zip(searches, searches[1:], strict=False):
        if k <= 10 or sizes[k] == sizes[k - 1]:  # (up to the cut; a search that kept)
            continue
        expected = min(2.0, peak / sizes[k - 1]) if states[before].regrow else 1.1
        assert sizes[k] / sizes[k - 1] == pytest.approx(max(expected, 1.1), rel=1e-12), k
        regrown += expected > 1.1
    assert regrown >= 2


def test_a_written_lr_is_no_cut_for_regrowth_to_undo():
    """An ``lr`` written 4x below the step size is the user's decision: the searches after
    it grow by 1.1 per search although they pass as linear (the peak starts afresh from the
    write), where without the write the same verdict doubled the step size."""
    sizes, searches, states = cut_then_regrowth_run(2.0, writes={60: 0.05})
    after = [k for k in searches if k >= 60]
    assert sizes[60] < 0.06 and any(states[k].regrow for k in after[:-1])
    for before, k in zip(after, after[1:], strict=False):
        assert sizes[k] == pytest.approx(sizes[before] * 1.1, rel=1e-12)
    assert states[80].peak_step_size == max(sizes[k] for k in after)
    unwritten, _, _ = cut_then_regrowth_run(2.0)
    assert unwritten[60] / unwritten[50] == pytest.approx(2.0, rel=1e-12)


def test_a_pending_regrowth_resumes_from_a_checkpoint():
    """The last search's verdict and the peak are in the state: a run resumed from a
    checkpoint taken right after a search that passed as linear starts its next search
    where the uninterrupted run does, twice the step size up."""
    _, searches, states = cut_then_regrowth_run(2.0)
    k = next(k for k in searches if k > 10 and states[k].regrow)
    opt, sizes, _ = one_sharp_batch_run(
        False, {10: 30.0}, steps=k + 1, initial_searches=1, loss_rise_guard=None
    )
    (w,) = opt.param_groups[0]["params"]
    resumed_w = w.detach().clone().requires_grad_()
    resumed = ALSALS([resumed_w], initial_searches=1, late_retry=False, loss_rise_guard=None)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.search_state == opt.search_state and resumed.search_state.regrow
    a, b, _ = float64_regression()
    for optimizer, weights in ((opt, w), (resumed, resumed_w)):
        for _ in range(10):  # (to the next search at the cadence)
            optimizer.step(lambda weights=weights: 0.5 * ((a @ weights - b) ** 2).mean())
        assert optimizer.last_step.kind == "search" and optimizer.last_step.trials == 1
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * sizes[k], rel=1e-12)
    assert torch.equal(w, resumed_w)


def test_regrowth_leads_back_no_higher_than_where_the_lead_rule_shrank():
    """``lead_rule="shrink"`` lowers the step size while ``z`` trails, on many batches'
    evidence: regrowth takes the largest step size down with it, so no search afterwards
    starts above 1.1 times the last step size (the run has no cut for it to undo), although
    searches pass as linear."""
    x, y = logistic_problem(3)
    model = make_model()
    opt = ALSALS(
        model.parameters(),
        lr=2.0,
        c=0.05,
        initial_searches=3,
        search_interval=8,
        lead_rule="shrink",
        loss_floor=None,
        loss_rise_guard=None,
    )
    shrunk = linear = 0
    for idx in batches(x, y, 400):
        before = opt.param_groups[0]["lr"]
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
        if opt.last_step.kind == "search" and opt.search_state.searches > 1:
            assert opt.last_step.trials == 1  # (no cut after the run's first search)
            factor = opt.param_groups[0]["lr"] / before
            assert factor <= 1.1 * (1 + 1e-12)
            shrunk += factor < 1.0
            linear += opt.search_state.regrow
    assert shrunk > 0 and linear > 0, "the run must show both"


def test_a_start_the_polyak_bound_lowered_is_no_evidence_for_regrowth():
    """A search whose start the Polyak bound lowered did not test the grown start: its
    first trial passing, however linear, leaves no verdict for the next search."""
    seen = set()
    for before, info, opt in later_first_trial_passes():
        bounded = info.step_size < before * 1.1 * (1 - 1e-12)
        if bounded:
            assert not opt.search_state.regrow
        seen.add((bounded, opt.search_state.regrow))
    assert (True, False) in seen and (False, True) in seen, "the run must show both"


@pytest.mark.parametrize(("sharpness", "retried"), [(12.0, False), (25.0, True)])
def test_a_regrown_start_that_backtracks_to_above_the_usual_one_is_no_cut(sharpness, retried):
    """After a linear pass the next search starts at twice the step size; on a batch sharp
    enough to fail that start, backtracking to 1.6x raised the step size: no cut for
    ``late_retry`` (the next step reuses it). Backtracking to below 1.1x, the start growth
    gives, is a cut as ever, checked on the next batch."""
    sizes, searches, states = cut_then_regrowth_run(2.0)
    k = next(k for k in searches if k > 10 and states[k].regrow)
    _, sizes, infos = one_sharp_batch_run(
        False,
        {10: 30.0, k + 10: sharpness},
        steps=k + 12,
        initial_searches=1,
        loss_rise_guard=None,
        group_writes={k + 1: {"late_retry": True}},
    )
    raised = sizes[k + 10] / sizes[k + 9]
    assert infos[k + 10].kind == "search" and infos[k + 10].trials > 1
    assert (raised < 1.1) == retried and raised > 1.0
    assert infos[k + 11].kind == ("search" if retried else "reuse")


def regrown_search_with_scripted_trials(fails):
    """The cut run up to the search (at the cadence) that starts twice the step size up,
    then that search on a batch whose trials ``fails`` names (``"start"``: the first
    trial; ``"averaging"``: the averaging move alone, a trial whose move from ``y`` lies
    along ``z - y``; ``"later"``: any other) rise by 1 above the loss at ``y``; the others
    give the regression's loss. The step size before it, the optimizer after it, and what
    each evaluation without gradient was."""
    sizes, searches, states = cut_then_regrowth_run(2.0)
    k = next(k for k in searches if k > 10 and states[k].regrow)
    a, b, _ = float64_regression()
    opt, _, _ = one_sharp_batch_run(
        False, {10: 30.0}, steps=k + 10, initial_searches=1, loss_rise_guard=None
    )
    (w,) = opt.param_groups[0]["params"]
    at_y, trials = [], []

    def closure():
        loss = 0.5 * ((a @ w - b) ** 2).mean()
        if torch.is_grad_enabled():
            at_y.append((w.detach().clone(), opt.state[w]["z"] - w.detach()))
            return loss
        y, towards_z = at_y[0]
        move = w.detach() - y
        across = move - (move @ towards_z) / (towards_z @ towards_z) * towards_z
        trials.append("averaging" if across.norm() <= 1e-9 * move.norm() else "trial")
        order = "start" if trials.count("trial") == 1 else "later"
        named = "averaging" if trials[-1] == "averaging" else order
        return loss + 1.0 if named in fails else loss

    before = opt.param_groups[0]["lr"]
    opt.step(closure)
    return before, opt, trials


def test_a_failed_raised_start_whose_averaging_move_fails_holds_the_step_size():
    """A doubled start that fails is followed by the averaging move alone, as any failed
    first trial: where it fails too the search ends ``"kept"`` at the step size (a hold; going
    on from the usual 1.1x start instead was tried and not kept, method.md section 36), and
    where it passes the trials backtrack from the doubled start."""
    before, opt, trials = regrown_search_with_scripted_trials({"start", "averaging"})
    assert trials == ["trial", "averaging"]
    assert opt.last_step.kind == "kept" and opt.param_groups[0]["lr"] == before
    assert not opt.search_state.regrow
    before, opt, trials = regrown_search_with_scripted_trials({"start"})
    assert trials[:3] == ["trial", "averaging", "trial"]
    assert opt.last_step.kind == "search" and opt.param_groups[0]["lr"] < 2 * before
    # the trial that passed there would pass as linear (on this regression it lies far
    # below its batch's limit), but a verdict is the first trial's alone
    assert not opt.search_state.regrow


def test_a_huge_regrowth_runs():
    """``regrowth`` is any finite value of at least 1: its test squares it as a product,
    which a float power would overflow (1e155 ** 2)."""
    _, sizes, infos = one_sharp_batch_run(
        False, (), steps=30, initial_searches=3, search_interval=2, regrowth=1e200
    )
    assert all(math.isfinite(s) and s > 0 for s in sizes)


def test_a_search_whose_trials_are_not_finite_leaves_no_verdict():
    """After a linear pass, a search whose every evaluation without gradient is NaN (the
    step is skipped) judged no start: the search after it starts at 1.1 times the step
    size, not at twice it."""
    sizes, searches, states = cut_then_regrowth_run(2.0)
    k = next(k for k in searches if k > 10 and states[k].regrow)
    a, b, _ = float64_regression()
    opt, sizes, _ = one_sharp_batch_run(
        False, {10: 30.0}, steps=k + 10, initial_searches=1, loss_rise_guard=None
    )
    (w,) = opt.param_groups[0]["params"]

    def nan_trials():
        loss = 0.5 * ((a @ w - b) ** 2).mean()
        return loss if torch.is_grad_enabled() else loss * math.nan

    opt.step(nan_trials)  # (the search at the cadence, k + 10)
    assert opt.last_step.kind == "nonfinite" and not opt.search_state.regrow
    before = opt.param_groups[0]["lr"]
    opt.step(lambda: 0.5 * ((a @ w - b) ** 2).mean())  # (it searches again)
    assert opt.last_step.kind == "search" and opt.last_step.trials == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(before * 1.1, rel=1e-12)


def test_a_step_with_a_zero_gradient_counts_towards_the_search_interval():
    """A zero gradient still takes Schedule-Free's step (the averaging move): it is one of
    the ``search_interval`` steps between two searches, as any reused step is."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), initial_searches=1, search_interval=3)
    idx = batches(x, y, 5)
    kinds = []
    for k in range(5):
        zero = 0.0 if k == 2 else 1.0  # step 2: a loss of 0, its gradient exactly 0
        opt.step(lambda k=k, zero=zero: zero * loss_of(model, x[idx[k]], y[idx[k]]))
        kinds.append(opt.last_step.kind)
    assert kinds == ["search", "reuse", "zero_grad", "search", "reuse"]


def test_a_zero_gradient_after_a_search_that_accepted_nothing_takes_no_step_size():
    """A search that ran out of trials leaves a step size no search accepted (the next one
    resumes below its last trial): a zero gradient before that search moves only by the
    averaging move, not by the untested step size (here with a decay, which would move
    the weights)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 1.5], dtype=torch.float64))
    opt = ALSALS([w], lr=100.0, weight_decay=0.1, max_trials=1, loss_floor=None)
    opt.step(lambda: 0.5 * (w * w).sum())  # its one trial, at lr, fails
    assert opt.last_step.kind == "exhausted" and opt.search_state.resume > 0.0
    before = w.detach().clone()
    opt.step(lambda: (w * 0.0).sum() + 1.0)
    assert opt.last_step.kind == "zero_grad" and opt.last_step.step_size == 0.0
    assert torch.equal(w.detach(), before)


def test_an_edit_of_the_weights_starts_the_loss_rise_guard_s_watch_afresh():
    """Phase 0: weights written in place since the last step are the new ``x``, and the
    guard's watch, whose losses were those of weights no longer held, starts afresh."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters())
    plan = batches(x, y, 6)
    for idx in plan[:5]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    assert opt.search_state.watch["samples"] == 5
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # a projection, say
    opt.step(lambda: loss_of(model, x[plan[5]], y[plan[5]]))
    assert opt.search_state.edits == 1
    assert opt.search_state.watch["samples"] == 1  # this step's loss alone


def test_a_written_lr_in_a_scaled_group_sets_the_step_size_lr_over_lr_scale():
    """A group shows ``lr = gamma * lr_scale``: an ``lr`` written there sets the searched
    step size ``gamma`` to ``lr / lr_scale``, from which the next search grows its start."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(
        [{"params": model.parameters(), "lr_scale": 0.5}], loss_floor=None, polyak_cap=False
    )
    plan = batches(x, y, 4)
    for idx in plan[:3]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    opt.param_groups[0]["lr"] = 0.005  # gamma = 0.01; small: the grown start passes
    opt.step(lambda: loss_of(model, x[plan[3]], y[plan[3]]))
    assert opt.last_step.kind == "search" and opt.last_step.trials == 1
    assert opt.last_step.step_size == pytest.approx(0.01 * 1.1, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.01 * 1.1, rel=1e-12)


def test_first_phase_settled_is_not_ended_by_the_run_s_first_search():
    """``first_phase="settled"`` ends at a search *after the first* that takes its first
    trial: a run's first search that passes at once (here at the Polyak step, which halves
    ``w`` on ``w^2 / 2``) says only that ``lr`` was not too small, and the searches go on."""
    w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = ALSALS([w], lr=100.0, first_phase="settled", initial_searches=10, search_interval=100)
    opt.step(lambda: 0.5 * (w * w).sum())
    assert opt.last_step.kind == "search" and opt.last_step.trials == 1
    assert not opt.search_state.first_phase_over
    opt.step(lambda: 0.5 * (w * w).sum())
    assert opt.last_step.kind != "reuse"


def test_a_step_whose_z_is_at_y_counts_neither_as_leading_nor_as_trailing():
    """Phase 5: each step counts ``A = g . (y - z)`` as leading (``> 0``) or trailing
    (``< 0``); where an edit restarted ``z`` at the weights, ``y = z`` and ``A = 0``: no sign
    for ``lead_rule``'s test."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), initial_searches=1, search_interval=100, lead_rule="hold")
    plan = batches(x, y, 4)
    for idx in plan[:3]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    # (the first step's alpha = 1 leaves x = z: the second step's A is 0 too; the third's not)
    signs = opt.search_state.leading + opt.search_state.trailing
    assert signs == 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # every weight edited: z restarts there
    opt.step(lambda: loss_of(model, x[plan[3]], y[plan[3]]))
    assert opt.last_step.kind == "reuse"
    assert opt.search_state.leading + opt.search_state.trailing == signs


def test_a_zero_written_in_any_group_stops_the_step_whatever_the_others_write():
    """One step size for all groups: an ``lr`` of 0 written in one group (a scheduler's end)
    stops every group for the step, also where an earlier group has another write."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    plan = batches(x, y, 3)
    for idx in plan[:2]:
        opt.step(lambda idx=idx: loss_of(model, x[idx], y[idx]))
    weights = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.05
    opt.param_groups[1]["lr"] = 0.0
    opt.step(lambda: loss_of(model, x[plan[2]], y[plan[2]]))
    assert opt.last_step.kind == "zero_lr"
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_the_step_after_a_skipped_non_finite_loss_searches():
    """``docs/algorithms.md`` (ALSALS, phase 1 and 4): a step after a skipped non-finite
    loss searches, whatever the cadence says; the step size is not reused untested (the
    clause was dead: the count it read was reset before it was read)."""
    x, y = logistic_problem(0)
    model = make_model()
    opt = ALSALS(model.parameters(), initial_searches=1, search_interval=1000)
    idx = batches(x, y, 6)
    for k in range(3):
        opt.step(lambda k=k: loss_of(model, x[idx[k]], y[idx[k]]))
    assert opt.last_step.kind == "reuse"  # the cadence alone would reuse from here on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: loss_of(model, x[idx[3]], y[idx[3]]) * float("nan"))
    assert opt.last_step.kind == "nonfinite"
    opt.step(lambda: loss_of(model, x[idx[4]], y[idx[4]]))
    assert opt.last_step.kind != "reuse" and opt.last_step.trials >= 1
    opt.step(lambda: loss_of(model, x[idx[5]], y[idx[5]]))
    assert opt.last_step.kind == "reuse"


# -- paths a mutation audit found no test pinning down (method.md, section 44) ---------------


def _one_weight_run(**settings):
    """ALSALS on ``0.5 w^2`` from ``w = 1`` (float64), three steps taken, with its closure."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = ALSALS([w], lr=0.01, **settings)
    evaluated: list[float] = []

    def closure():
        evaluated.append(float(w.detach()))
        return 0.5 * (w**2).sum()

    for _ in range(3):
        opt.step(closure)
    return w, opt, closure, evaluated


def test_a_written_lr_starts_the_next_search_where_a_resume_was_pending():
    """A search that accepted nothing leaves where the next one resumes (below its last
    trial); an lr written after it is the user's word and starts the next search from it,
    not from the smaller of it and the pending resume (which moved the first trial by 103
    instead of 480 here)."""
    w, opt, closure, evaluated = _one_weight_run(
        max_trials=2, loss_rise_guard=None, loss_floor=None
    )
    opt.param_groups[0]["lr"] = 1e3  # far too large: the search exhausts, a resume pending
    opt.step(closure)
    assert opt.last_step.kind == "exhausted"
    pending = opt.search_state.resume
    assert 0.0 < pending < 500.0
    opt.param_groups[0]["lr"] = 500.0
    evaluated.clear()
    opt.step(closure)
    moved = evaluated[0] - evaluated[1]  # (u is about 1 here: Adam's direction, one weight)
    assert moved > pending and moved > 0.9 * 500.0


def test_a_resumed_search_that_keeps_takes_the_averaging_move_alone():
    """A search resumed after one that accepted nothing, whose first trial and averaging
    move both fail (z uphill of x), is "kept" with no step along u (its step size is no
    search's) and resumes lower next time; taking the untested step size there moved the
    weight by 1500."""
    w, opt, closure, _ = _one_weight_run(max_trials=2, loss_rise_guard=None, loss_floor=None)
    opt.param_groups[0]["lr"] = 1e3
    opt.step(closure)
    first_resume = opt.search_state.resume
    assert opt.last_step.kind == "exhausted" and first_resume > 0.0
    with torch.no_grad():
        opt.state[w]["z"].fill_(10.0)  # z uphill: the averaging move alone fails too
    opt.step(closure)
    assert opt.last_step.kind == "kept"
    assert opt.last_step.step_size == 0.0
    assert 0.0 < opt.search_state.resume < first_resume
    opt.eval()
    assert abs(float(w.detach())) < 10.0


def test_a_failed_written_start_climbs_no_further_where_the_promise_stops_growing():
    """A written lr above the largest step size the run took, with z far uphill of x: the
    move's promise falls as the step size grows (the averaging weight grows with it), so
    the search takes no climb past the written start (it climbed to 1e5 and left the next
    search's resume there)."""
    w, opt, _, evaluated = _one_weight_run(loss_rise_guard=None)
    with torch.no_grad():
        opt.state[w]["z"].fill_(10.0)
        opt.state[w]["exp_avg_sq"].fill_(1e4)  # a small u: a small slope along it
    opt.param_groups[0]["lr"] = 1.0

    def closure():
        evaluated.append(float(w.detach()))
        return 0.5 * (w**2).sum()

    evaluated.clear()
    opt.step(closure)
    assert opt.last_step.kind == "kept" and opt.last_step.trials == 2
    assert len(evaluated) == 3  # the gradient, the trial, the averaging move alone
    assert 0.0 < opt.search_state.resume < 1.0
