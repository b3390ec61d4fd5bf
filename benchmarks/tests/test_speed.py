"""Smoke test of the step-cost benchmark on tiny models (no assertion on wall-clock time)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alsals_bench import cli
from alsals_bench.speed.configs import CONFIGS
from alsals_bench.speed.measure import Bench, clone_optimizer
from alsals_bench.speed.workloads import MODELS

pytest.importorskip("transformers")
pytest.importorskip("salsa.SaLSA")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    argv = [
        "speed",
        "--models",
        "mlp-tiny,cnn-tiny,gpt2-tiny",
        "--steps",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "3",
        "--memory-steps",
        "2",
        "--out",
        str(out),
        "--no-plot",
    ]
    assert cli.main(argv) == 0
    return out, json.loads((out / "speed.json").read_text())


def test_every_configuration_on_every_model(run):
    out, payload = run
    assert [r["model"] for r in payload["results"]] == ["mlp-tiny", "cnn-tiny", "gpt2-tiny"]
    for result in payload["results"]:
        assert [row["config"] for row in result["summary"]] == list(CONFIGS)
        assert all(len(m["step_s"]) == 2 for m in result["measurements"].values())
    text = (out / "speed.md").read_text()
    for name in CONFIGS:
        assert f"| {name} |" in text
    assert "### Targets" in text
    assert payload["machine"]["torch"] == torch.__version__


def test_pass_counts_and_ratios_are_sane(run):
    _, payload = run
    for result in payload["results"]:
        rows = {row["config"]: row for row in result["summary"]}
        adam = rows["adam"]
        assert (adam["forwards"], adam["backwards"]) == (1.0, 1.0)
        assert adam["x_adam"] == pytest.approx(1.0)
        assert adam["extra_params"] == pytest.approx(0.0)
        for name, row in rows.items():
            assert row["backwards"] == 1.0, name  # one gradient per step, whatever the search
            assert row["forwards"] >= 1.0, name
            assert math.isfinite(row["x_adam"]) and row["x_adam"] > 0, name
            assert 0 < row["passes_x_adam"] < row["x_adam"] + 1e-9, name  # passes are part of it
            assert row["peak_mib"] > 0 and row["state_mib"] >= 0, name
        # Every-step searches: at least one trial; the finite difference adds its probe.
        for name in ("sls", "adam-sls", "alsals-analytic", "salsa-every"):
            assert rows[name]["forwards"] >= 2.0, name
        assert rows["alsals"]["forwards"] >= 3.0
        # SLS keeps no moments; the Adam variants keep two, like Adam.
        assert rows["sls"]["state_mib"] == 0
        assert rows["alsals"]["state_params"] == pytest.approx(2.0, abs=0.01)
        assert rows["alsals-fast"]["salsa"] == "salsa"
        assert rows["alsals-analytic"]["salsa"] == "salsa-every"


def test_targets_table_covers_the_issue(run):
    out, _ = run
    text = (out / "speed.md").read_text()
    for what in (
        "alsals: step ≤ 1.8× Adam",
        "alsals-analytic: step ≤ 1.45× Adam",
        "alsals-fast: step ≤ 1.15× Adam",
        "own time ≤ 2× Adam",
        "peak ≤ Adam + 1 P",
        "faster than salsa",
    ):
        assert what in text, what


def test_snapshot_restores_the_optimizer_exactly():
    """The timed repeats start from a deep copy of the warmed-up optimizer: same trajectory."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    work = MODELS["mlp-tiny"](gen)
    bench = Bench(work, ["adam", "alsals-fast", "salsa"], torch.device("cpu"), log=lambda s: None)
    bench.warm_up(4)
    params = list(work.model.parameters())
    trajectories = []
    for _ in range(2):
        driver, start = bench._restore(CONFIGS["alsals-fast"])
        bench._run(driver, start, 3)
        trajectories.append([p.detach().clone() for p in params])
    for a, b in zip(*trajectories, strict=True):
        assert torch.equal(a, b)
    snap = bench.snapshots["salsa"].optimizer
    clone = clone_optimizer(snap, params)
    assert clone.step_size == snap.step_size and clone.params[0] is params[0]
    assert clone.state["gv"][0] is not snap.state["gv"][0]


def test_unknown_names_are_rejected(capsys):
    assert cli.main(["speed", "--models", "nope"]) == 2
    assert cli.main(["speed", "--configs", "nope"]) == 2
    assert "known" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "named"), [("--models", "--models"), ("--configs", "--configs")])
def test_an_empty_list_of_names_is_rejected_naming_its_flag(capsys, flag, named):
    """``--configs ""`` measured Adam alone, without a word."""
    assert cli.main(["speed", flag, ","]) == 2
    assert named in capsys.readouterr().err
