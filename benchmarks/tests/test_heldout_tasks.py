"""The held-out tasks of ``benchmarks/scripts/heldout_tasks.py`` (exploration, not a suite):
each sets up on its smoke budget and takes a training step's worth of calls, so that the
script a round measures with still runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_tasks import CPU, check_run, same_batches, same_weights

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "heldout_tasks.py"


def load_script():
    spec = importlib.util.spec_from_file_location("heldout_tasks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELDOUT = load_script().HELDOUT_TASKS


@pytest.mark.parametrize("task", HELDOUT, ids=[t.name for t in HELDOUT])
def test_heldout_task_smoke(task):
    run = task.setup(0, task.budget("smoke"), CPU)
    check_run(task, run)
    first, second = (
        task.setup(3, task.budget("smoke"), CPU),
        task.setup(3, task.budget("smoke"), CPU),
    )
    assert same_weights(first.model, second.model)
    assert same_batches(first.next_batch(), second.next_batch())


def test_a_misspelt_heldout_task_is_answered_with_the_heldout_names(monkeypatch):
    """The script registers its tasks beside the suites'; the error for a misspelt name
    listed the suites' tasks alone, none of the ones the script runs."""
    import alsals_bench.tasks

    monkeypatch.setattr(alsals_bench.tasks, "TASKS", dict(alsals_bench.tasks.TASKS))
    module = load_script()
    module.register()
    with pytest.raises(KeyError) as err:
        alsals_bench.tasks.get_task("lstm-chr")
    assert "; other tasks: lstm-char, digits-autoencoder," in str(err.value)


@pytest.mark.parametrize("task", HELDOUT, ids=[t.name for t in HELDOUT])
def test_heldout_task_takes_the_largest_seed_the_command_line_accepts(task):
    """``--seeds`` accepts up to 2**63 - 1; digits-contrastive seeded its views' generator
    with ``1_000_003 * seed + k``, which overflowed from seed 2**64 / 1_000_003 on: a
    traceback at the first batch, with the run's log already opened."""
    from alsals_bench._args import MAX_SEED

    run = task.setup(MAX_SEED, task.budget("smoke"), CPU)
    run.loss(run.model, run.next_batch())
