"""The runner's log, resume rules, the optimizer registry, the report and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from alsals_bench import cli
from alsals_bench.registry import (
    GROUPS,
    PEERS,
    REGISTRY,
    expand,
    get_optimizer,
    paper_adam_schedule,
)
from alsals_bench.report import fold_tuned_adam, load_runs, write_report
from alsals_bench.runner import RunKey, is_finished, read_log, run_one, sweep
from alsals_bench.tasks import get_task

try:
    import fcntl
except ImportError:  # (Windows: the lock is the file's existence)
    fcntl = None

needs_fcntl = pytest.mark.skipif(fcntl is None, reason="flock locks need fcntl (POSIX)")

TASK = "digits-cnn"


def test_a_run_logs_start_steps_evals_and_end(tmp_path):
    path = run_one(RunKey(TASK, "alsals", 0, "smoke"), tmp_path, progress=False)
    records = read_log(path)
    kinds = [r["type"] for r in records]
    steps = get_task(TASK).budget("smoke").steps
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("step") == steps and kinds.count("eval") >= 1
    step_records = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in step_records] == list(range(1, steps + 1))
    assert all(r["forwards"] >= 2 * r["step"] for r in step_records)  # a line search
    assert all(r["lr"] > 0 and math.isfinite(r["loss"]) for r in step_records)
    end = records[-1]
    assert end["status"] == "ok" and 0 <= end["peak_accuracy"] <= 1
    assert end["forwards_per_step"] > end["backwards_per_step"] == 1


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    def losses(seed, out):
        path = run_one(RunKey(TASK, "adam", seed, "smoke"), out, progress=False)
        return [r["loss"] for r in read_log(path) if r["type"] == "step"]

    assert losses(0, tmp_path / "a") == losses(0, tmp_path / "b")
    assert losses(0, tmp_path / "a") != losses(1, tmp_path / "c")


def test_sweep_skips_finished_runs_and_repeats_partial_ones(tmp_path):
    sweep([TASK], ["adam"], [0, 1], "smoke", tmp_path, progress=False)
    done = RunKey(TASK, "adam", 0, "smoke").path(tmp_path)
    partial = RunKey(TASK, "adam", 1, "smoke").path(tmp_path)
    done_before = done.read_text()
    # Simulate a kill in the middle of seed 1: the end record and half a line are missing.
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:3]) + '\n{"type": "st')
    assert is_finished(done) and not is_finished(partial)
    assert len(load_runs(tmp_path, "smoke")) == 1  # a partial run is never counted
    sweep([TASK], ["adam"], [0, 1], "smoke", tmp_path, progress=False)
    assert done.read_text() == done_before  # skipped, not rerun
    assert is_finished(partial)
    assert len(load_runs(tmp_path, "smoke")) == 2


def test_registry_groups_and_names():
    task = get_task(TASK)
    assert expand(["paper"], task) == ["alsals", "adam-sls", "adam"]
    assert task.adam_lr in task.adam_grid
    assert expand(["adam-tuned"], task) == [
        "adam" if lr == task.adam_lr else f"adam@{lr:g}" for lr in task.adam_grid
    ]
    assert expand(["paper", "adam-tuned"], task).count("adam") == 1
    assert set(GROUPS["paper"]) <= set(REGISTRY)
    assert get_optimizer("adam@0.003").name == "adam@0.003"
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        get_optimizer("adamw")
    with pytest.raises(ValueError, match="invalid learning rate"):
        get_optimizer("adam@fast")


def _stepper_on_smoke_task(name):
    """(task run, stepper) of a registered optimizer on the smoke budget; skips a missing peer."""
    spec = REGISTRY[name]
    if not spec.available():
        pytest.skip(f"needs {spec.package}")
    task = get_task(TASK)
    budget = task.budget("smoke")
    run = task.setup(0, budget, torch.device("cpu"))
    return run, spec.build(run.model, task, budget)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_optimizer_takes_a_step(name):
    run, stepper = _stepper_on_smoke_task(name)
    before = [p.detach().clone() for p in run.model.parameters()]
    stepper.train()
    for _ in range(2):
        batch = run.next_batch()
        loss = stepper.step(lambda batch=batch: run.loss(run.model, batch))
        assert math.isfinite(float(loss))
    stepper.eval()
    assert stepper.forwards >= 2 and stepper.backwards == 2
    assert stepper.lr > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))


class _CountingClock:
    """Stands in for the step-cost benchmark's clock: counts the passes run inside it."""

    entered = 0

    def __enter__(self) -> None:
        self.entered += 1

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("name", ["alsals", "alsals-fast", "sls"])
def test_line_search_stepper_counts_the_passes_the_optimizer_reports(name):
    run, stepper = _stepper_on_smoke_task(name)
    stepper.pass_clock = clock = _CountingClock()
    for _ in range(3):
        before = (stepper.forwards, stepper.backwards)
        batch = run.next_batch()
        stepper.step(lambda batch=batch: run.loss(run.model, batch))
        info = stepper.optimizer.last_step
        counted = (stepper.forwards - before[0], stepper.backwards - before[1])
        assert counted == (info.forwards, info.backwards)
    assert clock.entered == stepper.forwards  # every pass runs inside the clock


def test_dog_logs_the_step_size_it_took_not_its_multiplier():
    run, stepper = _stepper_on_smoke_task("dog")
    batch = run.next_batch()
    stepper.step(lambda: run.loss(run.model, batch))
    eta = float(stepper.optimizer.param_groups[0]["eta"][0])
    assert stepper.lr == eta and stepper.lr != stepper.optimizer.param_groups[0]["lr"]


def test_new_peers_and_the_untuned_baseline_are_registered_and_grouped():
    assert {"momo-adam", "prodigy-sf"} <= set(PEERS) <= set(REGISTRY)
    assert REGISTRY["momo-adam"].package == "momo-opt"
    assert REGISTRY["prodigy-sf"].package == "prodigy-plus-schedule-free"
    assert GROUPS["baselines"] == ("adamw-cosine",)
    assert "adamw-cosine" in GROUPS["all"] and "adamw-cosine" not in GROUPS["paper"]


def test_the_recommended_configurations_are_a_group_and_in_all():
    """The rows of ALSALS(params) and MomentumALSALS(params), which the README's claims are
    about, run by name; "all" left them out."""
    assert GROUPS["recommended"] == ("alsals-schedulefree", "alsals-recommended")
    assert set(GROUPS["recommended"]) <= set(GROUPS["all"]) & set(REGISTRY)
    assert REGISTRY["adamw-cosine"].package is None  # torch only: always available


def test_momo_adam_gets_the_loss_and_logs_the_step_size_it_took():
    run, stepper = _stepper_on_smoke_task("momo-adam")
    optimizer = stepper.optimizer
    lr, (beta1, beta2) = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]
    assert lr == 1e-2  # the authors' default
    for k in range(1, 4):
        before = [p.detach().double().clone() for p in run.model.parameters()]
        batch = run.next_batch()
        stepper.step(lambda batch=batch: run.loss(run.model, batch))
        assert optimizer._number_steps == k  # one optimizer step per training step
        tau = stepper.lr
        assert 0 < tau <= lr / (1 - beta1**k) * (1 + 1e-6)  # capped by lr / (1 - beta1^k)
        # Every parameter moved by -tau * m / D: the measured tau is the step it took.
        for p, b in zip(run.model.parameters(), before, strict=True):
            state = optimizer.state[p]
            d = state["grad_avg_sq"].double().div(1 - beta2 ** state["step"]).sqrt().add(1e-8)
            expected = -tau * state["grad_avg"].double() / d
            moved = p.detach().double() - b
            assert torch.linalg.vector_norm(moved - expected) <= 1e-3 * torch.linalg.vector_norm(
                expected
            )


def test_prodigy_sf_swaps_to_its_average_for_evaluation_and_back():
    run, stepper = _stepper_on_smoke_task("prodigy-sf")
    assert stepper.optimizer.param_groups[0]["lr"] == 1.0  # its default
    stepper.train()
    for _ in range(3):
        batch = run.next_batch()
        stepper.step(lambda batch=batch: run.loss(run.model, batch))
    training = [p.detach().clone() for p in run.model.parameters()]
    stepper.eval()
    assert not stepper.optimizer.param_groups[0]["train_mode"]
    assert any(not torch.equal(a, p) for a, p in zip(training, run.model.parameters(), strict=True))
    stepper.train()
    assert stepper.optimizer.param_groups[0]["train_mode"]
    for a, p in zip(training, run.model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), a)


def test_adamw_cosine_is_one_rate_for_every_task_five_percent_warmup_cosine_to_zero():
    for name in ("digits-cnn", "minilm-bbc"):
        task = get_task(name)
        budget = task.budget("quick")
        model = torch.nn.Linear(2, 1)
        stepper = get_optimizer("adamw-cosine").build(model, task, budget)
        optimizer = stepper.optimizer
        assert type(optimizer) is torch.optim.AdamW
        assert optimizer.param_groups[0]["weight_decay"] == 0.01
        lrs = []
        for _ in range(budget.steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            stepper.scheduler.step()
        warmup = math.ceil(0.05 * budget.steps)
        assert lrs[0] == pytest.approx(1e-3 / warmup)
        assert lrs[warmup - 1] == pytest.approx(1e-3) == max(lrs)
        assert lrs[warmup] == pytest.approx(1e-3)
        # cosine: halfway through the decay, half the peak; then towards 0
        half = warmup + (budget.steps - warmup) // 2
        assert lrs[half] == pytest.approx(
            1e-3 * 0.5 * (1 + math.cos(math.pi * (half - warmup) / (budget.steps - warmup)))
        )
        assert lrs[-1] < 1e-3 * 0.01


def test_a_scheduled_optimizer_logs_the_rate_each_step_used():
    run, stepper = _stepper_on_smoke_task("adamw-cosine")
    steps = get_task(TASK).budget("smoke").steps  # 6: warm-up 1 step, then cosine to 0
    logged = []
    for _ in range(steps):
        batch = run.next_batch()
        stepper.step(lambda batch=batch: run.loss(run.model, batch))
        logged.append(stepper.lr)
    # step 1 warms up to the peak; steps 2..6 decay over 5 steps: cos(pi * (k - 1) / 5)
    cosine = [0.5 * (1 + math.cos(math.pi * (k - 1) / (steps - 1))) for k in range(1, steps)]
    assert logged == pytest.approx([1e-3] + [1e-3 * c for c in cosine])
    assert logged[-1] > 0  # the rate of the last step, not the 0 that would follow it


def test_paper_adam_schedule_is_cosine_with_ten_percent_warmup_for_nlp():
    class Nlp:
        domain = "nlp"

    budget = get_task(TASK).budget("quick")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1.0)
    schedule = paper_adam_schedule(opt, Nlp(), budget)
    lrs = []
    for _ in range(budget.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    warmup = math.ceil(0.1 * budget.steps)
    assert lrs[0] == pytest.approx(1 / warmup)
    assert lrs[warmup - 1] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[warmup] == pytest.approx(1.0)
    assert lrs[-1] < 0.01
    assert paper_adam_schedule(opt, get_task(TASK), budget) is None  # images: flat


def _fake_run(out, task, optimizer, seed, accuracy, loss, metrics=("accuracy", "val_loss")):
    path = RunKey(task, optimizer, seed, "fake").path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "type": "start",
            "task": task,
            "optimizer": optimizer,
            "seed": seed,
            "metrics": list(metrics),
        },
        *[
            {
                "type": "step",
                "step": s,
                "loss": loss,  # (the final loss, the EMA of the step losses, is loss)
                "lr": 1e-3,
                "time": 0.1 * s,
                "forwards": s,
                "backwards": s,
            }
            for s in range(1, 5)
        ],
        {"type": "eval", "step": 4, "accuracy": accuracy, "val_loss": loss},
        {
            "type": "end",
            "status": "ok",
            "time_per_step": 0.1,
            "forwards_per_step": 1.0,
            "backwards_per_step": 1.0,
            "final_train_loss": loss,
            "peak_accuracy": accuracy,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_tables_mean_se_bold_best_log_average_and_tuned_adam(tmp_path):
    for seed, (a, b) in enumerate([(0.90, 0.80), (0.92, 0.84)]):
        _fake_run(tmp_path, "t1", "alsals", seed, a, 0.1)
        _fake_run(tmp_path, "t1", "adam", seed, b, 0.4)
        _fake_run(tmp_path, "t1", "adam@0.01", seed, 0.95, 1.0)
        _fake_run(tmp_path, "t1", "adam@0.001", seed, 0.70, 0.01)
        _fake_run(tmp_path, "t2", "alsals", seed, 0.5, 1.0)
        _fake_run(tmp_path, "t2", "adam", seed, 0.6, 0.01)
    runs, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert {t: g.best for t, g in grids.items()} == {"t1": 0.01}  # best peak accuracy
    text = write_report(tmp_path, "fake").read_text()
    assert "| task | alsals | adam | adam-tuned |" in text
    # ‡: adam-tuned's best rate is at the edge of its grid (0.01, the largest tried)
    assert "| t1 (n=2) | 0.91 ± 0.01 | 0.82 ± 0.02 | **0.95 ± 0**‡ |" in text
    assert "| t2 (n=2) | 0.5 ± 0 | **0.6 ± 0** | – |" in text
    assert "| *average* | 0.705 | 0.71 | – |" in text
    # log average of final losses: alsals exp(mean(log(0.1), log(1.0))) = 0.3162
    assert "| *log average* | 0.3162 | 0.06325 | – |" in text
    assert "Runs: 12 finished" in text  # the grid's runs count, though one column shows them
    assert "- t1 (peak accuracy) (best at the edge of the grid): " in text
    assert "0.001: 0.7 ± 0, **0.01: 0.95 ± 0**" in text
    assert (tmp_path / "fake" / "report" / "t1.png").exists()


def test_tuned_adam_counts_the_adam_run_as_its_grid_point_at_the_paper_lr(tmp_path):
    # The fake runs log lr 1e-3, so ``adam`` is the grid point adam@0.001.
    for seed in range(2):
        _fake_run(tmp_path, "t1", "adam", seed, 0.90, 0.1)
        _fake_run(tmp_path, "t1", "adam@0.01", seed, 0.85, 0.2)
    _fake_run(tmp_path, "t1", "adam@0.001", 1, 0.95, 0.1)  # an explicit run wins its seed
    runs, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert grids["t1"].best == 0.001 and grids["t1"].values == {
        0.001: [0.90, 0.95],
        0.01: [0.85] * 2,
    }
    tuned = sorted((r.seed, r.end["peak_accuracy"]) for r in runs if r.optimizer == "adam-tuned")
    assert tuned == [(0, 0.90), (1, 0.95)]
    assert sum(r.optimizer == "adam" for r in runs) == 2  # still reported as the baseline


def test_tuned_adam_never_picks_a_rate_that_diverged_and_breaks_ties_by_loss(tmp_path):
    for seed in range(2):
        # The highest accuracy, but one seed diverged: disqualified.
        _fake_run(tmp_path, "t1", "adam@0.1", seed, 0.99, 0.01)
        # Equal accuracy; the lower final training loss wins the tie.
        _fake_run(tmp_path, "t1", "adam@0.01", seed, 0.90, 0.2)
        _fake_run(tmp_path, "t1", "adam@0.001", seed, 0.90, 0.3)
    path = RunKey("t1", "adam@0.1", 1, "fake").path(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1].update(status="diverged", final_train_loss=None)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    grid = grids["t1"]
    assert grid.best == 0.01 and not grid.at_edge
    assert "0.1: diverged in 1 of 2 seeds" in grid.describe("t1")


def test_cli_list_and_default_run(tmp_path, capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "digits-cnn" in listed and "alsals" in listed and "adam-tuned" in listed
    code = cli.main(
        [
            "run",
            "--budget",
            "smoke",
            "--seeds",
            "1",
            "--out",
            str(tmp_path),
            "--optimizers",
            "alsals,adam",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Table I" in printed and "digits-cnn" in printed
    assert (tmp_path / "smoke" / "report" / "report.md").exists()


def test_fetch_landscape_and_speed_are_subcommands_with_their_own_options(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["fetch", "--only", "austen", "--only", "gpt2-bpe", "--data-dir", "d"])
    assert (args.command, args.only, str(args.data_dir)) == ("fetch", ["austen", "gpt2-bpe"], "d")
    args = parser.parse_args(["speed", "--models", "mlp-tiny", "--steps", "3"])
    assert (args.command, args.steps, str(args.out)) == ("speed", 3, "runs/speed")
    args = parser.parse_args(["landscape", "--scans", "2"])
    assert (args.command, args.scans, str(args.out)) == ("landscape", 2, "runs/landscape")
    for command, option in (
        ("fetch", "--data-dir"),
        ("landscape", "--points"),
        ("speed", "--profile"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "-h"])
        assert exit_.value.code == 0 and option in capsys.readouterr().out
    assert cli.main(["landscape", "--steps", "2", "--scans", "3"]) == 2


def test_options_before_the_subcommand_are_kept():
    """``alsals-bench --out X run`` used to run into runs/: the subcommand's own defaults
    overwrote the options given before it."""
    parser = cli.build_parser()
    args = parser.parse_args(["--out", "X", "--budget", "long", "--no-progress", "run"])
    assert (str(args.out), args.budget, args.no_progress) == ("X", "long", True)
    args = parser.parse_args(["--out", "X", "report"])
    assert str(args.out) == "X"
    args = parser.parse_args(["run", "--out", "Y", "--budget", "smoke"])
    assert (str(args.out), args.budget) == ("Y", "smoke")
    args = parser.parse_args([])
    assert (args.out, args.budget, args.device, args.no_progress) == (None, "quick", "cpu", False)


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("3", [0, 1, 2]), ("1", [0]), ("0,", [0]), ("0,4", [0, 4]), ("10,11", [10, 11])],
)
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert cli.build_parser().parse_args(["run", "--seeds", text]).seeds == seeds


@pytest.mark.parametrize("text", ["0", "-2", "x", "1,-1", ","])
def test_seeds_that_would_run_nothing_are_an_error(text, capsys):
    """``--seeds 0`` used to run no run at all and exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["run", "--seeds", text])
    assert exit_info.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_line_search_steps_log_where_the_loss_rise_guard_fired():
    """The step record marks a step at which ``loss_rise_guard`` set a ceiling, and only
    those (the flag is absent, not ``False``, elsewhere: the logs stay small)."""
    run, stepper = _stepper_on_smoke_task("alsals-recommended")
    batch = run.next_batch()
    stepper.step(lambda: run.loss(run.model, batch))
    assert "loss_rose" not in stepper.details()
    stepper.optimizer.last_step = dataclasses.replace(stepper.optimizer.last_step, loss_rose=True)
    assert stepper.details()["loss_rose"] is True


def test_a_run_whose_model_breaks_in_its_last_steps_is_diverged(tmp_path, monkeypatch):
    """Too few non-finite losses at the end for ``DIVERGED_AFTER``, but the final evaluation
    finds the model broken: the run is "diverged" (left out of the loss tables), not an
    "ok" run whose smoothed loss is the one from before the blow-up."""
    import alsals_bench.runner as runner

    real = runner.get_optimizer("adam")
    steps = get_task(TASK).budget("smoke").steps

    def build(model, task, budget):
        stepper = real.build(model, task, budget)
        take = stepper.step
        count = [0]

        def breaking(closure):
            count[0] += 1
            if count[0] == steps:  # the weights blow up at the last step
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
            return take(closure)

        stepper.step = breaking
        return stepper

    monkeypatch.setattr(
        runner, "get_optimizer", lambda name: dataclasses.replace(real, build=build)
    )
    end = read_log(run_one(RunKey(TASK, "adam", 0, "smoke"), tmp_path, progress=False))[-1]
    assert end["status"] == "diverged" and end["final_train_loss"] is None
    assert end["steps_done"] == steps


def test_the_report_keeps_the_runs_of_the_size_the_budget_defines():
    """A run of another size copied into a budget's folder is left out even where it is as
    common as the budget's own (a tie used to be broken by set order)."""
    from alsals_bench.report import Run, consistent

    size = get_task(TASK).budget("smoke")
    own = Run(TASK, "alsals", 0, {"steps": size.steps, "batch_size": size.batch_size}, {})
    other = Run(TASK, "adam", 2, {"steps": size.steps + 100, "batch_size": size.batch_size}, {})
    for order in ([own, other], [other, own]):
        assert consistent(order, "smoke") == ([own], [other])
    # an unknown budget: the most common size, ties to the larger run
    assert consistent([own, other, other], "no-such-budget") == ([other, other], [own])


def test_the_final_loss_ema_is_bias_corrected_and_skips_non_finite_losses():
    """Table II's EMA starts from 0 and divides by 1 - 0.98^n, as Adam's moments do: a
    constant loss is itself from the first step on, and a 40-step run's value no longer
    keeps 0.98^39 (45%) of its first loss."""
    from alsals_bench.runner import loss_ema

    assert loss_ema([0.7] * 5) == pytest.approx([0.7] * 5)
    nan = float("nan")
    assert math.isnan(loss_ema([nan, 2.0])[0])
    assert loss_ema([nan, 2.0, nan, 2.0]) == pytest.approx([nan, 2.0, 2.0, 2.0], nan_ok=True)
    first_then_zero = loss_ema([1.0] + [0.0] * 39)[-1]
    weight = 0.02 * 0.98**39 / (1 - 0.98**40)  # the first loss's share, about 0.02
    assert first_then_zero == pytest.approx(weight)
    assert first_then_zero < 0.03


def _finished_log(out, steps, batch_size, seed=0):
    """A finished log of digits-cnn/adam on the smoke budget, of the sizes given."""
    path = RunKey(TASK, "adam", seed, "smoke").path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = {"type": "start", "task": TASK, "optimizer": "adam", "seed": seed}
    start |= {"steps": steps, "batch_size": batch_size}
    path.write_text(json.dumps(start) + "\n" + json.dumps({"type": "end"}) + "\n")
    return path


def test_the_start_record_holds_the_alsals_version_and_the_thread_count(tmp_path):
    import alsals

    start = read_log(run_one(RunKey(TASK, "adam", 0, "smoke"), tmp_path, progress=False))[0]
    assert start["alsals"] == alsals.__version__
    assert start["threads"] == torch.get_num_threads()


def test_a_finished_run_of_other_sizes_is_kept_and_the_sweep_says_so(tmp_path, capsys):
    """It said "done, skipped" (nothing at all without progress), though the report then
    leaves the run out as of another budget size."""
    budget = get_task(TASK).budget("smoke")
    other = _finished_log(tmp_path, budget.steps + 7, budget.batch_size)
    same = _finished_log(tmp_path, budget.steps, budget.batch_size, seed=1)
    before = other.read_text()
    sweep([TASK], ["adam"], [0, 1], "smoke", tmp_path, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"[{TASK} | adam | seed 0 | smoke] done, kept, but it ran with other settings: "
        f"steps {budget.steps + 7} (now {budget.steps}); delete {other} to rerun it",
        "2 finished run(s) skipped (their logs are kept)",
    ]
    assert other.read_text() == before and is_finished(same)
    sweep([TASK], ["adam"], [1], "smoke", tmp_path, progress=True)
    assert capsys.readouterr().out == f"[{TASK} | adam | seed 1 | smoke] done, skipped\n"


def _hold(lock):
    """Hold ``lock`` as another process would (``flock`` locks of two opens conflict
    within one process too); the open file, to close."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = open(lock, "w")  # noqa: SIM115 (the caller closes it: the lock lasts until then)
    held.write("12345\n")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return held


@needs_fcntl
def test_a_run_whose_lock_another_process_holds_is_skipped_and_the_lock_named(tmp_path, capsys):
    """Two sweeps on one folder both wrote the same log: nothing kept them apart."""
    key = RunKey(TASK, "adam", 0, "smoke")
    lock = key.path(tmp_path).with_name("adam__seed0.jsonl.lock")
    with _hold(lock):
        assert sweep([TASK], ["adam"], [0], "smoke", tmp_path, progress=False) == []
    out = capsys.readouterr().out
    said = f"[{TASK} | adam | seed 0 | smoke] skipped: another process (pid 12345) holds its "
    assert said + f"lock file {lock}: it is writing its log" in out
    assert not key.path(tmp_path).exists() and lock.read_text() == "12345\n"


@needs_fcntl
def test_a_lock_file_a_killed_run_left_is_taken_over(tmp_path):
    """A SIGKILL leaves the lock file behind, but not its lock: the next sweep runs."""
    key = RunKey(TASK, "adam", 0, "smoke")
    lock = key.path(tmp_path).with_name("adam__seed0.jsonl.lock")
    lock.parent.mkdir(parents=True)
    lock.write_text("12345\n")
    assert sweep([TASK], ["adam"], [0], "smoke", tmp_path, progress=False) == [key.path(tmp_path)]
    assert is_finished(key.path(tmp_path)) and not lock.exists()


@needs_fcntl
def test_a_lock_taken_while_the_run_was_prepared_is_not_ours_to_remove(tmp_path, monkeypatch):
    """Taking the lock decides: the other process's lock survives our giving way."""
    from alsals_bench import runner

    key = RunKey(TASK, "adam", 0, "smoke")
    lock = runner.lock_path(key.path(tmp_path))
    prepare = runner._prepare
    held = []

    def prepare_while_another_process_starts(*args):
        held.append(_hold(lock))
        return prepare(*args)

    monkeypatch.setattr(runner, "_prepare", prepare_while_another_process_starts)
    try:
        with pytest.raises(runner.RunLocked):
            run_one(key, tmp_path, progress=False)
        assert lock.read_text() == "12345\n" and not key.path(tmp_path).exists()
    finally:
        held[0].close()


@needs_fcntl
def test_a_lock_file_removed_by_its_holder_as_it_was_opened_is_opened_again(tmp_path, monkeypatch):
    """The holder ends (removes the file, then closes it) between our open and our lock: the
    lock we get is on a file no other process will open; the run locks the path's new file."""
    from alsals_bench import runner

    key = RunKey(TASK, "adam", 0, "smoke")
    lock = runner.lock_path(key.path(tmp_path))
    lock.parent.mkdir(parents=True)
    lock.write_text("12345\n")
    flock, calls = fcntl.flock, []

    def holder_ends_first(fd, operation):
        calls.append(fd)
        if len(calls) == 2:  # (the first is is_locked's look)
            lock.unlink()
        return flock(fd, operation)

    monkeypatch.setattr(runner.fcntl, "flock", holder_ends_first)
    run_one(key, tmp_path, progress=False)
    assert len(calls) == 3 and is_finished(key.path(tmp_path)) and not lock.exists()


def test_the_lock_is_removed_when_a_run_ends_or_is_interrupted(tmp_path, monkeypatch):
    from alsals_bench import runner

    key = RunKey(TASK, "adam", 0, "smoke")
    run_one(key, tmp_path / "a", progress=False)
    assert sorted(p.name for p in key.path(tmp_path / "a").parent.iterdir()) == [
        "adam__seed0.jsonl"
    ]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_one(key, tmp_path / "b", progress=False)
    assert not runner.lock_path(key.path(tmp_path / "b")).exists()


def test_landscape_every_says_when_a_run_has_no_direction_to_scan(tmp_path, capsys):
    """A run of ALSALS(params) or Adam asked for scans logged none, without a word."""
    run_one(RunKey("digits-cnn", "adam", 0, "smoke"), tmp_path, progress=False, landscape_every=2)
    err = capsys.readouterr().err
    assert "[digits-cnn | adam | seed 0] --landscape-every: no landscape records" in err


@needs_fcntl
def test_a_lock_whose_pid_cannot_be_written_is_released(tmp_path, monkeypatch):
    """A failure after the lock is taken (a full disk at the pid's write) closes the file:
    no descriptor left open keeps the lock for the rest of the sweep's process."""
    import os

    from alsals_bench import runner

    lock = tmp_path / "adam__seed0.jsonl.lock"

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        runner._take_lock(lock)
    monkeypatch.undo()
    assert not runner.is_locked(lock)
    os.close(runner._take_lock(lock))


@needs_fcntl
def test_a_look_at_the_lock_by_another_sweep_does_not_make_the_run_skipped(tmp_path, monkeypatch):
    """``is_locked`` holds a shared lock for a moment: a run taking the lock then tries again
    rather than leaving the run to a process that is only looking (naming a dead pid)."""
    from alsals_bench import runner

    key = RunKey(TASK, "adam", 0, "smoke")
    lock = runner.lock_path(key.path(tmp_path))
    lock.parent.mkdir(parents=True)
    lock.write_text("12345\n")
    look = open(lock)  # noqa: SIM115 (released by the patched sleep below)
    fcntl.flock(look, fcntl.LOCK_SH | fcntl.LOCK_NB)
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: look.close())
    run_one(key, tmp_path, progress=False)
    assert is_finished(key.path(tmp_path)) and not lock.exists()
