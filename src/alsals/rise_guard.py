"""The loss-rise guard: a step size that grew while the training loss climbed goes back.

A line search tests each step on the batch it was computed from. Where the gradient noise
dominates and the loss cannot reach 0 (label noise, an under-parameterised model), every
batch accepts a step that is too large for the expected loss: the step size grows search
after search and the training loss climbs back from the level it had reached (on a noisy
linear regression the defaults ended at 1.9x its minimum, 15-115x without ``loss_floor``'s
cap; on a noisy logistic regression at 2.4-2.6x: ``benchmarks/scripts/noisy_problems.py``).
Nothing a single batch shows separates this from healthy progress, but the sequence of
batch losses does: each step's loss ``L0`` is an unbiased sample of the training loss at the
current weights, and their average climbing measurably above its lowest value while the
step size grew means the growth went too far.

The guard averages the batch losses (an EMA with the adaptive cadence's slow factor 0.99,
bias-corrected; the same weights average their squared deviations from the running
average, the spread, updated in West's form so that a loss with a large constant part, or
one that has converged to changes far below its size, keeps its spread's digits) and the
step sizes the
search chose for the updates (over the steps that moved; before ``loss_floor``'s Polyak
cap, which shrinks the steps taken as the loss nears its floor: a loss that jumps there,
because the objective changed, must not look like growth of the step size). Once it holds
one horizon of samples (``1 / (1 - 0.99)`` = 100) it tracks the lowest loss average, the
step size at that moment and the average's standard error then; at its first judgment of a
step that moved, a watch that began with the run also judges the average against the run's
start level (the mean of its first 10 losses, with the step size then; the standard error
of the difference from the spread of all its losses), once, so that a loss that climbed above where
the run began is a rise as soon as the watch judges (a matrix factorisation whose first
searches' step sizes sent the loss 50% above its start: the watch's own lowest, at one
horizon, was already the climbed level). It fires when the loss
average lies above the lowest by more than the loss's rounding and by more than
``loss_rise_guard`` of those standard errors plus the range that the averages of a flat
loss span by chance over the watch's length, while the step size is larger than it was at
the lowest. (The standard error is the
one at the lowest because a step size that is too large spreads the batch losses: on a noisy
logistic regression the spread it caused hid a doubling of the loss.) The step size then
gets a ceiling: its average at the lowest loss. No search starts or climbs above it, and the
watch starts afresh. The ceiling is lifted when the loss average falls measurably (by the
same margin) below the lowest it had reached before the rise: the landscape has changed,
and the evidence with it. It is also lifted where the watch begun at the ceiling finds
its lowest average measurably above the average that set the ceiling (``stayed_above``):
with the step size back where the loss was lowest the loss went on rising, so the rise was
not the step size's doing (new data whose loss floor lies above the old lowest). Writing
``lr`` clears it too.

A loss that only stops falling (a plateau) fires it no more often than chance allows (on
Gaussian noise, 0-3% of flat runs of 2000 or 10000 steps; the margin assumes averages near
normal, and heavy-tailed batch losses fire it more often: 11-15% of flat runs of 300 steps
with lognormal losses or rare hard batches, 5% of them at 10 and the rest at 0.1, while the
step size grew 0.2% a step, measured in 0.2.15's review); a loss that rises for another
reason (the data or the objective changed) while the step size did not grow never does.
Replayed on every run the benchmark had logged (716, every optimizer), it fires only where a
too-large step made the loss climb (Adam at rates above the grid's best, the uncapped line
searches on the noisy tabular check), and on none of the runs of the recommended
configuration.

The guard cannot see a step size that is too large from the run's first search on: it
judges from one horizon on and lowers only a step size that grew (at most to the first
steps' step size). ``ALSALS``'s
``start_rise`` (:class:`StartWatch`) compares the batch losses with their level over the
run's first steps instead, and halves the step size once per rise above it; since it cannot
tell a rise the step size caused from one the data or the objective caused, its ceiling
lasts at most one horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: The EMA factor of the batch losses: the adaptive cadence's slow average of the step size.
LOSS_SMOOTHING = 0.99
#: Samples the watch holds before it judges: one horizon of the average.
WATCH_SAMPLES = round(1.0 / (1.0 - LOSS_SMOOTHING))
#: The losses of the run's first steps that set its start level (the cadence's searched
#: first steps), for the guard's first watch and for ``start_rise``; also the horizon of
#: ``start_rise``'s average of the later losses (its EMA factor ``1 - 1 / START_SAMPLES``).
START_SAMPLES = 10


def ema_with_spread(
    average: float, spread: float, samples: int, loss: float, factor: float
) -> tuple[float, float]:
    """The EMA of the losses (``factor`` ``b``, without bias correction) and the same
    weights' sum of squared deviations from the bias-corrected average, with one more
    loss: ``A' = b A + (1 - b) L``, ``V' = b V + (1 - b) (1 - w) (L - m)^2`` with ``m`` the
    corrected average before and ``w = (1 - b) / (1 - b^n')`` the new loss's share of the
    one after (West, 1979: ``(L - m) (L - m')``, written so that no rounding makes it
    negative). ``V' / (1 - b^n')`` is the weighted variance ``E[L^2] - E[L]^2`` without
    forming that difference, whose two terms agree to all but the last digits where the
    losses' spread is far below their size."""
    updated = factor * average + (1.0 - factor) * loss
    if samples == 0:  # (the first loss is its own average: no deviation)
        return updated, factor * spread
    deviation = loss - average / (1.0 - factor**samples)
    share = (1.0 - factor) / (1.0 - factor ** (samples + 1))
    return updated, factor * spread + (1.0 - factor) * (1.0 - share) * deviation * deviation


def spread_from_squares(average: float, sq_average: float, samples: int, factor: float) -> float:
    """The sum of squared deviations ``V`` of ``ema_with_spread`` from a checkpoint that
    stored the EMA of the squared losses ``Q`` instead (``alsals`` before 0.2.9):
    ``V = Q - A^2 / (1 - b^n)``, at the rounding those checkpoints had."""
    if samples == 0:
        return 0.0
    return max(sq_average - average * average / (1.0 - factor**samples), 0.0)


def margin_in_errors(standard_errors: float, samples: int, horizon: int) -> float:
    """How many standard errors an average must move to count: ``standard_errors`` plus
    ``2 sqrt(2 ln(samples / horizon))``, the range that ``samples / horizon`` roughly
    independent averages of a flat loss span by chance (so that a long flat loss fires a
    watch no more often than a short one)."""
    return standard_errors + 2.0 * math.sqrt(2.0 * math.log(samples / horizon))


@dataclass(frozen=True)
class LossWatch:
    """The guard's statistics since the watch began.

    ``loss_avg`` is the EMA (without bias correction) of the batch losses over ``samples``
    losses and ``loss_spread_avg`` the same weights' sum of their squared deviations from
    the running average (``ema_with_spread``); ``step_size_avg`` and ``moves_avg``
    the same EMAs of the step size of each update (the search's, before the cap) and of
    whether it moved the weights (their ratio is the average step size of the moves);
    ``lowest`` is the lowest bias-corrected loss average since the watch began judging
    (meaningless before ``WATCH_SAMPLES``), ``step_size_at_lowest`` the average step size
    then and ``error_at_lowest`` the average's standard error then.

    ``from_start`` says that the watch began with the run (or with a written ``lr``, or, in
    ``ALSALS``, the guard written back on or edited weights: each a new start; not after
    the guard acted, nor in a run with ``warmup_steps``, whose ramp is no search's step
    size): at ``START_SAMPLES`` losses it takes their mean and average step size as the
    run's start level (``start_mean``, ``step_size_at_start``; 0: not taken or spent), and
    at its first judgment of a step that moved the guard also judges the loss average
    against that level (:meth:`against_start`): a loss that climbed from where the run
    began is a rise as soon as the watch judges, though the watch's own lowest, one horizon
    in, is already the climbed level (a ceiling where the step size grew; ``ALSALS``'s
    ``rise_restart`` restarts ``z`` whatever the step size did, as for any rise).
    """

    loss_avg: float = 0.0
    loss_spread_avg: float = 0.0
    samples: int = 0
    lowest: float = 0.0
    step_size_avg: float = 0.0
    moves_avg: float = 0.0
    step_size_at_lowest: float = 0.0
    error_at_lowest: float = 0.0
    from_start: bool = True
    start_mean: float = 0.0
    step_size_at_start: float = 0.0

    def mean(self) -> float:
        """The bias-corrected average of the losses."""
        return self.loss_avg / (1.0 - LOSS_SMOOTHING**self.samples)

    def standard_error(self) -> float:
        """The standard deviation of the average: the losses' spread times
        ``sqrt((1 - b) / (1 + b))``, the EMA's share of independent samples."""
        variance = max(self.loss_spread_avg / (1.0 - LOSS_SMOOTHING**self.samples), 0.0)
        return math.sqrt(variance * (1.0 - LOSS_SMOOTHING) / (1.0 + LOSS_SMOOTHING))

    @classmethod
    def from_stored(cls, stored: dict[str, float]) -> LossWatch:
        """The watch from its stored fields; one stored before 0.2.9 (the EMA of the
        squared losses, ``loss_sq_avg``) converted to the spread."""
        stored = dict(stored)
        if "loss_sq_avg" in stored and "loss_spread_avg" in stored:
            raise ValueError(
                "the guard's watch holds both 'loss_sq_avg' (before alsals 0.2.9) and "
                "'loss_spread_avg' (since): one of them, not both"
            )
        stored.setdefault("from_start", False)  # (stored before 0.2.15: as it ran)
        if "loss_sq_avg" in stored:
            squares = stored.pop("loss_sq_avg")
            stored["loss_spread_avg"] = spread_from_squares(
                stored["loss_avg"], squares, stored["samples"], LOSS_SMOOTHING
            )
        return cls(**stored)

    def step_size(self) -> float:
        """The average step size of the updates that moved the weights (0 if none did)."""
        return self.step_size_avg / self.moves_avg if self.moves_avg > 0.0 else 0.0

    def judging(self) -> bool:
        """Whether the watch holds more than one horizon of samples."""
        return self.samples > WATCH_SAMPLES

    def margin(self, standard_errors: float, standard_error: float) -> float:
        """How far the average must move to count: ``margin_in_errors`` standard errors
        over the horizon ``WATCH_SAMPLES``."""
        return margin_in_errors(standard_errors, self.samples, WATCH_SAMPLES) * standard_error

    def after(self, loss: float, step_size: float) -> LossWatch:
        """The statistics with one more batch loss and the step size of its update (the
        search's; 0: the weights did not move); a non-finite loss is left out."""
        if not math.isfinite(loss):
            return self
        b = LOSS_SMOOTHING
        average, spread = ema_with_spread(
            self.loss_avg, self.loss_spread_avg, self.samples, loss, b
        )
        watch = replace(
            self,
            loss_avg=average,
            loss_spread_avg=spread,
            step_size_avg=b * self.step_size_avg + (1.0 - b) * step_size,
            moves_avg=b * self.moves_avg + (1.0 - b) * (step_size > 0.0),
            samples=self.samples + 1,
        )
        if watch.from_start and watch.samples == START_SAMPLES:
            watch = watch.with_start_level()
        if watch.samples < WATCH_SAMPLES:
            return watch
        mean = watch.mean()
        if watch.samples > WATCH_SAMPLES and mean >= self.lowest:
            return watch
        return replace(
            watch,
            lowest=mean,
            step_size_at_lowest=watch.step_size(),
            error_at_lowest=watch.standard_error(),
        )

    def with_start_level(self) -> LossWatch:
        """The watch with its losses so far taken as the run's start level: their mean and
        the average step size then."""
        return replace(self, start_mean=self.mean(), step_size_at_start=self.step_size())

    def against_start(self) -> LossWatch:
        """Once the watch judges, until a step that moved has been judged (one look:
        :meth:`look` then drops the start level), where it took the
        run's start level and that lies below the lowest average it has seen: the watch as
        judged against that level, its lowest the start level, the step size then, and
        the standard error of the difference from the spread of all its losses (ten losses
        rarely hold a rare hard batch: their own spread would understate it); else the
        watch itself. What the watch stores is never this one: a later rise is judged
        against the watch's own lowest and error, as before."""
        if not (self.judging() and self.step_size_at_start > 0.0 and self.start_mean < self.lowest):
            return self
        variance = max(self.loss_spread_avg / (1.0 - LOSS_SMOOTHING**self.samples), 0.0)
        error = math.sqrt(variance / START_SAMPLES + self.standard_error() ** 2)
        return replace(
            self,
            lowest=self.start_mean,
            step_size_at_lowest=self.step_size_at_start,
            error_at_lowest=error,
        )

    def look(self, moved: bool) -> tuple[LossWatch, LossWatch]:
        """This step's judgment: the watch a rise is judged by (:meth:`against_start`) and
        the one to store, whose start level is spent where a step that ``moved`` the weights
        was judged against it (from then on it judges against its own lowest)."""
        judged = self.against_start()
        if moved and judged is not self:
            return judged, replace(self, start_mean=0.0, step_size_at_start=0.0)
        return judged, self

    def risen(self, standard_errors: float, resolution: float) -> bool:
        """Whether the loss average lies measurably above its lowest: by more than
        ``resolution``, the loss's rounding, and than the margin in the standard error the
        average had at its lowest (a step size that is too large spreads the batch losses,
        and the spread it causes must not hide the rise)."""
        if not self.judging():
            return False
        rise = self.mean() - self.lowest
        margin = self.margin(standard_errors, self.error_at_lowest)
        return rise > resolution and rise > margin

    def grew(self) -> bool:
        """Whether the average step size is larger than it was at the lowest loss."""
        return self.step_size() > self.step_size_at_lowest > 0.0

    def rose(self, standard_errors: float, resolution: float) -> bool:
        """Whether the loss average rose measurably (``risen``) while the step size grew."""
        return self.grew() and self.risen(standard_errors, resolution)

    def stayed_above(self, level: float, standard_errors: float, resolution: float) -> bool:
        """Whether the lowest loss average since the watch began judging lies measurably
        above ``level`` (``risen``'s margin, with the lowest in place of the average now):
        over the whole watch the loss never came back to ``level``."""
        if not self.judging():
            return False
        rise = self.lowest - level
        margin = self.margin(standard_errors, self.error_at_lowest)
        return rise > resolution and rise > margin

    def lifts(
        self, ceiling_loss: float, ceiling_rise: float, standard_errors: float, resolution: float
    ) -> bool:
        """Whether a ceiling set where the loss average was ``ceiling_rise``, above its
        lowest ``ceiling_loss``, has lost its ground: the average fell measurably below
        that lowest, or (this watch begun at the ceiling) never came back to the level
        that set it."""
        return self.fell_below(ceiling_loss, standard_errors, resolution) or self.stayed_above(
            ceiling_rise, standard_errors, resolution
        )

    def fell_below(self, level: float, standard_errors: float, resolution: float) -> bool:
        """Whether the loss average lies measurably below ``level`` (the same margin, in
        its standard error now)."""
        if not self.judging():
            return False
        fall = level - self.mean()
        return fall > resolution and fall > self.margin(standard_errors, self.standard_error())


#: What ``start_rise`` multiplies the step size by to form its ceiling.
START_CUT = 0.5


@dataclass(frozen=True)
class StartWatch:
    """``start_rise``'s statistics: the batch losses' level over the run's first
    ``START_SAMPLES`` steps (the start level: their sums), an EMA of the losses since the
    start or the rule's last act (factor ``1 - 1 / START_SAMPLES``, with its squares' for
    the spread), all of them of the losses less the first (``shift``: a loss with a large
    constant part keeps its spread's digits), whether the rule may cut (``armed``: not since
    a cut until the loss average has come back below the start level), and how many losses a
    standing ceiling has held for (``held``; -1: none stands).

    Each batch loss before its step is an unbiased sample of the loss at the weights it
    meets, on data the step was not fitted to; their average measurably above the start
    level says the run's steps made the model worse than it began, which a search that
    passes on its own batch cannot see (the step fits the batch and breaks the rest:
    embeddings of which each batch touches a few rows, a step size too large for the loss
    of the batches it was not tested on)."""

    shift: float = math.nan
    start_sum: float = 0.0
    start_sq_sum: float = 0.0
    start_samples: int = 0
    loss_avg: float = 0.0
    loss_sq_avg: float = 0.0
    samples: int = 0
    armed: bool = True
    held: int = -1

    def start_level(self) -> tuple[float, float]:
        """The start level: the mean of the first losses and its standard error (the
        sample standard deviation over ``sqrt(n)``); ``(nan, inf)`` before any."""
        n = self.start_samples
        if n == 0:
            return math.nan, math.inf
        mean = self.start_sum / n
        variance = max(self.start_sq_sum / n - mean * mean, 0.0) * n / max(n - 1, 1)
        return self.shift + mean, math.sqrt(variance / n)

    def level(self) -> tuple[float, float]:
        """The bias-corrected EMA of the losses since the start or the last act, and its
        standard error: the losses' spread (their weighted variance, unbiased: over ``1 -
        s``) times ``sqrt(s)``, ``s`` the sum of the normalised weights' squares (``1 / n``
        for a few samples, ``(1 - b) / (1 + b)`` for many); ``(nan, inf)`` before two."""
        if self.samples < 2:
            return math.nan, math.inf
        b = 1.0 - 1.0 / START_SAMPLES
        corrected = 1.0 - b**self.samples
        mean = self.loss_avg / corrected
        weight = (1.0 - b) / corrected
        squares = weight * weight * (1.0 - b ** (2 * self.samples)) / (1.0 - b * b)
        variance = max(self.loss_sq_avg / corrected - mean * mean, 0.0) / (1.0 - squares)
        return self.shift + mean, math.sqrt(variance * squares)

    def after(self, loss: float) -> StartWatch:
        """The statistics with one more batch loss (a non-finite one is left out)."""
        if not math.isfinite(loss):
            return self
        shift = loss if math.isnan(self.shift) else self.shift
        loss = loss - shift
        if self.start_samples < START_SAMPLES:
            return replace(
                self,
                shift=shift,
                start_sum=self.start_sum + loss,
                start_sq_sum=self.start_sq_sum + loss * loss,
                start_samples=self.start_samples + 1,
            )
        b = 1.0 - 1.0 / START_SAMPLES
        return replace(
            self,
            loss_avg=b * self.loss_avg + (1.0 - b) * loss,
            loss_sq_avg=b * self.loss_sq_avg + (1.0 - b) * loss * loss,
            samples=self.samples + 1,
            held=self.held + (self.held >= 0),
        )

    def judging(self) -> bool:
        """Whether the start level and the average since hold ``START_SAMPLES`` losses."""
        return self.start_samples >= START_SAMPLES and self.samples >= START_SAMPLES

    def _apart(self, above: bool, standard_errors: float, resolution: float) -> bool:
        """Whether the average lies measurably above (``above``) or below the start level: by
        more than ``resolution`` (the loss's rounding) and than ``standard_errors`` standard
        errors of the difference plus the range of them that repeated looks at a flat loss
        span by chance (``margin_in_errors`` over the horizon ``START_SAMPLES``)."""
        (mean, error), (start, start_error) = self.level(), self.start_level()
        gap = mean - start if above else start - mean
        margin = margin_in_errors(standard_errors, self.samples, START_SAMPLES)
        return gap > resolution and gap > margin * math.hypot(error, start_error)

    def rose(self, standard_errors: float, resolution: float) -> bool:
        """Whether the rule may cut and the losses' average lies measurably above the start
        level."""
        return self.armed and self.judging() and self._apart(True, standard_errors, resolution)

    def recovered(self, standard_errors: float, resolution: float) -> bool:
        """Whether, since a cut, the losses' average has come measurably below the start
        level: the run got past what the rise undid; the rule may cut again."""
        return not self.armed and self.judging() and self._apart(False, standard_errors, resolution)

    def expired(self) -> bool:
        """Whether a standing ceiling has held for one horizon of the guard's watch
        (``WATCH_SAMPLES`` finite losses, which skipped steps do not add to): a loss that stayed above the start level under it
        for so long says that it is not the step size's doing alone (the data or the
        objective changed), and the step sizes the searches find may be right."""
        return self.held >= WATCH_SAMPLES

    def cut(self) -> StartWatch:
        """The watch as the rule cuts: no further cut until the average has come back
        below the start level, which is judged on the losses from here."""
        return replace(self, loss_avg=0.0, loss_sq_avg=0.0, samples=0, armed=False, held=0)

    def rearmed(self) -> StartWatch:
        """The watch as the average comes back below the start level: the ceiling gone,
        a new rise may cut again, judged on the losses from here."""
        return replace(self, loss_avg=0.0, loss_sq_avg=0.0, samples=0, armed=True, held=-1)
