"""SLS, Adam + SLS and ALSALS: three configurations of one line search.

Every default below is the paper's (Kenneweg, Kenneweg & Hammer, ACDSA 2024; section and
equation given beside it) unless the docstring says otherwise.

=========================  =============  ===================  ===========================
choice                     SLS            AdamSLS              ALSALS
=========================  =============  ===================  ===========================
search direction           -g             -g/(sqrt(v)+eps)     -m/(sqrt(v)+eps)
update direction           -g             -m/(sqrt(v)+eps)     -m/(sqrt(v)+eps)
slope (right-hand side)    ||g||^2        g^2/(sqrt(v)+eps)    f_a, finite difference
c / smoothing              0.1 / none     0.1 / none           0.6 / EMA 0.99, c_h switch
=========================  =============  ===================  ===========================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import Tensor

from alsals.directions import Direction
from alsals.hyperparameters import ARGUMENTS, GROUP_KEYS, SEARCH_KEYS
from alsals.line_search import LineSearchOptimizer

Params = Iterable[Tensor] | Iterable[dict[str, Any]]

#: The paper's ALSALS, every search setting spelled out (Sec. III-C, Eq. 2 and 6; ``lr``
#: from the authors' code): ``ALSALS.paper(params)`` builds it whatever the defaults are.
PAPER_ALSALS: dict[str, Any] = {
    "lr": 0.1,
    "c": 0.6,
    "smoothing": 0.99,
    "slope": "finite_difference",
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "backtrack": 0.9,
    "growth_interval": 500,
    "max_trials": 100,
    "fd_step": 5e-8,
    "search_interval": 1,
    "start": "grown",
}


def hyperparameters(arguments: dict[str, Any]) -> dict[str, Any]:
    """The ``defaults`` of an optimizer: its constructor's hyperparameter arguments."""
    keys = ("lr", *SEARCH_KEYS, *GROUP_KEYS)
    return {key: arguments[key] for key in keys if key in arguments}


class SLS(LineSearchOptimizer):
    r"""Stochastic Armijo line search along the negative gradient (Vaswani et al. 2019;
    the paper's Sec. II-A).

    Accepts ``eta`` when ``f(w - eta g) <= f(w) - c * eta * ||g||^2`` (Eq. 1), backtracking
    ``eta <- backtrack * eta``; before each search ``eta`` grows by ``2^(1/growth_interval)``
    (Eq. 2).

    Args:
        {}
    """

    __doc__ = __doc__.format(
        ARGUMENTS.format(
            group="``weight_decay``, ``lr_scale``",
            lr="1.0, Vaswani et al.",
            c="0.1, Sec. II-A",
            smoothing=0,
            slope='``"analytic"``: ``||g||^2``',
            start='``"grown"``',
        )
    )
    search_direction = Direction.GRADIENT
    update_direction = Direction.GRADIENT

    def __init__(
        self,
        params: Params,
        lr: float = 1.0,
        *,
        c: float = 0.1,
        smoothing: float = 0.0,
        slope: str = "analytic",
        backtrack: float = 0.9,
        growth_interval: float = 500,
        max_trials: int = 100,
        fd_step: float = 5e-8,
        warmup_steps: int = 0,
        search_interval: int | str = 1,
        max_grad_norm: float | None = None,
        start: str = "grown",
        weight_decay: float = 0.0,
        lr_scale: float = 1.0,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params, hyperparameters(locals()), buffers=buffers, process_group=process_group
        )


class AdamSLS(LineSearchOptimizer):
    r"""Armijo line search with Adam's preconditioner (Vaswani et al. 2021; the paper's
    Sec. II-B).

    Searches along Adam's direction with ``beta1 = 0``, ``d_s = -g / (sqrt(v_hat) + eps)``,
    accepting ``eta`` when ``f(w + eta d_s) <= f(w) - c * eta * sum(g^2 / (sqrt(v_hat) + eps))``
    (Eq. 5), then applies the accepted ``eta`` along the momentum direction
    ``-m_hat / (sqrt(v_hat) + eps)``.

    Args:
        {}
    """

    __doc__ = __doc__.format(
        ARGUMENTS.format(
            group="``betas``, ``eps``, ``weight_decay``, ``lr_scale``",
            lr="0.1",
            c="0.1, the Armijo constant of the original criterion, Sec. III-C",
            smoothing=0,
            slope='``"analytic"``: ``sum g^2 / (sqrt(v_hat) + eps)``',
            start='``"grown"``',
        )
    )
    search_direction = Direction.PRECONDITIONED
    update_direction = Direction.MOMENTUM

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        *,
        c: float = 0.1,
        smoothing: float = 0.0,
        slope: str = "analytic",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backtrack: float = 0.9,
        growth_interval: float = 500,
        max_trials: int = 100,
        fd_step: float = 5e-8,
        warmup_steps: int = 0,
        search_interval: int | str = 1,
        max_grad_norm: float | None = None,
        start: str = "grown",
        weight_decay: float = 0.0,
        lr_scale: float = 1.0,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params, hyperparameters(locals()), buffers=buffers, process_group=process_group
        )


class ALSALS(LineSearchOptimizer):
    r"""Automated Large Scale Adam Line Search (the paper's Sec. III).

    Searches and steps along Adam's momentum direction ``d = -m_hat / (sqrt(v_hat) + eps)``.
    Because ``d`` is not the negative gradient, ``||g||^2`` no longer predicts the decrease;
    the slope is estimated by the finite difference ``f_a = (f(w) - f(w + fd_step d)) /
    fd_step`` (Eq. 6) and the test, smoothed on both sides by an EMA, is
    ``D' >= c_h * eta * G`` with ``c_h = c`` if ``G > 0`` else ``1/c`` (Eqs. 7-9).

    Args:
        {}
    """

    __doc__ = __doc__.format(
        ARGUMENTS.format(
            group="``betas``, ``eps``, ``weight_decay``, ``lr_scale``",
            lr="0.1, the authors' code",
            c="0.6, Sec. III-C; 0.3-0.7 work",
            smoothing=0.99,
            slope='``"finite_difference"``, Eq. 6',
            start='``"grown"``',
        )
    )
    search_direction = Direction.MOMENTUM
    update_direction = Direction.MOMENTUM

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        *,
        c: float = 0.6,
        smoothing: float = 0.99,
        slope: str = "finite_difference",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backtrack: float = 0.9,
        growth_interval: float = 500,
        max_trials: int = 100,
        fd_step: float = 5e-8,
        warmup_steps: int = 0,
        search_interval: int | str = 1,
        max_grad_norm: float | None = None,
        start: str = "grown",
        weight_decay: float = 0.0,
        lr_scale: float = 1.0,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params, hyperparameters(locals()), buffers=buffers, process_group=process_group
        )

    @classmethod
    def paper(cls, params: Params, **overrides: Any) -> ALSALS:
        """The paper's exact configuration (``PAPER_ALSALS``), with ``overrides`` on top."""
        return cls(params, **{**PAPER_ALSALS, **overrides})
