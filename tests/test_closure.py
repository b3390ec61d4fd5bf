"""The closure protocol: randomness replay, no side effects, both closure forms."""

from __future__ import annotations

import random
import warnings

import numpy as np
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


def make_setup(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SmallNet()
    x, y = make_classification()
    # A large initial step size makes the search backtrack, so a step has several trials.
    opt = cls(model.parameters(), lr=kwargs.pop("lr", 50.0), buffers=model.buffers(), **kwargs)
    return model, opt, x, y


def test_step_without_closure_says_a_closure_is_needed(optimizer_class):
    model, opt, _, _ = make_setup(optimizer_class)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


def test_step_returns_loss_at_the_starting_point(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    model.eval()  # deterministic forward
    closure = bce_closure(model, x, y)
    with torch.no_grad():
        expected = closure()
    loss = opt.step(closure)
    assert torch.equal(loss, expected)
    assert opt.last_step.trials > 1  # the weights moved through several trial points
    assert opt.last_step.loss == pytest.approx(float(expected))


def test_every_evaluation_in_a_step_sees_the_same_dropout_mask(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    masks: list[torch.Tensor] = []

    def closure():
        masks.append(nn.functional.dropout(torch.ones(32), p=0.5, training=True))
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    opt.step(closure)
    first_step = len(masks)
    assert first_step == opt.last_step.forwards > 2
    assert all(torch.equal(m, masks[0]) for m in masks)
    opt.step(closure)
    assert not torch.equal(masks[first_step], masks[0]), "a new step draws new randomness"
    assert all(torch.equal(m, masks[first_step]) for m in masks[first_step:])


def test_random_state_after_step_equals_one_plain_training_evaluation(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    closure = bce_closure(model, x, y)
    plain = SmallNet()
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(123)
    nn.functional.binary_cross_entropy_with_logits(plain(x), y).backward()
    expected = torch.get_rng_state()

    torch.manual_seed(123)
    opt.step(closure)
    assert opt.last_step.forwards > 2
    assert torch.equal(torch.get_rng_state(), expected)


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_gradient_noise_drawn_where_the_closure_runs_backward_is_fresh_at_every_step(cls):
    """A ``closure(backward)`` that adds noise to the gradient draws it only where it runs
    backward, never in a trial: after every step the random stream is where that one
    training evaluation leaves it, also after a step of one trial (left where the trial
    left it, the stream gave the same noise again at the next step)."""
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    opt = cls([w], lr=1e-3)  # (a small lr: most searches pass their first trial)

    def closure(backward):
        loss = ((w - target) ** 2).sum()
        if backward:
            loss.backward()
            w.grad.add_(torch.randn(4, dtype=torch.float64), alpha=1e-3)
        return loss

    forwards = []
    for _ in range(20):
        before = torch.get_rng_state()
        opt.step(closure)
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        torch.randn(4, dtype=torch.float64)  # the draws of one training evaluation
        assert torch.equal(after, torch.get_rng_state()), opt.last_step
        forwards.append(opt.last_step.forwards)
    assert 2 in forwards  # steps of one trial


def test_numpy_and_python_random_states_are_untouched(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    for _ in range(3):
        opt.step(bce_closure(model, x, y))
    after = np.random.get_state()  # noqa: NPY002
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1])
    assert random.getstate() == py_state


def test_runs_are_reproducible_under_manual_seed(optimizer_class):
    def run():
        model, opt, x, y = make_setup(optimizer_class, seed=7)
        for _ in range(5):
            idx = torch.randint(0, len(x), (32,))
            opt.step(bce_closure(model, x[idx], y[idx]))
        return [p.detach().clone() for p in model.parameters()]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_batchnorm_statistics_equal_one_training_forward_at_the_start(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    reference = SmallNet()
    reference.load_state_dict(model.state_dict())
    reference.train()
    with torch.no_grad():
        reference(x)

    opt.step(bce_closure(model, x, y))
    assert opt.last_step.forwards > 2
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)
    assert torch.equal(model.bn.running_var, reference.bn.running_var)
    assert model.bn.num_batches_tracked.item() == 1


class RunningCentre(nn.Module):
    """A buffer the forward pass reads as well as updates: a running mean subtracted from the
    input (as spectral_norm's power-iteration vector is read and updated)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1).double()
        self.register_buffer("centre", torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.centre.mul_(0.5).add_(0.5 * x.mean(0))
        return self.linear(x - self.centre)


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_trials_read_the_buffers_the_first_evaluation_read(cls):
    """Every trial evaluates the function the step's loss and gradient came from: buffers as
    they were before the first evaluation (else the replay at the starting weights differs
    from the loss, and the Armijo test compares two functions); after the step they are as
    one plain forward leaves them."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, dtype=torch.float64) + 2.0, torch.randn(16, 1, dtype=torch.float64)
    model, reference = RunningCentre(), RunningCentre()
    reference.load_state_dict(model.state_dict())
    opt = cls(model.parameters(), buffers=model.buffers())
    losses = []

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no replay warning)
        opt.step(closure)
    assert len(losses) > 2
    assert losses[1] == losses[0]  # the replay at the starting weights
    with torch.no_grad():
        reference(x)
    assert torch.equal(model.centre, reference.centre)


class ActNorm(nn.Module):
    """Glow's ActNorm: its first training forward sets its parameters from the data, once,
    behind an integer flag buffer (written through ``.data``, invisible to autograd)."""

    def __init__(self, channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones(1, channels, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.initialisations = 0

    def forward(self, x):
        if self.initialized.item() == 0:
            with torch.no_grad():
                self.loc.data.copy_(-x.mean(0, keepdim=True))
                self.scale.data.copy_(1 / (x.std(0, keepdim=True) + 1e-6))
            self.initialized.fill_(1)
            self.initialisations += 1
        return self.scale * (x + self.loc)


@pytest.mark.parametrize("later", [0, 3], ids=["first-step", "step-4"])
@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_forward_that_initialises_the_weights_runs_once(cls, later):
    """A data-dependent initialisation (ActNorm's) writes the weights at its first training
    forward, at the run's first step or a later one (a branch that joins later): that step's
    trials keep the buffers as it left them (its flag set), or each trial would initialise
    the weights again over the trial's move and the search judge a loss in which they never
    moved (ALSALS: 100 trials, no step; MomentumALSALS: a first search that collapsed the
    step size)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, dtype=torch.float64) * 3 + 1
    y = torch.randn(64, 1, dtype=torch.float64)
    norm, head = ActNorm(4), nn.Linear(4, 1).double()
    model = nn.Sequential(norm, head)
    opt = cls(model.parameters(), buffers=model.buffers())
    for _ in range(later):  # (without the normalisation yet)
        opt.step(lambda: ((head(x) - y) ** 2).mean())

    def closure():
        return ((model(x) - y) ** 2).mean() + (norm.loc**2).sum()

    opt.step(closure)
    assert norm.initialisations == 1
    assert opt.last_step.kind == "search"
    with torch.no_grad():
        assert closure().item() < opt.last_step.loss


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_forward_that_rounds_float64_weights_is_no_initialisation(cls):
    """A forward that rewrites float64 weights in place by their rounding (a renormalisation,
    here 1e-12 of each) beside a buffer it reads and updates (a call counter): the weights'
    norms before and after agree at float32's resolution, so it is no initialisation and the
    trials read the buffer as before the first evaluation. Compared in float64 (a version of
    this round), the write counted, the trials saw the counter one call later than the
    gradient did, every search failed with a false replay warning, and nothing moved."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    calls = torch.zeros((), dtype=torch.float64)

    def closure():
        calls.add_(1.0)
        if torch.is_grad_enabled():
            w.data.mul_(1.0 + 1e-12)
        return ((w - 3.0) ** 2).sum() + calls * w.sum()

    opt = cls([w], buffers=[calls])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no replay warning)
        for _ in range(3):
            opt.step(closure)
    assert (w - 1.0).abs().max().item() > 0.1


class MomentumContrast(nn.Module):
    """MoCo in miniature: its forward updates a frozen key encoder as a moving average of the
    query encoder (through ``.data``) and queues the keys in a buffer for the next batches."""

    def __init__(self):
        super().__init__()
        self.query, self.key = nn.Linear(16, 8).double(), nn.Linear(16, 8).double()
        self.key.load_state_dict(self.query.state_dict())
        self.key.requires_grad_(False)
        self.register_buffer("queue", nn.functional.normalize(torch.randn(64, 8).double(), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def forward(self, x1, x2):
        with torch.no_grad():
            for q, k in zip(self.query.parameters(), self.key.parameters(), strict=True):
                k.data.mul_(0.99).add_(q.data, alpha=0.01)
            keys = nn.functional.normalize(self.key(x2), dim=1)
        queries = nn.functional.normalize(self.query(x1), dim=1)
        positive = (queries * keys).sum(1, keepdim=True)
        logits = torch.cat([positive, queries @ self.queue.clone().T], 1) / 0.2
        loss = nn.functional.cross_entropy(logits, torch.zeros(len(x1), dtype=torch.long))
        with torch.no_grad():
            at = int(self.pointer)
            self.queue[at : at + len(keys)] = keys
            self.pointer.fill_((at + len(keys)) % len(self.queue))
        return loss


def test_a_frozen_encoder_updated_in_forward_is_no_initialisation():
    """MoCo's key encoder, frozen and updated in every forward, is passed with
    ``model.parameters()``: the trials still read the queue as before the first evaluation
    (without this step's keys among the negatives), so the searches pass. Counting the frozen
    weights' writes as an initialisation left this step's keys in the queue for the trials:
    searches failed and the step size stuck."""
    torch.manual_seed(0)
    model = MomentumContrast()
    opt = ALSALS(model.parameters(), buffers=model.buffers(), lr=1e-2)
    batches = torch.Generator().manual_seed(1)
    kinds = []
    for _ in range(30):
        base = torch.randn(32, 16, generator=batches, dtype=torch.float64)
        views = [base + 0.1 * torch.randn(32, 16, generator=batches, dtype=torch.float64)]
        views.append(base + 0.1 * torch.randn(32, 16, generator=batches, dtype=torch.float64))
        opt.step(lambda views=views: model(*views))
        kinds.append(opt.last_step.kind)
    assert "kept" not in kinds and kinds.count("search") >= 5


class BiasCorrectedScale(nn.Module):
    """Divides by a running second moment with Adam-style bias correction: its forward reads
    a float buffer and an integer step counter, and updates both."""

    def __init__(self):
        super().__init__()
        self.register_buffer("average", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.count += 1
                self.average.mul_(0.9).add_(0.1 * x.pow(2).mean())
        return x / (self.average / (1 - 0.9 ** self.count.item())).sqrt()


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_trials_read_a_counter_with_the_statistic_it_counts(cls):
    """An integer counter and the float statistic it bias-corrects go back together before
    each trial (a counter left one step ahead of its statistic was a state that never
    existed: the replay at the starting weights differed and warned)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4, dtype=torch.float64) * 3, torch.randn(64, 1, dtype=torch.float64)
    model = nn.Sequential(BiasCorrectedScale(), nn.Linear(4, 1).double())
    opt = cls(model.parameters(), buffers=model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no replay warning)
        for _ in range(3):
            opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert model[0].count.item() == 3


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_weights_passed_among_the_buffers_are_left_to_the_step(cls):
    """``buffers=`` holding the weights too (``model.state_dict().values()``, or the
    parameters added by mistake): they are the step's to move, not put back before each
    trial (which evaluated every trial at the starting weights: no step, ever). The run is
    the one with ``buffers=model.buffers()``, and BatchNorm's statistics, protected through
    the state dict's views of them, are not reported as unprotected."""

    def train(buffers_of):
        model, opt, x, y = make_setup(cls, seed=3)
        opt = cls(model.parameters(), buffers=buffers_of(model))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(5):
                opt.step(bce_closure(model, x, y))
        return [p.detach().clone() for p in model.parameters()]

    plain = train(lambda model: model.buffers())
    for buffers_of in (
        lambda model: [*model.buffers(), *model.parameters()],
        lambda model: model.state_dict().values(),
    ):
        weights = train(buffers_of)
        assert all(torch.equal(a, b) for a, b in zip(weights, plain, strict=True))


def test_without_buffers_trials_would_corrupt_batchnorm_statistics(optimizer_class):
    """Shows what `buffers=` protects against (and that the previous test can fail)."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=50.0)
    opt.step(bce_closure(model, x, y))
    assert model.bn.num_batches_tracked.item() == opt.last_step.forwards > 1


def test_closure_with_backward_argument_runs_backward_itself(optimizer_class):
    """Gradient accumulation over two micro-batches through closure(backward=...)."""
    torch.manual_seed(0)
    x, y = make_classification()
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    twin.load_state_dict(net.state_dict())
    calls = []

    def accumulating(backward: bool):
        calls.append((backward, torch.is_grad_enabled()))
        if backward:
            opt.zero_grad()
        total = 0.0
        for xb, yb in ((x[:64], y[:64]), (x[64:], y[64:])):
            loss = nn.functional.binary_cross_entropy_with_logits(net(xb).squeeze(-1), yb) / 2
            if backward:
                loss.backward()
            total = total + loss.detach()
        return total

    opt = optimizer_class(net.parameters(), lr=50.0)
    opt_twin = optimizer_class(twin.parameters(), lr=50.0)
    opt.step(accumulating)
    opt_twin.step(lambda: nn.functional.binary_cross_entropy_with_logits(twin(x).squeeze(-1), y))
    assert calls[0] == (True, True)
    assert calls[1:] and all(call == (False, False) for call in calls[1:])
    assert opt.last_step.trials == opt_twin.last_step.trials > 1
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plain_closure_returning_a_detached_loss_is_a_clear_error(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda: bce_closure(model, x, y)().detach())


def test_passing_the_loss_instead_of_the_closure_is_a_clear_error(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"got a tensor, not a closure.*not its value"):
        opt.step(bce_closure(model, x, y)())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("wrap", [lambda loss: (loss, 1), lambda loss: {"loss": loss}])
def test_closure_returning_a_model_output_says_to_return_the_loss_alone(optimizer_class, wrap):
    model, opt, x, y = make_setup(optimizer_class)
    with pytest.raises(TypeError, match=r"return the loss alone: output.loss or output\[0\]"):
        opt.step(lambda: wrap(bce_closure(model, x, y)()))


def test_the_module_instead_of_its_parameters_is_a_clear_error(optimizer_class):
    with pytest.raises(TypeError, match=r"not the module: pass model.parameters\(\)"):
        optimizer_class(nn.Linear(3, 1))


def test_closure_returning_a_non_scalar_is_a_clear_error(optimizer_class):
    model, opt, x, y = make_setup(optimizer_class)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: model(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_random_state_is_replayed_and_restored(optimizer_class):
    torch.manual_seed(0)
    model = SmallNet().cuda()
    x, y = (t.cuda() for t in make_classification())
    opt = optimizer_class(model.parameters(), lr=50.0, buffers=model.buffers())
    masks = []

    def closure():
        masks.append(torch.rand(16, device="cuda"))
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    torch.cuda.manual_seed(5)
    closure()
    expected = torch.cuda.get_rng_state()
    masks.clear()
    torch.cuda.manual_seed(5)
    opt.step(closure)
    assert len(masks) > 2 and all(torch.equal(m, masks[0]) for m in masks)
    assert torch.equal(torch.cuda.get_rng_state(), expected)


def _net_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = make_classification(n=96)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    return net, batches


def _bce(net, xb, yb):
    return nn.functional.binary_cross_entropy_with_logits(net(xb).squeeze(-1), yb)


def _twin(net):
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    twin.load_state_dict(net.state_dict())
    return twin


def test_closure_with_backward_that_never_zeroes_takes_the_steps_of_one_that_does(
    optimizer_class,
):
    """The gradients a step leaves in .grad are not added to the next step's: a closure that
    forgets zero_grad() trains exactly like one that calls it."""
    net, batches = _net_and_batches()
    twin = _twin(net)
    opt = optimizer_class(net.parameters(), lr=1.0)
    opt_twin = optimizer_class(twin.parameters(), lr=1.0)
    for xb, yb in batches:

        def forgetful(backward: bool, xb=xb, yb=yb):
            loss = _bce(net, xb, yb)
            if backward:
                loss.backward()
            return loss

        def zeroing(backward: bool, xb=xb, yb=yb):
            if backward:
                opt_twin.zero_grad()
            loss = _bce(twin, xb, yb)
            if backward:
                loss.backward()
            return loss

        opt.step(forgetful)
        opt_twin.step(zeroing)
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
            assert torch.equal(p, q)


def _forgetful(model, xb, yb):
    """A closure(backward) that never zeroes the gradients (the README allows it)."""

    def closure(backward: bool):
        loss = _bce(model, xb, yb)
        if backward:
            loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("how", ["left", "left-previewed", "added-to"])
@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_new_optimizer_drops_what_the_one_it_replaced_left_in_grad(cls, how):
    """A restart (a new optimizer built from the model mid-run) with a closure that forgets
    zero_grad(): its first step does not add the gradients the last one's step left in
    .grad, also after a preview of that step (those it finds added to since, a micro-batch
    run outside, it keeps)."""
    if how == "left-previewed" and cls is ALSALS:
        pytest.skip("ALSALS has no preview()")
    net, batches = _net_and_batches()
    opt = cls(net.parameters(), lr=1.0)
    for xb, yb in batches[:2]:
        opt.step(_forgetful(net, xb, yb))
    twin = _twin(net)  # the same weights, and the gradients the user meant to keep
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
        q.grad = p.grad.clone() if how == "added-to" else None
    if how == "added-to":  # a micro-batch's backward into .grad after the step: it counts
        _bce(net, *batches[0]).backward()
        _bce(twin, *batches[0]).backward()
    restarted = cls(net.parameters(), lr=1.0)
    reference = cls(twin.parameters(), lr=1.0)
    if how == "left-previewed":
        preview = restarted.preview(_forgetful(net, *batches[2]))
    restarted.step(_forgetful(net, *batches[2]))
    reference.step(_forgetful(twin, *batches[2]))
    if how == "left-previewed":
        assert preview.info == restarted.last_step
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_two_optimizers_used_in_turn_over_the_same_weights_add_nothing_of_each_others(cls):
    """Two optimizers stepping the same model in turn with a closure that forgets
    zero_grad(): each step's gradient is its batch's alone, as with one that zeroes."""
    net, batches = _net_and_batches()
    twin = _twin(net)
    first, second = cls(net.parameters(), lr=1.0), cls(net.parameters(), lr=1.0)
    first_twin, second_twin = cls(twin.parameters(), lr=1.0), cls(twin.parameters(), lr=1.0)
    for i in range(6):
        xb, yb = batches[i % 3]
        (first if i % 2 == 0 else second).step(_forgetful(net, xb, yb))
        for q in twin.parameters():
            q.grad = None
        (first_twin if i % 2 == 0 else second_twin).step(_forgetful(twin, xb, yb))
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
            assert torch.equal(p, q)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["to-none", "in-place"])
def test_gradients_accumulated_outside_the_closure_since_the_last_step_are_kept(
    optimizer_class, set_to_none
):
    """A micro-batch whose backward ran before step() counts: only gradients untouched since
    the previous step are dropped."""
    net, batches = _net_and_batches()
    twin = _twin(net)
    opt = optimizer_class(net.parameters(), lr=1.0)
    opt_twin = optimizer_class(twin.parameters(), lr=1.0)
    for xb, yb in batches:
        first, last = (xb[:16], yb[:16]), (xb[16:], yb[16:])
        opt.zero_grad(set_to_none=set_to_none)
        (_bce(net, *first) / 2).backward()

        def last_micro_batch(backward: bool, first=first, last=last):
            loss = _bce(net, *last) / 2
            if backward:
                loss.backward()
            return loss + _bce(net, *first).detach() / 2

        def both(backward: bool, first=first, last=last):
            if backward:
                opt_twin.zero_grad()
            total = 0.0
            for mb in (first, last):
                loss = _bce(twin, *mb) / 2
                if backward:
                    loss.backward()
                total = total + loss.detach()
            return total

        opt.step(last_micro_batch)
        opt_twin.step(both)
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_retry_of_a_failed_step_with_a_closure_that_never_zeroes(optimizer_class):
    """An exception in a trial, then the same step again: the failed attempt's gradients are
    not added to the retry's, which takes the step of a run without the failure."""
    net, batches = _net_and_batches()
    twin = _twin(net)
    opt = optimizer_class(net.parameters(), lr=50.0)  # backtracks: several trials
    opt_twin = optimizer_class(twin.parameters(), lr=50.0)
    fail = {"armed": False}

    def forgetful(model, xb, yb):
        def closure(backward: bool):
            if not backward and fail["armed"]:
                fail["armed"] = False
                raise RuntimeError("trial failed")
            loss = _bce(model, xb, yb)
            if backward:
                loss.backward()
            return loss

        return closure

    for index, (xb, yb) in enumerate(batches):
        if index == 1:
            fail["armed"] = True
            with pytest.raises(RuntimeError, match="trial failed"):
                opt.step(forgetful(net, xb, yb))
        opt.step(forgetful(net, xb, yb))
        opt_twin.step(forgetful(twin, xb, yb))
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)


def test_preview_then_step_with_a_closure_that_never_zeroes(optimizer_class):
    """preview() puts the gradients back as copies; the step after it still drops them."""
    net, batches = _net_and_batches()
    twin = _twin(net)
    opt = optimizer_class(net.parameters(), lr=1.0)
    opt_twin = optimizer_class(twin.parameters(), lr=1.0)
    for xb, yb in batches:
        preview = opt.preview(_forgetful(net, xb, yb))
        opt.step(_forgetful(net, xb, yb))
        opt_twin.step(_forgetful(twin, xb, yb))
        assert preview.info.step_size == opt.last_step.step_size
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("as_number", [float, np.float32, np.float64])
def test_a_closure_returning_a_python_number_loses_no_precision(optimizer_class, as_number):
    """closure(backward) may return loss.item(): a float64 least-squares problem then
    converges as with the tensor (it used to be rounded to float32 and stall near 1e-7);
    numpy scalars are numbers too."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(32, dtype=torch.float64, generator=gen)
    solution = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    best = 0.5 * ((a @ solution - b) ** 2).mean().item()
    results = []
    for item in (False, True):
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        opt = optimizer_class([w])

        def closure(backward, opt=opt, w=w, item=item):
            if backward:
                opt.zero_grad()
            loss = 0.5 * ((a @ w - b) ** 2).mean()
            if backward:
                loss.backward()
            return as_number(loss.item()) if item else loss

        for _ in range(150):
            opt.step(closure)
        results.append(0.5 * ((a @ w - b) ** 2).mean().item() - best)
    if as_number is np.float32:  # a float32 value: float32 resolution, yet no error
        assert results[1] < 1e-3
    else:
        assert results[1] == results[0]
        assert results[0] < 1e-6


@pytest.mark.parametrize("backward_form", [False, True])
def test_a_closure_that_raises_before_backward_leaves_the_gradients_as_they_were(
    optimizer_class, backward_form
):
    w = torch.ones(3, requires_grad=True)
    opt = optimizer_class([w])

    def failing(*args):
        raise RuntimeError("data loader broke")

    closure = (lambda backward: failing()) if backward_form else failing
    opt.step(lambda: (w**2).sum())  # a step: its gradients are left in .grad
    grad = w.grad
    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(closure)
    assert w.grad is grad


def test_a_backward_closure_that_never_runs_backward_warns(optimizer_class):
    w = torch.ones(3, requires_grad=True)
    opt = optimizer_class([w])
    with pytest.warns(UserWarning, match=r"call loss.backward\(\) in the closure"):
        opt.step(lambda backward: (w**2).sum())
    assert opt.last_step.kind == "zero_grad"


def test_a_loss_computed_and_backpropagated_before_the_closure_is_a_clear_error(
    optimizer_class,
):
    """A loop converted from AdamW that kept its ``loss.backward()`` and hands the optimizer
    that loss: the error says to compute the loss inside the closure (torch's own says to
    retain the graph, which would only make every trial see the same loss); nothing moves."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = optimizer_class(model.parameters())
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    with pytest.raises(RuntimeError, match="Compute the loss inside the closure"):
        opt.step(lambda: loss)
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.equal(p.detach(), p0)


def test_outputs_computed_before_the_closure_are_named(optimizer_class):
    """A loop converted from AdamW with the forward pass left outside the closure: the
    gradient is right, but no trial moves the loss, so no step is ever taken. After three
    such searches the optimizer says why; the weights never moved."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = optimizer_class(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            out = model(x[8 * k : 8 * k + 8])  # the mistake: outside the closure
            opt.step(lambda out=out, k=k: nn.functional.mse_loss(out, y[8 * k : 8 * k + 8]))
            named = [w for w in caught if "did not change when the weights moved" in str(w.message)]
            assert len(named) == (1 if k == 2 else 0)  # the third search, not before
    assert named[0].category is UserWarning
    assert "call the model inside the closure" in str(named[0].message)
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.equal(p.detach(), p0)


def test_a_loss_of_another_model_is_named(optimizer_class):
    """The optimizer built from one model, the closure evaluating another (a copy): no
    parameter it holds gets a gradient. Three such steps in a row, and it says so."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    copy = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = optimizer_class(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            opt.step(lambda: nn.functional.mse_loss(copy(x), y))
            named = [w for w in caught if "does not depend on the parameters" in str(w.message)]
            assert len(named) == (1 if k == 2 else 0)
    assert opt.last_step.kind == "zero_grad"


def test_a_parameter_set_unused_on_some_steps_is_not_taken_for_another_model(optimizer_class):
    """Steps whose loss leaves every parameter of this optimizer without a gradient, but
    never three in a row (a task-specific head trained on some batches only), steps whose
    trials move the loss, and steps with every parameter of the optimizer frozen: no warning
    about the closure."""
    torch.manual_seed(0)
    trunk, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = optimizer_class(head.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(did not change|does not depend).*")
        for k in range(12):
            if k % 3 == 2:  # another task's batch: the head takes no part
                opt.step(lambda: trunk(x).pow(2).mean())
                assert opt.last_step.kind == "zero_grad"
            else:
                opt.step(lambda: nn.functional.mse_loss(head(torch.tanh(trunk(x))), y))
                assert opt.last_step.kind in ("search", "reuse")
        head.requires_grad_(False)  # frozen for a while: not another model
        for _ in range(4):
            opt.step(lambda: nn.functional.mse_loss(head(torch.tanh(trunk(x))), y))
            assert opt.last_step.kind == "zero_grad"


def test_a_backward_closure_on_another_model_says_both_causes(optimizer_class):
    """closure(backward) that runs backward, but on a model whose parameters this optimizer
    does not hold: the warning names that cause beside the forgotten backward."""
    model, other = nn.Linear(3, 1), nn.Linear(3, 1)
    x = torch.randn(8, 3)
    opt = optimizer_class(model.parameters())

    def closure(backward):
        loss = other(x).pow(2).mean()
        if backward:
            loss.backward()
        return loss

    with pytest.warns(UserWarning, match="does not depend on this optimizer's parameters"):
        opt.step(closure)
    assert opt.last_step.kind == "zero_grad"


def test_an_lbfgs_closure_on_another_model_is_a_step_without_gradient(optimizer_class):
    """The LBFGS form (``zero_grad(); loss.backward(); return loss``) on a loss none of this
    optimizer's parameters take part in: its backward has used the graph, and the step is
    one without gradient, as the plain form's is (not the error for a loss computed before
    the closure); three in a row, and the optimizer says why. Nothing moves."""
    torch.manual_seed(0)
    model, other = nn.Linear(4, 1), nn.Linear(4, 1)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = optimizer_class(model.parameters())

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(other(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            opt.step(closure)
            assert opt.last_step.kind == "zero_grad"
            named = [w for w in caught if "does not depend on the parameters" in str(w.message)]
            assert len(named) == (1 if k == 2 else 0)
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.equal(p.detach(), p0)


def test_an_lbfgs_closure_that_leaves_out_this_optimizers_head_on_some_steps(optimizer_class):
    """Two optimizers, a trunk's and a head's, and an LBFGS-form closure: on another task's
    batches the loss does not involve the head, whose optimizer takes a step without
    gradient there (no error, no warning) and searches on the others."""
    torch.manual_seed(0)
    trunk, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = optimizer_class(head.parameters())

    def closure_of(loss_fn):
        def closure():
            opt.zero_grad()
            trunk.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        return closure

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(did not change|does not depend).*")
        for k in range(9):
            if k % 3 == 2:
                opt.step(closure_of(lambda: trunk(x).pow(2).mean()))
                assert opt.last_step.kind == "zero_grad"
                assert trunk.weight.grad is not None  # the trunk's gradient is the closure's
            else:
                opt.step(closure_of(lambda: nn.functional.mse_loss(head(trunk(x).tanh()), y)))
                assert opt.last_step.kind in ("search", "reuse")


@pytest.mark.parametrize("cls", [SLS, AdamSLS, MomentumALSALS, ALSALS])
def test_a_closure_that_never_zeroes_after_add_param_group_gets_this_steps_gradient(cls):
    """A group added between steps (a layer the closure already ran): the gradients the
    last step's backward left, in the old groups and in the new one, are dropped before a
    ``closure(backward)`` that forgets ``zero_grad()`` (the marks were compared as a list,
    and one more parameter made every stale gradient look accumulated on purpose: the step
    added the last one to its own)."""

    def run(zero: bool):
        torch.manual_seed(0)
        x, y = torch.randn(64, 5), (torch.randn(64) > 0).float()
        w, b = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(1))
        opt = cls([w], lr=0.1)

        def closure(backward):
            if zero:
                w.grad = b.grad = None
            loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
            if backward:
                loss.backward()
            return loss

        opt.step(closure)
        opt.add_param_group({"params": [b]})
        opt.step(closure)
        return w.detach().clone(), b.detach().clone()

    forgets, zeroes = run(zero=False), run(zero=True)
    assert all(torch.equal(f, z) for f, z in zip(forgets, zeroes, strict=True))


class _Constants(nn.Module):
    """A layer with constant buffers (position ids, a mask), as BERT's embeddings have."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.register_buffer("ids", torch.arange(4))
        self.register_buffer("mask", torch.ones(4))

    def forward(self, x):
        return self.linear(x * self.mask[self.ids])


def test_constant_unprotected_buffers_do_not_warn(optimizer_class, buffer_watch):
    model = _Constants()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = optimizer_class(model.parameters(), lr=50.0)  # trials happen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert opt.search_state.trials > 0


def test_the_buffer_check_waits_for_a_step_in_training_mode(optimizer_class, buffer_watch):
    """A first step in eval() says nothing about BatchNorm's statistics in train()."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=50.0)
    model.eval()
    opt.step(bce_closure(model, x, y))
    model.train()
    with pytest.warns(UserWarning, match="BatchNorm1d updated its buffers"):
        opt.step(bce_closure(model, x, y))


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_buffers_replaced_by_a_conversion_after_stepping_are_looked_at_again(cls, buffer_watch):
    """The model converted after some steps (``.double()``), and the state converted with
    it as the error advises (``SLS`` holds no tensor to refuse): the conversion replaced the
    BatchNorm buffers ``buffers=`` protects, so the trials moved the running statistics
    without a word (the one look at them had been made). Any change of the parameters'
    dtypes or devices, and any load, looks again: the trials that touch them are named."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = cls(model.parameters(), lr=50.0, buffers=model.buffers(), search_interval=1)
    for _ in range(2):
        opt.step(bce_closure(model, x, y))
    model.double()
    if cls is not SLS:
        with pytest.raises(TypeError, match=r"converted after .*buffers=model.buffers\(\)"):
            opt.step(bce_closure(model, x.double(), y.double()))
        opt.load_state_dict(opt.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            opt.step(bce_closure(model, x.double(), y.double()))
            opt.param_groups[0]["lr"] = 50.0  # (a search with trials at every step)
    assert any("build the optimizer after it" in str(c.message) for c in caught)


def test_buffers_replaced_by_a_conversion_after_building_the_optimizer_are_named(
    optimizer_class, buffer_watch
):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=50.0, buffers=model.buffers())
    model.double()  # new buffer tensors; the parameters stay the same objects
    with pytest.warns(UserWarning, match=r"build the optimizer after it"):
        opt.step(bce_closure(model, x.double(), y.double()))


# -- gradients written outside step() that a closure() drops -------------------------------

DROPPED = "held gradients computed since the last step"


def _dropped_warnings(caught) -> int:
    return sum(DROPPED in str(w.message) for w in caught)


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_backward_pass_outside_step_that_a_closure_drops_is_warned_about_once(cls):
    """A ``closure()`` gets the step's gradient from its own loss alone: gradients a backward
    pass computed before ``step()`` (a micro-batch accumulated outside after ``zero_grad()``,
    a trainer's accumulation) are dropped, which the optimizer says once, from its second
    step on; tiny ones too (the norm of gradients of 1e-30 underflows to 0 in float32)."""
    model, opt, x, y = make_setup(cls, lr=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(bce_closure(model, x[:16], y[:16]))
        for _ in range(3):
            opt.zero_grad()
            (
                1e-30 * nn.functional.binary_cross_entropy_with_logits(model(x[:16]), y[:16])
            ).backward()
            opt.step(bce_closure(model, x[16:], y[16:]))
    assert _dropped_warnings(caught) == 1


@pytest.mark.parametrize("cls", [MomentumALSALS, ALSALS])
@pytest.mark.parametrize(
    "before_step", ["none", "zeros", "clipped", "closure_backward", "first_step"]
)
def test_nothing_dropped_is_not_warned_about(cls, before_step):
    """No warning where nothing is lost: gradients set to ``None`` or to zeros before
    ``step()``, the step's own gradients clipped in place after it, micro-batches
    accumulated outside a ``closure(backward)`` (which keeps them), and an optimizer's first
    step, whose ``.grad`` may hold what an earlier loop left."""
    model, opt, x, y = make_setup(cls, lr=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if before_step == "first_step":
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        for _ in range(3):
            if before_step != "first_step":
                opt.step(bce_closure(model, x, y))
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[:16]), y[:16])
            if before_step == "none":
                opt.zero_grad(set_to_none=True)
            elif before_step == "zeros":
                loss.backward()
                opt.zero_grad(set_to_none=False)
            elif before_step == "clipped":
                nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            elif before_step == "closure_backward":
                loss.backward()

                def closure(backward):
                    loss = nn.functional.binary_cross_entropy_with_logits(model(x[16:]), y[16:])
                    if backward:
                        loss.backward()
                    return loss

                opt.step(closure)
                continue
            opt.step(bce_closure(model, x[16:], y[16:]))
    assert _dropped_warnings(caught) == 0


@pytest.mark.parametrize("cls", [MomentumALSALS, ALSALS])
def test_two_optimizers_over_one_model_do_not_warn_about_each_others_gradients(cls):
    """Two optimizers on disjoint parameters, each closure running the whole model
    (alternating optimisation, a GAN's two players): each one's backward pass adds to the
    other's gradients, which the other drops as it should, without a warning."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    params = list(model.parameters())
    first, second = cls(params[:2], lr=1.0), cls(params[2:], lr=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            first.step(bce_closure(model, x, y))
            second.step(bce_closure(model, x, y))
    assert _dropped_warnings(caught) == 0


@pytest.mark.parametrize("cls", [MomentumALSALS, ALSALS])
def test_dropped_gradients_far_below_a_norm_s_range_are_seen(cls):
    """Float64 gradients of 1e-50 are dropped all the same: their norm, in float32, would
    be 0 and the drop unseen."""
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = cls([w])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            (1e-50 * (w**2).sum()).backward()
            opt.step(lambda: (w**2).sum())
    assert _dropped_warnings(caught) == 1


# -- closures that differentiate inside -----------------------------------------------------


def _pinn(explicit_grad_mode: bool):
    """A physics-informed fit, ``u' = cos x`` with ``u(0) = 0``, whose loss takes the
    network's derivative in its inputs by ``torch.autograd.grad(create_graph=True)`` (as a
    gradient penalty or a Jacobian regulariser does); ``explicit_grad_mode``: the closure
    turns autograd on itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    points = torch.linspace(0.0, 1.0, 64, dtype=torch.float64).unsqueeze(1)

    def loss():
        x = points.clone().requires_grad_(True)
        u = model(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return ((du - torch.cos(x)) ** 2).mean() + model(torch.zeros_like(points[:1])).pow(2).sum()

    def closure():
        if explicit_grad_mode:
            with torch.enable_grad():
                return loss()
        return loss()

    return model, closure


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_closure_that_differentiates_in_its_inputs_trains(cls):
    """A loss that differentiates inside (PINN residuals, WGAN-GP's gradient penalty) fails
    under ``torch.no_grad()``, where trials ran, with torch's "does not require grad" (as
    ``torch.optim.LBFGS``, which runs every call with autograd on, does not): its trials
    run with autograd from the first that failed so, the same steps as a closure that turns
    autograd on itself, at one forward pass more for the run (the failed one)."""
    runs = {}
    for explicit in (False, True):
        model, closure = _pinn(explicit)
        opt = cls(model.parameters(), lr=1.0)
        first = float(closure())
        for _ in range(30):
            opt.step(closure)
        if cls is ALSALS:
            opt.eval()
        runs[explicit] = (list(model.parameters()), float(closure()), opt.search_state.forwards)
    (params, loss, forwards), (params_explicit, loss_explicit, forwards_explicit) = (
        runs[False],
        runs[True],
    )
    assert loss == loss_explicit and loss < 0.1 * first
    assert all(torch.equal(a, b) for a, b in zip(params, params_explicit, strict=True))
    assert forwards == forwards_explicit + 1


@pytest.mark.parametrize("cls", [MomentumALSALS, ALSALS])
def test_trials_that_move_unprotected_buffers_are_named_before_the_gradient(cls, buffer_watch):
    """A spectral-normalised layer without ``buffers=``: its power iteration moves a buffer
    at every trial, so the trials' losses do not follow the gradient. The warning names the
    module and the fix, and comes first; one that blames the closure's gradient ("the loss
    fell by about 1/N of what the gradient promised") names the buffers as a cause too."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 16))
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(16, 1))
    opt = cls.paper(model.parameters()) if cls is MomentumALSALS else cls(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            opt.step(lambda: nn.functional.mse_loss(model(x), y))
    messages = [str(c.message) for c in caught]
    first = next(i for i, m in enumerate(messages) if "updated its buffers" in m)
    assert "buffers=model.buffers()" in messages[first]
    for i, m in enumerate(messages):
        if "of what the gradient promised" in m or "not the loss's own" in m:
            assert i > first and "buffers that buffers= does not protect" in m


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_under_several_ranks_a_differentiating_closure_is_told_to_turn_autograd_on(
    cls, monkeypatch
):
    """With several ranks, a rank that alone switched its trials to autograd would issue
    other collectives in its forward passes than the others (DDP's buffer broadcast: a
    hang, where one rank's data took a branch that differentiates). There the optimizer
    does not switch: the error says to turn autograd on inside the closure, and nothing
    moved. (The ranks are simulated: this process is told it has company.)"""
    import alsals.closure

    monkeypatch.setattr(alsals.closure, "world_size", lambda group: 2)
    model, closure = _pinn(explicit_grad_mode=False)
    opt = cls(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"under torch.distributed.*torch.enable_grad\(\)"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model, closure = _pinn(explicit_grad_mode=True)
    opt = cls(model.parameters(), lr=1.0)
    opt.step(closure)  # (turned on inside: it trains, on every rank alike)
    assert opt.last_step.kind != "nonfinite"


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_closure_that_runs_backward_whatever_it_is_told_runs_it_once_a_step(cls):
    """A ``closure(backward)`` that calls ``loss.backward()`` whatever its argument says
    fails under a trial's ``torch.no_grad()``; its trials then run with autograd on, and
    their backward calls do nothing: one backward pass a step reaches the parameters, not
    one per trial (which would also add gradients to tensors the optimizer does not own)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    passes = []
    w.register_hook(lambda g: passes.append(1))
    x = torch.randn(16, 4, dtype=torch.float64)

    def closure(backward):
        loss = (x @ w - 1.0).pow(2).mean()
        loss.backward()  # (the argument ignored)
        return loss

    opt = cls([w], lr=10.0)
    for _ in range(3):
        opt.step(closure)
    assert len(passes) == 3 and opt.search_state.backwards == 3
    assert opt.search_state.forwards > 3  # (trials ran)


@pytest.mark.parametrize("returned", ["a count", "a flag", "complex"])
@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_loss_that_is_no_real_floating_point_tensor_is_a_clear_error(cls, returned):
    model, opt, x, y = make_setup(cls, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]

    def closure(backward):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        if backward:
            opt.zero_grad()
            loss.backward()
        errors = ((model(x) > 0).float() != y).sum()  # an int64 count
        return {"a count": errors, "a flag": errors > 3, "complex": loss.detach() * (1 + 1j)}[
            returned
        ]

    with pytest.raises(TypeError, match=r"real floating-point tensor.*dtype torch\.\w+ \("):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _run_calling_inside_the_closure(cls, call, steps=8):
    """The weights after ``steps`` steps whose closure calls ``call(opt)`` at every
    evaluation, and the warnings given."""
    model, opt, x, y = make_setup(cls, lr=1.0)
    model.eval()

    def closure():
        call(opt)
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
    return [p.detach().clone() for p in model.parameters()], [str(w.message) for w in caught]


def _checkpointing_tools_read(opt) -> None:
    """``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` on an optimizer
    without state: ``lr`` 0, zero gradients, ``step()`` without a closure to create the
    state, everything put back, then ``state_dict()``."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if not opt.state:
        lrs, grads = [g["lr"] for g in opt.param_groups], [p.grad for p in params]
        for g in opt.param_groups:
            g["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for g, lr in zip(opt.param_groups, lrs, strict=True):
            g["lr"] = lr
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
    opt.state_dict()


@pytest.mark.parametrize("call", ["state_dict", "train", "checkpointing tool"])
@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_looking_at_the_optimizer_inside_the_closure_leaves_the_run_as_it_was(cls, call):
    # (ALSALS took its own move to y for the user's edit of the weights, and restarted z
    # and its averaging there at each call: a different run, silently; a checkpointing
    # tool's step() without a closure created the state's placeholders mid-step: SLS's
    # search state started afresh at every step)
    if call == "train" and cls is not ALSALS:
        pytest.skip("train() is ALSALS's (Schedule-Free's swap)")
    look = _checkpointing_tools_read if call == "checkpointing tool" else lambda opt: None
    look = (lambda opt: getattr(opt, call)()) if call in ("state_dict", "train") else look
    plain, _ = _run_calling_inside_the_closure(cls, lambda opt: None)
    looked, said = _run_calling_inside_the_closure(cls, look)
    assert all(torch.equal(a, b) for a, b in zip(plain, looked, strict=True))
    inside = [m for m in said if "state_dict() was taken inside the closure" in m]
    assert len(inside) == (call != "train"), said  # said once, where it is said


@pytest.mark.parametrize("outer", ["step", "preview"])
@pytest.mark.parametrize("what", ["load_state_dict", "add_param_group", "step", "preview"])
@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_changing_the_optimizer_inside_the_closure_is_refused(cls, what, outer):
    if "preview" in (what, outer) and cls is ALSALS:
        pytest.skip("preview() is the other optimizers'")
    model, opt, x, y = make_setup(cls, lr=1.0)
    opt.step(bce_closure(model, x, y))
    saved, before = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
    extra = nn.Parameter(torch.zeros(3))

    def closure():
        if what == "load_state_dict":
            opt.load_state_dict(saved)
        elif what == "add_param_group":
            opt.add_param_group({"params": [extra]})
        else:
            getattr(opt, what)(bce_closure(model, x, y))
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    with pytest.raises(RuntimeError, match=rf"{cls.__name__}\.{what}\(\) was called inside"):
        getattr(opt, outer)(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert_bitwise_same(opt.state_dict(), saved)
    assert len(opt.param_groups) == 1
    opt.step(bce_closure(model, x, y))  # and the optimizer goes on


class _WithExpandedBuffer(nn.Module):
    """A linear model with a buffer that repeats its elements (``expand``-ed, as position
    ids are built) beside a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 1)
        self.register_buffer("offsets", torch.arange(8.0).expand((4, -1)))

    def forward(self, x):
        return self.lin(self.norm(x + self.offsets[0])).squeeze(-1)


@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_an_expanded_buffer_among_the_protected_ones_is_left_as_it_is(cls, buffer_watch):
    """``buffers=model.buffers()`` with an ``expand``-ed buffer: putting the buffers back
    copied into it, which torch refuses (its elements share memory), and every step
    raised; no forward pass can write it in place, so there is nothing to put back."""
    torch.manual_seed(0)
    model = _WithExpandedBuffer()
    x, y = make_classification()
    opt = cls(model.parameters(), lr=1.0, buffers=model.buffers())
    closure = bce_closure(model, x, y)
    if cls is not ALSALS:
        kept = [b.clone() for b in model.buffers()]
        opt.preview(closure)  # (its watcher of unprotected buffers skips it too)
        assert all(torch.equal(a, b) for a, b in zip(kept, model.buffers(), strict=True))
    for _ in range(3):
        opt.step(closure)
    assert opt.last_step.kind in ("search", "reuse")
    assert torch.equal(model.offsets, torch.arange(8.0).expand((4, -1)))


class _GraphModel(nn.Module):
    """A graph convolution whose adjacency is a sparse buffer (as GCNs register it)."""

    def __init__(self) -> None:
        super().__init__()
        edges = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
        self.register_buffer("adjacency", torch.sparse_coo_tensor(edges, torch.ones(5), (5, 5)))
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(torch.sparse.mm(self.adjacency, x)).squeeze(-1)


@pytest.mark.parametrize("given", [True, False], ids=["buffers-given", "not-given"])
@pytest.mark.parametrize("cls", [*OPTIMIZERS, ALSALS], ids=[*OPTIMIZER_IDS, "ALSALS"])
def test_a_sparse_buffer_is_no_obstacle(cls, given, buffer_watch):
    """A sparse buffer: the watch for unprotected buffers compared it with torch.equal, which
    has no sparse kernel, and every step raised where it was not among ``buffers=`` (and,
    for a moment in 0.2.16's making, where it was: it reports strides of 0)."""
    torch.manual_seed(0)
    model = _GraphModel()
    x, y = torch.randn(5, 4), torch.randn(5)
    opt = cls(model.parameters(), lr=1.0, buffers=model.buffers() if given else None)

    def closure():
        return ((model(x) - y) ** 2).mean()

    if cls is not ALSALS:
        opt.preview(closure)
    first = float(closure())
    for _ in range(5):
        opt.step(closure)
    assert float(closure()) < first
