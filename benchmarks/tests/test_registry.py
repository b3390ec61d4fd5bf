"""The benchmark's MomentumALSALS rows are the configurations their names promise."""

from __future__ import annotations

import pytest
from torch import nn

from alsals import MomentumALSALS
from alsals_bench.registry import ABLATION, LINE_SEARCHES, get_optimizer, line_search_stepper
from alsals_bench.tasks import get_task


def defaults_of(name: str) -> dict:
    return line_search_stepper(name, nn.Linear(3, 2)).optimizer.defaults


def test_the_recommended_row_is_alsals_defaults():
    assert (
        defaults_of("alsals-recommended") == MomentumALSALS(nn.Linear(3, 2).parameters()).defaults
    )


def test_the_alsals_row_is_the_papers_configuration():
    assert defaults_of("alsals") == MomentumALSALS.paper(nn.Linear(3, 2).parameters()).defaults


def test_the_preconditioned_row_differs_from_the_recommended_in_the_search_direction_only():
    # the variants of the defaults keep the settings they were run with (trust_interpolation
    # off): those of the row alsals-recommended-tested
    recommended = defaults_of("alsals-recommended-tested")
    preconditioned = defaults_of("alsals-recommended-preconditioned")
    differing = {k for k in recommended if recommended[k] != preconditioned[k]}
    assert differing == {"search_direction"}
    assert preconditioned["search_direction"] == "preconditioned"


def test_the_cap_row_differs_from_the_papers_configuration_in_loss_floor_only():
    paper, capped = defaults_of("alsals"), defaults_of("alsals-capped")
    assert {k for k in paper if paper[k] != capped[k]} == {"loss_floor"}
    assert capped["loss_floor"] == 0.0 and paper["loss_floor"] is None


def test_the_guard_row_differs_from_the_papers_configuration_in_loss_rise_guard_only():
    paper, guarded = defaults_of("alsals"), defaults_of("alsals-guarded")
    assert {k for k in paper if paper[k] != guarded[k]} == {"loss_rise_guard"}
    assert guarded["loss_rise_guard"] == 3.0 and paper["loss_rise_guard"] is None


def test_the_uncapped_row_is_the_defaults_before_the_cap_and_the_guard():
    recommended, uncapped = (
        defaults_of("alsals-recommended"),
        defaults_of("alsals-recommended-uncapped"),
    )
    differing = {k for k in recommended if recommended[k] != uncapped[k]}
    assert differing == {"loss_floor", "loss_rise_guard"}
    assert uncapped["loss_floor"] is None and uncapped["loss_rise_guard"] is None


@pytest.mark.parametrize("name", [n for n in ABLATION if n in LINE_SEARCHES])
def test_every_ablation_row_builds(name):
    assert isinstance(line_search_stepper(name, nn.Linear(3, 2)).optimizer, MomentumALSALS)


def test_the_default_rows_run_as_users_run_them_and_the_paper_rows_under_its_protocol():
    """On a task whose optimizers share a warm-up (the GPT-2 stand-in), the paper's rows warm
    up to Adam's peak rate (Sec. IV-A); ``MomentumALSALS(params)``'s rows take neither the warm-up
    nor the rate: exactly ``MomentumALSALS(params)``'s defaults."""
    task = get_task("austen-gpt2")
    budget = task.budget("quick")
    assert budget.warmup_steps > 0

    def built(name):
        return get_optimizer(name).build(nn.Linear(3, 2), task, budget).optimizer.defaults

    for name in ("alsals-recommended", "alsals-recommended-preconditioned"):
        assert built(name) == defaults_of(name)
    assert built("alsals-recommended") == MomentumALSALS(nn.Linear(3, 2).parameters()).defaults
    for name in ("alsals", "alsals-analytic", "alsals-candidate"):
        paper = built(name)
        assert paper["warmup_steps"] == budget.warmup_steps and paper["lr"] == task.adam_lr


@pytest.mark.parametrize("name", ["adam@0", "adam@-1", "adam@nan", "adam@inf", "adam@-0.0"])
def test_an_adam_rate_that_is_not_positive_and_finite_is_rejected(name):
    """``adam@0`` used to train silently at the task's own rate (``lr or task.adam_lr``)."""
    with pytest.raises(ValueError, match="positive, finite"):
        get_optimizer(name)


def test_adam_runs_at_the_rate_named_and_records_its_configured_peak_rate():
    task = get_task("digits-cnn")
    budget = task.budget("smoke")
    for name, rate in (("adam", task.adam_lr), ("adam@0.003", 0.003), ("adam@1e-7", 1e-7)):
        stepper = get_optimizer(name).build(nn.Linear(3, 2), task, budget)
        assert stepper.optimizer.param_groups[0]["lr"] == rate
        assert stepper.start_info == {"peak_lr": rate}
