"""Tests found missing by mutation testing of the report, the runner and Adam's grid: each
pins one decision (which summary, which key, which comparison) that a plausible one-token
change got past the other tests. Synthetic logs with answers computed by hand."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import alsals_bench.runner as runner
from alsals_bench.report import (
    _band,
    adam_compute,
    fold_tuned_adam,
    load_runs,
    on_common_x,
    write_report,
)
from alsals_bench.runner import RunKey, loss_ema, read_log, run_one
from alsals_bench.tasks import get_task


def _log(
    out,
    task,
    optimizer,
    seed,
    losses=(1.0, 1.0),
    passes=None,
    metrics=("accuracy",),
    evals=None,
    start_info=None,
    **end,
):
    """A finished run's log of budget ``fake`` (size 4): one step record per loss; ``passes``
    the cumulative (forwards, backwards) per step (default one of each a step, Adam's);
    ``evals`` the eval records' metrics; ``end`` overrides the end record's fields."""
    path = RunKey(task, optimizer, seed, "fake").path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(losses)
    passes = passes or [(s, s) for s in range(1, n + 1)]
    start = {"type": "start", "task": task, "optimizer": optimizer, "seed": seed}
    start |= {"budget": "fake", "steps": 4, "batch_size": 8, "metrics": list(metrics)}
    start |= start_info or {}
    records = [start]
    for s, (loss, (f, b)) in enumerate(zip(losses, passes, strict=True), 1):
        records.append(
            {"type": "step", "step": s, "loss": loss, "lr": 1e-3, "time": 0.5 * s}
            | {"forwards": f, "backwards": b}
        )
    for metrics_at in evals or [{"accuracy": 0.5}]:
        records.append({"type": "eval", "step": n, **metrics_at})
    summary = {"status": "ok", "time_per_step": 0.5, "forwards_per_step": passes[-1][0] / n}
    summary |= {"backwards_per_step": passes[-1][1] / n, "final_train_loss": losses[-1]}
    summary |= {"peak_accuracy": 0.5} if "accuracy" in metrics else {}
    records.append({"type": "end", **summary, **end})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _tables(out):
    """{title: {row label: {column: cell}}} of every markdown table in the report."""
    text = write_report(out, "fake").read_text()
    tables = {}
    for part in text.split("### ")[1:]:
        lines = [line for line in part.splitlines() if line.startswith("| ")]
        if not lines:
            continue
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        rows = {}
        for line in lines[1:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
        tables[part.splitlines()[0].strip()] = rows
    return tables, text


TABLE_I = "Table I: peak validation accuracy"
TABLE_II = "Table II: final training loss (EMA of the per-step loss)"
EQUAL = "Equal compute: training loss at the compute Adam used"
COST = "Cost per training step (median over seeds)"


def test_a_cell_is_the_mean_over_seeds_not_the_median(tmp_path):
    """Table I's cell is the mean of the seeds' peak accuracies (0.5, 0.6, 0.9: 0.6667, not
    the median 0.6), with the standard error std(ddof=1) / sqrt(3)."""
    for seed, accuracy in enumerate((0.5, 0.6, 0.9)):
        _log(tmp_path, "t1", "alsals", seed, peak_accuracy=accuracy)
    tables, _ = _tables(tmp_path)
    assert tables[TABLE_I]["t1 (n=3)"]["alsals"] == "**0.6667 ± 0.12**"


def test_the_standard_error_divides_by_the_seeds_that_have_a_value(tmp_path):
    """A diverged seed (no final loss) is left out of the mean and of the standard error's
    sqrt(n): losses 1 and 3 give 2 ± 1 over n=2 (not ± 0.82 over the row's 3 seeds)."""
    _log(tmp_path, "t1", "alsals", 0, [1.0] * 4)
    _log(tmp_path, "t1", "alsals", 1, [3.0] * 4)
    _log(tmp_path, "t1", "alsals", 2, [3.0, math.nan], status="diverged", final_train_loss=None)
    tables, _ = _tables(tmp_path)
    assert tables[TABLE_II]["t1 (n=3)"]["alsals"] == "**2 ± 1** (n=2)"


def _lm(out, task, optimizer, seed, best_loss, best_ppl):
    """A language-modelling run whose best and final validation metrics differ."""
    _log(
        out,
        task,
        optimizer,
        seed,
        metrics=("val_loss", "perplexity"),
        evals=[{"val_loss": best_loss, "perplexity": best_ppl}],
        best_val_loss=best_loss,
        final_val_loss=best_loss + 1,
        best_perplexity=best_ppl,
        final_perplexity=best_ppl * 3,
    )


def test_the_language_model_tables_show_the_best_validation_loss_and_perplexity(tmp_path):
    """The LM tables read ``best_val_loss`` and ``best_perplexity`` (not the final ones), and
    a language task (which also has a ``val_loss``) is not repeated in the table of tasks
    judged by a validation loss alone."""
    for seed in range(2):
        _lm(tmp_path, "lm", "alsals", seed, 2.0, 7.0)
        _lm(tmp_path, "lm", "adam", seed, 3.0, 20.0)
    tables, _ = _tables(tmp_path)
    assert tables["Language modelling: best validation loss"]["lm (n=2)"] == {
        "alsals": "**2 ± 0**",
        "adam": "3 ± 0",
    }
    assert tables["Language modelling: best validation perplexity"]["lm (n=2)"] == {
        "alsals": "**7 ± 0**",
        "adam": "20 ± 0",
    }
    assert "Best validation loss" not in tables


def test_the_best_validation_loss_table_averages_tasks_logarithmically(tmp_path):
    """Its summary row is the geometric mean over tasks: 0.01 and 1 give 0.1 (their
    arithmetic mean would be 0.505)."""
    for task, loss in (("r1", 0.01), ("r2", 1.0)):
        _log(tmp_path, task, "adam", 0, metrics=("val_loss",), evals=[{"val_loss": loss}],
             best_val_loss=loss)  # fmt: skip
    tables, _ = _tables(tmp_path)
    assert tables["Best validation loss"]["*log average*"] == {"adam": "0.1"}


def test_a_diverged_seed_in_the_equal_compute_table_makes_its_cell_say_n(tmp_path):
    """A diverged run has no loss at Adam's compute (NaN, not a missing run): the cell
    averages the other seed only and must say ``(n=1)``."""
    for seed in range(2):
        _log(tmp_path, "t1", "adam", seed, [1.0] * 4)
    _log(tmp_path, "t1", "alsals", 0, [0.5] * 4)
    _log(tmp_path, "t1", "alsals", 1, [0.5, math.nan], status="diverged", final_train_loss=None)
    tables, _ = _tables(tmp_path)
    assert tables[EQUAL]["t1 (n=2, Adam 12)"]["alsals"] == "**0.5** (n=1)"


def test_adams_compute_is_the_largest_over_its_seeds(tmp_path):
    """Of two ``adam`` runs that spent 12 and 15 pass-equivalents, the table compares at 15
    (the docs: "the largest over the seeds that did not diverge")."""
    _log(tmp_path, "t1", "adam", 0, [1.0] * 4)
    _log(tmp_path, "t1", "adam", 1, [1.0] * 4, passes=[(1, 1), (2, 2), (3, 3), (9, 3)])
    assert adam_compute(load_runs(tmp_path, "fake")) == {"t1": 15.0}
    tables, _ = _tables(tmp_path)
    assert "t1 (n=2, Adam 15)" in tables[EQUAL]


def test_a_cell_is_marked_short_when_any_seed_used_less_compute_than_adam(tmp_path):
    """† marks a cell where at least one seed ended below Adam's compute (9 < 12), even if
    the other seed did not."""
    for seed in range(2):
        _log(tmp_path, "t1", "adam", seed, [1.0] * 4)
    _log(tmp_path, "t1", "alsals", 0, [0.5] * 3)  # 9 pass-equivalents in all
    _log(tmp_path, "t1", "alsals", 1, [0.5] * 4)
    tables, text = _tables(tmp_path)
    assert tables[EQUAL]["t1 (n=2, Adam 12)"]["alsals"] == "**0.5 ± 0**†"
    assert "† used less compute in total than Adam" in text


def test_the_equal_compute_table_averages_tasks_logarithmically(tmp_path):
    """Its summary row is the geometric mean of the tasks' means: 0.01 and 1 give 0.1."""
    for task, loss in (("t1", 0.01), ("t2", 1.0)):
        _log(tmp_path, task, "adam", 0, [loss] * 4)
    tables, _ = _tables(tmp_path)
    assert tables[EQUAL]["*log average*"] == {"adam": "0.1"}
    assert tables[TABLE_II]["*log average*"] == {"adam": "0.1"}


def test_the_cost_table_is_the_median_over_seeds_with_the_ratio_to_adam(tmp_path):
    """Time per step, forwards and backwards per step are medians over seeds (one slow or
    costly seed does not move them), and the time ratio is to the ``adam`` column."""
    for seed, (time, forwards) in enumerate(((0.001, 1.0), (0.002, 1.0), (0.009, 4.0))):
        _log(tmp_path, "t1", "adam", seed, time_per_step=time, forwards_per_step=forwards)
    for seed, (time, forwards) in enumerate(((0.004, 3.0), (0.004, 3.0), (0.004, 6.0))):
        _log(tmp_path, "t1", "alsals", seed, time_per_step=time, forwards_per_step=forwards,
             backwards_per_step=1.0)  # fmt: skip
    tables, _ = _tables(tmp_path)
    assert tables[COST]["t1"] == {
        "alsals": "4 (2.00×), 3.00 / 1.00",
        "adam": "2 (1.00×), 1.00 / 1.00",
    }


def test_a_grid_without_accuracy_picks_the_lowest_final_training_loss(tmp_path):
    """On a task without accuracy (a language model) the grid's metric is the final training
    loss, and the best rate is the lowest: here 0.001, the smallest rate tried, so the edge
    is flagged too."""
    for seed in range(2):
        for name, loss in (("adam@0.001", 1.0), ("adam@0.01", 2.0), ("adam@0.1", 3.0)):
            _log(tmp_path, "lm", name, seed, [loss] * 4, metrics=("val_loss",),
                 evals=[{"val_loss": loss}])  # fmt: skip
    runs, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    grid = grids["lm"]
    assert grid.metric == "final_train_loss" and not grid.higher_is_better
    assert grid.best == 0.001 and grid.at_edge
    assert grid.describe("lm").startswith("- lm (final training loss) (best at the edge")
    tuned = [r for r in runs if r.optimizer == "adam-tuned"]
    assert {r.start["optimizer"] for r in tuned} == {"adam@0.001"}
    tables, _ = _tables(tmp_path)
    assert tables[TABLE_II]["lm (n=2)"]["adam-tuned"] == "**1 ± 0**‡"


def test_the_grid_ranks_rates_by_the_mean_over_seeds(tmp_path):
    """0.01's peak accuracies 0.5, 0.95, 0.95 (mean 0.8, median 0.95) lose to 0.001's 0.9
    at every seed: the grid ranks by the mean, as its list and the tables report."""
    for seed, accuracy in enumerate((0.5, 0.95, 0.95)):
        _log(tmp_path, "t1", "adam@0.01", seed, peak_accuracy=accuracy)
        _log(tmp_path, "t1", "adam@0.001", seed, peak_accuracy=0.9)
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert grids["t1"].best == 0.001


def test_a_rate_where_one_seed_diverged_loses_whatever_its_place_in_the_grid(tmp_path):
    """A rate with one diverged seed is out of the running even where its other seed has
    the best accuracy and its logs are read first (``adam@0.0001`` sorts before the rest):
    a NaN mean compared as neither better nor worse, and the first rate read kept it."""
    _log(tmp_path, "t1", "adam@0.0001", 0, peak_accuracy=0.99)
    _log(tmp_path, "t1", "adam@0.0001", 1, status="diverged", final_train_loss=None,
         peak_accuracy=0.99)  # fmt: skip
    for seed in range(2):
        _log(tmp_path, "t1", "adam@0.001", seed, peak_accuracy=0.9)
        _log(tmp_path, "t1", "adam@0.01", seed, peak_accuracy=0.8)
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert list(grids["t1"].values)[0] == 0.0001  # (read first)
    assert grids["t1"].best == 0.001


def test_a_grid_of_one_rate_is_not_flagged_as_at_its_edge(tmp_path):
    """With one rate tried (``adam`` and ``adam@0.001`` at the same rate) there is no edge
    to report: the grid's edge is a comparison between rates (``len(values) > 1``)."""
    for seed in range(2):
        _log(tmp_path, "t1", "adam", seed, start_info={"peak_lr": 0.001})
        _log(tmp_path, "t1", "adam@0.001", seed)
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert list(grids["t1"].values) == [0.001] and not grids["t1"].at_edge
    _, text = _tables(tmp_path)
    assert "‡" not in text and "edge of the grid" not in text


class _Resized:
    """A task whose budgets are resized (``dataclasses.replace``) and whose evaluation, if
    ``evaluate`` is given, is that function of the model: the runner's own loop, on a
    model small enough to train in a second."""

    def __init__(self, name, evaluate=None, **sizes):
        self._task, self._sizes, self._evaluate = get_task(name), sizes, evaluate

    def __getattr__(self, name):
        return getattr(self._task, name)

    def budget(self, name):
        return dataclasses.replace(self._task.budget(name), **self._sizes)

    def setup(self, seed, budget, device):
        run = self._task.setup(seed, budget, device)
        if self._evaluate is not None:
            run.evaluate = self._evaluate
        return run


def _scripted(evaluations):
    """An evaluation that returns these metrics in turn."""
    remaining = iter(evaluations)
    return lambda model: dict(next(remaining))


def _wrapped_adam(monkeypatch, wrap):
    """Make the runner build ``adam`` with ``wrap(stepper, model)`` applied."""
    real = runner.get_optimizer("adam")

    def build(model, task, budget):
        stepper = real.build(model, task, budget)
        wrap(stepper, model)
        return stepper

    monkeypatch.setattr(
        runner, "get_optimizer", lambda name: dataclasses.replace(real, build=build)
    )


def _run(tmp_path, monkeypatch, task, optimizer="adam"):
    """The records of one run of ``optimizer`` on the resized ``task``."""
    monkeypatch.setattr(runner, "get_task", lambda name: task)
    return read_log(run_one(RunKey("digits-cnn", optimizer, 0, "smoke"), tmp_path, progress=False))


def test_a_run_evaluates_every_eval_every_steps_and_at_its_end_and_sums_up_its_evals(
    tmp_path, monkeypatch
):
    """5 steps, ``eval_every`` 2: evals after steps 2, 4 and 5 (the last step, though not a
    multiple). The end record: the peak accuracy and best validation loss over the finite
    values (a NaN first evaluation is skipped), the final ones from the last evaluation,
    per-step averages over the steps done, and the training loss's bias-corrected EMA."""
    nan = float("nan")
    evaluations = [
        {"accuracy": nan, "val_loss": nan},
        {"accuracy": 0.9, "val_loss": 1.0},
        {"accuracy": 0.7, "val_loss": 1.5},
    ]
    task = _Resized("digits-cnn", _scripted(evaluations), steps=5, eval_every=2)
    records = _run(tmp_path, monkeypatch, task)
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in records if r["type"] == "eval"] == [2, 4, 5]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [(r["forwards"], r["backwards"]) for r in steps] == [(k, k) for k in range(1, 6)]
    end = records[-1]
    assert end["status"] == "ok" and end["steps_done"] == 5
    assert end["peak_accuracy"] == 0.9 and end["final_accuracy"] == 0.7
    assert end["best_val_loss"] == 1.0 and end["final_val_loss"] == 1.5
    assert end["forwards_per_step"] == end["backwards_per_step"] == 1.0
    assert end["time_per_step"] == pytest.approx(end["train_time"] / 5)
    assert end["train_time"] == pytest.approx(steps[-1]["time"])
    assert all(a["time"] <= b["time"] for a, b in zip(steps[:-1], steps[1:], strict=True))
    assert end["final_train_loss"] == pytest.approx(loss_ema([r["loss"] for r in steps])[-1])


def test_a_run_diverges_after_twenty_non_finite_losses_in_a_row(tmp_path, monkeypatch):
    """A NaN loss at step 1, a finite one at step 2 (the count starts again), then NaN from
    step 3 on: the 20th in a row is step 22, where the run stops as "diverged"; the passes
    per step are over the 22 steps done, not the budget's 40."""

    def wrap(stepper, model):
        take, count = stepper.step, [0]

        def step(closure):
            count[0] += 1
            loss = take(closure)
            return loss if count[0] == 2 else float("nan")

        stepper.step = step

    _wrapped_adam(monkeypatch, wrap)
    records = _run(tmp_path, monkeypatch, _Resized("digits-cnn", steps=40, eval_every=100))
    end = records[-1]
    assert runner.DIVERGED_AFTER == 20
    assert end["status"] == "diverged" and end["steps_done"] == 22
    assert sum(r["type"] == "step" for r in records) == 22
    assert not any(r["type"] == "eval" for r in records)
    assert end["final_train_loss"] is None
    assert end["forwards_per_step"] == end["backwards_per_step"] == 1.0


def test_the_report_recomputes_the_final_loss_from_the_step_losses(tmp_path):
    """A log whose end record holds a final loss from before the EMA's bias correction (here
    a stale 99) is reported with the corrected EMA of its step losses, as every newer log."""
    _log(tmp_path, "t1", "adam", 0, [2.0, 1.0, 1.0, 1.0], final_train_loss=99.0)
    (run,) = load_runs(tmp_path, "fake")
    assert run.end["final_train_loss"] == pytest.approx(loss_ema([2.0, 1.0, 1.0, 1.0])[-1])
    tables, _ = _tables(tmp_path)
    assert tables[TABLE_II]["t1 (n=1)"]["adam"] == "**1.242**"


def test_a_tie_in_the_grid_is_broken_by_the_mean_final_loss_over_every_seed(tmp_path):
    """Equal accuracy at 0.01 and 0.001: the lower mean final training loss wins, over all
    seeds (0.01: 0.1 and 1.0, mean 0.55; 0.001: 0.3 at both), not the first seed's alone."""
    for seed, loss in enumerate((0.1, 1.0)):
        _log(tmp_path, "t1", "adam@0.01", seed, [loss] * 4, peak_accuracy=0.9)
        _log(tmp_path, "t1", "adam@0.001", seed, [0.3] * 4, peak_accuracy=0.9)
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert grids["t1"].best == 0.001


def test_a_run_evaluates_in_eval_mode_and_trains_again_in_train_mode(tmp_path, monkeypatch):
    """Around each evaluation the stepper is told (``eval``: Schedule-Free swaps in its
    average) and the model is in eval mode (BatchNorm's running statistics); training
    resumes in train mode, the stepper told again (``train``)."""
    calls = []

    def wrap(stepper, model):
        take = stepper.step
        stepper.train = lambda: calls.append("train")
        stepper.eval = lambda: calls.append("eval")

        def step(closure):
            calls.append(("step", model.training))
            return take(closure)

        stepper.step = step

    def evaluate(model):
        calls.append(("evaluate", model.training))
        return {"accuracy": 0.5, "val_loss": 1.0}

    _wrapped_adam(monkeypatch, wrap)
    _run(tmp_path, monkeypatch, _Resized("digits-cnn", evaluate, steps=3, eval_every=2))
    step, evaluation = ("step", True), ("evaluate", False)
    assert calls == ["train", step, step, "eval", evaluation, "train", step, "eval", evaluation,
                     "train"]  # fmt: skip


def test_step_records_count_the_cumulative_forward_and_backward_passes(tmp_path):
    """A line search's step record holds its passes so far: one backward a step (the step
    number) and more forwards, and the end record's per-step counts are the last record's
    totals over the steps done."""
    records = read_log(
        run_one(RunKey("digits-cnn", "alsals", 0, "smoke"), tmp_path, progress=False)
    )
    steps = [r for r in records if r["type"] == "step"]
    assert [r["backwards"] for r in steps] == [r["step"] for r in steps]
    assert all(r["forwards"] > r["backwards"] for r in steps)
    assert all(b["forwards"] > a["forwards"] for a, b in zip(steps[:-1], steps[1:], strict=True))
    end = records[-1]
    assert end["forwards_per_step"] == pytest.approx(steps[-1]["forwards"] / len(steps))
    assert end["backwards_per_step"] == 1.0


def test_curves_on_different_x_are_resampled_at_as_many_points_as_the_longest():
    """Seeds whose x differ (pass-equivalents) are interpolated onto evenly spaced points
    over the range every seed covers, as many as the longest curve has (5, not 3)."""
    x, ys = on_common_x(
        [
            (np.array([0.0, 4, 8]), np.array([0.0, 4, 8])),
            (np.array([0.0, 2, 4, 6, 8]), np.array([0.0, 1, 2, 3, 4])),
        ]
    )
    assert x.tolist() == [0, 2, 4, 6, 8]
    assert ys.tolist() == [[0, 2, 4, 6, 8], [0, 1, 2, 3, 4]]


def test_a_log_average_over_a_zero_mean_is_not_given(tmp_path):
    """The log average needs positive means: a task whose best validation loss is 0 leaves
    the column's log average out (–), not 0."""
    for task, loss in (("r1", 0.0), ("r2", 1.0)):
        _log(tmp_path, task, "adam", 0, metrics=("val_loss",), evals=[{"val_loss": loss}],
             best_val_loss=loss)  # fmt: skip
    tables, _ = _tables(tmp_path)
    assert tables["Best validation loss"]["*log average*"] == {"adam": "–"}


def test_table_one_holds_the_classification_tasks_only(tmp_path):
    """A task without accuracy (regression) has no row in Table I, and its average over the
    classification tasks is given (a row of – would have blanked it)."""
    _log(tmp_path, "cls", "adam", 0, peak_accuracy=0.8)
    _log(tmp_path, "reg", "adam", 0, metrics=("val_loss",), evals=[{"val_loss": 1.0}],
         best_val_loss=1.0)  # fmt: skip
    tables, _ = _tables(tmp_path)
    assert tables[TABLE_I] == {"cls (n=1)": {"adam": "**0.8**"}, "*average*": {"adam": "0.8"}}


class _Axes:
    """Records what ``_band`` draws."""

    def __init__(self):
        self.lines, self.bands = [], []

    def plot(self, x, y, **style):
        self.lines.append((list(x), list(y)))

    def fill_between(self, x, low, high, **style):
        self.bands.append((list(x), list(low), list(high)))


def test_the_figures_band_is_the_standard_error_over_seeds():
    """The band around the mean curve is ± std(ddof=1) / sqrt(seeds): seeds at 0 and 2 give
    the mean 1 and the band [0, 2]."""
    axes = _Axes()
    x = np.array([1.0, 2.0])
    _band(axes, [(x, np.zeros(2)), (x, np.full(2, 2.0))], "adam", "k")
    assert axes.lines == [([1.0, 2.0], [1.0, 1.0])]
    ((_, low, high),) = axes.bands
    assert low == pytest.approx([0.0, 0.0]) and high == pytest.approx([2.0, 2.0])


def test_a_finished_run_is_returned_as_it_is_without_preparing_it(tmp_path, monkeypatch):
    """``run_one`` on a run whose log is finished returns its path at once: no data loaded,
    no model built (a finished run whose data is gone is still finished), log untouched."""
    path = RunKey("digits-cnn", "adam", 0, "smoke").path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"type": "start"}\n{"type": "end"}\n')

    def prepare(*args):
        raise AssertionError("a finished run was prepared again")

    monkeypatch.setattr(runner, "_prepare", prepare)
    assert run_one(RunKey("digits-cnn", "adam", 0, "smoke"), tmp_path, progress=False) == path
    assert path.read_text() == '{"type": "start"}\n{"type": "end"}\n'
