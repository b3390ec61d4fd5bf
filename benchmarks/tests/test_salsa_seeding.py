"""SaLSa's runs are reproducible: the installed ``SaLSA.step`` reseeds torch's generator
with ``int(time.time())`` around the closure, so its dropout masks followed the wall clock;
the runner's stepper reseeds from the run's seed instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from alsals_bench.registry import REGISTRY, salsa_stepper
from alsals_bench.runner import RunKey, read_log, run_one

pytestmark = pytest.mark.skipif(not REGISTRY["salsa"].available(), reason="needs salsa-optimizer")


def _trajectory(out, monkeypatch, clock):
    import salsa.SaLSA as salsa_module

    monkeypatch.setattr(salsa_module.time, "time", lambda: clock)
    path = run_one(RunKey("digits-cnn", "salsa", 0, "smoke"), out, progress=False)
    keys = ("loss", "lr", "forwards", "backwards")
    return [tuple(r[k] for k in keys) for r in read_log(path) if r["type"] == "step"]


def test_two_salsa_runs_of_one_seed_are_the_same_run_whatever_the_clock(tmp_path, monkeypatch):
    # digits-cnn has dropout: with SaLSA's own seed, a different second, different masks.
    first = _trajectory(tmp_path / "a", monkeypatch, 1_000_000.0)
    second = _trajectory(tmp_path / "b", monkeypatch, 2_000_000.0)
    assert first == second


def _draws(seed, steps=3):
    """The random number each evaluation of each step drew: [[step 1's], [step 2's], ...]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    stepper = salsa_stepper(model)
    stepper.seed(seed)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    draws: list[list[float]] = []

    def closure():
        draws[-1].append(float(torch.rand(())))
        return nn.functional.mse_loss(model(x), y)

    before = torch.get_rng_state()
    for _ in range(steps):
        draws.append([])
        stepper.step(closure)
    # The global stream is where it was (SaLSA restores it after each evaluation; so do we).
    assert torch.equal(torch.get_rng_state(), before)
    return draws


def test_every_evaluation_of_a_step_sees_the_same_numbers_and_the_streams_are_kept():
    # numpy's legacy global state: SaLSA reseeds it and used to leave it so
    np.random.seed(123)  # noqa: NPY002
    numpy_before = np.random.get_state()[1].copy()  # noqa: NPY002
    draws = _draws(7)
    assert all(len(set(step)) == 1 for step in draws)  # one mask per step, for every trial
    assert len({step[0] for step in draws}) == 3  # a new one each step
    assert np.array_equal(np.random.get_state()[1], numpy_before)  # noqa: NPY002
    assert _draws(7) == draws and _draws(8) != draws  # the run's seed alone decides
