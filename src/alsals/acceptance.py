"""The sufficient-decrease test of the line search.

Armijo's condition (Eq. 1) accepts a step size ``eta`` when the loss decreases by at least a
fraction ``c`` of what the slope predicts: ``f(w) - f(w + eta d) >= c * eta * s``. ALSALS
(Sec. III-B, Eqs. 7-9) generalises it in two ways, both expressed here:

* the slope ``s`` may be negative along a momentum direction; then the factor becomes
  ``c_h = 1/c``, which still allows a step whose loss increase is at most ``1/c`` times the
  first-order prediction instead of driving ``eta`` to zero (Eq. 8);
* both sides are smoothed with an exponential moving average (factor ``smoothing``) to damp
  mini-batch noise: ``D' = b D + (1 - b) (f(w) - f(w + eta d))`` and
  ``G = b G + (1 - b) s``, and the test is ``D' >= c_h * eta * G``. With ``smoothing = 0``
  this is the plain Armijo test of SLS and Adam + SLS.

Where the slope is ``-g . d`` and the loss has a kink along ``d`` (autograd's gradient at a
tie of two pieces is one piece's, and need not be a descent direction), the loss rises for
every step size while the slope says it should fall; the search would end without a step,
and the next one from the same weights would too. The trials measure the slope the paper's
finite difference would: ``measured_slope`` recognises the contradiction (the smallest
measurable trials rose, in proportion to ``eta``) and ``SearchTest.rejudged`` judges the
trials again with it, as Eq. 8 prescribes for a negative slope.

The averages start at zero without bias correction: both sides carry the same factor
``1 - b^k``, so the test is unaffected by it.

A change of the loss within its rounding (``loss_resolution``: ``RESOLUTION_ULPS`` units in
the last place) says nothing about a trial, whichever way it goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

#: A rise that grows like ``eta^p`` with ``p`` in this range, from a search's smallest firm
#: rise to the next trial at least twice as large, is first order: the loss has a kink along
#: the direction. A smooth loss that overshoots rises at least like ``eta^2`` there.
FIRST_ORDER_POWERS = (0.5, 1.5)
#: A rise of at least this many times the loss's resolution is measured, not rounding noise
#: (a float32 mean over a large batch can be off by a few resolutions).
FIRM_RISE = 8.0
#: A trial whose loss change and predicted change both lie within this many units in the
#: last place of the loss (or whose loss did not change at all) is below the resolution of
#: the weights or the loss: it says nothing about whether the step is too large.
RESOLUTION_ULPS = 4


def loss_resolution(dtype: torch.dtype, loss: float) -> float:
    """The rounding of a loss of this size in ``dtype``: ``RESOLUTION_ULPS`` units in the
    last place. A change within it says nothing."""
    return RESOLUTION_ULPS * torch.finfo(dtype).eps * abs(loss)


@dataclass(frozen=True)
class ArmijoTest:
    c: float
    smoothing: float

    def average(self, previous: float, value: float) -> float:
        """One step of the exponential moving average used on both sides."""
        if self.smoothing == 0.0:
            return value
        return self.smoothing * previous + (1.0 - self.smoothing) * value

    def factor(self, slope_average: float) -> float:
        """``c_h`` of Eq. 8: ``c`` where the (smoothed) slope predicts a decrease, else ``1/c``."""
        return self.c if slope_average > 0.0 else 1.0 / self.c

    def accepts(self, decrease_average: float, eta: float, slope_average: float) -> bool:
        """Eq. 9 on the smoothed quantities; a non-finite value never passes."""
        if not (math.isfinite(decrease_average) and math.isfinite(slope_average)):
            return False
        return decrease_average >= self.factor(slope_average) * eta * slope_average

    def verdict(
        self,
        loss: float,
        decrease: float,
        decrease_average: float,
        eta: float,
        slope: float,
        slope_average: float,
        resolution: float,
    ) -> str:
        """``"accepted"``, ``"rejected"`` or ``"unresolved"`` for one trial.

        A finite trial is *unresolved* when the loss did not change at all, or when both the
        change ``decrease`` and the predicted change ``c_h * eta * |slope|`` lie within
        ``resolution`` (the rounding of the loss): it is below the resolution of the weights
        or the loss and says nothing about whether the step is too large.
        """
        if not math.isfinite(loss):
            return "rejected"
        predicted = self.factor(slope_average) * eta * abs(slope)
        if decrease == 0.0 or max(abs(decrease), predicted) <= resolution:
            return "unresolved"
        return "accepted" if self.accepts(decrease_average, eta, slope_average) else "rejected"


@dataclass
class SearchTest:
    """The test of one search: the slope, the averages it would store, the last trial's
    decrease. ``decrease_average`` and ``slope_average`` are the stored ``D`` and ``G``."""

    test: ArmijoTest
    loss0: float
    resolution: float
    decrease_average: float
    slope_average: float
    slope: float = math.nan
    slope_now: float = math.nan  # G' of this search
    tried: float = math.nan  # the last trial's step size
    decrease: float = math.nan  # of the last trial
    decrease_now: float = math.nan  # D' of the last trial

    def set_slope(self, slope: float) -> bool:
        """Phase 5.1: record the slope; ``False`` if it is not finite (skip the step)."""
        self.slope = slope
        if not math.isfinite(slope):
            return False
        self.slope_now = self.test.average(self.slope_average, slope)
        return True

    def curvature(self) -> float:
        """``k`` of the quadratic ``q(x) = s x - k x^2 / 2`` through ``L0`` with slope ``s``
        and the last trial ``(eta, L0 - decrease)``."""
        eta = self.tried
        # divided by eta twice: eta * eta underflows to 0 below 1e-154
        return 2.0 * ((eta * self.slope - self.decrease) / eta) / eta

    def predicted_decrease(self, x: float) -> float:
        """``q(x)``: the decrease the quadratic through the last trial predicts at ``x``."""
        return x * self.slope - 0.5 * self.curvature() * x * x

    def largest_passing(self) -> float:
        """The largest step size that the test would accept if the batch loss along the
        direction were the quadratic through ``L0`` with slope ``s`` and the last trial
        ``(eta, L0 - decrease)``; ``nan`` where that quadratic has no positive curvature, or
        no positive step passes on it.

        On the quadratic ``decrease(x) = x s - k x^2 / 2`` the smoothed test
        ``b D + (1 - b) decrease(x) >= c_h x G'`` holds between the roots of
        ``A x^2 - B x - C`` with ``A = (1 - b) k / 2``, ``B = (1 - b) s - c_h G'``,
        ``C = b D``; the larger root is returned.
        """
        b = self.test.smoothing
        a = 0.5 * (1.0 - b) * self.curvature()
        lin = (1.0 - b) * self.slope - self.test.factor(self.slope_now) * self.slope_now
        const = b * self.decrease_average
        disc = lin * lin + 4.0 * a * const
        if not (math.isfinite(a) and math.isfinite(disc) and a > 0.0 and disc >= 0.0):
            return math.nan
        root = math.sqrt(disc)
        # the larger root, in the form without cancellation for either sign of ``lin``
        largest = (lin + root) / (2.0 * a) if lin >= 0.0 else 2.0 * const / (root - lin)
        return largest if largest > 0.0 else math.nan

    def rejudged(self, trials: list[tuple[float, float]], slope: float) -> SearchTest | None:
        """The test of this search with the ``slope`` its ``trials`` ``(eta, loss)`` measured
        (``measured_slope``), left at the largest trial it accepts; ``None`` if it accepts
        none. This test is not changed."""
        test = replace(self)
        if not test.set_slope(slope):
            return None
        for eta, loss in sorted(trials, reverse=True):
            if test.judge(loss, eta) == "accepted":
                return test
        return None

    def judge(self, loss: float, eta: float, warmup: bool = False) -> str:
        """Phase 5.3 for the trial ``f(w0 + eta d) = loss``. During warm-up (5.2) a trial
        passes unless its loss is non-finite or measurably above ``L0``."""
        self.tried = eta
        self.decrease = self.loss0 - loss
        self.decrease_now = self.test.average(self.decrease_average, self.decrease)
        if warmup:
            if not math.isfinite(loss):
                return "rejected"
            return "rejected" if self.decrease < -self.resolution else "accepted"
        return self.test.verdict(
            loss,
            self.decrease,
            self.decrease_now,
            eta,
            self.slope,
            self.slope_now,
            self.resolution,
        )


def measured_slope(trials: list[tuple[float, float]], loss0: float, resolution: float) -> float:
    """The slope that a search's trials ``(eta, loss)`` measure where they contradict the
    slope it used, else ``nan``.

    The contradiction: the smallest trial that changed the loss beyond ``resolution`` raised
    it, and so did every resolved trial up to one at least twice as large as the smallest
    firm rise (``FIRM_RISE`` resolutions), by rises that grow in proportion to ``eta``
    between the two (their power within ``FIRST_ORDER_POWERS``). A smooth loss whose slope
    predicts a fall either falls at the smallest resolved trials or, overshooting, rises
    like ``eta^2`` or faster there; rounding noise neither grows with ``eta`` nor is firm.
    The slope measured is the secant of the smallest firm rise, ``(L0 - L(eta)) / eta < 0``.
    """
    resolved = sorted((eta, loss0 - loss) for eta, loss in trials if abs(loss0 - loss) > resolution)
    firm = None  # (eta, decrease) of the smallest firm rise
    for eta, decrease in resolved:
        if decrease >= 0.0:
            return math.nan
        if firm is None and -decrease >= FIRM_RISE * resolution:
            firm = (eta, decrease)
        elif firm is not None and eta >= 2.0 * firm[0]:
            power = math.log(firm[1] / decrease) / math.log(firm[0] / eta)
            low, high = FIRST_ORDER_POWERS
            return firm[1] / firm[0] if low <= power <= high else math.nan
    return math.nan


def overstated_fraction(
    trials: list[tuple[float, float, float]], loss0: float, c: float, resolution: float
) -> float:
    """The fraction of its promise by which a search's trials ``(eta, loss, promise)`` lowered
    the loss, where the promise overstates the slope, else ``nan``.

    The overstatement: at least three trials that lowered the loss beyond ``FIRM_RISE``
    resolutions, by a positive promise, each short of ``c``, their step sizes at least 4x
    apart, and the fraction of the first trial at least 4x larger than the smallest at
    least 3/4 of the smallest one's (flat). Where the promise is the loss's slope the
    fraction tends to 1 as ``eta`` shrinks, so no trial of a smooth loss stays short of
    ``c`` at every step size, and one short of ``c`` lies where the curvature bends the
    fraction steeply (a quadratic's ``1 - b eta`` at 0.6 is -0.6 at 4x); a gradient ``k``
    times the loss's (micro-batches accumulated without dividing by their number, a
    backward pass run twice) gives ``1/k`` at the small trials, flat, and no trial can pass
    but one that the loss's rounding lets through. (Flat between the smallest and the trial
    4x larger, not the largest: there the curvature may already bend the fraction, and a
    search that backtracks from far above the batch's limit has such trials; and in the
    fractions, not in their shortfalls ``1 - fraction``, which all exceed 3/4 where ``c``
    is 1/4 or less.) The fraction reported is the smallest trial's.
    """
    falls = sorted(
        (eta, (loss0 - loss) / promise)
        for eta, loss, promise in trials
        if eta > 0.0 and promise > 0.0 and loss0 - loss > FIRM_RISE * resolution
    )
    if len(falls) < 3 or falls[-1][0] < 4.0 * falls[0][0]:
        return math.nan
    smallest, fraction = falls[0]
    further = next(f for eta, f in falls if eta >= 4.0 * smallest)
    short = all(f < c for _, f in falls)
    flat = further >= 0.75 * fraction
    return fraction if short and flat else math.nan
