"""SLS, Adam + SLS and ALSALS on Adam's momentum: three configurations of one line search.

The defaults of ``SLS`` and ``AdamSLS`` are the paper's (Kenneweg, Kenneweg & Hammer, ACDSA
2024; section and equation given beside each). ``MomentumALSALS`` is the paper's ALSALS:
its defaults are the best configuration of the paper's dynamics on our benchmark, and
``MomentumALSALS.paper(params)`` (``PAPER_ALSALS``, also ``ALSALS.paper(params)``) is the
paper's exact one. ``alsals.ALSALS``, the recommended optimizer, runs the same kind of
search over Schedule-Free AdamW's dynamics (:mod:`alsals.schedule_free`).

=========================  =============  ===================  ==================================
choice                     SLS            AdamSLS              MomentumALSALS (paper ; default)
=========================  =============  ===================  ==================================
search direction           -g             -g/(sqrt(v)+eps)     -m/(sqrt(v)+eps) (option: -g/(...))
update direction           -g             -m/(sqrt(v)+eps)     -m/(sqrt(v)+eps)
slope (right-hand side)    ||g||^2        g^2/(sqrt(v)+eps)    f_a, finite difference ; -g.d
c / smoothing              0.1 / none     0.1 / none           0.6 / EMA 0.99 ; 0.9, c_h switch
start / cadence            grown / 1      grown / 1            grown / 1 ; Polyak / adaptive
update's step size         searched       searched             searched ; capped by MoMo's Polyak step
step size ceiling          none           none                 none ; loss-rise guard
backtracking               x0.9           x0.9                 x0.9 ; x0.8, interpolated, trusted
=========================  =============  ===================  ==================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from torch import Tensor

from alsals.directions import Direction
from alsals.hyperparameters import ARGUMENTS, GROUP_KEYS, SEARCH_KEYS
from alsals.line_search import LineSearchOptimizer

Params = Iterable[Tensor] | Iterable[dict[str, Any]]

#: ``growth_interval`` with ``2^(1/b) = 1.1``: the step size may grow 10% per search (SaLSa's)
GROWTH_10_PERCENT = math.log(2.0) / math.log(1.1)

#: The paper's ALSALS, every search setting spelled out (Sec. III-C, Eq. 2 and 6; ``lr`` from
#: the authors' code): ``MomentumALSALS.paper(params)`` builds it whatever the defaults are.
PAPER_ALSALS: dict[str, Any] = {
    "lr": 0.1,
    "c": 0.6,
    "smoothing": 0.99,
    "slope": "finite_difference",
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "backtrack": 0.9,
    "interpolate": False,
    "trust_interpolation": False,
    "growth_interval": 500,
    "max_trials": 100,
    "fd_step": 5e-8,
    "search_interval": 1,
    "start": "grown",
    "search_direction": "momentum",
    "loss_floor": None,
    "loss_rise_guard": None,
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
            backtrack=0.9,
            interpolate="``False``",
            trust="``False``",
            floor="``None``",
            guard="``None``",
            growth=500,
            interval=1,
            extra="",
        )
    )
    search_directions = (Direction.GRADIENT,)
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
        interpolate: bool = False,
        trust_interpolation: bool = False,
        growth_interval: float = 500,
        max_trials: int = 100,
        fd_step: float = 5e-8,
        warmup_steps: int = 0,
        search_interval: int | str = 1,
        max_grad_norm: float | None = None,
        start: str = "grown",
        loss_floor: float | None = None,
        loss_rise_guard: float | None = None,
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
            backtrack=0.9,
            interpolate="``False``",
            trust="``False``",
            floor="``None``",
            guard="``None``",
            growth=500,
            interval=1,
            extra="",
        )
    )
    search_directions = (Direction.PRECONDITIONED,)
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
        interpolate: bool = False,
        trust_interpolation: bool = False,
        growth_interval: float = 500,
        max_trials: int = 100,
        fd_step: float = 5e-8,
        warmup_steps: int = 0,
        search_interval: int | str = 1,
        max_grad_norm: float | None = None,
        start: str = "grown",
        loss_floor: float | None = None,
        loss_rise_guard: float | None = None,
        weight_decay: float = 0.0,
        lr_scale: float = 1.0,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params, hyperparameters(locals()), buffers=buffers, process_group=process_group
        )


class MomentumALSALS(LineSearchOptimizer):
    r"""Automated Large Scale Adam Line Search (the paper's Sec. III), in the configuration
    our evidence recommends for these dynamics; ``MomentumALSALS.paper(params)`` is the
    paper's exact one. ``alsals.ALSALS``, which searches Schedule-Free AdamW's step size,
    is the stronger default on our benchmark (``benchmarks/docs/method.md``, section 18).

    Steps along Adam's momentum direction ``-m_hat / (sqrt(v_hat) + eps)`` with the step
    size ``eta`` of an Armijo search that accepts ``eta`` when the smoothed decrease
    ``D' >= c_h * eta * G``, with ``c_h = c`` if ``G > 0`` else ``1/c`` (Eqs. 7-9; ``G`` the
    smoothed slope). ``search_direction`` is what the trials move along: ``"momentum"``,
    the update direction itself (the paper's), or ``"preconditioned"``, Adam's direction
    without momentum ``-g / (sqrt(v_hat) + eps)`` (Adam + SLS's and SaLSa's).

    ``"preconditioned"``'s slope carries the whole of this batch's gradient noise, so the
    step size falls as the noise comes to dominate: on our benchmark that raised the mean
    peak accuracy (0.830 to 0.844, every trial tested) at a 10% higher log-average training
    loss and more forward passes per step, so it is an option, not the default
    (``benchmarks/docs/method.md``).

    The defaults differ from the paper's (``PAPER_ALSALS``) in ten choices, each measured
    alone in ``benchmarks/docs/method.md``: the exact slope ``-g . d`` instead of the
    finite difference of Eq. 6 (which rounds to 0 in float32 and costs a forward pass),
    SaLSa's adaptive search cadence, each search starting no higher than the Polyak step
    ``L0 / s`` (the first search no longer wastes 30-50 trials), growth of 10% per search
    and backtracking by 0.8 (the step size follows the landscape both ways instead of
    creeping up by ``2^(1/500)`` per step), smoothing 0.9, interpolated backtracking
    (the same step sizes as plain backtracking, in fewer trials: section 9), and, after a
    trial that lowered the loss but failed the test, the interpolated step size taken without
    evaluating it (``trust_interpolation``: the second trial of most searches saved, at the
    same quality on our six tasks and a worse training loss on a noisy tabular check,
    section 10), and every update capped by the Polyak step on MoMo's momentum model of the
    loss (``loss_floor=0``: where the batches' gradients disagree the update shrinks as a
    decaying learning rate would; a noisy tabular check's training loss 22x lower, the
    training loss on digits at 300 steps 22% higher, section 11), and a step size that grew
    while the batch losses' average climbed sent back to its level where the loss was
    lowest (``loss_rise_guard=3``: on noisy problems whose loss cannot reach 0 the search's
    growth no longer runs into the gradient noise; it never acts on our benchmark's tasks,
    section 12). ``search_interval="settled"``
    ends the cadence's first phase (a search in each of the first 10 steps) as soon as the
    step size has settled: 10% fewer forward passes on our six tasks, at some quality on
    held-out tasks, so an option (``benchmarks/docs/method.md``, section 8).

    Args:
        {}
    """

    __doc__ = __doc__.format(
        ARGUMENTS.format(
            group="``betas``, ``eps``, ``weight_decay``, ``lr_scale``",
            lr="0.1, the authors' code; the first search tries 1.1 lr, or the Polyak step if smaller",
            c="0.6, Sec. III-C; 0.3-0.7 work",
            smoothing=0.9,
            slope='``"analytic"``',
            start='``"polyak"``',
            backtrack=0.8,
            interpolate="``True``",
            trust="``True``",
            floor="0.0",
            guard="3.0",
            growth="``GROWTH_10_PERCENT``: 10% per search",
            interval='``"adaptive"``; ``"settled"`` is cheaper on short runs',
            extra=(
                '\n        search_direction: ``"preconditioned"`` or ``"momentum"`` (the '
                'paper\'s), see above (``"momentum"``).'
            ),
        )
    )
    search_directions = (Direction.MOMENTUM, Direction.PRECONDITIONED)
    update_direction = Direction.MOMENTUM

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        *,
        c: float = 0.6,
        smoothing: float = 0.9,
        slope: str = "analytic",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backtrack: float = 0.8,
        interpolate: bool = True,
        trust_interpolation: bool = True,
        growth_interval: float = GROWTH_10_PERCENT,
        max_trials: int = 100,
        fd_step: float = 5e-8,
        warmup_steps: int = 0,
        search_interval: int | str = "adaptive",
        max_grad_norm: float | None = None,
        start: str = "polyak",
        search_direction: str = "momentum",
        loss_floor: float | None = 0.0,
        loss_rise_guard: float | None = 3.0,
        weight_decay: float = 0.0,
        lr_scale: float = 1.0,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params, hyperparameters(locals()), buffers=buffers, process_group=process_group
        )

    @classmethod
    def paper(cls, params: Params, **overrides: Any) -> MomentumALSALS:
        """The paper's exact configuration (``PAPER_ALSALS``), with ``overrides`` on top."""
        return cls(params, **{**PAPER_ALSALS, **overrides})
