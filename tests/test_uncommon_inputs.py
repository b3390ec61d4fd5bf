"""Uncommon inputs users can give: each is accepted as documented or refused by name, and a
refused one changes nothing (inputs a coverage audit found no test gave)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS
from conftest import OPTIMIZER_IDS, OPTIMIZERS, assert_bitwise_same

F64 = torch.float64
#: The four line-search configurations and ALSALS: where a property holds for every class.
ALL = [*OPTIMIZERS, ALSALS]
ALL_IDS = [*OPTIMIZER_IDS, "ALSALS"]


def mse(model: nn.Module, seed: int = 0):
    """The closure of ``model``'s mean squared error on a fixed float64 batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=F64)
    y = torch.randn(16, 1, generator=gen, dtype=F64)
    return lambda: ((model(x) - y) ** 2).mean()


def regression(seed: int = 0):
    """A small float64 least-squares fit: ``nn.Linear(3, 1)`` and its closure."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1, dtype=F64)
    return model, mse(model, seed)


def weights(model_or_params) -> list[torch.Tensor]:
    params = (
        model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    )
    return [p.detach().clone() for p in params]


# -- closures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_a_closure_returning_none_is_refused_naming_its_type(cls):
    """A closure that forgets its ``return`` gives ``None``: a ``TypeError`` that says the
    loss must be returned and names ``NoneType`` (without the hint meant for a model's
    output), before anything moves."""
    model, _ = regression()
    opt = cls(model.parameters())
    before = weights(model)
    with pytest.raises(
        TypeError,
        match=r"closure must return the loss \(a scalar tensor\); closure\(\) returned NoneType$",
    ):
        opt.step(lambda: None)
    assert_bitwise_same(before, weights(model))


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_declaring_that_a_backward_closure_does_not_run_backward_is_refused(cls):
    """``closure_runs_backward=False`` with a ``closure(backward)`` contradicts itself (the
    closure's argument tells it whether to run backward): a ``TypeError`` saying so, before
    the closure is called or anything moves."""
    model, loss = regression()
    opt = cls(model.parameters())
    before = weights(model)
    calls = []

    def closure(backward):
        calls.append(backward)
        return loss()

    with pytest.raises(
        TypeError, match="closure_runs_backward=False, but the closure takes a backward argument"
    ):
        opt.step(closure, closure_runs_backward=False)
    assert calls == []
    assert_bitwise_same(before, weights(model))


class _UnreadableSignature:
    """A callable whose signature ``inspect`` cannot read (as some C-implemented ones)."""

    def __init__(self, closure):
        self.closure = closure

    @property
    def __signature__(self):
        raise ValueError("no signature found")

    def __call__(self):
        return self.closure()


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_a_closure_whose_signature_cannot_be_read_is_called_without_arguments(cls):
    """Where ``inspect.signature`` fails, the closure is taken for the plain form
    ``closure()`` (the optimizer runs backward): the run is the one of the same closure as
    a lambda, bit for bit."""
    runs = []
    for wrap in (_UnreadableSignature, lambda closure: lambda: closure()):
        model, loss = regression()
        opt = cls(model.parameters())
        for _ in range(3):
            opt.step(wrap(loss))
            assert opt.last_step.kind in ("search", "reuse", "kept")
        runs.append(weights(model))
    assert_bitwise_same(*runs)


# -- buffers= ---------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["one tensor", "beside None"])
@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_buffers_given_as_one_tensor_or_beside_none_are_protected(cls, given):
    """``buffers=`` may be one tensor rather than an iterable of them (a 0-d counter cannot
    be iterated), and ``None`` among them (a module's unset buffer) is skipped: the tensor
    is the one protected, and the trials leave it as the step's one training forward did."""
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    counter = torch.zeros((), dtype=torch.int64)

    def closure():
        counter.add_(1)  # a forward pass's side effect, as num_batches_tracked
        return ((w - 3.0) ** 2).sum()

    opt = cls([w], lr=100.0, buffers=counter if given == "one tensor" else [None, counter])
    assert len(opt.protected_buffers) == 1 and opt.protected_buffers[0] is counter
    opt.step(closure)
    assert opt.last_step.kind == "search" and opt.last_step.forwards > 2  # (trials ran)
    assert counter.item() == 1


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_a_number_among_the_buffers_is_refused_naming_its_type(cls):
    """``buffers=[1.0]`` is no buffer to protect: a ``TypeError`` that says what to pass and
    names the type given."""
    with pytest.raises(
        TypeError, match=r"buffers= must hold tensors \(model.buffers\(\)\); got float$"
    ):
        cls([torch.zeros(2, requires_grad=True)], buffers=[1.0])


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_every_parameter_frozen_with_buffers_given_is_a_step_without_gradient(cls):
    """Every parameter frozen (``requires_grad=False``) and ``buffers=`` given: the step is a
    ``zero_grad`` one (no weight to watch for an initialisation by the forward pass), the
    weights unchanged, the buffer as one forward pass left it."""
    w = torch.tensor([1.0, -2.0], dtype=F64)
    counter = torch.zeros((), dtype=torch.int64)

    def closure():
        counter.add_(1)
        return ((w - 3.0) ** 2).sum()

    opt = cls([w], buffers=[counter])
    opt.step(closure)
    assert opt.last_step.kind == "zero_grad"
    assert torch.equal(w, torch.tensor([1.0, -2.0], dtype=F64))
    assert counter.item() == 1


# -- parameter groups and settings --------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_a_parameter_group_that_is_no_dict_is_refused_and_nothing_is_added(cls):
    """``add_param_group([p])`` (the list of parameters instead of ``{"params": [p]}``): a
    ``TypeError`` naming the type given, and the optimizer keeps the groups it had."""
    opt = cls([torch.zeros(2, requires_grad=True)])
    groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(TypeError, match="a parameter group must be a dict, got list$"):
        opt.add_param_group([torch.zeros(3, requires_grad=True)])
    assert_bitwise_same(groups, opt.param_groups)


def test_alsals_betas_that_are_no_pair_are_refused():
    """``betas=0.9`` (beta1 alone): a ``ValueError`` that shows the value and what is
    expected, at construction and where a group brings it (which is then not added)."""
    with pytest.raises(ValueError, match=r"invalid betas: 0\.9 \(expected \(beta1, beta2\)\)"):
        ALSALS([torch.zeros(2, requires_grad=True)], betas=0.9)
    opt = ALSALS([torch.zeros(2, requires_grad=True)])
    groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=r"invalid betas: 0\.9 \(expected \(beta1, beta2\)\)"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "betas": 0.9})
    assert_bitwise_same(groups, opt.param_groups)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_one_group_mixing_float32_and_float64_steps_as_one_group_per_dtype(cls):
    """A group holding float32 and float64 weights: its slope terms are each rounded in
    their weight's dtype, so the run is bit for bit the one whose group is split by dtype
    (an ``lr_scale`` of 0.3 makes the rounding of the scaled terms show)."""
    runs = []
    for split in (False, True):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(5, generator=gen).requires_grad_()
        b = torch.randn(5, generator=gen, dtype=F64).requires_grad_()
        ta, tb = torch.randn(5, generator=gen), torch.randn(5, generator=gen, dtype=F64)
        groups = (
            [{"params": [a], "lr_scale": 0.3}, {"params": [b], "lr_scale": 0.3}]
            if split
            else [{"params": [a, b], "lr_scale": 0.3}]
        )
        opt = cls(groups)
        history = []
        for _ in range(4):
            opt.step(
                lambda a=a, b=b, ta=ta, tb=tb: (
                    1.7 * ((a - ta) ** 2).sum() + ((b - tb) ** 2).sum() / 3
                )
            )
            assert opt.last_step.kind in ("search", "reuse", "kept")
            history.append((opt.last_step.slope, opt.last_step.step_size, *weights([a, b])))
        assert a.dtype == torch.float32 and b.dtype == F64
        runs.append(history)
    assert_bitwise_same(*runs)


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_max_grad_norm_with_no_gradient_at_all_is_a_step_without_gradient(cls):
    """``max_grad_norm`` set and a ``closure(backward)`` whose loss is a constant (no
    parameter gets a gradient): the norm is 0 (not an error over an empty list), the step a
    ``zero_grad`` one, the weights unchanged."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = cls([w], max_grad_norm=1.0)
    opt.step(lambda backward: torch.tensor(1.0))
    assert opt.last_step.kind == "zero_grad"
    assert opt.last_step.grad_norm == 0.0
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_zero_gradients_created_outside_the_step_are_no_dropped_gradient(cls):
    """A backward pass outside ``step()`` that leaves new gradients of exactly 0 (a loss
    weighted by 0): dropping them loses nothing, so there is no warning about dropped
    gradients, and the run is the one without that pass, bit for bit."""
    runs = []
    for outside in (True, False):
        model, loss = regression()
        opt = cls(model.parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(loss)
            for _ in range(3):
                opt.zero_grad()
                if outside:
                    (0.0 * loss()).backward()
                    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
                opt.step(loss)
        assert not [w for w in caught if "held gradients computed" in str(w.message)]
        runs.append(weights(model))
    assert_bitwise_same(*runs)


# -- ALSALS -----------------------------------------------------------------------------------


def test_alsals_refuses_sparse_gradients_and_leaves_everything_as_it_was():
    """``nn.Embedding(sparse=True)``: a ``RuntimeError`` naming sparse gradients, the
    weights and the optimizer's state as before the step."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = ALSALS(emb.parameters())
    before, state = weights(emb), copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"ALSALS does not support sparse gradients"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum())
    assert_bitwise_same(before, weights(emb))
    assert_bitwise_same(state, opt.state_dict())


def test_alsals_closure_with_backward_that_never_runs_it_warns_and_skips():
    """A ``closure(backward)`` that never calls ``loss.backward()``: no parameter has a
    gradient, the step is a ``zero_grad`` one that moves nothing, and the warning names the
    forgotten call."""
    model, loss = regression()
    opt = ALSALS(model.parameters())
    before = weights(model)
    with pytest.warns(
        UserWarning,
        match=r"ALSALS: closure\(backward\) returned a loss that requires grad but no parameter has a gradient",
    ):
        opt.step(lambda backward: loss())
    assert opt.last_step.kind == "zero_grad"
    assert_bitwise_same(before, weights(model))
    assert all("z" not in opt.state.get(p, {}) for p in model.parameters())


def test_alsals_weights_written_after_train_are_the_next_step_s_start():
    """``train()`` (weights at ``y``), then weights written, then ``step()`` without
    ``eval()``: the written weights are the new average ``x`` (``z`` restarts there), as a
    write between steps is; the run goes on bit for bit as after that write."""
    runs = []
    for held in (True, False):
        model, loss = regression()
        opt = ALSALS(model.parameters())
        for _ in range(3):
            opt.step(loss)
        if held:
            opt.train()
        with torch.no_grad():
            model.weight.fill_(0.25)
        for _ in range(3):
            opt.step(loss)
            assert opt.last_step.kind in ("search", "reuse", "kept")
        assert opt.search_state.edits == 1
        runs.append((weights(model), copy.deepcopy(opt.state_dict())))
    assert_bitwise_same(runs[0][0], runs[1][0])
    assert_bitwise_same(runs[0][1], runs[1][1])


def test_alsals_a_group_unfrozen_after_train_joins_the_next_step():
    """A group frozen until ``train()`` has run (so ``train()`` took no copy of its
    weights), then unfrozen before the step: it gets a gradient, joins the step and trains,
    bit for bit as where it was unfrozen without ``train()``."""
    runs = []
    for train in (True, False):
        torch.manual_seed(0)
        a, b = nn.Linear(3, 1, dtype=F64), nn.Linear(3, 1, dtype=F64)
        gen = torch.Generator().manual_seed(1)
        x, y = (
            torch.randn(8, 3, generator=gen, dtype=F64),
            torch.randn(8, 1, generator=gen, dtype=F64),
        )
        b.requires_grad_(False)
        opt = ALSALS([{"params": a.parameters()}, {"params": b.parameters()}])

        def loss(a=a, b=b, x=x, y=y):
            return ((a(x) + b(x) - y) ** 2).mean()

        for _ in range(2):
            opt.step(loss)
        frozen = weights(b)
        if train:
            opt.train()
        b.requires_grad_(True)
        for _ in range(2):
            opt.step(loss)
            assert opt.last_step.kind in ("search", "reuse", "kept")
        assert all("z" in opt.state[p] for p in b.parameters())
        assert not torch.equal(frozen[0], b.weight.detach())
        runs.append(weights([*a.parameters(), *b.parameters()]))
    assert_bitwise_same(*runs)


def test_alsals_clipping_keeps_a_moment_whose_unclipped_square_would_overflow():
    """Gradient entries of 1e20 in float32 with ``max_grad_norm=1``: the unclipped ``g*g``
    overflows Adam's second moment, the clipped one does not, so the overflow check (which
    forms the moment from the clipped gradient) skips nothing: the step searches, and
    ``v = (1 - beta2) (g / ||g||)^2 = 0.001 / 3`` per entry."""
    w = torch.ones(3, requires_grad=True)
    opt = ALSALS([w], max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning of a skipped step)
        opt.step(lambda: 1e20 * ((w - 0.5) ** 2).sum())
    assert opt.last_step.kind == "search"
    assert opt.last_step.grad_norm == pytest.approx(3**0.5 * 1e20, rel=1e-6)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], torch.full((3,), 1e-3 / 3))
    assert (w.detach() < 1.0).all()


# -- checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_a_line_search_state_without_step_size_is_refused_and_nothing_loads(cls):
    """A stored line-search state that lacks ``step_size`` (a checkpoint edited by hand): a
    ``ValueError`` naming the entry and where it is, before anything loads."""
    model, loss = regression()
    opt = cls(model.parameters())
    opt.step(loss)
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0]["line_search"]["step_size"]
    fresh = cls(regression()[0].parameters())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"state\[0\]: the line_search state has no 'step_size'"):
        fresh.load_state_dict(saved)
    assert_bitwise_same(before, fresh.state_dict())


def test_an_alsals_search_state_that_is_no_dict_is_refused_and_nothing_loads():
    """The ALSALS search state replaced by a number: a ``ValueError`` that names the entry
    and says it is no dict, before anything loads."""
    model, loss = regression()
    opt = ALSALS(model.parameters())
    opt.step(loss)
    saved = copy.deepcopy(opt.state_dict())
    (index,) = [k for k, v in saved["state"].items() if "schedule_free_search" in v]
    saved["state"][index]["schedule_free_search"] = 5
    fresh = ALSALS(regression()[0].parameters())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(
        ValueError, match=r"invalid ALSALS state 'schedule_free_search': 5 \(not a dict\)"
    ):
        fresh.load_state_dict(saved)
    assert_bitwise_same(before, fresh.state_dict())


def test_an_alsals_checkpoint_with_retired_entries_resumes_bit_for_bit():
    """Checkpoints of older versions hold ``last_kept`` and ``linear``, which the search no
    longer keeps: they load (ignored), and the resumed run is the uninterrupted one, bit for
    bit."""
    model, loss = regression()
    opt = ALSALS(model.parameters())
    for _ in range(3):
        opt.step(loss)
    saved = copy.deepcopy(opt.state_dict())
    (index,) = [k for k, v in saved["state"].items() if "schedule_free_search" in v]
    saved["state"][index]["schedule_free_search"].update(last_kept=0.5, linear=True)
    resumed_model = copy.deepcopy(model)
    resumed = ALSALS(resumed_model.parameters())
    resumed.load_state_dict(saved)
    for m, o in ((model, opt), (resumed_model, resumed)):
        for _ in range(3):
            o.step(mse(m, seed=2))
    assert_bitwise_same(weights(model), weights(resumed_model))
    assert_bitwise_same(opt.state_dict(), resumed.state_dict())


def test_a_line_search_state_from_before_0_2_9_with_no_loss_samples_resumes_bit_for_bit():
    """An SLS checkpoint from before 0.2.9 holds the EMA of the squared losses
    (``loss_sq_avg``) instead of their spread; with no loss sampled yet (SLS without the
    rise guard samples none) the spread is 0 (not a division by ``1 - b^0 = 0``): the
    loaded search state is the saved one, and the run goes on bit for bit."""
    model, loss = regression()
    opt = SLS(model.parameters())
    for _ in range(3):
        opt.step(loss)
    saved = copy.deepcopy(opt.state_dict())
    stored = saved["state"][0]["line_search"]
    assert stored["loss_samples"] == 0 and stored["loss_spread_avg"] == 0.0
    del stored["loss_spread_avg"]
    stored["loss_sq_avg"] = 0.0
    resumed_model = copy.deepcopy(model)
    resumed = SLS(resumed_model.parameters())
    resumed.load_state_dict(saved)
    assert resumed.search_state == opt.search_state
    for m, o in ((model, opt), (resumed_model, resumed)):
        for _ in range(3):
            o.step(mse(m, seed=2))
    assert_bitwise_same(weights(model), weights(resumed_model))
    assert resumed.search_state == opt.search_state


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_a_step_without_closure_with_lr_0_and_a_gradient_missing_asks_for_a_closure(cls):
    """``step()`` without a closure on an optimizer without state, ``lr`` 0 in every group:
    only where every gradient is present and zero is it a checkpointing tool's call (a
    no-op creating the state); with one missing it is a user's step without its closure,
    the clear ``TypeError``, no state created and nothing moved."""
    model, _ = regression()
    opt = cls(model.parameters())
    for group in opt.param_groups:
        group["lr"] = 0.0
    model.weight.grad = torch.zeros_like(model.weight)  # (the bias's gradient is None)
    before = weights(model)
    with pytest.raises(
        TypeError, match=r"this optimizer needs a closure: call optimizer.step\(closure\)"
    ):
        opt.step()
    assert not opt.state
    assert_bitwise_same(before, weights(model))


# -- preview() and the buffers of the modules it runs ---------------------------------------


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_preview_puts_back_batchnorm_statistics_of_a_child_run_before_its_parent(cls, buffer_watch):
    """A closure that runs a child module (BatchNorm) on its own before the model that holds
    it: ``preview()`` puts its running statistics back as they were before the child's
    first forward pass, not as that pass left them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    x = torch.randn(8, 3)
    buffers = [b.clone() for b in model.buffers()]
    before = weights(model)
    opt = cls(model.parameters())
    opt.preview(lambda: model[1](x).pow(2).mean() + model(x).pow(2).mean())
    assert_bitwise_same(buffers, [b.clone() for b in model.buffers()])
    assert_bitwise_same(before, weights(model))


class _Resizer(nn.Module):
    """A buffer that a training forward pass resizes to the batch (a lazy observer's)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen.resize_(x.shape[0]).fill_(1.0)
        return self.linear(x)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_preview_puts_back_a_buffer_its_forward_passes_resized(cls, buffer_watch):
    """A buffer resized in the forward pass: ``preview()`` gives it back its shape and its
    values."""
    torch.manual_seed(0)
    model = _Resizer()
    x = torch.randn(5, 3)
    opt = cls(model.parameters())
    opt.preview(lambda: model(x).pow(2).mean())
    assert model.seen.shape == (1,)
    assert torch.equal(model.seen, torch.zeros(1))
