"""The report's equal-compute table and figures, its grid-edge marks and its budgets, on
small synthetic logs whose answers are computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from unwritable import unwritable

from alsals_bench import cli
from alsals_bench.report import (
    adam_compute,
    build_tables,
    fold_tuned_adam,
    load_runs,
    loss_at_compute,
    on_common_x,
    pass_equivalents,
    write_report,
)
from alsals_bench.runner import RunKey, is_finished


def _log(
    out,
    task,
    optimizer,
    seed,
    losses,
    forwards,
    backwards,
    budget="fake",
    size=4,
    metrics=("accuracy",),
    lrs=None,
    start_info=None,
    **end,
):
    """A finished run's log: one step record per loss, cumulative pass counts as given;
    ``size`` is the budget's steps in its start record (runs of one size are averaged);
    ``lrs`` the logged rates (default 1e-3 each step); ``start_info`` more start fields."""
    path = RunKey(task, optimizer, seed, budget).path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(losses)
    start = {"type": "start", "task": task, "optimizer": optimizer, "seed": seed}
    start |= {"budget": budget, "steps": size, "batch_size": 8, "metrics": list(metrics)}
    start |= start_info or {}
    records = [start]
    lrs = lrs or [1e-3] * n
    for s, (loss, f, b, lr) in enumerate(zip(losses, forwards, backwards, lrs, strict=True), 1):
        records.append(
            {"type": "step", "step": s, "loss": loss, "lr": lr, "time": 0.5 * s}
            | {"forwards": f, "backwards": b}
        )
    records.append({"type": "eval", "step": n, "accuracy": 0.5})
    summary = {"time_per_step": 0.5, "forwards_per_step": forwards[-1] / n}
    summary |= {"backwards_per_step": backwards[-1] / n, "peak_accuracy": 0.5}
    summary |= {"final_train_loss": losses[-1], "status": "ok"} | end
    records.append({"type": "end", **summary})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _adam_like(steps):
    """Cumulative passes of one forward and one backward per step: 3 pass-equivalents each."""
    return list(range(1, steps + 1)), list(range(1, steps + 1))


def test_loss_at_the_compute_adam_used_by_hand(tmp_path):
    for seed, scale in ((0, 1.0), (1, 2.0)):
        # Adam: 4 steps of 1 forward + 1 backward = 3 pass-equivalents: 12 in all.
        _log(tmp_path, "t1", "adam", seed, [2 * scale, scale, scale, scale], *_adam_like(4))
        # A line search: 3 forwards + 1 backward a step = 5, 10, 15, 20 pass-equivalents;
        # at Adam's 12, its step 2: the EMA (0.98, bias-corrected) of its first two losses.
        losses = [1.0, 0.5, 0.5, 0.5] if seed == 0 else [3.0, 1.5, 1.5, 1.5]
        _log(tmp_path, "t1", "alsals", seed, losses, [3, 6, 9, 12], [1, 2, 3, 4])
        # Used less than Adam in total (9): reported at its end and marked.
        _log(tmp_path, "t1", "cheap", seed, [1.0, 1.0, 1.0], *_adam_like(3))
        # Its first step alone costs 13 > 12: no loss at Adam's compute.
        _log(tmp_path, "t1", "costly", seed, [1.0, 1.0], [11, 22], [1, 2])
    runs = load_runs(tmp_path, "fake")
    assert [list(pass_equivalents(r)) for r in runs if r.optimizer == "alsals"][0] == [
        5,
        10,
        15,
        20,
    ]
    assert adam_compute(runs) == {"t1": 12}
    at = {(r.optimizer, r.seed): loss_at_compute(r, 12) for r in runs}
    # Adam at its own end: the EMA of 2, 1, 1, 1 from 0, over 1 - 0.98^4 (x2 for seed 1).
    adam = (((0.02 * 2 * 0.98 + 0.02) * 0.98 + 0.02) * 0.98 + 0.02) / (1 - 0.98**4)
    assert at["adam", 0] == (pytest.approx(adam), False)  # 1.2425
    assert at["adam", 1] == (pytest.approx(2 * adam), False)
    two = (0.98 * 0.02 * 1.0 + 0.02 * 0.5) / (1 - 0.98**2)  # 0.7475: the first loss's weight
    assert at["alsals", 0] == (pytest.approx(two), False)  # is 0.98 / 1.98 of the two
    assert at["alsals", 1] == (pytest.approx(3 * two), False)
    assert at["cheap", 0] == (pytest.approx(1.0), True)
    assert math.isnan(at["costly", 0][0])

    text = write_report(tmp_path, "fake").read_text()
    assert "### Equal compute: training loss at the compute Adam used" in text
    assert "| task | alsals | adam | cheap | costly |" in text
    # alsals: mean of 0.7475 and 2.242, s.e. their difference / 2; adam: 1.864 ± 0.6212
    assert "| t1 (n=2, Adam 12) | 1.495 ± 0.75 | 1.864 ± 0.62 | **1 ± 0**† | – |" in text
    assert "| *log average* | 1.495 | 1.864 | 1 | – |" in text
    assert "† used less compute in total than Adam" in text
    assert "forward passes + 2 × backward passes" in text
    assert (tmp_path / "fake" / "report" / "t1.png").exists()  # loss against passes, time


def test_a_diverged_run_and_old_logs_without_pass_counts_have_no_equal_compute_loss(tmp_path):
    _log(tmp_path, "t1", "adam", 0, [1.0, 1.0], *_adam_like(2), status="diverged")
    run = load_runs(tmp_path, "fake")[0]
    assert math.isnan(loss_at_compute(run, 100)[0])  # left out, as in Table II
    run.end["status"] = "ok"
    assert loss_at_compute(run, 100) == (1.0, True)
    run.steps["forwards"] = np.full(2, np.nan)  # a log from before pass counts
    assert math.isnan(loss_at_compute(run, 100)[0]) and adam_compute([run]) == {}


def test_curves_of_seeds_share_their_steps_or_are_interpolated_on_a_common_x():
    # Same steps (one seed ran shorter): the shared prefix, as the step plots always did.
    x, ys = on_common_x(
        [(np.array([1.0, 2, 3]), np.array([5.0, 6, 7])), (np.array([1.0, 2]), np.array([1.0, 2]))]
    )
    assert list(x) == [1, 2] and ys.tolist() == [[5, 6], [1, 2]]
    # Different x (pass-equivalents, time): the range both cover, [4, 9], at 3 points,
    # each seed interpolated linearly: seed 1 at 4, 6.5, 9 = 1 + 1/3, 2 + 1/6, 3.
    x, ys = on_common_x(
        [
            (np.array([3.0, 6, 9]), np.array([1.0, 2, 3])),
            (np.array([4.0, 8, 12]), np.array([2.0, 4, 6])),
        ]
    )
    assert x.tolist() == [4, 6.5, 9]
    assert ys[0] == pytest.approx([1 + 1 / 3, 2 + 1 / 6, 3])
    assert ys[1] == pytest.approx([2, 3.25, 4.5])
    # No overlap, or nothing finite: nothing to plot.
    assert on_common_x([(np.array([1.0, 2]), np.ones(2)), (np.array([3.0, 4]), np.ones(2))]) is None
    assert on_common_x([(np.array([np.nan]), np.ones(1))]) is None


def _grid(out, best_at_edge):
    """Adam's grid on t1: 1e-3 (the ``adam`` run, logged lr 1e-3), 1e-2 and 1e-4; the best
    peak accuracy at 1e-2 (the edge) or at 1e-3 (inside)."""
    for seed in range(2):
        for name, accuracy in (
            ("adam", 0.8),
            ("adam@0.01", 0.9 if best_at_edge else 0.7),
            ("adam@0.0001", 0.6),
            ("alsals", 0.85),
        ):
            _log(out, "t1", name, seed, [1.0, 1.0], *_adam_like(2), peak_accuracy=accuracy)


def test_a_best_adam_rate_at_the_grid_edge_is_marked_in_the_markdown_tables(tmp_path, capsys):
    _grid(tmp_path / "edge", best_at_edge=True)
    text = write_report(tmp_path / "edge", "fake").read_text()
    assert "**Adam's best rate is at the edge of its grid** on t1" in text
    tables = text.split("### ")
    for title in ("Table I:", "Table II:", "Equal compute:"):
        (table,) = [t for t in tables if t.startswith(title)]
        header, row = [
            [cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("|---")
        ][:2]
        cells = dict(zip(header, row, strict=True))
        assert cells["adam-tuned"].endswith("‡") and not cells["alsals"].endswith("‡")
        assert "‡ `adam-tuned`: the best rate is at the edge of the task's grid" in table
    assert "- t1 (peak accuracy) (best at the edge of the grid)" in text
    # The terminal shows the same tables.
    assert cli.main(["report", "--budget", "fake", "--out", str(tmp_path / "edge")]) == 0
    assert "0.9 ± 0**‡" in capsys.readouterr().out

    _grid(tmp_path / "inside", best_at_edge=False)
    text = write_report(tmp_path / "inside", "fake").read_text()
    assert "‡" not in text and "edge of the grid" not in text


def test_the_report_never_averages_runs_of_different_budgets(tmp_path):
    for seed in range(2):
        _log(tmp_path, "t1", "adam", seed, [4.0] * 4, *_adam_like(4), budget="quick")
        _log(tmp_path, "t1", "adam", seed, [1.0] * 20, *_adam_like(20), budget="long", size=20)
    # A long run from another version of the budget (10 steps): left out, not averaged.
    _log(tmp_path, "t1", "adam", 2, [9.0] * 10, *_adam_like(10), budget="long", size=10)
    long = write_report(tmp_path, "long").read_text()
    assert "Runs: 2 finished" in long
    assert "| t1 (n=2) | **1 ± 0** |" in long  # Table II: the long runs only
    assert "| t1 (n=2, Adam 60) | **1 ± 0** |" in long  # 20 steps x 3 pass-equivalents
    assert (
        "Left out (a different budget size than the other runs of the task): t1/adam/seed 2" in long
    )
    quick = write_report(tmp_path, "quick").read_text()
    assert "| t1 (n=2) | **4 ± 0** |" in quick and "Adam 12)" in quick
    assert (tmp_path / "long" / "report" / "report.md").exists()
    assert (tmp_path / "quick" / "report" / "report.md").exists()


def test_tasks_judged_by_a_validation_loss_alone_get_its_table(tmp_path):
    """A regression task (``val_loss`` only) has a best-validation-loss table with its log
    average; the classification task beside it is not in that table."""
    for seed, (a, b) in enumerate(((0.02, 0.04), (0.08, 0.01))):
        for optimizer, best in (("adam", a), ("alsals", b)):
            _log(
                tmp_path,
                "reg",
                optimizer,
                seed,
                [1.0, 1.0],
                *_adam_like(2),
                metrics=("val_loss",),
                best_val_loss=best,
            )
        _log(tmp_path, "cls", "adam", seed, [1.0, 1.0], *_adam_like(2))
    text = write_report(tmp_path, "fake").read_text()
    table = text.split("### Best validation loss")[1].split("###")[0]
    assert "| task | alsals | adam |" in table
    assert "| reg (n=2) | **0.025 ± 0.015** | 0.05 ± 0.03 |" in table
    assert "cls" not in table
    # log average over the one task: the geometric mean of the task's means
    assert "| *log average* | 0.025 | 0.05 |" in table


def _table_rows(text, title):
    """{row label: {column: cell}} of the markdown table titled ``title``."""
    (table,) = [t for t in text.split("### ") if t.startswith(title)]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows, table


def test_a_diverged_adam_run_sets_no_equal_compute_budget(tmp_path):
    """A diverged ``adam`` run (cut at step 2 of 4) used to set its task's budget to the
    compute of its 2 steps (6) instead of the 4 steps Adam runs (12)."""
    nan = float("nan")
    # t1: one seed finished (12), the other diverged: the finished run's compute.
    _log(tmp_path, "t1", "adam", 0, [1.0] * 4, *_adam_like(4))
    _log(tmp_path, "t1", "adam", 1, [1.0, nan], *_adam_like(2), status="diverged")
    # t2: every adam run diverged: the compute Adam planned, 4 steps x 3.
    for seed in range(2):
        _log(tmp_path, "t2", "adam", seed, [1.0, nan], *_adam_like(2), status="diverged")
        _log(tmp_path, "t2", "alsals", seed, [2.0, 1.0, 0.5, 0.5], [3, 6, 9, 12], [1, 2, 3, 4])
    runs = load_runs(tmp_path, "fake")
    assert adam_compute(runs) == {"t1": 12.0, "t2": 12.0}
    text = write_report(tmp_path, "fake").read_text()
    rows, table = _table_rows(text, "Equal compute:")
    assert "t1 (n=2, Adam 12)" in rows
    # alsals at 12 pass-equivalents: its step 2 (10), the EMA of 2.0 and 1.0 (corrected)
    assert rows["t2 (n=2, Adam 12 planned)"]["alsals"] == "**1.495 ± 0**"
    assert "Every `adam` run diverged on t2" in table


def test_the_adam_run_joins_the_grid_at_its_configured_rate_not_its_largest_logged(tmp_path):
    """An ``adam`` run (peak 0.01) that diverged in its warm-up logged rates up to 0.002
    only: it used to join the grid at 0.002, a rate nobody configured."""
    nan = float("nan")
    lrs = [0.001, 0.002]
    peak = {"peak_lr": 0.01}
    _log(tmp_path, "t1", "adam", 0, [1.0, nan], *_adam_like(2), lrs=lrs, start_info=peak,
         status="diverged")  # fmt: skip
    _log(tmp_path, "t1", "adam@0.01", 1, [1.0] * 2, *_adam_like(2), peak_accuracy=0.7)
    _log(tmp_path, "t1", "adam@0.001", 0, [1.0] * 2, *_adam_like(2), peak_accuracy=0.6)
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    values = grids["t1"].values
    assert sorted(values) == [0.001, 0.01]
    assert values[0.001] == [0.6] and math.isnan(values[0.01][0]) and values[0.01][1] == 0.7
    # A log from before the start record held the rate: the largest logged rate, as before.
    path = RunKey("t1", "adam", 0, "fake").path(tmp_path)
    path.write_text(path.read_text().replace(', "peak_lr": 0.01', ""))
    _, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    assert sorted(grids["t1"].values) == [0.001, 0.002, 0.01]


def test_one_seed_at_one_rate_counts_once_in_the_grid(tmp_path, capsys):
    """``adam@1e-3`` beside ``adam@0.001`` (and ``adam@3e-4`` beside ``adam@0.0003``) of one
    seed used to count as two seeds of the rate."""
    for seed in range(2):
        _log(tmp_path, "t1", "adam@0.001", seed, [1.0] * 2, *_adam_like(2), peak_accuracy=0.8)
        _log(tmp_path, "t1", "adam@0.0003", seed, [1.0] * 2, *_adam_like(2), peak_accuracy=0.5)
    _log(tmp_path, "t1", "adam@1e-3", 0, [1.0] * 2, *_adam_like(2), peak_accuracy=0.2)
    _log(tmp_path, "t1", "adam@3e-4", 1, [1.0] * 2, *_adam_like(2), peak_accuracy=0.9)
    runs, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    grid = grids["t1"]
    # The grid's own spelling is kept, whichever was run first; one value per seed.
    assert grid.values == {0.001: [0.8, 0.8], 0.0003: [0.5, 0.5]} and grid.best == 0.001
    tuned = [r for r in runs if r.optimizer == "adam-tuned"]
    assert sorted(r.seed for r in tuned) == [0, 1]
    assert {r.start["optimizer"] for r in tuned} == {"adam@0.001"}
    described = grid.describe("t1")
    assert "adam@1e-3 seed 0 (rate 0.001: adam@0.001 kept)" in described
    assert "adam@3e-4 seed 1 (rate 0.0003: adam@0.0003 kept)" in described
    text = write_report(tmp_path, "fake").read_text()
    assert "adam@1e-3 seed 0 (rate 0.001: adam@0.001 kept)" in text
    rows, _ = _table_rows(text, "Table I:")
    assert rows["t1 (n=2)"]["adam-tuned"] == "**0.8 ± 0**‡"  # 0.001: the grid's edge


def test_a_cell_averaged_over_fewer_seeds_than_its_row_says_so(tmp_path):
    """The row's "(n=2)" counts the task's seeds; a cell with one seed used to look the same
    and could be bold against a two-seed mean."""
    for seed, accuracy in ((0, 0.8), (1, 0.6)):
        _log(tmp_path, "t1", "alsals", seed, [1.0] * 2, *_adam_like(2), peak_accuracy=accuracy)
    _log(tmp_path, "t1", "adam", 0, [1.0] * 2, *_adam_like(2), peak_accuracy=0.75)
    text = write_report(tmp_path, "fake").read_text()
    rows, table = _table_rows(text, "Table I:")
    assert rows["t1 (n=2)"] == {"alsals": "0.7 ± 0.1", "adam": "**0.75** (n=1)"}
    assert "(n=k): the mean of k seeds, not of the row's n" in table
    rows, _ = _table_rows(text, "Equal compute:")
    assert rows["t1 (n=2, Adam 6)"]["adam"].endswith(" (n=1)")
    assert not rows["t1 (n=2, Adam 6)"]["alsals"].endswith(")")


def test_a_file_that_is_no_run_log_is_skipped_with_a_warning_and_the_rest_reported(
    tmp_path, capsys
):
    """Each of these crashed the whole report (UnicodeDecodeError, AttributeError,
    KeyError 'task', KeyError 'time_per_step'); now each is left out, named, with why."""
    _log(tmp_path, "t1", "adam", 0, [1.0, 0.5], *_adam_like(2))
    folder = tmp_path / "fake" / "t1"
    start = json.dumps({"type": "start", "task": "t1", "optimizer": "x", "seed": 0})
    times = '"time_per_step": 1, "forwards_per_step": 1, "backwards_per_step": 1'
    odd = {
        "latin1.jsonl": (b'{"type": "start"}\n\xff\xfe\n{"type": "end"}\n', "line 2 is not UTF-8"),
        "array.jsonl": (b"[1, 2]\n", "line 1 is not a JSON object"),
        "end-alone.jsonl": (b'{"type": "end"}\n', "an end record without a start record"),
        "bare-end.jsonl": (
            f'{start}\n{{"type": "end"}}\n'.encode(),
            "its end record has no 'time_per_step'",
        ),
        # (a TypeError, and a ValueError in the figures, from a metric that is no number)
        "text-metric.jsonl": (
            f'{start}\n{{"type": "end", {times}, "peak_accuracy": "high"}}\n'.encode(),
            "its end record's 'peak_accuracy' is 'high'",
        ),
        "text-eval.jsonl": (
            f'{start}\n{{"type": "eval", "step": 1, "accuracy": "x"}}\n'
            f'{{"type": "end", {times}}}\n'.encode(),
            "an eval record's 'accuracy' is 'x'",
        ),
    }
    for name, (content, _) in odd.items():
        (folder / name).write_bytes(content)
    # What a kill or a crash leaves is a partial run, not counted and not warned about.
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "torn.jsonl").write_bytes(f'{start}\n{{"type": "st'.encode())
    (folder / "nul.jsonl").write_bytes(f"{start}\n".encode() + b"\0" * 64)
    capsys.readouterr()
    path = write_report(tmp_path, "fake")
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(odd)
    for name, (_, why) in odd.items():
        (line,) = [w for w in warnings if f"{folder / name}:" in w]
        assert line.startswith("alsals-bench: warning: skipped ") and why in line
    assert "| t1 (n=1) |" in path.read_text()
    assert [r.optimizer for r in load_runs(tmp_path, "fake")] == ["adam"]
    # A sweep crashed on these too (is_finished); it now runs them again.
    assert not is_finished(folder / "array.jsonl") and not is_finished(folder / "latin1.jsonl")


def test_a_report_folder_that_cannot_be_written_fails_before_the_report_is_built(
    tmp_path, capsys, monkeypatch
):
    """It failed with a traceback once the figures were drawn."""
    _log(tmp_path, "t1", "adam", 0, [1.0, 0.5], *_adam_like(2))
    budget = unwritable(tmp_path / "fake", monkeypatch)
    assert cli.main(["report", "--budget", "fake", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"the report goes to {budget / 'report'}, but {budget} cannot be written to" in err
    assert err.count("\n") == 1 and not (budget / "report").exists()


def test_a_copied_or_misfiled_log_is_skipped_not_counted_as_a_second_run(tmp_path, capsys):
    """A copy of a log (``adam__seed0 (copy).jsonl``) was read as one more run of its seed:
    the cell said (n=2) for one seed and its standard error shrank; a log filed under another
    task's folder was reported under the task its records name. Both are now left out, named."""
    _log(tmp_path, "t1", "adam", 0, [1.0, 0.5], *_adam_like(2))
    _log(tmp_path, "t1", "adam", 1, [2.0, 1.0], *_adam_like(2))
    folder = tmp_path / "fake" / "t1"
    copy = folder / "adam__seed0 (copy).jsonl"
    copy.write_bytes((folder / "adam__seed0.jsonl").read_bytes())
    (tmp_path / "fake" / "t2").mkdir()
    misfiled = tmp_path / "fake" / "t2" / "adam__seed1.jsonl"
    misfiled.write_bytes((folder / "adam__seed1.jsonl").read_bytes())
    capsys.readouterr()
    runs = load_runs(tmp_path, "fake")
    assert sorted((r.task, r.seed) for r in runs) == [("t1", 0), ("t1", 1)]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert f"skipped {copy}: it holds the run t1/adam/seed 0, whose log is t1/" in warnings[0]
    assert f"skipped {misfiled}: it holds the run t1/adam/seed 1" in warnings[1]


def test_a_folder_named_like_a_log_is_skipped_with_a_warning(tmp_path, capsys):
    """It ended the report in a traceback (IsADirectoryError)."""
    _log(tmp_path, "t1", "adam", 0, [1.0, 0.5], *_adam_like(2))
    (tmp_path / "fake" / "t1" / "old.jsonl").mkdir()
    capsys.readouterr()
    assert [r.seed for r in load_runs(tmp_path, "fake")] == [0]
    assert "old.jsonl: cannot be read (Is a directory)" in capsys.readouterr().err


def test_a_task_without_an_adam_run_is_named_under_the_equal_compute_table(tmp_path):
    """It was dropped from the table, and from its log average, without a word."""
    _log(tmp_path, "t1", "adam", 0, [1.0, 0.5], *_adam_like(2))
    _log(tmp_path, "t1", "alsals", 0, [1.0, 0.25], [3, 6], [1, 2])
    _log(tmp_path, "t2", "alsals", 0, [1.0, 0.25], [3, 6], [1, 2])
    runs, grids = fold_tuned_adam(load_runs(tmp_path, "fake"))
    rows, table = _table_rows(build_tables(runs, grids, len(runs)), "Equal compute:")
    assert list(rows) == ["t1 (n=1, Adam 6)", "*log average*"]
    assert "No `adam` run on t2: left out of this table and its log average" in table
