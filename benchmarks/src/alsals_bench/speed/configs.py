"""The configurations the step-cost benchmark compares, built from the benchmark's registry.

Our line searches are the registry's (``alsals_bench.registry.LINE_SEARCHES``, by the same
names), SaLSa is the registry's peer (its default ``speed_up=True``, and ``speed_up=False``
as ``salsa-every``), and Adam is the cost reference: ``torch.optim.Adam(foreach=True)`` at a
flat rate, the multi-tensor kernels our optimizers use too. Each is driven by the registry's
stepper for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from alsals import ALSALS
from alsals_bench.registry import (
    LINE_SEARCHES,
    LineSearchStepper,
    Stepper,
    line_search_stepper,
    salsa_stepper,
)


@dataclass(frozen=True)
class Config:
    name: str
    build: Callable[[nn.Module], Stepper]
    # The SaLSa configuration that does the same work: SaLSa's slope is analytic-style
    # (g.g/sqrt(v), no probe pass), so only our analytic-slope MomentumALSALS runs compare with it,
    # every step with speed_up=False and adaptive with speed_up=True.
    salsa: str | None = None
    peer: str | None = None  # the registry's peer it is, whose package it needs

    @property
    def ours(self) -> bool:
        return self.name in LINE_SEARCHES


def _adam(model: nn.Module) -> Stepper:
    return Stepper(torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True))


def _alsals(model: nn.Module) -> Stepper:
    """``ALSALS(params)``, the recommended optimizer (the registry's ``alsals-schedulefree``)."""
    return LineSearchStepper(ALSALS(model.parameters(), buffers=model.buffers()))


_SALSA_COUNTERPARTS = {"alsals-analytic": "salsa-every", "alsals-fast": "salsa"}

CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("adam", _adam),
        *(
            Config(name, partial(line_search_stepper, name), _SALSA_COUNTERPARTS.get(name))
            for name in (
                "sls",
                "adam-sls",
                "alsals",
                "alsals-analytic",
                "alsals-adaptive",
                "alsals-fast",
            )
        ),
        Config("alsals-schedulefree", _alsals),
        Config("salsa", partial(salsa_stepper, speed_up=True), peer="salsa"),
        Config("salsa-every", partial(salsa_stepper, speed_up=False), peer="salsa"),
    )
}
DEFAULT_CONFIGS = tuple(CONFIGS)
