"""Hyperparameters of the line search: their names, validation, and one shared documentation.

Every value is checked where it enters (constructor, ``add_param_group``,
``load_state_dict``) and stored as a plain Python ``float``/``int``/``str``/``tuple``, so
that any real number type works as input (``numpy.float32(0.05)``, ``numpy.int64(100)``, a
0-dim tensor) while ``state_dict()`` stays loadable with ``torch.load(weights_only=True)``.
A bad value is a ``TypeError`` (wrong kind) or ``ValueError`` (out of range) naming it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

#: Hyperparameters of the search itself: one value for the whole optimizer.
SEARCH_KEYS = (
    "c",
    "smoothing",
    "backtrack",
    "interpolate",
    "trust_interpolation",
    "growth_interval",
    "max_trials",
    "slope",
    "fd_step",
    "warmup_steps",
    "search_interval",
    "max_grad_norm",
    "start",
    "search_direction",
    "loss_floor",
    "loss_rise_guard",
)
#: Hyperparameters that may differ between parameter groups.
GROUP_KEYS = ("betas", "eps", "weight_decay", "lr_scale")
#: Keys torch.optim manages in every group; anything else in a group is an error.
TORCH_GROUP_KEYS = ("params", "lr", "initial_lr", "name")
SLOPES = ("analytic", "finite_difference")
#: ``search_interval`` values that choose the cadence from the step sizes found
ADAPTIVE_CADENCES = ("adaptive", "settled")
STARTS = ("grown", "polyak")

#: Shared argument documentation of the three constructors (``{}`` holds the defaults).
ARGUMENTS = """\
params: parameters or parameter groups (dicts). Per-group settings: {group}.
        lr: initial step size; the search adapts it from there ({lr}).
        c: sufficient-decrease constant of the Armijo test ({c}).
        smoothing: EMA factor on both sides of the test; 0 is the plain test ({smoothing}).
        slope: ``"analytic"`` (``-g . d`` from the gradient already computed: no extra
            forward pass) or ``"finite_difference"`` (Eq. 6, one extra forward pass per
            search) ({slope}).
        betas, eps: Adam's moment factors and denominator term (Eq. 3; Adam variants only).
        start: where a search starts: ``"grown"``, ``eta * 2^(1/growth_interval)`` (Eq. 2),
            or ``"polyak"``, no higher than the Polyak step ``(L0 - f*) / s`` (the step that
            would bring the loss to ``f* = loss_floor``, 0 if ``None``, if the slope held; one
            more synchronisation per search)
            ({start}).
        backtrack: ``eta <- backtrack * eta`` after a failed trial ({backtrack}).
        interpolate: after a failed trial, go lower than ``backtrack * eta`` where the
            quadratic through ``L0``, the slope and the failed trial's loss predicts the
            test passes only there (at most 10x lower); a search that starts far too high
            then needs two or three trials, not dozens ({interpolate}).
        trust_interpolation: when a trial of a search (not the first search of a run)
            lowers the loss measurably but fails the test, take the step size that
            ``interpolate``'s quadratic through it predicts will pass without evaluating it;
            its predicted decrease enters the test's average. Saves the second trial of most
            searches; no effect with ``interpolate=False`` ({trust}).
        loss_floor: a lower bound ``f*`` on the loss (0 for cross-entropy and squared
            errors): no update is larger than the Polyak step ``(h - f*) / (m . u)`` on
            MoMo's model ``h`` of the loss (the EMA of the recent batches' linearisations at
            the current weights, Schaipp et al. 2024): where the gradient noise dominates,
            the model falls below the loss and the step the batch allows is cut back, as a
            decaying learning rate would. The search's own step size is kept for the next
            search; ``None`` turns the cap off ({floor}). A loss that goes below the floor
            (a negative log-likelihood of continuous data) is found out by the searches'
            trials: one warning, and the cap and the Polyak start are off for the run.
        loss_rise_guard: when the average of the batch losses (EMA 0.99) climbs more than
            this many standard errors (plus the range a flat loss's averages span by chance)
            above the lowest it reached (at its first judgment, once, also above the run's
            start level, the mean of its first 10 losses), while the step size grew, the
            step size has outgrown the gradient noise: it gets a ceiling, its average when
            the loss was lowest (a
            loss that only stops falling never fires it; one that later falls measurably
            below that lowest lifts the ceiling, as does one that under the ceiling never
            comes back to the level that set it, and writing ``lr`` clears it;
            :mod:`alsals.rise_guard`). A loss that rises by design while the step size grows
            (an annealed regulariser) can fire it too: pass ``None`` there ({guard}).
        growth_interval: ``b`` of Eq. 2: before each search ``eta <- eta * 2^(1/b)``
            ({growth}; ``math.inf`` disables growth).
        max_trials: trials per search (100); if none passes, the weights are left unchanged.
        fd_step: step of the finite-difference slope (5e-8, Eq. 6).
        warmup_steps: during the first ``warmup_steps`` updates the step is
            ``lr * (k + 1) / warmup_steps`` unless it increases the batch loss, in which
            case the search backtracks below it: a linear ramp to ``lr`` that cannot make
            things worse (0; the paper's GPT-2 runs ramped over 2000 steps, with ``lr``
            the peak step size).
        search_interval: search every k steps and reuse the step size in between,
            ``"adaptive"`` (SaLSa's cadence: a search in each of the first 10 steps, then at
            least every 10 steps, more often while the step size changes) or ``"settled"``
            (the same, but the first phase ends as soon as a search after the first accepts
            its first trial: the step size has settled) ({interval}).
        max_grad_norm: clip the gradient to this norm (over all parameters, all ranks and
            shards) before the step, as ``torch.nn.utils.clip_grad_norm_`` does; ``None``
            does not clip (``None``).
        weight_decay: decoupled weight decay ``w <- w - eta * lr_scale * weight_decay * w0``
            (0).
        lr_scale: per-group multiplier of the one searched step size (1).
        buffers: module buffers to protect from trial evaluations: ``model.buffers()``
            whenever the model has BatchNorm or other buffers a training forward updates.
        process_group: the ranks that must take the same decisions (default group).{extra}
"""


def real(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is a real number (not a bool), else a ``TypeError``."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
            return float(value.item())
    elif not isinstance(value, bool) and isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            raise ValueError(f"invalid {name}: {value!r} (too large for a float)") from None
    raise TypeError(f"invalid {name}: {value!r} (expected a real number)")


def loss_floor(value: Any) -> float | None:
    """``loss_floor`` as a finite ``float``, or ``None`` (no floor): a NaN or infinite floor
    is a ``ValueError`` naming it."""
    if value is None:
        return None
    floor = real("loss_floor", value)
    if not math.isfinite(floor):
        raise ValueError(
            f"invalid loss_floor: {value!r} (expected a finite number, or None for no floor)"
        )
    return floor


def integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int >= minimum`` if it is an integer (not a bool).

    A one-element tensor counts as the number it holds: an integer dtype as an integer, a
    floating one as a float (so ``tensor(20.0)`` is refused as ``20.0`` is).
    """
    number = value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        number = value.item()  # int for integer dtypes, float or complex for the others
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise TypeError(f"invalid {name}: {value!r} (expected an integer >= {minimum})")
    if not isinstance(number, numbers.Integral) or number < minimum:
        raise ValueError(f"invalid {name}: {value!r} (expected an integer >= {minimum})")
    return int(number)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ``TypeError`` (no truthy numbers)."""
    if not isinstance(value, bool):
        raise TypeError(f"invalid {name}: {value!r} (expected True or False)")
    return value


def in_range(
    name: str, value: Any, low: float, high: float = math.inf, *, closed_low: bool
) -> float:
    """A real number in ``(low, high)`` or ``[low, high)``, finite."""
    number = real(name, value)
    ok_low = number >= low if closed_low else number > low
    if not (math.isfinite(number) and ok_low and number < high):
        bracket = "[" if closed_low else "("
        raise ValueError(
            f"invalid {name}: {value!r} (expected a number in {bracket}{low}, {high}))"
        )
    return number


#: ``2 ** MAX_GROWTH_EXPONENT`` is the largest power of two float64 holds below its ``inf``.
MAX_GROWTH_EXPONENT = 1023
#: No step size above this (``lr`` included): its square (``ALSALS``'s averaging weight)
#: must stay finite in float64, and no model's weights move usefully by more.
MAX_STEP_SIZE = 1e100


def checked_search(h: dict[str, Any]) -> dict[str, Any]:
    """The search hyperparameters of ``h`` (and ``lr``), validated, as plain Python values."""
    out = dict(h)
    out["lr"] = in_range("lr", h["lr"], 0.0, MAX_STEP_SIZE, closed_low=False)
    out["c"] = in_range("c", h["c"], 0.0, 1.0, closed_low=False)
    out["smoothing"] = in_range("smoothing", h["smoothing"], 0.0, 1.0, closed_low=True)
    out["backtrack"] = in_range("backtrack", h["backtrack"], 0.0, 1.0, closed_low=False)
    growth = real("growth_interval", h["growth_interval"])
    if not growth > 1.0 / MAX_GROWTH_EXPONENT:  # (2^(1/b) above float64's range: overflow)
        raise ValueError(
            f"invalid growth_interval: {h['growth_interval']!r} (expected a number above "
            f"1/{MAX_GROWTH_EXPONENT}, where the growth per search 2^(1/growth_interval) "
            "is a finite number; math.inf disables growth)"
        )
    out["growth_interval"] = growth
    for name in ("interpolate", "trust_interpolation"):
        out[name] = flag(name, h.get(name, False))
    out["max_trials"] = integer("max_trials", h["max_trials"], 1)
    if h["slope"] not in SLOPES:
        raise ValueError(f"invalid slope: {h['slope']!r} (expected one of {SLOPES})")
    out["fd_step"] = in_range("fd_step", h["fd_step"], 0.0, closed_low=False)
    out["warmup_steps"] = integer("warmup_steps", h["warmup_steps"], 0)
    if h.get("start", "grown") not in STARTS:
        raise ValueError(f"invalid start: {h['start']!r} (expected one of {STARTS})")
    out["loss_floor"] = loss_floor(h.get("loss_floor"))
    guard = h.get("loss_rise_guard")
    if guard is not None:
        out["loss_rise_guard"] = in_range("loss_rise_guard", guard, 0.0, closed_low=False)
    else:
        out["loss_rise_guard"] = None
    clip = h.get("max_grad_norm")
    if clip is not None:
        out["max_grad_norm"] = in_range("max_grad_norm", clip, 0.0, closed_low=False)
    interval = h["search_interval"]
    if interval not in ADAPTIVE_CADENCES:
        try:
            out["search_interval"] = integer("search_interval", interval, 1)
        except (TypeError, ValueError):
            raise ValueError(
                f"invalid search_interval: {interval!r} (expected an integer >= 1, "
                "'adaptive' or 'settled')"
            ) from None
    return out


def check_group(group: dict[str, Any]) -> None:
    """Validate and normalise the per-group hyperparameters of ``group`` in place."""
    if "betas" in group:
        betas = group["betas"]
        if isinstance(betas, torch.Tensor) or not (
            isinstance(betas, (tuple, list)) and len(betas) == 2
        ):
            raise ValueError(f"invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        group["betas"] = (
            in_range("betas[0]", betas[0], 0.0, 1.0, closed_low=True),
            in_range("betas[1]", betas[1], 0.0, 1.0, closed_low=True),
        )
    if "eps" in group:
        group["eps"] = in_range("eps", group["eps"], 0.0, closed_low=False)
    group["weight_decay"] = in_range("weight_decay", group["weight_decay"], 0.0, closed_low=True)
    group["lr_scale"] = in_range("lr_scale", group["lr_scale"], 0.0, closed_low=False)
