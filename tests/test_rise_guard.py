"""``loss_rise_guard``: a step size that grew while the training loss climbed goes back.

The watch's statistics against their closed forms; the guard on a noisy regression that
no step size makes reach 0, for all three optimizers; what it must never do (fire on a
loss that falls or holds still, let a trial or a reuse exceed its ceiling); how the user
overrides it; its state across a resume.
"""

from __future__ import annotations

import io
import logging
import math
import random

import pytest
import torch

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.rise_guard import LOSS_SMOOTHING, START_SAMPLES, WATCH_SAMPLES, LossWatch
from alsals.search_state import SearchState

F64 = torch.float64
CLASSES = [SLS, AdamSLS, MomentumALSALS]
IDS = ["SLS", "AdamSLS", "MomentumALSALS"]


def _watch(
    losses: list[float], step_size: float | list[float] = 0.1, from_start: bool = True
) -> LossWatch:
    watch = LossWatch(from_start=from_start)
    sizes = step_size if isinstance(step_size, list) else [step_size] * len(losses)
    for loss, size in zip(losses, sizes, strict=True):
        watch = watch.after(loss, size)
    return watch


# -- the watch ---------------------------------------------------------------------------


def test_the_watch_holds_the_bias_corrected_average_and_its_standard_error():
    gen = torch.Generator().manual_seed(0)
    losses = (1.0 + 0.3 * torch.randn(250, generator=gen, dtype=F64)).tolist()
    watch = _watch(losses, from_start=False)  # (the lowest is its own: see the next test)
    b = LOSS_SMOOTHING
    weights = [(1 - b) * b ** (len(losses) - 1 - i) for i in range(len(losses))]
    total = sum(weights)
    mean = sum(w * x for w, x in zip(weights, losses, strict=True)) / total
    second = sum(w * x * x for w, x in zip(weights, losses, strict=True)) / total
    assert watch.samples == 250
    assert watch.mean() == pytest.approx(mean, rel=1e-12)
    expected = math.sqrt((second - mean * mean) * (1 - b) / (1 + b))
    assert watch.standard_error() == pytest.approx(expected, rel=1e-9)
    # the lowest average since the watch began judging (at WATCH_SAMPLES samples)
    running, lowest = LossWatch(from_start=False), math.inf
    for i, x in enumerate(losses):
        running = running.after(x, 0.1)
        if i + 1 >= WATCH_SAMPLES:
            lowest = min(lowest, running.mean())
    assert watch.lowest == pytest.approx(lowest, rel=1e-12)


def _climb(n: int = WATCH_SAMPLES + 1, seed: int = 3) -> tuple[list[float], list[float]]:
    """Losses that climb from the run's first steps on while the step size grows."""
    gen = torch.Generator().manual_seed(seed)
    noise = (0.02 * torch.randn(n, generator=gen, dtype=F64)).tolist()
    return [1.0 + 0.004 * k + e for k, e in enumerate(noise)], [0.1 * 1.01**k for k in range(n)]


def test_the_runs_first_watch_judges_its_first_look_against_the_start_level():
    """Losses that climb from the run's first steps while the step size grows: the watch
    begun with the run takes its first ``START_SAMPLES`` losses as the start level (their
    mean and the step size then) and, at its first judgment, is judged against it (the
    standard error of the difference from the spread of all its losses): the climb is a
    rise there, with the first steps' step size. Judged against its own lowest, one horizon
    in and already the climbed level, it is not; nor is a watch begun after the guard
    acted (``from_start=False``), which takes no start level."""
    losses, sizes = _climb()
    watch = _watch(losses, sizes)
    b = LOSS_SMOOTHING
    weights = [b ** (START_SAMPLES - 1 - i) for i in range(START_SAMPLES)]
    start = sum(w * x for w, x in zip(weights, losses[:START_SAMPLES], strict=True))
    step = sum(w * x for w, x in zip(weights, sizes[:START_SAMPLES], strict=True))
    assert watch.start_mean == pytest.approx(start / sum(weights), rel=1e-12)
    assert watch.step_size_at_start == pytest.approx(step / sum(weights), rel=1e-12)
    judged = watch.against_start()
    assert judged.lowest == watch.start_mean < watch.lowest
    assert judged.step_size_at_lowest == watch.step_size_at_start
    variance = watch.loss_spread_avg / (1 - b**watch.samples)
    expected = math.sqrt(variance / START_SAMPLES + watch.standard_error() ** 2)
    assert judged.error_at_lowest == pytest.approx(expected, rel=1e-12)
    assert judged.rose(3.0, 0.0) and not watch.rose(3.0, 0.0)
    plain = _watch(losses, sizes, from_start=False)
    assert plain.step_size_at_start == 0.0 and plain.against_start() == plain
    assert not plain.rose(3.0, 0.0)


def test_the_start_level_is_never_what_the_watch_keeps():
    """The watch judged against the start level is never stored: a watch that took the
    start level keeps, at every step, the fields of one that took none (its lowest, step
    size and standard error there), so that a later rise is judged as before; once spent
    (:meth:`LossWatch.look` at a step that moved), it is judged against its own lowest
    alone."""
    losses, sizes = _climb(3 * WATCH_SAMPLES)
    seeded, plain = LossWatch(), LossWatch(from_start=False)
    start_fields = {"from_start", "start_mean", "step_size_at_start"}
    for loss, size in zip(losses, sizes, strict=True):
        seeded, plain = seeded.after(loss, size), plain.after(loss, size)
        same = {f: v for f, v in vars(seeded).items() if f not in start_fields}
        assert same == {f: v for f, v in vars(plain).items() if f not in start_fields}
    assert seeded.against_start() != seeded
    _, spent = seeded.look(moved=True)
    assert spent.against_start() == spent


def _guard_steps(opt, losses, sizes):
    """``ALSALS``'s guard fed one loss and searched step size a step, as its step does."""
    search = opt.search_state
    for loss, size in zip(losses, sizes, strict=True):
        opt._watch_loss(search, loss, size, torch.float64)
    return search


def test_the_start_level_is_one_look_at_a_step_that_moved():
    """The look waits for a step that moved (the 101st loss's step kept the weights: no
    ceiling can be set there) and judges the next one; a look that finds no rise is
    spent, and the watch judges against its own lowest from then on."""
    w = torch.zeros(2, requires_grad=True)
    quiet = {"start_rise": False, "rise_restart": False}
    losses, sizes = _climb(WATCH_SAMPLES + 2)
    held = _guard_steps(ALSALS([w], **quiet), losses, sizes[:-2] + [0.0, sizes[-1]])
    start = _watch(losses[:START_SAMPLES], sizes[:START_SAMPLES]).step_size()
    assert held.step_size_ceiling == pytest.approx(start, rel=1e-12)  # (at the 102nd)
    assert held.watch["from_start"] is False  # (the watch after the guard acted takes none)
    stopped = _guard_steps(ALSALS([w], **quiet), losses[:-1], sizes[:-2] + [0.0])
    assert stopped.step_size_ceiling == math.inf  # (not at a step that kept the weights)
    assert stopped.watch["step_size_at_start"] > 0.0  # (the look still to come)
    # (a start level a little below the lowest average, not measurably: no rise)
    flat = [0.99] * START_SAMPLES + [1.0 + 0.05 * math.sin(k) for k in range(WATCH_SAMPLES - 9)]
    spent = _guard_steps(ALSALS([w], **quiet), flat, sizes[:-1])
    assert LossWatch.from_stored(spent.watch).samples == WATCH_SAMPLES + 1
    assert spent.step_size_ceiling == math.inf
    assert spent.watch["step_size_at_start"] == 0.0


def test_a_first_horizon_below_the_start_level_is_judged_as_before():
    """Where the loss fell over the first horizon (every healthy run), the start level
    changes nothing: the first judgment is the watch's own."""
    gen = torch.Generator().manual_seed(4)
    noise = (0.05 * torch.randn(WATCH_SAMPLES + 1, generator=gen, dtype=F64)).tolist()
    losses = [2.0 * math.exp(-k / 40) + 0.5 + e for k, e in enumerate(noise)]
    watch = _watch(losses, [0.1 * 1.002**k for k in range(len(losses))])
    assert watch.step_size_at_start > 0.0 and watch.start_mean > watch.lowest
    assert watch.against_start() == watch


def test_rare_hard_batches_in_the_first_steps_raise_no_false_alarm():
    """Batch losses with a heavy tail (95% near 0.1, 5% at 10: rare hard batches) and a
    slowly growing step size: ten losses usually hold no hard batch, so their mean lies
    far below the loss's; their own spread would say that mean is precise (a false alarm
    at the first judgment in 22% of runs, measured). The spread of the watch's 101
    losses holds the tail: no false alarm in 400 runs (measured; asserted: at most 1%),
    where the watch's own lowest gives none either."""
    fired = 0
    for seed in range(400):
        draw = random.Random(seed)
        watch = LossWatch()
        for k in range(WATCH_SAMPLES + 1):
            loss = 10.0 if draw.random() < 0.05 else 0.1 + 0.02 * draw.random()
            watch = watch.after(loss, 0.1 * 1.002**k)
        fired += watch.against_start().rose(3.0, 0.0)
    assert fired <= 4


def test_a_watch_stored_before_the_start_level_continues_as_it_ran():
    """A checkpoint of 0.2.14 or older holds no start level: its watch takes none, also
    one restarted by the guard that has not yet seen ``START_SAMPLES`` losses."""
    stored = {k: v for k, v in vars(_watch([1.0, 1.1, 1.2])).items()}
    for name in ("from_start", "start_mean", "step_size_at_start"):
        stored.pop(name)
    watch = LossWatch.from_stored(stored)
    assert not watch.from_start
    for _ in range(START_SAMPLES):
        watch = watch.after(1.0, 0.1)
    assert watch.step_size_at_start == 0.0
    old = SearchState.from_dict({"step_size": 0.1, "initial_step_size": 0.1, "loss_samples": 3})
    assert not old.watch_from_start
    assert SearchState(step_size=0.1, initial_step_size=0.1).watch_from_start


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6, 1e8])
def test_the_watch_s_spread_keeps_its_digits_under_a_large_constant_part(offset):
    """Losses whose spread is 1e-11 of their size (a constant added to the loss, or a
    float64 loss converged to changes far below its value): the standard error is the
    offset-free one to the losses' own rounding (the difference of the EMA of the squares and the squared
    average gave 0 at an offset of 1e6 and 2000x too much at 1e8), and a climb of 3e-3 in
    noise of 1e-3 fires the guard at every offset, a flat loss at none."""
    gen = torch.Generator().manual_seed(2)
    noise = (1e-3 * torch.randn(400, generator=gen, dtype=F64)).tolist()
    flat = _watch([offset + e for e in noise[:200]])
    reference = _watch(noise[:200])
    assert flat.mean() - offset == pytest.approx(reference.mean(), abs=1e-14 * max(offset, 1))
    # (the losses themselves round to 2.2e-16 of the offset: the spread's share of that)
    rounding = 1e-9 + 10 * 2.2e-16 * offset / 1e-3
    assert flat.standard_error() == pytest.approx(reference.standard_error(), rel=rounding)
    climbed, held = flat, flat
    for e in noise[200:]:
        climbed = climbed.after(offset + 3e-3 + e, 0.2)
        held = held.after(offset + e, 0.2)
    resolution = 4 * 2.2e-16 * max(offset, 1.0)
    assert climbed.rose(3.0, resolution) and not held.rose(3.0, resolution)


def test_a_watch_stored_before_0_2_9_loads_with_its_spread():
    """Checkpoints before 0.2.9 hold the EMA of the squared losses (``loss_sq_avg``): the
    watch (``ALSALS``'s dict, ``MomentumALSALS``'s search state) loads it as the spread,
    with the standard error the stored statistics give; a stored value that is not a
    number is refused by its stored name, a negative spread and a state with both entries
    by theirs."""
    gen = torch.Generator().manual_seed(0)
    losses = (1.0 + 0.3 * torch.randn(150, generator=gen, dtype=F64)).tolist()
    watch = _watch(losses)
    b, n = LOSS_SMOOTHING, len(losses)
    squares = sum((1 - b) * b ** (n - 1 - i) * x * x for i, x in enumerate(losses))
    stored = {k: v for k, v in vars(watch).items() if k != "loss_spread_avg"}
    loaded = LossWatch.from_stored({**stored, "loss_sq_avg": squares})
    assert loaded.standard_error() == pytest.approx(watch.standard_error(), rel=1e-9)
    assert LossWatch.from_stored(vars(watch)) == watch
    state = {
        "step_size": 0.1,
        "initial_step_size": 0.1,
        "loss_avg": watch.loss_avg,
        "loss_sq_avg": squares,
        "loss_samples": n,
    }
    search = SearchState.from_dict(state)
    assert search.loss_spread_avg == pytest.approx(watch.loss_spread_avg, rel=1e-9)
    with pytest.raises(ValueError, match="'loss_sq_avg'"):
        SearchState.from_dict({**state, "loss_sq_avg": "0.3"})
    with pytest.raises(ValueError, match="'loss_spread_avg'.*>= 0"):
        SearchState.from_dict({"step_size": 0.1, "initial_step_size": 0.1, "loss_spread_avg": -1.0})
    with pytest.raises(ValueError, match="both 'loss_sq_avg'.*and 'loss_spread_avg'"):
        SearchState.from_dict({**state, "loss_spread_avg": 0.1})
    with pytest.raises(ValueError, match="both 'loss_sq_avg'.*and 'loss_spread_avg'"):
        LossWatch.from_stored({**vars(watch), "loss_sq_avg": squares})


def test_the_watch_judges_only_after_one_horizon_and_leaves_out_nonfinite_losses():
    climb = [1.0 + 0.1 * k for k in range(2 * WATCH_SAMPLES)]
    sizes = [0.1 * 1.01**k for k in range(2 * WATCH_SAMPLES)]  # (a step size that grew)
    fired = [n for n in range(1, len(climb) + 1) if _watch(climb[:n], sizes[:n]).rose(3.0, 0.0)]
    assert fired and fired[0] > WATCH_SAMPLES
    watch = _watch([1.0] * WATCH_SAMPLES + [math.nan, math.inf])
    assert watch.samples == WATCH_SAMPLES and watch.mean() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "losses",
    [
        [1.0] * 500,  # constant: no spread, never above its lowest
        [1.0 / (1 + 0.01 * k) for k in range(500)],  # falling
        [0.5 + 0.1 * math.sin(k) for k in range(2000)],  # a plateau with batch-to-batch noise
    ],
    ids=["constant", "falling", "noisy-plateau"],
)
def test_a_loss_that_falls_or_holds_still_never_fires_it(losses):
    watch = LossWatch()
    for loss in losses:
        watch = watch.after(loss, 0.1)
        assert not watch.rose(3.0, 4 * 2.2e-16 * abs(watch.mean()))


def test_a_measurable_climb_fires_it_and_a_small_one_does_not():
    gen = torch.Generator().manual_seed(1)
    noise = (0.1 * torch.randn(400, generator=gen, dtype=F64)).tolist()
    flat = [1.0 + e for e in noise[:200]]

    def fires(rise: float) -> bool:
        watch = _watch(flat, step_size=0.1)
        for e in noise[200:]:
            watch = watch.after(1.0 + rise + e, 0.2)  # the step size doubled
            if watch.rose(3.0, 0.0):
                return True
        return False

    # the average's standard error here is ~0.1 * sqrt(0.01 / 1.99) = 0.007; the margin at
    # most (3 + 2 sqrt(2 ln 4)) of them = 0.045
    assert fires(0.1)
    assert not fires(0.005)


def test_the_lowest_average_keeps_the_step_size_it_was_reached_at():
    """The step size grew from 0.1 to 1 while the loss climbed: the lowest average and the
    step size at it stay where the loss was lowest."""
    climbed = _watch([1.0] * 150, step_size=0.1)
    for k in range(150):
        climbed = climbed.after(1.0 + 0.01 * k, 1.0)
    assert climbed.lowest == pytest.approx(1.0) and climbed.rose(3.0, 0.0)
    assert climbed.step_size_at_lowest == pytest.approx(0.1)
    assert climbed.step_size() == pytest.approx(1.0, rel=0.3)


def test_a_climb_while_the_step_size_did_not_grow_is_not_the_guards_business():
    """The loss climbs because the data or the objective changed, not the step size: the
    guard does not fire (the search's own backtracking answers a step that is too large
    now). The same climb while the step size grew does."""
    climb = [1.0] * 150 + [1.0 + 0.01 * k for k in range(150)]
    same = _watch(climb, step_size=0.1)
    assert same.judging() and same.mean() - same.lowest > same.margin(3.0, same.error_at_lowest)
    assert not same.rose(3.0, 0.0)
    smaller = _watch(climb[:150], 0.1)
    for loss in climb[150:]:
        smaller = smaller.after(loss, 0.05)
    assert not smaller.rose(3.0, 0.0)
    grown = _watch(climb[:150], 0.1)
    for loss in climb[150:]:
        grown = grown.after(loss, 0.3)
    assert grown.rose(3.0, 0.0)
    assert grown.step_size_at_lowest == pytest.approx(0.1)


def test_the_step_size_average_counts_only_the_moves():
    """A step that did not move the weights (a failed or unresolved search) is not a step
    size of 0: at the loss's floor, where searches end unresolved, the ceiling would
    otherwise be 0."""
    watch = _watch([1.0] * 50, step_size=0.2)
    for _ in range(100):
        watch = watch.after(1.0, 0.0)
    assert watch.step_size() == pytest.approx(0.2)
    assert watch.step_size_at_lowest == pytest.approx(0.2)
    assert LossWatch().step_size() == 0.0


def test_the_fall_that_lifts_a_ceiling_needs_the_same_margin():
    gen = torch.Generator().manual_seed(2)
    noise = (0.1 * torch.randn(300, generator=gen, dtype=F64)).tolist()
    watch = _watch([1.0 + e for e in noise])
    assert not watch.fell_below(1.0, 3.0, 0.0)
    assert watch.fell_below(1.5, 3.0, 0.0)
    assert not _watch([1.0] * WATCH_SAMPLES).fell_below(5.0, 3.0, 0.0)  # not judging yet


def test_a_loss_that_stays_above_a_level_needs_the_same_margin():
    """``stayed_above``: the lowest average since the watch began judging lies above the
    level by ``risen``'s margin (in the standard error at the lowest)."""
    gen = torch.Generator().manual_seed(2)
    noise = (0.1 * torch.randn(300, generator=gen, dtype=F64)).tolist()
    watch = _watch([1.0 + e for e in noise])
    assert not watch.stayed_above(1.0, 3.0, 0.0)
    assert watch.stayed_above(0.5, 3.0, 0.0)
    assert not watch.stayed_above(0.5, 3.0, 1.0)  # not above the resolution
    assert not watch.stayed_above(math.inf, 3.0, 0.0)
    assert not _watch([5.0] * WATCH_SAMPLES).stayed_above(1.0, 3.0, 0.0)  # not judging yet


# -- on a noisy regression ---------------------------------------------------------------


class NoisyRegression:
    """Linear regression with unit-variance noise on the targets (the training loss cannot
    reach 0; its minimum is computed exactly), mini-batches of 8, each epoch in its own
    fixed random order (a step's batch depends on the step alone, so a run can resume)."""

    n, d, batch = 512, 16, 8

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.x = torch.randn(self.n, self.d, dtype=F64, generator=gen) / math.sqrt(self.d)
        noise = torch.randn(self.n, dtype=F64, generator=gen)
        self.y = self.x @ torch.randn(self.d, dtype=F64, generator=gen) + noise
        fit = torch.linalg.lstsq(self.x, self.y).solution
        self.minimum = self.full(fit)

    def full(self, w: torch.Tensor) -> float:
        with torch.no_grad():
            return 0.5 * float(((self.x @ w - self.y) ** 2).mean())

    def closure(self, w: torch.Tensor, k: int):
        per_epoch = self.n // self.batch
        epoch, i = divmod(k, per_epoch)
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(1000 * self.seed + epoch)
        )
        idx = order[self.batch * i : self.batch * (i + 1)]
        return lambda: 0.5 * ((self.x[idx] @ w - self.y[idx]) ** 2).mean()

    def run(self, opt, w: torch.Tensor, steps: range) -> tuple[list[int], list[float]]:
        """Steps ``steps``; the steps at which the guard fired, the full-data losses."""
        fired, full = [], []
        for k in steps:
            opt.step(self.closure(w, k))
            if opt.last_step.loss_rose:
                fired.append(k)
            full.append(self.full(w))
        return fired, full


def _fresh(cls, guard, **kwargs):
    w = torch.zeros(NoisyRegression.d, dtype=F64, requires_grad=True)
    return w, cls([w], loss_rise_guard=guard, **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_on_noisy_batches_the_guard_stops_the_loss_climbing_back(cls):
    """Each batch accepts a step too large for the expected loss and the step size grows
    (SLS and AdamSLS by 2^(1/500) per step, MomentumALSALS by 10% per search): without the guard
    the full-data loss over the last 1000 of 2500 steps is 37-88% above its minimum
    (measured on seeds 0-2); with it the climb is seen, the step size goes back to its
    average where the loss was lowest, and the excess is 9-20% of that (measured;
    asserted: below 35%)."""
    problem = NoisyRegression()
    kwargs = {"loss_floor": None} if cls is MomentumALSALS else {}
    excess = {}
    for guard in (None, 3.0):
        w, opt = _fresh(cls, guard, **kwargs)
        fired, full = problem.run(opt, w, range(2500))
        assert bool(fired) == (guard is not None)
        excess[guard] = sum(full[-1000:]) / 1000 - problem.minimum
    assert excess[None] > 0.2 * problem.minimum  # the failure is there to be fixed
    assert excess[3.0] < 0.35 * excess[None]
    state = opt.state[w]["line_search"]
    assert opt.param_groups[0]["lr"] <= state["step_size_ceiling"] < math.inf


def test_no_trial_and_no_reused_step_exceeds_the_ceiling():
    """After the guard fired, every step's step size (searched or reused) and the ``lr``
    the next search starts from stay at or below the ceiling (the search's 10% growth no
    longer lifts it past); each ceiling lies below the step size the update took."""
    problem = NoisyRegression(seed=2)
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    ceiling, after_fire = math.inf, 0
    for k in range(900):
        lr = opt.param_groups[0]["lr"]
        opt.step(problem.closure(w, k))
        info = opt.last_step
        if ceiling < math.inf:
            after_fire += 1
            assert lr <= ceiling and info.step_size <= ceiling
        if info.loss_rose:
            cut = opt.state[w]["line_search"]["step_size_ceiling"]
            assert 0.0 < cut < min(ceiling, info.step_size)
            ceiling = cut
        assert opt.param_groups[0]["lr"] <= ceiling
    assert after_fire > 100


def test_a_deterministic_descent_never_fires_it():
    """Full-batch logistic regression: the loss only falls; the guard stays silent and the
    run is the run without it, step for step."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, dtype=F64, generator=gen)
    y = (x @ torch.randn(5, dtype=F64, generator=gen) > 0).to(F64)
    runs = []
    for guard in (3.0, None):
        w = torch.zeros(5, dtype=F64, requires_grad=True)
        opt = MomentumALSALS([w], loss_rise_guard=guard)
        losses = []
        for _ in range(400):
            loss = opt.step(
                lambda w=w: torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)
            )
            losses.append(float(loss))
            assert not opt.last_step.loss_rose
        runs.append((losses, w.detach().clone(), opt.state[w]["line_search"]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2]["step_size_ceiling"] == math.inf
    assert runs[0][2]["loss_samples"] == 400 and runs[1][2]["loss_samples"] == 0


def test_writing_lr_clears_the_ceiling_and_restarts_the_watch():
    problem = NoisyRegression()
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    fired, _ = problem.run(opt, w, range(400))
    assert fired
    assert opt.state[w]["line_search"]["step_size_ceiling"] < math.inf
    opt.param_groups[0]["lr"] = 1.0
    opt.step(problem.closure(w, 400))
    state = opt.state[w]["line_search"]
    assert state["step_size_ceiling"] == math.inf
    assert state["loss_samples"] == 1


def test_a_resumed_run_keeps_the_ceiling_and_the_watch():
    """Save after the guard fired, load into a fresh optimizer, go on: bit-identical to
    the run that never stopped."""
    problem = NoisyRegression()
    w, straight = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    fired, _ = problem.run(straight, w, range(700))
    assert fired and fired[0] < 400

    first_w, first = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    problem.run(first, first_w, range(400))
    buffer = io.BytesIO()
    torch.save({"w": first_w.detach(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["state"][0]["line_search"]["step_size_ceiling"] < math.inf
    resumed_w, resumed = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    with torch.no_grad():
        resumed_w.copy_(saved["w"])
    resumed.load_state_dict(saved["opt"])
    problem.run(resumed, resumed_w, range(400, 700))
    assert torch.equal(resumed_w.detach(), w.detach())
    assert resumed.state[resumed_w]["line_search"] == straight.state[w]["line_search"]


@pytest.mark.parametrize(
    ("value", "error"),
    [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), ("3", TypeError)],
)
def test_loss_rise_guard_is_validated(value, error):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(error, match="loss_rise_guard"):
        MomentumALSALS([w], loss_rise_guard=value)


def test_a_bad_ceiling_in_a_checkpoint_is_refused():
    w = torch.zeros(2, requires_grad=True)
    opt = MomentumALSALS([w])
    opt.step(lambda: (w * w).sum() + 1.0)
    saved = opt.state_dict()
    for bad in (0.0, -1.0, math.nan):
        saved["state"][0]["line_search"]["step_size_ceiling"] = bad
        with pytest.raises(ValueError, match="step_size_ceiling"):
            MomentumALSALS([w]).load_state_dict(saved)


def test_the_ceiling_is_lifted_once_the_loss_falls_below_where_it_rose():
    """A ceiling set on noisy targets holds while the loss stays at that level; when the
    noise goes (the targets become exact) the loss falls far below the lowest it had, and
    the ceiling is lifted: the evidence it rested on no longer holds."""
    problem = NoisyRegression()
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    fired, _ = problem.run(opt, w, range(600))
    assert fired
    assert opt.state[w]["line_search"]["step_size_ceiling"] < math.inf
    problem.y = problem.x @ torch.linalg.lstsq(problem.x, problem.y).solution  # no noise
    lifted = None
    for k in range(600, 1500):
        opt.step(problem.closure(w, k))
        if opt.state[w]["line_search"]["step_size_ceiling"] == math.inf:
            lifted = k
            break
    assert lifted is not None, "the ceiling was never lifted"
    assert opt.state[w]["line_search"]["ceiling_loss"] == 0.0


def test_when_the_objective_moves_training_goes_on():
    """Noisy regression until the guard has fired, then the targets move far: the loss
    jumps from 0.6 to about 20 while the step size stays under its ceiling. The jump is not
    the step size's doing: the ceiling does not come down (a second firing, where the step
    sizes under the ceiling averaged a little more than at the lowest loss, leaves it
    where it was), and the run fits the new targets (measured: 12% above their minimum over
    the last 200 of 600 steps)."""
    problem = NoisyRegression()
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    fired, _ = problem.run(opt, w, range(600))
    assert fired
    ceiling = opt.state[w]["line_search"]["step_size_ceiling"]
    problem.y = problem.y + 5.0 * problem.x.sum(dim=1)
    problem.minimum = problem.full(torch.linalg.lstsq(problem.x, problem.y).solution)
    assert problem.full(w) > 10.0
    _, full = problem.run(opt, w, range(600, 1200))
    assert opt.state[w]["line_search"]["step_size_ceiling"] == ceiling
    assert sum(full[-200:]) / 200 < 1.5 * problem.minimum


def test_the_log_says_when_and_why_the_guard_set_a_ceiling(caplog):
    problem = NoisyRegression()
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    with caplog.at_level(logging.INFO, logger="alsals"):
        fired, _ = problem.run(opt, w, range(400))
    messages = [r.getMessage() for r in caplog.records if "loss_rise_guard" in r.getMessage()]
    assert len(messages) == len(fired) == 1
    ceiling = opt.state[w]["line_search"]["step_size_ceiling"]
    assert "rose from" in messages[0] and f"at most {ceiling:.3g}" in messages[0]


def test_a_preview_of_the_step_that_fires_it_is_that_step_and_changes_nothing():
    problem = NoisyRegression()
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    fired, _ = problem.run(opt, w, range(400))
    assert fired
    w, opt = _fresh(MomentumALSALS, 3.0, loss_floor=None)
    problem.run(opt, w, range(fired[0]))
    before = opt.state_dict()
    preview = opt.preview(problem.closure(w, fired[0]))
    assert preview.info.loss_rose
    assert opt.state_dict()["state"][0]["line_search"] == before["state"][0]["line_search"]
    opt.step(problem.closure(w, fired[0]))
    assert opt.last_step == preview.info
    assert opt.state[w]["line_search"]["step_size_ceiling"] < math.inf


def test_a_loss_that_jumps_at_its_floor_is_not_growth_of_the_step_size():
    """The Polyak cap shrinks the steps taken as a loss nears its floor; when the objective
    then moves (the target of a float32 quadratic, after 500 steps to its rounding floor),
    the loss jumps while the steps taken grow back to the searched size. The guard judges
    the searched step size: where it fires (the search grows the step size after the
    jump), its ceiling is the searched step size at the lowest loss (measured 0.045), not
    the capped steps' (0.0107 when it judged those), and the run reaches the new optimum
    (measured: 2.4e-10 of the loss after the jump within 300 steps, against 6.8e-6)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen)
    a = a @ a.T / 8 + 0.1 * torch.eye(8)
    w = torch.zeros(8, requires_grad=True)
    target = torch.ones(8)
    opt = MomentumALSALS([w])

    def loss():
        e = w - target
        return e @ a @ e

    for _ in range(500):
        opt.step(loss)
    assert loss().item() < 1e-8
    target = -2.0 * torch.ones(8)
    start = loss().item()
    for _ in range(300):
        opt.step(loss)
    assert loss().item() < 1e-7 * start


def test_a_ceiling_set_at_a_data_shift_is_lifted_once_the_loss_stays_above_its_level():
    """``MomentumALSALS`` on a noisy regression whose targets move 100x farther with 10x the
    noise at step 1500 (new data whose loss floor lies far above the old lowest): the guard
    fires at the jump and sets a ceiling at the old problem's step size, which the fall
    below the old lowest would never lift. Under it the loss average stays measurably above
    the level that set it (the rise was not the step size's doing): one horizon later the
    ceiling is lifted, and the run ends level with one without the guard (it held for
    good: 546 against 36 over the last 100 steps)."""
    pre, post, n, d = 1500, 600, 512, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, dtype=F64, generator=gen)
    old = x @ torch.randn(d, dtype=F64, generator=gen) + 0.5 * torch.randn(
        n, dtype=F64, generator=gen
    )
    new = x @ (100.0 * torch.randn(d, dtype=F64, generator=gen))
    new = new + 5.0 * torch.randn(n, dtype=F64, generator=gen)
    picks = torch.randint(0, n, (pre + post, 16), generator=torch.Generator().manual_seed(1))

    def train(**kwargs):
        w = torch.zeros(d, dtype=F64, requires_grad=True)
        opt = MomentumALSALS([w], **kwargs)
        fired, lifted, full = [], None, []
        for k in range(pre + post):
            idx, y = picks[k], (old if k < pre else new)
            opt.step(lambda idx=idx, y=y: ((x[idx] @ w - y[idx]) ** 2).mean())
            fired += [k] if opt.last_step.loss_rose else []
            if fired and lifted is None and opt.search_state.step_size_ceiling == math.inf:
                lifted = k
            with torch.no_grad():
                full.append(float(((x @ w - new) ** 2).mean()))
        return fired, lifted, sum(full[-100:]) / 100

    fired, lifted, guarded = train()
    assert pre in fired
    assert lifted is not None and lifted <= pre + 2 * WATCH_SAMPLES
    _, _, unguarded = train(loss_rise_guard=None)
    assert guarded < 1.5 * unguarded


def test_a_rise_after_a_lowest_reached_without_moves_is_no_growth_of_the_step_size():
    """A watch whose lowest average came while no update moved the weights (step size 0:
    searches that kept nothing) has no step size to compare with: a later climb at a
    positive step size is not growth, and sets no ceiling (it would be a ceiling of 0)."""
    watch = _watch([1.0] * (WATCH_SAMPLES + 1), step_size=0.0)
    assert watch.step_size_at_lowest == 0.0
    for _ in range(50):
        watch = watch.after(2.0, 0.1)
    assert watch.risen(3.0, 0.0)  # the loss did climb measurably
    assert not watch.grew() and not watch.rose(3.0, 0.0)


def test_a_watch_flag_that_is_not_a_bool_is_refused():
    with pytest.raises(ValueError, match="watch_from_start"):
        SearchState.from_dict({"step_size": 0.1, "initial_step_size": 0.1, "watch_from_start": 1})
    w = torch.zeros(2, requires_grad=True)
    opt = ALSALS([w])
    for _ in range(3):
        opt.step(lambda: (w - 1.0).pow(2).sum())
    saved = opt.state_dict()
    entry = next(e for e in saved["state"].values() if "schedule_free_search" in e)
    entry["schedule_free_search"]["watch"]["from_start"] = 1.0
    with pytest.raises(ValueError, match="from_start"):
        ALSALS([w]).load_state_dict(saved)
