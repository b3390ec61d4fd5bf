"""The benchmark's ALSALS rows are the configurations their names promise."""

from __future__ import annotations

import pytest
from torch import nn

from alsals import ALSALS
from alsals_bench.registry import ABLATION, LINE_SEARCHES, line_search_stepper


def defaults_of(name: str) -> dict:
    return line_search_stepper(name, nn.Linear(3, 2)).optimizer.defaults


def test_the_recommended_row_is_alsals_defaults():
    assert defaults_of("alsals-recommended") == ALSALS(nn.Linear(3, 2).parameters()).defaults


def test_the_alsals_row_is_the_papers_configuration():
    assert defaults_of("alsals") == ALSALS.paper(nn.Linear(3, 2).parameters()).defaults


def test_the_preconditioned_row_differs_from_the_recommended_in_the_search_direction_only():
    recommended = defaults_of("alsals-recommended")
    preconditioned = defaults_of("alsals-recommended-preconditioned")
    differing = {k for k in recommended if recommended[k] != preconditioned[k]}
    assert differing == {"search_direction"}
    assert preconditioned["search_direction"] == "preconditioned"


@pytest.mark.parametrize("name", [n for n in ABLATION if n in LINE_SEARCHES])
def test_every_ablation_row_builds(name):
    assert isinstance(line_search_stepper(name, nn.Linear(3, 2)).optimizer, ALSALS)
