"""torch.compile: a compiled model inside the closure trains, and trials do not recompile.

One step evaluates the closure once with autograd and then several times under
``torch.no_grad()``. Dynamo guards on the grad mode, so a compiled model gets exactly two
graphs (training and inference) on the first step and reuses them on every later step: the
weights change in place, shapes and modes do not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alsals import AdamSLS, MomentumALSALS

testing = pytest.importorskip("torch._dynamo.testing")


class Net(nn.Module):
    """Dropout (replayed randomness) and BatchNorm (buffers restored after each trial)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(64, 12, generator=gen)
        out.append((x, (x[:, :4].sum(dim=1) > 0).long()))
    return out


def train(model, forward, optimizer, data):
    losses, trials = [], 0
    for x, y in data:

        def closure(x=x, y=y):
            return nn.functional.cross_entropy(forward(x), y)

        losses.append(optimizer.step(closure).item())
        trials += optimizer.last_step.trials
    return losses, trials


def fresh(cls=MomentumALSALS, **kwargs):
    torch.manual_seed(0)
    model = Net()
    return model, cls(model.parameters(), buffers=model.buffers(), **kwargs)


@pytest.fixture(autouse=True)
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [MomentumALSALS, AdamSLS], ids=lambda c: c.__name__)
def test_compiled_model_trains_like_eager_without_recompiling(cls):
    data = batches(12)
    eager_model, eager_opt = fresh(cls)
    eager_losses, _ = train(eager_model, eager_model, eager_opt, data)

    model, optimizer = fresh(cls)
    counter = testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    losses, trials = train(model, compiled, optimizer, data[:6])
    assert trials >= len(data[:6]), "trial evaluations must have run"
    # two graphs: the training one and the no_grad one for trials; nothing per step
    assert counter.frame_count == 2
    with torch.compiler.set_stance("fail_on_recompile"):
        more, _ = train(model, compiled, optimizer, data[6:])
    assert counter.frame_count == 2
    losses += more

    # aot_eager runs the same kernels and draws dropout masks from the same generator:
    # the compiled run follows the eager trajectory
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-6)
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for b, c in zip(model.buffers(), eager_model.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_inductor_trains_replays_dropout_and_does_not_recompile():
    model, optimizer = fresh(MomentumALSALS, slope="analytic")
    counter = testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    data = batches(10, seed=1)
    x, _ = data[0]
    # the replay the line search relies on: same random state, same dropout masks, in the
    # training graph and in the no_grad graph the trials use
    state = torch.get_rng_state()
    with_grad = compiled(x).detach()
    torch.set_rng_state(state)
    with torch.no_grad():
        without_grad = compiled(x)
    torch.testing.assert_close(with_grad, without_grad)
    model.load_state_dict(fresh()[0].state_dict())  # undo the BatchNorm update above
    assert counter.frame_count == 2

    losses, _ = train(model, compiled, optimizer, data[:4])
    with torch.compiler.set_stance("fail_on_recompile"):
        more, _ = train(model, compiled, optimizer, data[4:])
    assert counter.frame_count == 2
    losses += more
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert optimizer.state[model.fc1.weight]["line_search"]["failed_searches"] == 0
