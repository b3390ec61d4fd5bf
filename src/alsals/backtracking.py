"""Where the next trial of a search goes, and what the trials so far say (phases 5.2-5.5).

A search starts at ``eta * 2^(1/b)`` (Eq. 2), or during warm-up at the ramp's value, and
walks from there: down by ``backtrack`` after a rejected trial (with ``interpolate``, by as
many factors ``backtrack`` as a quadratic through the rejected trial predicts will fail),
up by ``UPWARD_FACTOR`` after an unresolved one while nothing larger was rejected (never
above the warm-up cap, nor above the ceiling). No trial goes above ``largest``, the ceiling
``loss_rise_guard`` set on the step size. When the search ends without an accepted trial,
the walk says where the next search starts.

Climbing recovers a step size that fell below what the loss can resolve. Its ceiling is the
step size whose update is as large as the weights (``set_ceiling``): a trial that moves the
weights that far and still changes nothing is not below any resolution; the loss is flat
there. Without it, a loss that no step can move (a saturated network) sent every search up
by ``2^max_trials``, until the step size overflowed.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

#: An unresolved trial is followed by one this many times larger.
UPWARD_FACTOR = 2.0
#: An interpolated trial is at least this fraction of the rejected one (the safeguard of
#: Nocedal & Wright, Numerical Optimization, Sec. 3.5: a model fitted far from where the
#: test passes must not send the search to 0).
INTERPOLATION_FLOOR = 0.1
#: The step size never falls below the smallest normal float.
MIN_STEP_SIZE = sys.float_info.min


@dataclass
class Backtracking:
    """The step sizes of one search."""

    eta_start: float  # where the search started (before growth)
    eta: float  # the step size of the next trial
    cap: float  # warm-up: no trial above it (inf otherwise)
    backtrack: float
    largest: float = math.inf  # loss_rise_guard's ceiling: no trial above it
    ceiling: float = math.inf  # no climb above it, set at the first unresolved trial
    ceiling_known: bool = False  # set_ceiling ran (its value may be inf: a zero direction)
    rejected: bool = False  # a finite, resolved trial failed the test
    smallest_rejected: float = math.inf  # the smallest such trial's step size
    largest_unresolved: float = 0.0
    flat: bool = False  # a loss of exactly 0 that a trial left exactly 0 (a fitted batch)
    last_tried: float = math.nan
    unbounded: float = 0.0  # the start the Polyak bound lowered (0: it did not)
    growth: float = 1.0  # the factor the start grew the step size by (1 in warm-up)

    @classmethod
    def start(
        cls,
        step_size: float,
        cap: float,
        growth_interval: float,
        backtrack: float,
        largest: float = math.inf,
    ) -> Backtracking:
        """Phase 5.2: grow ``eta`` by ``2^(1/b)``; during warm-up start at the cap; never
        above ``largest``."""
        if cap < math.inf:
            eta = min(cap, largest)
            return cls(eta_start=eta, eta=eta, cap=cap, backtrack=backtrack, largest=largest)
        growth = 2.0 ** (1.0 / growth_interval)
        eta = max(min(step_size * growth, largest), MIN_STEP_SIZE)
        return cls(
            eta_start=step_size,
            eta=eta,
            cap=cap,
            backtrack=backtrack,
            largest=largest,
            growth=growth,
        )

    def limit(self, largest: float) -> None:
        """Start no higher than ``largest`` (the Polyak step ``L0 / s``)."""
        if largest < self.eta:
            self.unbounded = self.eta
        self.eta = max(min(self.eta, largest), MIN_STEP_SIZE)

    def carried(self, accepted: float) -> float:
        """Where the next search starts after this one accepted ``accepted``.

        The Polyak bound is a model's word (the loss falling linearly to the floor), and it
        measures this batch's height above the floor, not the scale of the landscape: a batch
        whose loss is at the floor but for rounding (a sample fitted exactly) bounds its own
        trials to almost 0. Where it lowered the start and no trial was rejected, the step
        size carried on falls by at most ``INTERPOLATION_FLOOR``, the safeguard on how far
        an interpolated trial may fall; otherwise it is the accepted one, as after any search.
        """
        if self.rejected:
            return accepted
        return max(accepted, INTERPOLATION_FLOOR * self.unbounded)

    def reject(self, finite: bool, predicted: float = math.nan, diverged: bool = False) -> None:
        """A rejected trial: the next one is ``backtrack`` times smaller. Given the step
        size that a model of the loss ``predicted`` to pass, the walk skips the trials above
        it that plain backtracking would make: the next trial is the first of
        ``eta * backtrack^j`` (``j >= 1``) not above ``predicted``, but not below
        ``INTERPOLATION_FLOOR * eta``. A search that accepts a trial then accepts one that
        plain backtracking would have tried too, in fewer trials. A ``diverged`` trial
        (non-finite where the loss at the start is finite) says the step is too large but
        not by how much, and gives no model: the next trial is ``INTERPOLATION_FLOOR``
        times smaller, the largest cut interpolation may make. Only a finite trial sets
        ``rejected`` (a batch whose every trial is non-finite says nothing of the step size
        the next search starts from: ``failed_step_size``)."""
        self.rejected = self.rejected or finite
        if finite:
            self.smallest_rejected = min(self.smallest_rejected, self.eta)
        self.last_tried = self.eta
        eta = self.eta * (INTERPOLATION_FLOOR if diverged else self.backtrack)
        if finite and math.isfinite(predicted):
            floor = self.eta * INTERPOLATION_FLOOR
            while eta > predicted and eta * self.backtrack >= floor:
                eta *= self.backtrack
        self.eta = max(eta, MIN_STEP_SIZE)

    def set_ceiling(self, ceiling: float) -> None:
        """No climb above ``ceiling``, where the update is as large as the weights."""
        self.ceiling = max(ceiling, MIN_STEP_SIZE)
        self.ceiling_known = True

    def climb(self) -> bool:
        """An unresolved trial: go up if nothing larger was rejected and the cap and the
        ceiling allow; returns ``False`` when the search must end unresolved instead."""
        self.largest_unresolved = max(self.largest_unresolved, self.eta)
        larger = min(self.eta * UPWARD_FACTOR, self.cap, self.ceiling, self.largest)
        if self.rejected or self.flat or larger <= self.eta:
            return False
        self.eta = larger
        return True

    def unresolved_step_size(self, history: bool) -> float:
        """Phase 5.5: keep the step size, or the largest unresolved one below the ceiling if
        that is larger; on a batch found flat (``flat``: a batch a model has fitted, whose
        float32 loss is exactly 0) keep it: climbing there went up to a move as large as
        the weights and took that as the step size.

        A search that ended unresolved below a finite ``rejected`` trial bracketed the step
        size: too large at the smallest rejected trial, below the resolution under it. The
        next search starts at the top of that bracket, the smallest rejected trial (the
        step size is set so that its growth lands there, as after a failed search): there
        a rejection and one unresolved trial end it again while the run stays converged,
        and any start not rejected would climb back (keeping the start, a converged float32
        run walked down from it at every search, longer as Adam's ``v`` decayed: AdamSLS 2
        -> 34 passes per step). Never below the bracket, so the step size cannot collapse.
        (Not on a flat batch: at ``L0 = 0`` no trial passes, and its rejections say nothing
        of the step size; nor with smoothing history, where the averaged test may have
        rejected what the trial alone would pass, as in ``failed_step_size``.)"""
        if self.flat:
            return self.eta_start
        if self.rejected and not history:
            return max(self.smallest_rejected / self.growth, MIN_STEP_SIZE)
        return max(self.eta_start, min(self.largest_unresolved, self.ceiling))

    def failed_step_size(self, history: bool) -> float:
        """Phase 5.4: where the next search starts after ``max_trials`` without acceptance.

        With smoothing history the test itself may be unsatisfiable (the averages are then
        reset): keep the step size. Without it, a finite rejection means the step is too
        large: the next search starts one backtrack below the last one tried (the step size
        is set so that its growth lands there: with few ``max_trials``, going on from the
        last trial itself grew it at every failed search, a stall). No finite, resolved
        trial says nothing against the step size: keep it.
        """
        if history:
            return self.eta_start
        if self.rejected:
            return max(self.last_tried * self.backtrack / self.growth, MIN_STEP_SIZE)
        return self.unresolved_step_size(history)
