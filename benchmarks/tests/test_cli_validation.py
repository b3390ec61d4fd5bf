"""A command line that cannot run fails at once, on one line, with exit status 2: unknown
names, a budget a task lacks, an unusable device or missing data used to surface only when
that run started (after the earlier runs had trained), as tracebacks, leaving empty logs."""

from __future__ import annotations

import pytest
import torch
from unwritable import unwritable

from alsals_bench import cli, landscape, report, runner
from alsals_bench.data import fetch
from alsals_bench.runner import RunKey, read_log, run_one
from alsals_bench.speed import cli as speed_cli


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _run(out, *options):
    # digits-cnn first: with late validation it trained before the bad piece was reached
    argv = ["run", "--budget", "smoke", "--seeds", "0,", "--out", str(out), "--no-progress"]
    return cli.main([*argv, *options])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tasks", "digits-cnn", "no-such-task"], "unknown task 'no-such-task'"),
        (["--optimizers", "adam,no-such-optimizer"], "unknown optimizer 'no-such-optimizer'"),
        (["--optimizers", "adam", "adam@0"], "invalid learning rate in optimizer name 'adam@0'"),
        (["--optimizers", "adam", "adam@-1"], "invalid learning rate"),
        (["--optimizers", "adam", "adam@nan"], "invalid learning rate"),
        (["--budget", "quik"], "unknown budget 'quik'"),
        (["--tasks", "digits-cnn", "gpt2-owt", "--budget", "quick"], "no budget 'quick'"),
        (["--tasks", "digits-cnn", "gpt2-owt"], "task 'gpt2-owt': no data for this task"),
        (["--device", "no-such-device"], "--device 'no-such-device' is not usable here"),
    ],
)
def test_a_sweep_that_cannot_run_fails_before_its_first_run(
    tmp_path, capsys, monkeypatch, options, message
):
    monkeypatch.delenv("ALSALS_OWT_DIR", raising=False)
    assert _run(tmp_path / "out", *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("alsals-bench: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _files(tmp_path / "out") == []  # nothing ran, no log was opened


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is usable here")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    assert _run(tmp_path / "out", "--device", "cuda") == 2
    assert "--device 'cuda' is not usable here" in capsys.readouterr().err
    assert _files(tmp_path / "out") == []


def test_missing_offline_data_is_found_before_the_first_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALSALS_DATA_DIR", str(tmp_path / "no-data"))
    assert _run(tmp_path / "out", "--tasks", "digits-cnn", "fashion-resnet") == 2
    err = capsys.readouterr().err
    assert "task 'fashion-resnet': data source 'fashion-mnist' is not in" in err
    assert "alsals-bench fetch --only fashion-mnist" in err and err.count("\n") == 1
    assert _files(tmp_path / "out") == []


def test_a_run_that_cannot_start_leaves_no_empty_log(tmp_path):
    """``run_one`` opened (and so created, empty) the log before resolving the optimizer."""
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_one(RunKey("digits-cnn", "no-such-optimizer", 0, "smoke"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="has no budget"):
        run_one(RunKey("digits-cnn", "adam", 0, "no-such-budget"), tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_an_adam_run_records_its_configured_peak_rate(tmp_path):
    path = run_one(RunKey("digits-cnn", "adam@0.002", 0, "smoke"), tmp_path, progress=False)
    assert read_log(path)[0]["peak_lr"] == 0.002


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["run", "--landscape-every", "0"], "--landscape-every"),
        (["run", "--landscape-every", "-3"], "--landscape-every"),
        (["landscape", "--seed", "-1"], "--seed"),
        (["landscape", "--points", "1"], "--points"),
        (["speed", "--profile", "no-such-config"], "--profile"),
        (["speed", "--profile", "alsals,"], None),  # valid: the parser keeps it
        (["speed", "--threads", "-1"], "--threads"),
        (["speed", "--seed", "-1"], "--seed"),  # (ran, unlike run's and landscape's seeds)
        (["speed", "--seed", str(2**63)], "--seed"),  # (a traceback from manual_seed)
        (["run", "--seeds", "1000000000000"], "--seeds"),  # (a list of 1e12 seeds: no memory)
        (["landscape", "--steps", "-1"], "--steps"),
        (["landscape", "--scans", "0"], "--scans"),
    ],
)
def test_bad_option_values_are_rejected_when_parsed(argv, option, capsys):
    parser = cli.build_parser()
    if option is None:
        parser.parse_args(argv)
        return
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_landscape_every_is_off_when_absent_and_speed_threads_zero_is_torchs_default():
    parser = cli.build_parser()
    assert parser.parse_args(["run"]).landscape_every is None
    assert parser.parse_args(["run", "--landscape-every", "2"]).landscape_every == 2
    assert parser.parse_args(["speed", "--threads", "0"]).threads == 0  # documented: default


def test_speed_profile_of_a_configuration_not_measured_fails_before_measuring(capsys):
    assert cli.main(["speed", "--models", "mlp-tiny", "--configs", "adam", "--profile",
                     "alsals"]) == 2  # fmt: skip
    assert "--profile alsals: not measured" in capsys.readouterr().err


def test_report_on_a_missing_folder_or_budget_is_one_line(tmp_path, capsys):
    assert cli.main(["report", "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nothing to report: no runs folder" in err and err.count("\n") == 1
    assert cli.main(["report", "--out", str(tmp_path), "--budget", "long"]) == 2
    err = capsys.readouterr().err
    assert "no runs of budget 'long'" in err and err.count("\n") == 1
    (tmp_path / "long").mkdir()  # the folder, but no finished run in it
    assert cli.main(["report", "--out", str(tmp_path), "--budget", "long"]) == 2
    err = capsys.readouterr().err
    assert "no finished runs of budget 'long'" in err and err.count("\n") == 1


def test_the_runs_folder_variable_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    assert "ALSALS_RUNS_DIR" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tasks", ","], "no task given"),
        (["--optimizers", ""], "no optimizer given"),
    ],
)
def test_an_empty_list_of_tasks_or_optimizers_is_an_error(tmp_path, capsys, options, message):
    assert _run(tmp_path / "out", *options) == 2
    assert message in capsys.readouterr().err


def test_an_output_that_is_not_a_folder_fails_before_any_run(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("")
    assert _run(out, "--tasks", "digits-cnn", "--optimizers", "adam") == 2
    assert f"--out {out} is not a folder" in capsys.readouterr().err
    assert cli.main(["report", "--budget", "smoke", "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_landscape_of_an_optimizer_without_a_search_direction_is_a_usage_error(tmp_path, capsys):
    argv = ["landscape", "--task", "digits-cnn", "--optimizer", "adam", "--budget", "smoke"]
    assert cli.main([*argv, "--steps", "2", "--scans", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'adam' has no search direction to scan" in err and "Traceback" not in err


def test_speed_with_an_output_it_cannot_create_fails_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["speed", "--models", "mlp-tiny", "--configs", "adam", "--steps", "1"]
    assert cli.main([*argv, "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot be created" in err and err.count("\n") == 1


@pytest.mark.parametrize("content", ['{"command": "x", "res', "{}"])
def test_speed_report_only_on_a_file_that_is_no_speed_result_is_one_line(tmp_path, capsys, content):
    (tmp_path / "speed.json").write_text(content)
    assert cli.main(["speed", "--report-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a speed result" in err and err.count("\n") == 1


# A folder that exists but takes no file failed with a traceback, for run and speed only
# once the work was done: the output check made the folder but never wrote in it.
_WRITERS = {
    "run": ["run", "--budget", "smoke", "--seeds", "0,", "--optimizers", "adam", "--no-progress"],
    "landscape": ["landscape", "--budget", "smoke", "--steps", "2", "--scans", "1"],
    "speed": ["speed", "--models", "mlp-tiny", "--configs", "adam", "--steps", "1"],
}


@pytest.mark.parametrize("command", list(_WRITERS))
def test_an_output_folder_that_cannot_be_written_fails_before_any_work(
    tmp_path, capsys, monkeypatch, command
):
    out = unwritable(tmp_path / "out", monkeypatch)
    assert cli.main([*_WRITERS[command], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} cannot be written to" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _files(out) == []


def test_a_data_folder_that_is_a_file_is_named_not_fetched_into(tmp_path, capsys, monkeypatch):
    """``ALSALS_DATA_DIR`` at a file: ``run`` said to run fetch, and fetch then failed with a
    traceback; both now say what is wrong with the folder."""
    a_file = tmp_path / "data"
    a_file.write_text("")
    monkeypatch.setenv("ALSALS_DATA_DIR", str(a_file))
    assert _run(tmp_path / "out", "--tasks", "fashion-resnet") == 2
    err = capsys.readouterr().err
    assert f"the data folder {a_file} ($ALSALS_DATA_DIR) is a file, not a folder" in err
    assert err.count("\n") == 1
    assert cli.main(["fetch", "--only", "gpt2-bpe"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"alsals-bench fetch: the data folder {a_file} ($ALSALS_DATA_DIR) is not a folder\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99999999999999999999,", "seed 99999999999999999999 is too large"),
        (f"0,{2**63}", f"seed {2**63} is too large"),
        ("-1", "a count cannot be negative"),
        ("3,-1", "seed -1 is negative"),
    ],
)
def test_seeds_out_of_range_say_what_is_wrong(text, message, capsys):
    """A seed above 2**63 - 1 ended the run in a traceback from ``torch.manual_seed``;
    ``--seeds -1`` was told how to write seed 0 alone."""
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["run", "--seeds", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "seed 0 alone" not in err


def test_the_largest_seed_is_accepted(capsys):
    largest = 2**63 - 1
    assert cli.build_parser().parse_args(["run", "--seeds", f"{largest},"]).seeds == [largest]
    assert cli.build_parser().parse_args(["landscape", "--seed", str(largest)]).seed == largest
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["landscape", "--seed", str(largest + 1)])
    assert "argument --seed" in capsys.readouterr().err


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("argv", "target", "says"),
    [
        (["run", "--budget", "smoke", "--seeds", "0,"], (runner, "sweep"),
         "finished runs are kept; the interrupted one starts again next time"),
        (["fetch"], (fetch, "run"), "the sources fetched before are kept"),
        (["speed"], (speed_cli, "run"), "speed.json, speed.md and speed.png are written only"),
        (["landscape"], (landscape, "run_command"), "the scans and figures are written after"),
        (["report", "--budget", "smoke"], (report, "write_report"), "the runs are untouched"),
    ],
)  # fmt: skip
def test_ctrl_c_says_what_each_subcommand_leaves_behind(
    tmp_path, capsys, monkeypatch, argv, target, says
):
    """Every subcommand said that finished runs are kept and the interrupted one starts
    again: only true of ``run``."""
    (tmp_path / "smoke").mkdir()
    monkeypatch.setenv("ALSALS_RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(*target, _interrupt)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("alsals-bench: interrupted (") and says in err
    assert ("starts again next time" in err) == (argv[0] == "run")


def test_ctrl_c_in_the_report_after_a_sweep_says_the_runs_are_finished(
    tmp_path, capsys, monkeypatch
):
    """``run`` said the interrupted run starts again next time, when every run had finished
    and the report alone was cut off."""
    (tmp_path / "smoke").mkdir()
    monkeypatch.setenv("ALSALS_RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(runner, "sweep", lambda *args, **kwargs: [])
    monkeypatch.setattr(report, "write_report", _interrupt)
    assert cli.main(["run", "--budget", "smoke", "--seeds", "0,", "--optimizers", "adam"]) == 130
    err = capsys.readouterr().err
    assert "the runs are untouched" in err and "starts again next time" not in err


def test_speed_checks_its_names_before_it_makes_the_output_folder(tmp_path, capsys):
    out = tmp_path / "speed-out"
    assert cli.main(["speed", "--models", "no-such-model", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("alsals-bench speed: unknown model 'no-such-model'")
    assert not out.exists()


def _subparser(name):
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices[name]


def test_report_lists_only_the_options_it_uses():
    options = {s for a in _subparser("report")._actions for s in a.option_strings}
    assert options == {"-h", "--help", "--budget", "--out"}


def test_landscape_help_explains_every_option_in_plain_text():
    parser = _subparser("landscape")
    assert all(action.help for action in parser._actions)
    assert "``" not in parser.description


@pytest.mark.parametrize("where", ["budget", "task", "log"])
def test_a_file_or_folder_in_the_way_of_a_run_fails_before_the_first_run(tmp_path, capsys, where):
    """A file where the budget's or the task's folder goes, or a folder where a log goes,
    was a traceback when the sweep reached that run (FileExistsError, NotADirectoryError,
    IsADirectoryError)."""
    budget, task = tmp_path / "smoke", tmp_path / "smoke" / "digits-cnn"
    if where == "budget":
        budget.write_text("")
    elif where == "task":
        budget.mkdir()
        task.write_text("")
    else:
        (task / "adam__seed1.jsonl").mkdir(parents=True)
    argv = ["run", "--budget", "smoke", "--tasks", "digits-cnn", "--optimizers", "adam"]
    assert cli.main([*argv, "--seeds", "0,1", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alsals-bench: error: ") and err.count("\n") == 1
    assert not (task / "adam__seed0.jsonl").exists()  # (no run before the error)
