"""The landscape command writes the three figures and the scans on the built-in task."""

from __future__ import annotations

import json

from alsals_bench import cli


def test_landscape_command_writes_figures_and_scans(tmp_path):
    code = cli.main(
        [
            "landscape",
            "--task",
            "digits-cnn",
            "--steps",
            "4",
            "--scans",
            "3",
            "--points",
            "8",
            "--budget",
            "smoke",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    for name in ("fig2_single_batch.png", "fig3_consecutive_batches.png", "fig4_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 1000
    scans = json.loads((tmp_path / "scans.json").read_text())["scans"]
    assert [s["step"] for s in scans] == [1, 2, 3]
    assert all(len(s["decreases"]) == 8 for s in scans)


def test_runner_records_landscape_scans_every_k_steps(tmp_path):
    from alsals_bench.runner import RunKey, read_log, run_one

    path = run_one(RunKey("digits-cnn", "alsals", 0, "smoke"), tmp_path, progress=False,
                   landscape_every=2)  # fmt: skip
    records = read_log(path)
    scans = [r for r in records if r["type"] == "landscape"]
    assert [s["step"] for s in scans] == [1, 3, 5]
    steps = {r["step"]: r for r in records if r["type"] == "step"}
    for scan in scans:  # the scan reports the step size the step then took
        assert scan["chosen_step_size"] == steps[scan["step"]]["lr"]
