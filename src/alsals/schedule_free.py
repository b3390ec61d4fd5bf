"""``ALSALS``, the recommended optimizer: an Armijo line search over Schedule-Free AdamW's
step size.

The paper's ALSALS searches along Adam's momentum direction (``MomentumALSALS``, with
``ALSALS.paper(params)`` its exact configuration); on our benchmark a search over the step
size of Schedule-Free's dynamics does better (``benchmarks/docs/method.md``, section 18), so
that is what ``ALSALS(params)`` builds.

Schedule-Free AdamW (Defazio et al., NeurIPS 2024) replaces the learning-rate schedule by an
average. It keeps three sequences: ``z``, moved by Adam's preconditioned gradient; ``x``, the
running average of ``z`` that a user evaluates; and ``y = (1 - beta1) z + beta1 x``, where the
gradient is taken (the model's weights during training). With the step size ``gamma``, the
preconditioned gradient ``u = g / (sqrt(v_hat) + eps) + weight_decay * y`` and the averaging
weight ``alpha = w / (w_1 + ... + w)``, ``w = max(gamma so far)^2``, one step is

    z' = z - gamma u
    x' = (1 - alpha) x + alpha z'
    y' = (1 - beta1) z' + beta1 x'  =  y + alpha (z - y) - gamma (1 - beta1 (1 - alpha)) u

Its remaining hyperparameter is ``gamma``. Here a line search sets it: Armijo on the batch,
from ``y`` (where the gradient was taken) along the whole move, accepting ``gamma`` when

    f(y) - f(y') >= c * g . (y - y')  =  c * (alpha g . (y - z) + gamma kappa g . u),
    kappa = 1 - beta1 (1 - alpha)

so the test uses the gradient's own slope and two dot products per step (no probe pass).
Each search starts at ``growth`` times the last accepted ``gamma`` (``lr`` at the first),
no higher than the Polyak step (where that linear model reaches ``loss_floor``), and
backtracks by ``backtrack`` (skipping, with ``interpolate``, the trials that a quadratic
fitted to the rejected one says fail). A trial from a start no search accepted (a written
``lr``, a resumed search) that fails while its move promises no decrease (``P(gamma) <= 0``:
the averaging move's rise outweighs the move along ``u``) was too small: the search climbs from it by ``EXPANSION`` until one promises a decrease. Where
the first trial fails, the averaging move
alone (``gamma = 0``, one more pass) is tested: if it fails too, no step size can pass,
the search says nothing about ``gamma``, and the step is taken with the last one
(``"kept"``); with ``kept_rule="shrink"``, from the 5th such search in a row on, each
divides it by ``growth`` (on a full-batch problem every search keeps, and only the average
converges, slowly). Every step, searched or reused, is capped by the Polyak step of its
batch's linear model (``polyak_cap``). A search whose first trial passed with nearly the
whole decrease the linear model promised (``regrowth``: its batch would take a step several
times larger) lets the next search start at ``regrowth`` (2) times the step size, up to the
largest a search has set: the way back after a cut is a few searches (section 35).
Searches run on each of the first ``initial_searches`` steps and every
``search_interval``-th step after; the steps between reuse ``gamma``. With ``lead_rule``, a
search grows its start only while ``z`` does not trail the average: each step's own batch
says whether the move towards ``z`` is downhill (``g . (y - z) > 0``: ``z`` leads, as
while the run travels) or uphill (``z`` trails, circling what the average holds), and
where the steps since the last search say "uphill" more often than a fair coin would (a
one-sided sign test at 5%) the start is ``gamma`` (``"hold"``) or ``gamma / growth``
(``"shrink"``). Without it (the default, ``"off"``) the Armijo test, which judges the move
of ``y``, a ``kappa ~ 1 - beta1`` share of ``z``'s step, lets ``gamma`` grow by ``growth``
nearly every search for as long as a run lasts: over long runs it overshoots. With it, a
plateau the run must grow out of keeps ``gamma`` small, since ``z`` trails there too; the
default keeps the growth (``benchmarks/docs/method.md``, section 19). ``loss_rise_guard``
is ``MomentumALSALS``'s (:mod:`alsals.rise_guard`): a ``gamma`` that grew while the batch losses'
average climbed goes back to its level at the lowest loss. Here the averaging moves the
weights too: a climb while ``gamma`` did not grow is ``x`` moving towards a ``z`` that larger
steps left where the loss is higher, and with ``rise_restart`` the guard restarts ``z`` at
``x`` (a function-value restart, as accelerated methods reset their momentum; section 22).
The guard judges from one horizon (100 steps) on and lowers only a ``gamma`` that grew; a
first step size too large for the batches it was not tested on (each batch's search passes
while the loss of the next batches climbs from the start: embeddings of which each batch
touches a few rows) is ``start_rise``'s (:class:`alsals.rise_guard.StartWatch`): the batch
losses' average measurably above its level over the first 10 steps halves ``gamma`` (a
ceiling, once per rise; section 33).

Why (``benchmarks/docs/method.md``, sections 17-18): on the GPT-2 stand-in ``MomentumALSALS``'s
searches settle at Schedule-Free's own rate, and Adam at that rate trails Schedule-Free: the
gap there is Schedule-Free's dynamics, not the step size. A search over the step size of
those dynamics keeps both.

Unlike Schedule-Free, whose model holds ``y`` during training and needs ``optimizer.eval()``
/ ``optimizer.train()`` around evaluation, the model holds ``x`` outside ``step()``: each
step moves the weights to ``y`` (from ``x`` and ``z``) for its evaluations and ends at
``x'``, so a loop evaluates, saves and logs the weights to use with no extra call. A
backward pass that runs outside ``step()`` (the Hugging Face Trainer's) needs the weights at
``y``: ``train()`` puts them there (and ``eval()`` back, without a step), as Schedule-Free's
``train()`` / ``eval()`` do; for everything else they change nothing. The cost: a copy of
the weights and two passes over them per step. BatchNorm's running statistics are those of the
training passes at ``y``; recompute them at ``x`` where it matters (Schedule-Free's
advice).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from alsals.acceptance import FIRM_RISE, loss_resolution, overstated_fraction
from alsals.backtracking import INTERPOLATION_FLOOR, MIN_STEP_SIZE
from alsals.closure import Closure, ClosureEvaluator, LeftGradients, checked_buffers
from alsals.directions import (
    detached_copies,
    float64_vector,
    largest_representable,
    representable,
    scaled,
    wide_dot,
    wide_dots,
    wide_norms,
)
from alsals.distributed import (
    any_not_finite,
    checked_process_group,
    local_shard,
    mean_on_device,
    mean_to_host,
    shard_count,
)
from alsals.hyperparameters import (
    MAX_STEP_SIZE,
    TORCH_GROUP_KEYS,
    flag,
    in_range,
    integer,
    loss_floor,
)
from alsals.line_search import StepInfo
from alsals.messages import (
    BUFFERS_MOVED_HINT,
    BUFFERS_WARNING,
    COMPLEX_PARAMETERS,
    DISCONNECTED_WARNING,
    DROPPED_GRADIENTS_WARNING,
    FROZEN_GROUP_ADVICE,
    HELD_WARNING,
    NO_BACKWARD_WARNING,
    SCHEDULE_WARNING,
    STALE_BUFFERS_HINT,
    STALL_WARNING_STEPS,
    TRIALS_NONFINITE,
    UNBOUNDED_LOSS_HINT,
    not_replayed_message,
    overstated_message,
    unchanged_message,
)
from alsals.optimizers import MomentumALSALS
from alsals.rise_guard import START_CUT, LossWatch, StartWatch
from alsals.schedule_free_state import PLACEHOLDER_KEYS, STATE_KEY, SearchState
from alsals.searching_optimizer import SearchingOptimizer
from alsals.state_placeholders import (
    is_state_initialisation,
    state_dict_without_placeholders,
)
from alsals.torch_optim_boundary import (
    SCHEDULE_WARNING_STEPS,
    anchor_parameter,
    check_eps,
    check_state_dict_form,
    drop_foreign_keys,
    group_params,
    groups_with_one_lr,
    schedule_suspected,
    split_shown_lr,
    warn_about_other_settings,
    written_lr,
)

#: The exponent of Schedule-Free's averaging weight ``w = max(gamma so far)^2`` (its
#: ``weight_lr_power``): later steps, taken at the full step size, weigh more.
AVERAGING_POWER = 2.0
#: The overstated-slope warning judges only trials whose promise is the step's along ``u``:
#: the averaging move's part at most this share of it (the fraction of the promise a trial
#: lowered the loss by is then the gradient's scale against the loss's within about as much
#: as the flatness test allows, 1/4).
AVERAGING_SHARE = 0.25
#: The settings of the search, read from the first parameter group.
SEARCH_SETTINGS = (
    "c",
    "growth",
    "backtrack",
    "interpolate",
    "max_trials",
    "initial_searches",
    "first_phase",
    "search_interval",
    "lead_rule",
    "kept_rule",
    "cut_retry",
    "late_retry",
    "regrowth",
    "polyak_start",
    "loss_floor",
    "polyak_cap",
    "loss_rise_guard",
    "rise_restart",
    "start_rise",
    "max_grad_norm",
    "warmup_steps",
)
#: Settings added since 0.2.0, with the values that reproduce the behaviour of a state saved
#: before each existed (a checkpoint or a pickle of an older version continues as it ran).
SETTINGS_ADDED = {
    "rise_restart": False,
    "warmup_steps": 0,
    "kept_rule": "keep",
    "cut_retry": False,
    "start_rise": False,
    "late_retry": False,
    "regrowth": None,
}
#: What may end the searches of a run's first steps early (``first_phase``).
FIRST_PHASES = ("never", "kept", "settled")
#: What a search's start does while ``z`` trails ``x`` (``lead_rule``).
LEAD_RULES = ("off", "hold", "shrink")
#: What a run of searches that all kept the step size does (``kept_rule``).
KEPT_RULES = ("keep", "shrink")
#: The sign test's level: ``z`` trails when so many batches say so that a fair coin would
#: give as many in at most 5% of the runs (9 of the 10 steps between two searches).
LEAD_TEST_LEVEL = 0.05
#: A run's first search whose start (the user's ``lr``) passes at once looks upwards by this
#: factor per trial: the mirror of the interpolated backtracking's largest cut per trial
#: (``INTERPOLATION_FLOOR``).
EXPANSION = 1.0 / INTERPOLATION_FLOOR
#: Where that expansion fails, the bracket between the largest trial that passed and the
#: smallest that failed narrows until it is no wider than this: a start far below the
#: batch's limit costs a few trials at the first step (two or three from ``EXPANSION``'s
#: 10x: the interpolated trial, then geometric middles), not
#: the hundreds of steps that growth by 10% per search takes to cover what is left.
EXPANDED_BRACKET = 2.0
#: Steps skipped in a row for a non-finite loss at ``y`` from which ``z`` restarts at ``x``
#: (at the first of them where the loss at ``x`` is finite).
NONFINITE_RESTART = 2
#: A search whose evaluations (trials and the averaging move), this many, all gave exactly
#: the loss at ``y`` ends there: the closure's loss does not follow the weights.
UNCHANGED_EVALUATIONS = 2
#: A change of the loss this many times its dtype's epsilon (times ``max(|loss|, 1)``)
#: is one its rounding resolves, whatever the loss is a mean of: searches whose gradient
#: predicted one and found the loss unchanged are not a converged run's.
UNRESOLVED_ULPS = 1e3
#: A step size this far below the largest a run took has collapsed: searches that find the
#: loss unchanged there do not say that the run converged.
COLLAPSE_RATIO = 1e-4
#: Each group's own state: Schedule-Free's averaging weights and the group's settings.
GROUP_STATE = (
    "weight_sum",
    "lr_max",
    "betas",
    "eps",
    "weight_decay",
    "lr_scale",
)


@dataclass(frozen=True)
class _Move:
    """The step a decided step writes: ``z`` moves by ``step_size`` along ``u`` (0: the
    averaging move alone), and with ``restart`` then restarts at the new average."""

    step_size: float
    restart: bool


@dataclass(frozen=True)
class SearchResult:
    """What a search decided: ``kind`` (``"search"``: a trial passed; ``"kept"``,
    ``"exhausted"``, ``"nonfinite"``; ``"reuse"`` where no search ran), the step size to
    take (the accepted one; the last one when kept; 0 when exhausted), the evaluations it
    made, whether the accepted step size becomes the run's (not where
    ``polyak_start="trial"`` and only the Polyak bound lowered the start), the accepted
    trial's loss decrease, whether every evaluation gave exactly the starting loss, and,
    for a search that accepted nothing, where the next one resumes (below its last trial)."""

    kind: str
    step_size: float
    evaluations: int
    sets_step_size: bool = False
    decrease: float = math.nan
    unchanged: bool = False
    resume: float = 0.0
    idle: bool = False  # no step judged: the averaging move alone until the next search
    linear: bool = False  # its first trial, from the step size's multiple, passed as if linear


def averaging_weight(group: dict[str, Any], gamma: float) -> tuple[float, float, float]:
    """Schedule-Free's averaging weight ``alpha = w / (w_1 + ... + w)`` of a step of size
    ``gamma`` (the searched one; the group moves by ``gamma * lr_scale``) in ``group``, with
    the group's ``lr_max`` and ``w`` after it (``alpha = 1`` at a group's first step: ``x``
    starts at ``z``): ``w = lr_max^2``, the largest step so far, as Schedule-Free's code
    weighs (``benchmarks/docs/method.md``, section 21: each step's own ``gamma^2`` did
    worse). A constant ``lr_scale`` leaves ``alpha`` as it is."""
    lr_max = min(max(group["lr_max"], gamma * group["lr_scale"]), MAX_STEP_SIZE)
    weight = lr_max**AVERAGING_POWER
    total = group["weight_sum"] + weight
    alpha = weight / total if total > 0.0 else 1.0
    return alpha, lr_max, weight


@dataclass
class _Average:
    """The weights of one parameter group that a step may move and a copy of ``x``, the
    average they hold between steps (local shards under FSDP2), while a step moves them to
    ``y`` and its trials: the copy restores them exactly, or becomes ``x'``. A frozen
    parameter without a gradient (a LoRA model's base) is not copied: nothing moves it."""

    group: dict[str, Any]
    params: list[Tensor]
    weights: list[Tensor]
    x: list[Tensor]

    def add(self, param: Tensor) -> Tensor:
        """Hold one more parameter (unfrozen after ``train()`` copied the others); its copy."""
        weight = local_shard(param.detach())
        self.params.append(param)
        self.weights.append(weight)
        self.x.append(weight.clone())
        return self.x[-1]

    def restore(self, keep: set[int] | frozenset[int] = frozenset()) -> None:
        """The weights back to ``x``, but for the parameters in ``keep`` (by ``id``)."""
        weights, x = self.weights, self.x
        if keep:
            kept = [id(p) not in keep for p in self.params]
            weights = [w for w, k in zip(weights, kept, strict=True) if k]
            x = [t for t, k in zip(x, kept, strict=True) if k]
        if weights:
            with torch.no_grad():
                torch._foreach_copy_(weights, x)


@dataclass
class _Group:
    """The tensors of one parameter group that take part in this step, and its moves
    (``params`` to ``u``: the local shards under FSDP2, on which all arithmetic runs)."""

    group: dict[str, Any]
    params: list[Tensor]  # the weights, at y
    grads: list[Tensor]
    z: list[Tensor]
    x: list[Tensor]  # the copy of the average, to become x'
    clip: Tensor | None  # max_grad_norm's factor of the gradients (None: unclipped)
    u: list[Tensor]  # the preconditioned gradient with weight decay
    steps: list[int]  # Adam's t after this step
    counts: list[int]  # over how many ranks each tensor is sharded (FSDP2; else 1)
    owners: list[Tensor]  # the parameters themselves: the state's keys
    z_state: list[Tensor]  # z and v as the state holds them (DTensors under FSDP2)
    v_state: list[Tensor]
    v: list[Tensor]  # v as the state holds it (local shards)
    origin: list[Tensor] | None = None  # y, while trials move the weights

    def place(self, gamma: float) -> None:
        """The weights at ``y' = y + alpha (z - y) - gamma kappa u`` (a trial; ``y`` is kept
        to come back to: the weights as the gradient's evaluation left them, which a
        closure that initialises weights from the data may have written)."""
        if self.origin is None:
            self.origin = detached_copies(self.params)
        alpha = averaging_weight(self.group, gamma)[0]
        kappa = 1.0 - self.group["betas"][0] * (1.0 - alpha)
        step = gamma * self.group["lr_scale"]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.origin)
            torch._foreach_lerp_(self.params, self.z, alpha)
            torch._foreach_add_(
                self.params, self.u, alpha=representable(-step * kappa, self.params)
            )

    def new_moments(self) -> list[Tensor]:
        """Adam's ``v' = beta2 v + (1 - beta2) g^2`` of this step, in new tensors (the state
        keeps ``v`` until the commit): formed where needed, not held through the trials."""
        v_new = torch._foreach_mul(self.v, self.group["betas"][1])
        self.add_squared_gradients(v_new)
        return v_new

    def add_squared_gradients(
        self, v_new: list[Tensor], scratch: list[Tensor] | None = None
    ) -> None:
        """``v_new += (1 - beta2) g^2`` with the step's (clipped) gradients ``g``, formed in
        ``scratch`` where given (else in new tensors)."""
        moved = self.grads
        if self.clip is not None and scratch is None:
            moved = torch._foreach_mul(self.grads, self.clip)
        elif self.clip is not None:
            torch._foreach_copy_(scratch, self.grads)
            torch._foreach_mul_(scratch, self.clip)
            moved = scratch
        torch._foreach_addcmul_(v_new, moved, moved, 1.0 - self.group["betas"][1])


class ALSALS(SearchingOptimizer):
    r"""Schedule-Free AdamW whose step size an Armijo line search sets (module docstring):
    the recommended configuration. ``ALSALS.paper(params)`` is the paper's exact ALSALS (a
    ``MomentumALSALS``); arguments of ``MomentumALSALS`` alone (``slope``, ``smoothing``,
    ``search_direction``, ...) are refused with a ``TypeError`` that says so.

    Needs a closure (``optimizer.step(closure)``, either form of ``MomentumALSALS.step``'s);
    outside ``step()`` the weights are the average ``x``, to evaluate and save as they are.
    ``last_step.kind`` is ``"search"`` (a trial passed), ``"reuse"`` (the last step size,
    between searches; 0, the averaging move alone, after a search that found no trial its
    loss's rounding let it judge, until the next at the cadence), ``"kept"`` (neither the first trial nor the averaging move alone
    passed: the step is taken at the last step size, which is kept; where that step size is
    no search's, a written or resumed one, or the first trial's loss was not finite, only
    the averaging move is taken and the next step resumes below the first trial),
    ``"exhausted"`` (``max_trials`` failed, or the trials went below what the loss's
    rounding resolves: only the averaging move is taken, the step size is kept, and the
    next search resumes below the last trial or from the smallest rejected one, looking
    upwards from there as a run's first search does), ``"zero_lr"`` (``lr`` 0 was written:
    nothing moves), ``"zero_grad"`` (the gradient is exactly 0: Schedule-Free's averaging
    move alone, at the last step size, as Schedule-Free AdamW's step would take; where no
    parameter has a gradient, skipped: nothing written), ``"nonfinite"`` (skipped: nothing
    written; two steps in a row whose loss at ``y`` is not finite restart ``z`` at ``x``
    where the loss at ``x`` is finite, one evaluation);
    ``last_step.step_size``
    is the step size taken, ``capped`` when ``polyak_cap`` cut it, and
    ``param_groups[i]["lr"]`` the searched one (times the group's ``lr_scale``), where the
    next search starts.

    Args:
        params: parameters or parameter groups.
        lr: the step size the first search starts from (0.1; never above the Polyak step).
            A start that passes at once, or leaves the loss exactly unchanged, says only that
            ``lr`` is not too large: the first search then looks upwards by ``EXPANSION``
            (10) per trial, never above the Polyak step, until a trial fails, and takes the
            largest that passed (or one trial between, where a quadratic fitted to the
            failure puts it). Not during ``warmup_steps``, whose ramp is a ceiling.
        c: Armijo's constant (0.6, the paper's ALSALS).
        betas: ``beta1`` in ``[0, 1)`` interpolates between ``z`` and ``x`` (Schedule-Free's
            momentum; 0 evaluates gradients at ``z``, Polyak-Ruppert averaging), ``beta2`` is
            Adam's second-moment factor ((0.9, 0.999)).
        eps: Adam's ``eps`` (1e-8).
        weight_decay: decoupled weight decay at ``y``, as Schedule-Free applies it (0); no
            step size above ``1 / (lr_scale * weight_decay)`` is tried (the decay would flip
            the weights), and a search whose move the decay turns uphill keeps its step size.
        growth: each search starts at this multiple of the last step size (1.1).
        backtrack: a rejected trial's step size is multiplied by this (0.8).
        interpolate: skip the trials of that grid above where a quadratic model fitted to
            the rejected trial passes the test (``True``).
        max_trials: evaluations per search (the averaging move's test counts as one); if
            none passes, only the averaging move is taken, the step size is kept, and the
            next step resumes below the last trial (100).
        initial_searches: steps that all search at the start of a run (10).
        first_phase: what ends those searches early: ``"never"``; ``"kept"``, a search that
            kept the step size (the test cannot judge it there, and the next steps' searches
            would not either); ``"settled"``, that or a search after the first that takes
            its first trial (``"kept"``).
        search_interval: afterwards, a search every this many steps (10).
        lead_rule: what decides ``growth`` at a search's start. Each step's own batch says
            whether ``z`` leads the average (``g . (y - z) > 0``: the move towards ``z`` is
            downhill on a batch ``z`` was not built from) or trails it (uphill). The start
            grows by ``growth`` unless the steps since the last search trailed more often
            than chance allows (a one-sided sign test at 5%); there it is the last step
            size (``"hold"``) or that divided by ``growth`` (``"shrink"``); ``"off"``:
            always ``growth`` (``"off"``). The sign says nothing about plateaus a run must
            grow out of: there ``z`` trails too, and ``"shrink"`` / ``"hold"`` keep the
            step size too small to leave them (``benchmarks/docs/method.md``, section 19).
        kept_rule: what a run of ``"kept"`` searches (the averaging move alone failed the
            test, so no step size could be judged) does to the step size they keep:
            ``"keep"`` leaves it; ``"shrink"`` divides it by ``growth`` at each kept search
            from the 5th in a row on (a fair coin gives 5 in a row with probability 1/32,
            beyond the 5% level; with ``growth=1`` nothing shrinks). Any other search ends
            the run, but not a skipped step's (its loss was not finite). On a full-batch
            (deterministic) problem every search keeps, ``z`` circles the minimum at a step
            size too large to settle, and only the average converges, slowly (as
            Schedule-Free AdamW's does at a fixed rate); ``"shrink"`` takes it to the
            minimum within float64's resolution, though not steadily (searches that pass
            grow the step size again). On minibatch training it costs a transformer trained
            from scratch, whose kept runs come while its loss still falls
            (``benchmarks/docs/method.md``, section 31) (``"keep"``).
        cut_retry: a search after the run's first that sets the step size more than
            ``EXPANSION`` (10x) below its own start (one batch's cut: an outlier batch, or
            Adam's first steps on a recurrent or deep unnormalised network) makes the next
            step (the next not skipped) search again, from that start, once: the step size
            becomes the larger of the cut and the trial that search passed (``True``).
        late_retry: once the run's first phase is over (the searches at the cadence), every
            search that sets the step size below its own start, by any factor, is checked on
            the next batch as ``cut_retry`` checks a cut beyond 10x: a step size that many
            batches accepted is not lowered on one batch's word (an outlier batch: a
            recurrent network's large gradients), while within the first phase, where every
            step searches anyway, the searches find the step size's level (``True``).
        regrowth: the way back after a cut. A search whose first trial (started at a
            multiple of the step size: ``growth``, ``regrowth``'s own, or the lead rule's;
            not lowered by the Polyak bound, not a retry, not in warm-up) passes with a
            decrease of at least ``1 - (1 - c) / regrowth^2`` of what the linear model promised (0.9 of it at the defaults) stands so far below the
            Armijo test's limit on its batch (``regrowth^2`` times the trial or more,
            where a quadratic fits the slice) that the next search starts at ``regrowth``
            times the step size instead of ``growth`` times, but never above the largest
            step size a search of the run has set: a step size that one batch cut deep
            comes back in a few searches, not the dozens that 10% per search takes, while
            growth beyond where the run has been stays at ``growth``. A step size lowered
            on many batches' evidence (a ceiling of the guard or of ``start_rise``,
            ``kept_rule``'s or ``lead_rule``'s shrink) lowers that largest step size with it,
            and a written ``lr`` resets it (the searches after it set it afresh). A search
            that backtracks from a raised start to above the usual one raised the step
            size: no cut for ``late_retry`` (``None``: off; 2.0).
        loss_floor: the loss's lower bound for the Polyak start and cap; a batch whose loss
            is exactly at it takes no trial and no step along the gradient (nothing below
            it to reach), unless the gradient promises a change the loss's rounding would
            show there (the floor is then no minimum: a wrong floor, or a kink at it, and
            the search runs as any other); ``None``: no bound (0.0).
        polyak_start: what a later search's start lowered by the Polyak bound sets, where
            that start passes at once: the step size (``"sets"``), or the trial only, the
            step size staying where it was, as the cap leaves it (``"trial"``) (``"trial"``).
        polyak_cap: no step, searched or reused, larger than the Polyak step of its own
            batch's linear model (the step size the search keeps is not cut) (``True``).
        loss_rise_guard: ``MomentumALSALS``'s guard, in standard errors: where the batch
            losses' average rises measurably above its lowest while the step size grew, the
            step size gets a ceiling, its average at the lowest loss, lifted where the loss
            average falls measurably below that lowest or where, from one horizon after the
            ceiling on, even its lowest lies measurably above the average that set it (new
            data, not the step size, raised it); ``None``: off (3.0).
        rise_restart: where the guard finds the loss average risen, whatever the step size
            did, ``z`` restarts at the average ``x`` (function-value restart, as for
            accelerated methods): the average stops moving towards a ``z`` that has gone
            where the loss is higher (``True``).
        start_rise: where the batch losses' average (over the last ~10 steps) rises
            measurably above its level over the run's first 10 steps, in
            ``loss_rise_guard``'s standard errors, the step size gets a ceiling at half its
            value (and ``z`` restarts with ``rise_restart``): each search passed on its own
            batch, but the steps made the loss on the batches they were not fitted to worse
            than where the run began (a first step size too large: embeddings that each
            batch touches a few rows of). Once per rise: the ceiling is lifted, and the
            rule armed again, where the average comes measurably below the start level;
            the ceiling is also lifted after 100 steps with a finite loss (a loss that rose
            for another reason: new data, a moving objective). Not while the guard's own
            ceiling stands; off with ``loss_rise_guard=None`` (``True``).
        max_grad_norm: clip the gradient the update uses to this norm (over all parameters),
            as ``clip_grad_norm_`` would before the step; the Armijo test keeps the true
            gradient's slope. ``last_step.grad_norm`` is the norm before clipping
            (``None``: no clipping).
        warmup_steps: for the first ``k < warmup_steps`` steps every step searches, starting
            at the ramp ``lr * (k + 1) / warmup_steps`` (not above its Polyak step), so
            the step size may follow a linear warm-up to ``lr`` but never one the batch
            rejects; ``lr`` is then the peak (0: no warm-up).
        lr_scale: per-group multiplier of the one searched step size: group ``i`` moves by
            ``gamma * lr_scale_i`` (layer-wise rates) (1).
        buffers: module buffers to protect from the trial evaluations (``model.buffers()``
            where the model has BatchNorm).
        process_group: the ranks that must take the same decisions (default group).
    """

    STATE_KEY = STATE_KEY
    PLACEHOLDER_KEYS = PLACEHOLDER_KEYS
    SEARCH_STATE = SearchState
    NOT_COPIED = (*SearchingOptimizer.NOT_COPIED, "_held", "_versions")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        *,
        c: float = 0.6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        growth: float = 1.1,
        backtrack: float = 0.8,
        interpolate: bool = True,
        max_trials: int = 100,
        initial_searches: int = 10,
        first_phase: str = "kept",
        search_interval: int = 10,
        lead_rule: str = "off",
        kept_rule: str = "keep",
        cut_retry: bool = True,
        late_retry: bool = True,
        regrowth: float | None = 2.0,
        polyak_start: str = "trial",
        loss_floor: float | None = 0.0,
        polyak_cap: bool = True,
        loss_rise_guard: float | None = 3.0,
        rise_restart: bool = True,
        start_rise: bool = True,
        max_grad_norm: float | None = None,
        warmup_steps: int = 0,
        lr_scale: float = 1.0,
        buffers: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise _unknown_arguments(unknown)
        if isinstance(params, torch.nn.Module):
            raise TypeError(
                "ALSALS takes the parameters, not the module: pass "
                "model.parameters() (or a list of parameter groups)"
            )
        params, lr = groups_with_one_lr(params, lr)
        settings = {"lr": in_range("lr", lr, 0.0, MAX_STEP_SIZE, closed_low=False)}
        settings.update(
            _checked_search_settings(
                {
                    "c": c,
                    "growth": growth,
                    "backtrack": backtrack,
                    "interpolate": interpolate,
                    "max_trials": max_trials,
                    "initial_searches": initial_searches,
                    "first_phase": first_phase,
                    "search_interval": search_interval,
                    "lead_rule": lead_rule,
                    "kept_rule": kept_rule,
                    "cut_retry": cut_retry,
                    "late_retry": late_retry,
                    "regrowth": regrowth,
                    "polyak_start": polyak_start,
                    "loss_floor": loss_floor,
                    "polyak_cap": polyak_cap,
                    "max_grad_norm": max_grad_norm,
                    "loss_rise_guard": loss_rise_guard,
                    "rise_restart": rise_restart,
                    "start_rise": start_rise,
                    "warmup_steps": warmup_steps,
                }
            )
        )
        self._buffers = checked_buffers(buffers)
        self._process_group = checked_process_group(process_group)
        self.__dict__.update(self._fresh_bookkeeping())
        defaults = {
            **settings,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "lr_scale": lr_scale,
            "weight_sum": 0.0,
            "lr_max": 0.0,
        }
        super().__init__(params, defaults)
        self._shown_lr = [g["lr"] for g in self.param_groups]

    @classmethod
    def paper(
        cls, params: Iterable[Tensor] | Iterable[dict[str, Any]], **overrides: Any
    ) -> MomentumALSALS:
        """The paper's exact ALSALS (``PAPER_ALSALS``: Armijo along Adam's momentum direction,
        the finite-difference slope, ...), with ``overrides`` on top: a ``MomentumALSALS``."""
        return MomentumALSALS.paper(params, **overrides)

    @property
    def _settings(self) -> dict[str, Any]:
        """The search's settings: one for all groups, the first group's (``state_dict``
        carries them with the groups)."""
        first = self.param_groups[0]
        return {key: first[key] for key in SEARCH_SETTINGS}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim``'s, with the group checked before it is added: ``betas``,
        ``eps``, ``weight_decay`` and ``lr_scale`` may differ between groups; the search's
        settings (``lr`` included: one step size is searched for all parameters, which
        moves group ``i`` by ``lr_scale_i`` times it) may not."""
        self._refuse_in_step("add_param_group()")
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        param_group = {k: v for k, v in param_group.items() if k not in ("weight_sum", "lr_max")}
        if "lr" in param_group and self.param_groups:  # a copy of a group shows its lr
            shown = self._stored_search_state().step_size * param_group.get("lr_scale", 1.0)
            if param_group["lr"] == shown:
                del param_group["lr"]
        for key in ("lr", *SEARCH_SETTINGS):
            if key in param_group and param_group[key] != self.defaults[key]:
                advice = (
                    " (a per-group 'lr': give each group lr_scale = its lr / the base lr"
                    + (f"; {FROZEN_GROUP_ADVICE})" if param_group[key] == 0 else ")")
                    if key == "lr"
                    else ""
                )
                raise ValueError(
                    f"param_groups[...]['{key}'] = {param_group[key]!r}: ALSALS "
                    f"searches one step size for all parameters, so {key} is a setting of the "
                    f"optimizer (ALSALS(params, {key}=...)), not of a group{advice}"
                )
        param_group["params"] = group_params(param_group)
        per_group = ("betas", "eps", "weight_decay", "lr_scale")
        known = {*SEARCH_SETTINGS, *GROUP_STATE, *TORCH_GROUP_KEYS, "params", "lr", "param_names"}
        drop_foreign_keys("ALSALS", param_group, known, per_group)
        settings = _group_settings({**self.defaults, **param_group})
        held = self._held is not None  # (after train(): the new group joins at y too)
        if held:
            self.eval()
        try:
            super().add_param_group(param_group)  # (it unpacks named parameters)
            group = self.param_groups[-1]
            if any(torch.is_complex(p) for p in group["params"]):
                self.param_groups.pop()
                raise ValueError(COMPLEX_PARAMETERS)
        finally:
            if held:
                self.train()
        group.update(settings)
        self._show_new_group(group)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict; each group also records the ``lr`` the last step
        showed (:func:`alsals.torch_optim_boundary.with_shown_lr`). Weights edited in place since the
        last step (a projection after it) are adopted first, as the next step would adopt
        them: the checkpoint carries the restarted ``z``, which a resumed optimizer, built
        without the version counters, could not find."""
        if self._held is not None:
            self._warn_once("held_state_dict", HELD_WARNING.format(what="state_dict()"))
        elif not self._in_step:  # (in a step the weights are where the step put them)
            self._adopt_edited_weights()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing a state another optimizer
        saved (its groups lack this one's settings and averaging weights) with the keys
        named, before anything is loaded."""
        self._refuse_in_step("load_state_dict()")
        check_state_dict_form(type(self).__name__, state_dict)
        state_dict, shown = split_shown_lr(state_dict)
        state_dict = state_dict_without_placeholders(state_dict, PLACEHOLDER_KEYS)
        required = {*SEARCH_SETTINGS, *GROUP_STATE}
        groups = state_dict.get("param_groups", [])
        # an older version's state (every group lacks the same settings, all added since
        # 0.2.0): the settings it predates, as it ran without them
        lacking = {frozenset(required - group.keys()) for group in groups}
        predated = next(iter(lacking)) if len(lacking) == 1 else frozenset()
        old = predated <= SETTINGS_ADDED.keys()
        filled = {k: SETTINGS_ADDED[k] for k in sorted(predated)} if old else {}
        if filled:
            groups = [{**filled, **group} for group in groups]
            state_dict = {**state_dict, "param_groups": groups}
        for index, group in enumerate(groups):
            missing = sorted(required - group.keys())
            if missing:
                raise ValueError(
                    f"the state loaded into ALSALS lacks {', '.join(missing)} in "
                    f"param_groups[{index}]: it was saved by another optimizer (a MomentumALSALS or "
                    "torch.optim state cannot continue a Schedule-Free run)"
                )
        # a state edited by hand: refused, with the setting named, before loading
        _check_groups(state_dict.get("param_groups", []), "the state's ")
        stored = state_dict.get("state", {})
        for entry in stored.values():
            if isinstance(entry, dict) and STATE_KEY in entry:
                SearchState.check_stored(entry[STATE_KEY])
        saved_groups = state_dict.get("param_groups", [])
        if saved_groups:
            saved = {k: saved_groups[0][k] for k in SEARCH_SETTINGS}
            compared = [k for k in SEARCH_SETTINGS if k not in filled]  # (said below)
            warn_about_other_settings("ALSALS", saved, self.defaults, compared)
        if filled:
            listed = ", ".join(f"{k}={v!r}" for k, v in filled.items())
            warnings.warn(
                f"the state loaded into ALSALS was saved by a version of alsals before "
                f"{', '.join(filled)}: it goes on as that version ran ({listed})",
                UserWarning,
                stacklevel=2,
            )
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # (numbers as plain floats: weights_only loading)
            group.update(_group_settings(group))
        if self.param_groups:  # groups added later get the loaded settings, not the old ones
            self.defaults.update({k: self.param_groups[0][k] for k in SEARCH_SETTINGS})
            anchor = anchor_parameter(self.param_groups)
            if anchor is None or STATE_KEY not in self.state[anchor]:  # saved before a step
                # the lr the run was built with: the one its groups showed (an lr written
                # since is a write the first step adopts, as it would have been)
                first = self.param_groups[0]
                lr = shown[0] if shown is not None else first["lr"]
                self.defaults["lr"] = lr / first["lr_scale"]
        self._versions = None  # the weights that go with this state are loaded separately
        # after train(): the copy of x it held is the old run's; the weights now (or as the
        # model's checkpoint is loaded) are the new x
        self._held = None
        self._shown_lr = shown
        self._placeholders, self._signature = False, None  # (the loaded state holds none)

    @classmethod
    def _fresh_bookkeeping(cls) -> dict[str, Any]:
        return {
            **super()._fresh_bookkeeping(),
            # a search since the last that passed by a resolved change found the slope
            # overstated
            "_slope_overstated": False,
            "_held": None,  # x (list of _Average), while train() holds the weights at y
            # each parameter's version counter as this optimizer left the weights (x): a
            # later in-place write is an edit by the user (_adopt_edited_weights)
            "_versions": None,
        }

    def __getstate__(self) -> dict[str, Any]:
        if self._held is not None:
            self._warn_once("held_copy", HELD_WARNING.format(what="a copy (deepcopy, pickle)"))
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for settings in (self.defaults, *self.param_groups):  # (pickled by an older version)
            for key, value in SETTINGS_ADDED.items():
                settings.setdefault(key, value)

    # --------------------------------------------------------------- Schedule-Free's swap

    def train(self) -> None:
        """Move the weights to ``y``, where the next step takes its gradient, for a backward
        pass that runs outside ``step()`` (the Hugging Face Trainer's ``training_step`` calls
        this before its forward pass, as it does for Schedule-Free). Not needed where the
        backward pass runs inside the closure: ``step()`` moves the weights itself. Calling
        it again before the step changes nothing; ``step()`` or ``eval()`` brings the
        weights back to the average; inside the closure, where the step has put the weights
        already, it does nothing."""
        if self._held is None and not self._in_step:
            self._drop_placeholders()  # (their z is no step's: y is x before a first step)
            self._adopt_edited_weights()
            self._held = self._to_gradient_point()
            self._versions = self._weight_versions()

    def eval(self) -> None:
        """Bring the weights back to the average ``x`` after ``train()`` without a step (the
        Trainer calls this before evaluating); otherwise they are ``x`` already and nothing
        changes."""
        if self._held is not None:
            # weights written while held (a checkpoint loaded after train()) are the new x,
            # as between steps; the others go back to x
            edited = self._edited_weights()
            for average in self._held:
                average.restore(keep=edited)
            self._held = None
            self._adopt_edited_weights(edited)
            self._versions = self._weight_versions()

    def _edited_weights(self) -> set[int]:
        """The parameters written in place since this optimizer last left them (their
        version counters moved), by ``id``."""
        if self._versions is None:
            return set()
        now = self._weight_versions()
        return {k for k, v in now.items() if k in self._versions and v != self._versions[k]}

    # ------------------------------------------------------------------------------ the step

    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, closure_runs_backward: bool | None = None
    ) -> Tensor:
        """One training step: the weights move from the average ``x`` to ``y``, where the
        loss and gradient are taken; a search when one is due; the move, after which the
        weights are the new average ``x'``. Returns the loss at ``y``. An exception leaves
        the weights, the state and the random stream as they were. ``closure_runs_backward``
        as ``MomentumALSALS.step``'s (a closure without arguments that runs backward itself:
        Lightning's)."""
        if is_state_initialisation(self.state, self.param_groups, closure):  # a tool's
            if not self._in_step:  # (a tool reading the state inside the closure: a read)
                self._create_placeholders()
            return None  # type: ignore[return-value]  # (no closure, no loss: torch's None)
        with self._running_closure():
            return self._step(closure, closure_runs_backward)

    def _step(self, closure: Closure | None, closure_runs_backward: bool | None) -> Tensor:
        self._check_state("ALSALS")
        self._check_written_settings()
        self._check_ranks("ALSALS")
        if self._held is not None and self._edited_weights():
            self.eval()  # weights written after train(): the new x (then y from it again)
        if self._held is None:  # (after train(), the weights are at y, moved by train())
            self._adopt_edited_weights()
        params = [p for g in self.param_groups for p in g["params"]]
        evaluator = ClosureEvaluator(
            closure,
            params,
            self._buffers,
            runs_backward=closure_runs_backward,
            left=self._left_grads,
            watch_dropped=not self._dropped_looked,
            trials_with_grad=self._trials_with_grad,
        )
        search = self._stored_search_state()
        before = search.step_size
        written = self._adopt_written_lr(search)
        cut = written == "zero" or (written is not None and search.step_size < before)
        counts = self._written_lr_steps, self._lr_cuts  # (an exception puts them back)
        self._written_lr_steps = self._written_lr_steps + 1 if written else 0
        self._lr_cuts += cut
        # a written lr that a skipped step left untested is still the user's, not a search's
        pending = "set" if written is None and search.untested_write else written
        averages: list[_Average] = []
        self._grad_norm = math.nan
        held = self._held is not None
        averages, self._held = self._held or [], None  # (train(): the weights are at y)
        try:
            if schedule_suspected(self._written_lr_steps, self._lr_cuts):
                message = SCHEDULE_WARNING.format(name="ALSALS", n=SCHEDULE_WARNING_STEPS)
                self._warn_once("schedule", message)
            averages = averages or self._to_gradient_point()
            loss = evaluator.evaluate_with_grad()
            groups, squared = self._gather(averages, search.root_first)
            root_first = search.root_first
            info, move = self._run(search, pending, loss, groups, squared, evaluator)
            if move is None:  # (a step that writes nothing keeps the order it found)
                search.root_first = root_first
            self._warn_about(info, evaluator)  # (-W error: undone like any exception)
            if (
                move is not None
            ):  # (written last: a warning raised as an error finds nothing written)
                self._commit(groups, move.step_size, move.restart)
            # y, where the loss is taken, may have left the loss's domain (a reused step
            # size moved z past a log barrier, say) while the average x has not: where the
            # loss at x is finite (not a bad batch), z restarts at x (the last thing the step
            # does: an exception in that evaluation undoes the step like any other)
            if (
                info.kind == "nonfinite"
                and search.nonfinite_in_a_row >= NONFINITE_RESTART  # (x may have been a bad
                # batch's at the second: each later one looks again, one forward pass)
                and self._finite_at_average(averages, evaluator)
            ):
                self._restart_at_average(averages)
                search.restarts += 1
                search.nonfinite_in_a_row = 0  # (y is x now: no look until two more)
        except BaseException:
            self._written_lr_steps, self._lr_cuts = counts
            for average in averages:
                average.restore()
            if held:  # the weights as they were: at y, where train() had put them
                self._held = self._to_gradient_point()
            self._versions = self._weight_versions()
            evaluator.abort()
            if not evaluator.grads_as_found():  # a retry must not add this attempt's to its own
                self._left_grads = LeftGradients.at_step_end(params)
            raise
        for average in averages:  # x' where the step moved, x where it did not
            average.restore()
        self._versions = self._weight_versions()
        evaluator.finish()
        self._trials_with_grad = evaluator.trials_with_grad
        self._left_grads = LeftGradients.at_step_end(params)
        search.forwards += evaluator.forwards
        search.backwards += evaluator.backwards
        search.trials += info.trials
        self._store(search)
        self.last_step = StepInfo(
            **{
                **info.__dict__,
                "forwards": evaluator.forwards,
                "backwards": evaluator.backwards,
                "grad_norm": self._grad_norm,
            }
        )
        return loss

    def _weight_versions(self) -> dict[int, int]:
        """Every parameter's version counter now: torch raises it at each in-place write,
        ``model.load_state_dict`` and ``torch.nn.init`` included (not at writes through
        ``.data``, which autograd does not see either). Under FSDP2 it is the DTensor's own
        counter, which writes to the DTensor raise (its local shard's does not move). An
        inference tensor (a frozen part built under ``torch.inference_mode()``) has none:
        outside inference mode it cannot be written in place, so it has no edit to see."""
        try:
            return {id(p): p._version for group in self.param_groups for p in group["params"]}
        except RuntimeError:  # (an inference tensor among them: looked for only then)
            return {
                id(p): p._version
                for group in self.param_groups
                for p in group["params"]
                if not p.is_inference()
            }

    @torch.no_grad()
    def _adopt_edited_weights(self, edited: set[int] | None = None) -> None:
        """Weights written since this optimizer last left them at ``x`` (a checkpoint loaded
        into the model alone, a re-initialised layer, a projection after each step) are the
        new ``x``: ``z`` restarts there, for the edited parameters, so that ``y`` and the
        average do not pull them back towards where the run had been. Where every parameter
        of a group was edited, its averaging restarts too (``alpha = 1`` at the next step,
        as at a run's first); the search state, Adam's second moments and the step size stay.
        """
        edited = self._edited_weights() if edited is None else edited
        if not edited:
            return
        for group in self.param_groups:
            stepped = [p for p in group["params"] if "z" in self.state.get(p, {})]
            moved = [p for p in stepped if id(p) in edited]
            if not moved:
                continue
            torch._foreach_copy_(
                [local_shard(self.state[p]["z"]) for p in moved],
                [local_shard(p.detach()) for p in moved],
            )
            if len(moved) == len(stepped):
                group["weight_sum"], group["lr_max"] = 0.0, 0.0
        stored = self._stored_entry()
        if stored is not None:
            # (the groups' lr is left as it is: a written lr stays the user's word)
            search = SearchState.from_dict(stored)
            search.watch = None  # it compares losses of weights no longer held
            search.edits += 1
            self._put_entry(search.to_dict())
        self._versions = self._weight_versions()

    @torch.no_grad()
    def _to_gradient_point(self) -> list[_Average]:
        """A copy of every group's weights (the average ``x``), then the weights moved to
        ``y = (1 - beta1) z + beta1 x`` where ``z`` exists (before a parameter's first step
        ``x = z = y``) and the parameter trains: one frozen (``requires_grad=False``) stays
        at ``x``, the value it is evaluated and saved with, while the others train. An
        exception on the way (a copy that cannot be allocated) puts back the groups moved."""
        averages: list[_Average] = []
        try:
            for group in self.param_groups:
                params = [p for p in group["params"] if p.requires_grad or p.grad is not None]
                if not params:
                    continue
                weights = [local_shard(p.detach()) for p in params]
                averages.append(_Average(group, params, weights, detached_copies(weights)))
                moved = [
                    (w, local_shard(self.state[p]["z"]))
                    for p, w in zip(params, weights, strict=True)
                    if p.requires_grad and "z" in self.state.get(p, {})
                ]
                if moved:
                    at, towards = zip(*moved, strict=True)
                    torch._foreach_lerp_(list(at), list(towards), 1.0 - group["betas"][0])
        except BaseException:
            for average in averages:
                average.restore()
            raise
        return averages

    def _check_written_settings(self) -> None:
        """The settings as the groups hold them now (a loop may have written any of them
        since the last step): valid, and the search's the same in every group; else an
        error that names the setting, before anything moves."""
        _check_groups(self.param_groups, normalise=True)
        first = self.param_groups[0]
        for index, group in enumerate(self.param_groups):
            for key in SEARCH_SETTINGS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"param_groups[{index}]['{key}'] = {group[key]!r} differs from "
                        f"param_groups[0]'s {first[key]!r}: ALSALS searches one step size for "
                        f"all parameters, so {key} is one setting for all groups"
                    )

    def _warn_about(self, info: StepInfo, evaluator: ClosureEvaluator) -> None:
        """Warnings for the steps a user must not miss, each once: a skipped step whose loss
        or gradient is not finite, a closure that forgot backward, and a loss that gives no
        parameter a gradient several steps in a row (the steps are all skipped)."""
        if info.kind == "nonfinite":
            if not math.isfinite(info.loss):
                culprit = "the loss"
            elif info.trials:  # finite at y with gradient, not without it where it must be
                culprit = TRIALS_NONFINITE
            else:  # (u = g / sqrt(v): g*g may overflow where g does not)
                culprit = "the gradient (or Adam's second moment g*g, which overflows first)"
            self._warn_once(
                f"nonfinite_{culprit}",
                f"ALSALS: {culprit} is not finite: the step was skipped, and the weights and "
                "Adam's moments left unchanged (where two steps in a row find the loss at y "
                "not finite and it is finite at the average x, z restarts at x). Further "
                "skips are counted in search_state.skipped_nonfinite without warning.",
                RuntimeWarning,
            )
        if info.kind == "zero_grad" and evaluator.backward_forgotten:
            self._warn_once("no_backward", NO_BACKWARD_WARNING.format(name="ALSALS"))
        if evaluator.dropped_gradients is not None:  # (one look: a loop zeroing in place
            self._dropped_looked = True  # stays quiet after it, at no cost per step)
            if evaluator.dropped_gradients:
                self._warn_once(
                    "dropped_gradients", DROPPED_GRADIENTS_WARNING.format(name="ALSALS")
                )
        disconnected = info.kind == "zero_grad" and evaluator.disconnected
        if self._streak("disconnected", disconnected) >= STALL_WARNING_STEPS:
            self._warn_once(
                "disconnected",
                DISCONNECTED_WARNING.format(name="ALSALS", n=STALL_WARNING_STEPS),
            )

    def _warn_about_buffers(self, evaluator: ClosureEvaluator) -> None:
        """Once: modules whose buffers (BatchNorm's running statistics) a trial changed,
        which ``buffers=`` did not protect (checked at the first trial run in training mode)."""
        if evaluator.unprotected_modules is None:
            return
        self._buffers_checked = True
        if evaluator.unprotected_modules:
            modules = ", ".join(evaluator.unprotected_modules)
            message = BUFFERS_WARNING.format(name="ALSALS", modules=modules)
            self._warn_once("buffers", message + (STALE_BUFFERS_HINT if self._buffers else ""))

    def _run(
        self,
        search: SearchState,
        written: str | None,
        loss: Tensor,
        groups: list[_Group],
        squared: Tensor | None,
        evaluator: ClosureEvaluator,
    ) -> tuple[StepInfo, _Move | None]:
        """Everything after the first evaluation but the write: what the step did, and the
        move that ``step()`` writes once nothing else can raise (its warnings included:
        ``-W error`` turns them into exceptions, which must find the state as it was)."""
        device = groups[0].grads[0].device if groups else loss.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        holds = zero if squared is None else zero + 1.0  # (this rank holds gradients)
        loss0, grad_sq_value, held_anywhere, overflow_risk, root_risk, *sums = mean_to_host(
            [
                loss.to(device),
                zero if squared is None else squared,
                holds,
                *self._overflow_risks(groups, squared, zero),
                *self._move_slopes(groups, zero),
            ],
            self._process_group,
            self._rank_marks("ALSALS"),
        )
        averaging, slope = sums[0::2], sums[1::2]
        if not 0.0 < grad_sq_value < math.inf and self._settings["max_grad_norm"] is None:
            # float32's squares underflow to 0 (entries below about 1e-23) or their sum
            # overflows (entries near 1e19, or many near 1e16) where float64's do not:
            # whether the gradient is 0, or finite, decided in float64
            grads = [t for g in groups for t in g.grads]
            counts = [k for g in groups for k in g.counts]
            wide = _squared_norm(grads, counts, torch.float64)
            (grad_sq_value,) = mean_to_host([zero if wide is None else wide], self._process_group)
        if self._settings["max_grad_norm"] is not None:
            self._grad_norm = math.sqrt(grad_sq_value) if grad_sq_value >= 0.0 else math.nan
        nonfinite = not (math.isfinite(loss0) and math.isfinite(grad_sq_value))
        nonfinite = nonfinite or not all(math.isfinite(s) for s in sums)
        nonfinite = nonfinite or (overflow_risk > 0.0 and self._moments_overflow(groups, device))
        # steps in a row whose loss at y is not finite (a GradScaler overflow, a non-finite
        # gradient, is none; any other step ends the row): two restart z at x, in step()
        outside = not math.isfinite(loss0) and search.steps > 0
        after_nonfinite = search.nonfinite_in_a_row > 0  # (the last step's loss at y)
        search.nonfinite_in_a_row = search.nonfinite_in_a_row + 1 if outside else 0
        if nonfinite or (grad_sq_value == 0.0 and held_anywhere == 0.0):
            kind = "nonfinite" if nonfinite else "zero_grad"
            search.skipped_nonfinite += nonfinite
            search.skipped_zero_grad += not nonfinite
            return _info(kind, 0.0, loss0), None
        if written == "zero":  # lr 0 written: no update this step, the step size kept
            return _info("zero_lr", 0.0, loss0), None
        if root_risk > 0.0 and not search.root_first:
            # a gradient this large may take v' / (1 - beta2^t), which u's denominator forms
            # before its square root, past the largest float (u was 0 there, every trial
            # passed with the loss unchanged): from this step on the root comes first, as in
            # torch.optim.Adam (in a run that never had such a gradient, the order it took)
            search.root_first = True
            for g in groups:
                g.u = []  # (freed before its successor is formed)
                clipped = g.clip is not None  # (then moved is a copy of its own: u in its place)
                moved = torch._foreach_mul(g.grads, g.clip) if clipped else g.grads
                g.u = _update_direction(g.group, moved, g.v, g.steps, g.params, True, clipped)
            sums = mean_to_host(self._move_slopes(groups, zero), self._process_group)
            averaging, slope = sums[0::2], sums[1::2]
        h = self._settings
        at_floor = loss0 == h["loss_floor"]  # (at its lower bound: no move along u lowers it)
        if at_floor and grad_sq_value > 0.0:
            # unless the gradient predicts a change the loss's rounding shows at the step
            # size: then the loss at its floor is no minimum (a wrong floor, a critic's 0 at
            # its start; or a loss that does not follow the gradient), and the search judges
            # it as any other (it stalled there, every step cut to 0)
            gamma = min(search.step_size, search.ceiling())
            at_floor = not self._resolved(gamma, loss0, averaging, slope, evaluator.loss_dtype)
        if grad_sq_value == 0.0:
            # A gradient that is exactly 0 (a loss at y that reached 0, or its rounding): no
            # slope to search along, but Schedule-Free's step still moves x towards z (and
            # decays), as Schedule-Free AdamW's would. Skipping it would leave y, and so the
            # zero gradient, where they are for good, with x possibly far behind z.
            gamma = min(search.step_size, search.ceiling())
            if search.steps < h["warmup_steps"]:  # (the ramp's value, as a search's start)
                gamma = min(gamma, self._warmup_ramp(search))
            # no step size that no search has accepted (the user's lr before the first, a
            # written or resumed one), nor any at the loss's lower bound: the averaging move
            # alone (no decay either)
            untested = search.searches == 0 or search.untested_write or search.resume > 0.0
            if untested or written or at_floor:
                gamma = 0.0
            search.steps += 1
            search.steps_since_search += 1
            return _info("zero_grad", gamma, loss0), _Move(gamma, restart=False)
        if not math.isfinite(search.first_loss):
            search.first_loss = loss0
        if h["loss_floor"] is not None and loss0 < h["loss_floor"]:  # (before any write)
            self._warn_once(
                "loss_floor",
                f"ALSALS: the loss {loss0:.6g} is below loss_floor={h['loss_floor']:g}, the "
                "lower bound the Polyak start and cap assume; they are off while it is. Pass "
                "the loss's lower bound (loss_floor=...), or loss_floor=None for neither."
                + UNBOUNDED_LOSS_HINT,
            )
        lead = sum(averaging)
        search.leading += lead > 0.0
        search.trailing += lead < 0.0
        if not (h["cut_retry"] or h["late_retry"]):  # (switched off since a cut armed one)
            search.retry_from = 0.0
        # (a step size no search accepted is never reused untested: resume > 0 searches,
        # but after a search that could judge no trial, at the cadence)
        due = (
            search.searches == 0
            or written
            or (search.resume > 0.0 and not search.idle)
            or after_nonfinite
            or search.steps < h["warmup_steps"]
            or (search.steps < h["initial_searches"] and not search.first_phase_over)
            or search.steps_since_search + 1 >= h["search_interval"]
            or search.retry_from > 0.0
        )
        reused = 0.0 if search.idle else min(search.step_size, search.ceiling())
        result = SearchResult("reuse", reused, 0)
        if due and search.searches == 0:  # the closure at y again must give loss0 again
            (again,) = mean_to_host([evaluator.evaluate()], self._process_group)
            if not math.isfinite(again):  # without gradient only: no trial can be judged
                search.skipped_nonfinite += 1
                return _info("nonfinite", 0.0, loss0, trials=1), None
            message = not_replayed_message("ALSALS", loss0, again)
            if message is not None:
                self._warn_once("replay", message)
        if due:
            # cut_retry, late_retry: whether a cut this search makes is checked on the next
            # batch, and whether it is that check (which may only raise the step size again)
            retrying = search.retry_from > 0.0
            in_first_phase = search.steps < h["initial_searches"] and not search.first_phase_over
            checkable = not (
                search.searches == 0
                or written
                or search.resume > 0.0
                or retrying
                or search.steps < h["warmup_steps"]
            )
            # at the floor no trial can pass (the test asks for a decrease below it): the
            # search ends as one whose moves all left the loss unchanged, without an
            # evaluation (it took max_trials of them at every step)
            trials: list[tuple[float, float]] = []
            result = (
                SearchResult("exhausted", 0.0, 0, unchanged=True)
                if at_floor
                else self._search(
                    search, loss0, groups, averaging, slope, evaluator, written, trials
                )
            )
            self._warn_about_buffers(evaluator)  # (before anything is written)
            ratio, passed = self._overstated_slope(
                loss0, result, trials, averaging, slope, evaluator.loss_dtype
            )
            if math.isfinite(ratio):
                self._slope_overstated = True
                # (where trials moved unprotected buffers, named by the warning before, they
                # may be the cause: said too)
                hint = BUFFERS_MOVED_HINT if "buffers" in self._warned else ""
                params = (p for g in self.param_groups for p in g["params"])
                taken = result.kind == "search"  # (one that lowered the loss by no firm change)
                message = overstated_message("ALSALS", 1.0 / ratio, params, taken)
                self._warn_once("overstated", message + hint)
            elif passed:  # (a search whose trials resolved nothing says nothing either way)
                self._slope_overstated = False
            # cut_retry: a search that set the step size more than EXPANSION below its own
            # start (one batch's cut) makes the next step search again from that start;
            # late_retry: after the first phase, one that set it below its start at all
            search.retry_from = 0.0
            if retrying and result.kind == "search":
                # the larger of the cut and the trial this batch passed (also where only the
                # Polyak bound lowered the retry's start: a pass above the cut refutes it; a
                # second cut below the first leaves the first)
                result = replace(result, sets_step_size=result.step_size >= search.step_size)
            late = h["late_retry"] and not in_first_phase
            least_cut = 1.0 if late else EXPANSION if h["cut_retry"] else math.inf
            # (measured from the start growth gives, where regrowth started higher: a search
            # that backtracked from a doubled start to above it raised the step size)
            usual_start = min(trials[0][0], search.step_size * h["growth"]) if trials else 0.0
            cut = (
                result.kind == "search"
                and result.sets_step_size
                and usual_start > least_cut * result.step_size
            )
            if checkable and cut:
                search.retry_from = trials[0][0]
            if self._streak("loss_unchanged", result.unchanged) >= STALL_WARNING_STEPS:
                # (a search that collapsed far below the run's largest step size is no
                # converged run's, whatever the loss did before)
                # (and a run that never took a step has not converged)
                searched = min(search.step_size, search.resume or math.inf)
                largest = max(g["lr_max"] / g["lr_scale"] for g in self.param_groups)
                healthy = largest > 0 and searched >= COLLAPSE_RATIO * largest
                # (nor one where the gradient predicted a change far above what the loss's
                # dtype resolves: the loss did not follow the weights, it did not converge;
                # not where the weights' own dtype is coarser than float32, whose rounding
                # may swallow such a move whole)
                # (at the floor the step size searched judges what the gradient predicts,
                # not the Polyak bound, which is 0 there or infinite where the averaging
                # move rises: a closure returning 0 whatever its gradient says is no
                # converged run)
                polyak = self._polyak_step(loss0, searched, averaging, slope)
                start = searched if at_floor else min(searched, polyak)
                coarse = all(
                    torch.finfo(p.dtype).eps > torch.finfo(torch.float32).eps
                    for g in groups
                    for p in g.params
                )
                predicted = not coarse and self._resolved(
                    start, loss0, averaging, slope, evaluator.loss_dtype
                )
                followed = search.loss_followed and healthy and not self._slope_overstated
                message = unchanged_message(loss0, search.first_loss, followed, predicted)
                self._warn_once("loss_unchanged", message)
            # (followed: a step a search took lowered the loss; a trial that changed it and was
            # rejected says nothing of the steps taken: a loss whose rounding hides every
            # step, a constant of 1e9 in float32, or a step size of 1e-300, never converged)
            search.loss_followed |= result.kind == "search" and result.decrease > 0.0
            if result.kind == "nonfinite":  # (the step's end puts the weights back at x)
                search.skipped_nonfinite += 1
                search.regrow = False  # (it judged no start)
                return _info(result.kind, 0.0, loss0, result.evaluations), None
        if result.kind != "reuse":
            result = self._after_kept_run(search, result)
        kind, gamma, trials = result.kind, result.step_size, result.evaluations
        # polyak_cap: no step, reused or searched, above this batch's Polyak step
        taken = gamma
        if h["polyak_cap"] and gamma > 0.0:
            taken = max(min(gamma, self._polyak_step(loss0, gamma, averaging, slope)), 0.0)
        if at_floor:
            taken = 0.0
        # (the guard judges the search's step size, not the cap's, which shrinks with the loss)
        searched = gamma if taken > 0.0 else 0.0
        loss_rose, restart = self._watch_loss(search, loss0, searched, evaluator.loss_dtype)
        search.steps += 1
        if kind == "reuse":
            search.steps_since_search += 1
        else:
            search.searches += 1
            search.steps_since_search = 0
            search.untested_write = False
            search.leading = search.trailing = 0
            search.kept += kind == "kept"
            # (searches counts this one already: "after the first" is a second or later)
            settled = kind == "search" and trials == 1 and search.searches > 1
            ending = {"kept": kind == "kept", "settled": kind == "kept" or settled}
            in_warmup = search.steps <= h["warmup_steps"]  # (steps counts this one already)
            search.first_phase_over |= ending.get(h["first_phase"], False) and not in_warmup
            search.exhausted += kind == "exhausted"
            # (a flat loss: nothing to resume; but a resumed search that found only trials
            # its rounding hides resumes again, at the cadence: the step sizes the searches
            # before it rejected stay rejected, not reused untested)
            resumed = search.resume > 0.0
            search.idle = result.idle or (result.unchanged and resumed)
            if kind == "search" or (result.unchanged and not resumed):
                search.resume = 0.0
            elif result.resume > 0.0:
                search.resume = result.resume
            if result.sets_step_size:
                search.step_size = gamma
                search.peak_step_size = max(search.peak_step_size, gamma)
            search.regrow = result.linear
        search.step_size = max(min(search.step_size, search.ceiling()), MIN_STEP_SIZE)
        # (regrowth leads back to no step size above a ceiling the guard or start_rise set,
        # even once it is lifted: they lowered it on the evidence of many batches)
        search.peak_step_size = min(search.peak_step_size, search.ceiling())
        decrease = result.decrease if kind == "search" and taken == gamma else math.nan
        info = _info(kind, taken, loss0, trials, loss_rose, capped=taken < gamma)
        return replace(info, loss_decrease=decrease), _Move(taken, restart)

    def _search(
        self,
        search: SearchState,
        loss0: float,
        groups: list[_Group],
        averaging: list[float],
        slope: list[float],
        evaluator: ClosureEvaluator,
        written: str | None,
        trials: list[tuple[float, float]],
    ) -> SearchResult:
        """Trials from the grown (or Polyak) start down by ``backtrack``, judged by the
        Armijo test of the move of ``y``; nothing is written (each trial's step size and
        loss are appended to ``trials``)."""
        h = self._settings
        c = h["c"]

        def promised(gamma: float) -> float:
            return self._promised(gamma, averaging, slope)

        values: list[float] = []
        # (no difference below the smallest normal number of the loss's dtype: a loss of 0
        # and a subnormal trial are the same loss, at what its rounding resolves)
        tiny = torch.finfo(evaluator.loss_dtype).tiny

        def same(value: float) -> bool:
            return abs(value - loss0) < tiny

        def passes(gamma: float) -> tuple[bool, float]:
            for g in groups:
                g.place(gamma)
            watch = not self._buffers_checked and evaluations == 1
            (value,) = mean_to_host([evaluator.evaluate(watch_buffers=watch)], self._process_group)
            values.append(value)
            trials.append((gamma, value))
            ok = math.isfinite(value) and loss0 - value >= c * promised(gamma)
            return ok, value

        first = search.searches == 0
        # after a search that accepted nothing, the next resumes below its last trial
        resuming = not first and search.resume > 0.0
        if first:
            gamma = search.step_size
        elif resuming:
            gamma = min(search.resume, search.step_size)
        elif search.retry_from > 0.0:  # (cut_retry, late_retry: the search that cut's start)
            gamma = search.retry_from
        else:
            gamma = search.step_size * self._start_factor(search)
        if search.steps < h["warmup_steps"]:  # the ramp to lr: its value at this step
            gamma = self._warmup_ramp(search)
        # no trial above what the weights' dtype can hold (beyond it every trial overflows;
        # over every parameter, not this rank's gradients: the same on every rank)
        params = (p for g in self.param_groups for p in g["params"])
        # (nor one whose decay takes more than the whole of y: gamma lr_scale wd > 1 flips it)
        decay_cap = self._decay_cap()
        largest = min(search.ceiling(), MAX_STEP_SIZE, largest_representable(params), decay_cap)
        gamma = min(gamma, largest)
        # no start above the Polyak step of the linear model
        bound = self._polyak_step(loss0, gamma, averaging, slope)
        # polyak_start="trial": where the bound alone lowered a later search's start and
        # that start passes, the search says nothing about the step size above it
        # (not from a written lr, which no search has accepted: the trial that passes does)
        trusted = not (first or resuming or written)
        # Where the start is no search's (a written lr, a resumed or a first search), a failed
        # trial whose promise P(gamma) is not positive was too small to pay for the averaging
        # move's rise (z trailing x on this batch), not too large: the search climbs by
        # EXPANSION (never above the Polyak step, nor in warm-up) until a trial promises a
        # decrease (from a written lr 17x below the step size, every trial below it failed
        # and the step size stayed at 0 for 127 steps). A start grown from an accepted step
        # size backtracks as before (a climb there jumped it 10-100x on one batch).
        climb_top = gamma if search.steps < h["warmup_steps"] else min(largest, bound)
        outgrown = trusted  # no climb from a trusted start, nor after a positive promise failed
        lowered = trusted and bound < gamma and h["polyak_start"] == "trial"
        # regrowth: a start that is a multiple of the step size (not a retry's, not warm-up's
        # ramp), which the Polyak bound did not lower
        grown = (
            trusted
            and search.retry_from <= 0.0
            and search.steps >= h["warmup_steps"]
            and not bound < gamma
        )
        gamma = max(min(gamma, bound), MIN_STEP_SIZE)
        evaluations = 0
        # A run's first search starts from the user's guess, lr: a start that passes at once
        # (or moves the loss by less than its rounding) says only that lr is not too large,
        # so the search looks upwards first, by EXPANSION per trial and never above the
        # Polyak step, until a trial fails (not during warm-up, whose ramp is a ceiling). A
        # resumed search does the same, up to the step size the failed one started below.
        top = min(bound, MAX_STEP_SIZE if first else search.step_size, decay_cap)
        expanding = (first or resuming) and search.steps >= h["warmup_steps"] and gamma < top
        passed: tuple[float, float] | None = None  # the largest expansion that passed
        rejected = math.inf  # the smallest trial that failed with a loss other than L0

        def averaging_alone() -> str | None:
            """Test the averaging move alone (``gamma = 0``): ``"kept"`` if it fails (no
            step size can pass), ``"nonfinite"`` if its loss is not finite, else ``None``."""
            nonlocal evaluations
            evaluations += 1
            ok, value = passes(0.0)
            if not math.isfinite(value):
                return "nonfinite"
            if len(values) >= UNCHANGED_EVALUATIONS and all(same(v) for v in values):
                return "unchanged"
            return None if ok else "kept"

        checked = first  # at a run's first step x = z = y: there is no averaging move
        # A resumed search, one from a written lr, or one whose first trial was not finite,
        # does not take the last step size where it ends "kept" (untested, and here no
        # search accepted it, or a trial beside it diverged): only the averaging move
        kept_allowed = not resuming and written is None
        if self._decay_outweighs(gamma, slope):
            # The move along u raises the loss to first order: its decay's share outweighs
            # the gradient's (beyond AdamW's equilibrium, g_hat = -wd y). No step size can
            # pass but one the loss's rounding hides, down to which the trials would cut the
            # step size; the loss cannot judge the decay, which AdamW takes untested (at most
            # the whole of y: the cap above). Schedule-Free's move, at the last step size.
            return SearchResult("kept", min(search.step_size, gamma), evaluations)
        while evaluations < h["max_trials"]:
            evaluations += 1
            ok, value = passes(gamma)
            if expanding:
                expanding = (ok or same(value)) and gamma < top
                if expanding:
                    passed = (gamma, loss0 - value) if ok else passed
                    gamma = min(gamma * EXPANSION, top)
                    continue
            if ok:
                sets = not (lowered and evaluations == 1)
                linear = (
                    grown
                    and evaluations == 1
                    and self._passed_as_linear(loss0 - value, promised(gamma))
                )
                return SearchResult(
                    "search", gamma, evaluations, sets, loss0 - value, linear=linear
                )
            if passed is not None:
                # the trial above the largest expansion that passed failed: the bracket
                # narrows to EXPANDED_BRACKET, first where the quadratic fitted to the
                # failure puts the trial, then at its geometric middle; the largest that
                # passed is taken
                failed = gamma
                between = self._next_trial(gamma, loss0 - value, promised)
                if not (math.isfinite(value) and passed[0] < between < failed):
                    between = math.sqrt(passed[0]) * math.sqrt(failed)
                while failed > EXPANDED_BRACKET * passed[0] and evaluations < h["max_trials"]:
                    evaluations += 1
                    ok, value = passes(between)
                    if ok:
                        passed = (between, loss0 - value)
                    else:
                        failed = between
                    between = math.sqrt(passed[0]) * math.sqrt(failed)
                return SearchResult("search", passed[0], evaluations, True, passed[1])
            if len(values) >= UNCHANGED_EVALUATIONS and all(same(v) for v in values):
                # every move gave exactly the starting loss: the closure's loss does not
                # follow the weights (or changes below its rounding); no trial can judge
                return SearchResult("exhausted", 0.0, evaluations, unchanged=True)
            if same(value) and rejected < math.inf:
                # below a trial the loss rejected, one that leaves it exactly as it was: the
                # trials went under what its rounding resolves, where none can judge (they
                # walked on to max_trials, and a later step reused the rejected step size
                # once a search found nothing but such trials). The averaging move alone;
                # the next search resumes from the smallest rejected trial, and where this
                # one was resumed too, the steps until the next at the cadence idle
                return SearchResult("exhausted", 0.0, evaluations, resume=rejected, idle=resuming)
            if math.isfinite(value) and not same(value):
                rejected = min(rejected, gamma)
            kept_allowed = kept_allowed and math.isfinite(value)
            outgrown = outgrown or promised(gamma) > 0.0
            if not outgrown and math.isfinite(value):
                up = min(gamma * EXPANSION, climb_top)
                if up > gamma and promised(up) > promised(gamma):
                    gamma = up
                    continue
            if not checked and evaluations < h["max_trials"]:  # (it counts as a trial)
                checked = True
                ending = averaging_alone()
                if ending == "unchanged":
                    return SearchResult("exhausted", 0.0, evaluations, unchanged=True)
                if ending == "nonfinite":
                    return SearchResult(ending, 0.0, evaluations)
                if ending == "kept":
                    if kept_allowed:
                        return SearchResult(ending, search.step_size, evaluations)
                    # no step size can pass, and the last one is no search's: only the
                    # averaging move, and the next step searches from below this trial
                    below = max(self._next_trial(gamma, loss0 - value, promised), MIN_STEP_SIZE)
                    return SearchResult(ending, 0.0, evaluations, resume=below)
            gamma = self._next_trial(gamma, loss0 - value, promised)
        if passed is not None:  # max_trials ran out while the expansions still passed
            return SearchResult("search", passed[0], evaluations, True, passed[1])
        # No trial passed: taking the last one would leave the run at a step size
        # ~backtrack^max_trials (with the default max_trials, near 0: the search cannot
        # judge there, a gradient that is not the loss's or a loss that rounds), from which
        # growth by 10% per search takes thousands of steps. Only the averaging move is
        # taken (tested where there is one); the step size is kept but not reused: the next
        # step resumes the search below the last trial, looking upwards from there as a
        # run's first search does (max_trials too small for how far lr was off).
        # (gamma is already the trial after the last one)
        return SearchResult("exhausted", 0.0, evaluations, resume=max(gamma, MIN_STEP_SIZE))

    def _overstated_slope(
        self,
        loss0: float,
        result: SearchResult,
        trials: list[tuple[float, float]],
        averaging: list[float],
        slope: list[float],
        loss_dtype: torch.dtype,
    ) -> tuple[float, bool]:
        """Whether the search passed a trial by a change the loss's rounding resolves, and,
        for one that did not, the fraction of its promise ``P(gamma)`` by which its trials
        lowered the loss where the promise overstates the slope (``overstated_fraction``;
        else ``nan``)."""
        resolution = loss_resolution(loss_dtype, loss0)
        passed = result.kind == "search" and result.decrease > FIRM_RISE * resolution
        if passed:
            return math.nan, True
        # (only trials whose promise is the step's along u: where the averaging move's part
        # is a fair share of it, near where the two cancel, the fraction of the promise
        # says nothing about the gradient's scale)
        promised = []
        for gamma, loss in trials:
            moving, stepping = self._promise_parts(gamma, averaging, slope)
            if gamma > 0.0 and abs(moving) <= AVERAGING_SHARE * stepping:
                promised.append((gamma, loss, moving + stepping))
        return overstated_fraction(promised, loss0, self._settings["c"], resolution), False

    def _decay_cap(self) -> float:
        """The largest step size whose decay takes at most the whole of the weights in every
        group, ``min 1 / (lr_scale * weight_decay)`` (``inf`` without decay): beyond it the
        move's decay term ``gamma * lr_scale * weight_decay * y`` overshoots 0 and flips the
        weights, where the AdamW form of the other optimizers caps the decay's factor at 1."""
        # (divided one factor at a time: their product of tiny settings underflows to 0)
        caps = (
            1.0 / g["lr_scale"] / g["weight_decay"] for g in self.param_groups if g["weight_decay"]
        )
        return min(caps, default=math.inf)

    def _decay_outweighs(self, gamma: float, slope: list[float]) -> bool:
        """Whether the move along ``u`` promises no decrease, ``sum lr_scale kappa g.u <= 0``
        (``kappa`` at ``gamma``), where a weight decay takes part: without one ``g.u`` is a sum
        of squares, never below 0."""
        if not any(g["weight_decay"] for g in self.param_groups):
            return False
        total = 0.0
        for group, s in zip(self.param_groups, slope, strict=True):
            alpha = averaging_weight(group, gamma)[0]
            total += group["lr_scale"] * (1.0 - group["betas"][0] * (1.0 - alpha)) * s
        return total <= 0.0

    def _after_kept_run(self, search: SearchState, result: SearchResult) -> SearchResult:
        """Count the searches in a row whose averaging move alone failed the test; with
        ``kept_rule="shrink"``, each that makes the run longer than chance allows (a fair
        coin's ``1/2`` per search, at ``LEAD_TEST_LEVEL``) divides the step size it keeps
        by ``growth``."""
        judged = result.kind == "kept" and result.evaluations > 0  # (not the decay's)
        search.kept_in_a_row = search.kept_in_a_row + 1 if judged else 0
        beyond_chance = trailing_beyond_chance(0, search.kept_in_a_row)  # (lead_rule's test)
        shrinks = self._settings["kept_rule"] == "shrink" and result.step_size > 0.0
        if not (judged and beyond_chance and shrinks):
            return result
        shrunk = result.step_size / self._settings["growth"]
        search.peak_step_size = shrunk  # (a decision of many searches: regrowth's ceiling)
        return replace(result, step_size=shrunk, sets_step_size=True)

    def _start_factor(self, search: SearchState) -> float:
        """The multiple of the last step size a search starts from: ``growth``, or with
        ``lead_rule``, where the batches since the last search show ``z`` trailing ``x``
        beyond chance (a one-sided sign test at ``LEAD_TEST_LEVEL``), ``1`` (``"hold"``)
        or ``1 / growth`` (``"shrink"``). With ``regrowth``, after a search whose first
        trial passed as the linear model promised, up to ``regrowth`` where the step size
        is below the largest a search has set (never above it); a start the lead rule holds
        or shrinks lowers that largest to the step size."""
        rule, growth = self._settings["lead_rule"], self._settings["growth"]
        if rule == "off" or not trailing_beyond_chance(search.leading, search.trailing):
            regrowth = self._settings["regrowth"]
            if regrowth is not None and search.regrow:
                return max(min(regrowth, search.peak_step_size / search.step_size), growth)
            return growth
        # (held or shrunk on the evidence of many batches: regrowth leads back no higher)
        search.peak_step_size = min(search.peak_step_size, search.step_size)
        return 1.0 if rule == "hold" else 1.0 / growth

    def _passed_as_linear(self, decrease: float, promise: float) -> bool:
        """``regrowth``'s test of a first trial that passed: its decrease at least
        ``1 - (1 - c) / regrowth^2`` of the promise. Along a quadratic slice
        ``f(gamma) = f - s gamma + h gamma^2 / 2`` the share is ``1 - h gamma / (2 s)``, and
        the test's limit ``2 (1 - c) s / h`` lies ``(1 - c) / (1 - share)`` times above the
        trial: at least ``regrowth^2`` times here, so a start ``regrowth`` times higher
        is still ``regrowth`` times below it."""
        regrowth = self._settings["regrowth"]
        if regrowth is None or not promise > 0.0:
            return False
        # (a product, not ** 2: a huge regrowth overflows a float power)
        return decrease >= (1.0 - (1.0 - self._settings["c"]) / regrowth / regrowth) * promise

    def _promised(self, gamma: float, averaging: list[float], slope: list[float]) -> float:
        """``g . (y - y')``: the decrease the gradient promises for the move of size
        ``gamma`` (``averaging`` and ``slope``: each group's ``g . (y - z)`` and ``g . u``)."""
        return sum(self._promise_parts(gamma, averaging, slope))

    def _promise_parts(
        self, gamma: float, averaging: list[float], slope: list[float]
    ) -> tuple[float, float]:
        """The promise's two parts: the averaging move's (``y`` towards ``z``) and the step's
        along ``u``."""
        moving = stepping = 0.0
        for group, a, s in zip(self.param_groups, averaging, slope, strict=True):
            alpha = averaging_weight(group, gamma)[0]
            kappa = 1.0 - group["betas"][0] * (1.0 - alpha)
            moving += alpha * a
            stepping += gamma * group["lr_scale"] * kappa * s
        return moving, stepping

    def _resolved(
        self,
        gamma: float,
        loss0: float,
        averaging: list[float],
        slope: list[float],
        loss_dtype: torch.dtype,
    ) -> bool:
        """Whether the move at step size ``gamma`` promises a change of the loss that its
        rounding shows: more than ``UNRESOLVED_ULPS`` epsilons of ``loss_dtype`` times
        ``max(|L0|, 1)``."""
        resolution = UNRESOLVED_ULPS * torch.finfo(loss_dtype).eps * max(abs(loss0), 1.0)
        return abs(self._promised(gamma, averaging, slope)) > resolution

    def _polyak_step(
        self, loss0: float, gamma: float, averaging: list[float], slope: list[float]
    ) -> float:
        """The step size where the linear model of the move (its averaging weight that of
        ``gamma``) reaches ``loss_floor``; ``inf`` without a floor, or where the model does
        not reach it (the averaging move alone promises the whole height, or no decrease)."""
        floor = self._settings["loss_floor"]
        if floor is None:
            return math.inf
        at_zero = self._promised(0.0, averaging, slope)
        per_unit = (self._promised(gamma, averaging, slope) - at_zero) / gamma
        height = loss0 - floor - at_zero
        if not (height > 0.0 and per_unit > 0.0):
            return math.inf
        return height / per_unit

    def _next_trial(self, gamma: float, decrease: float, promised: Any) -> float:
        """The trial after a rejected ``gamma`` whose loss fell by ``decrease``:
        ``backtrack * gamma``, or with ``interpolate`` the first of ``gamma * backtrack^j``
        not above the step size where a quadratic model of the loss passes the test (the
        promise less ``k gamma^2 / 2``, ``k`` fitted to the trial), but no lower than
        ``INTERPOLATION_FLOOR * gamma``: the same grid as plain backtracking, in fewer
        trials."""
        h = self._settings
        nxt = gamma * h["backtrack"]
        if h["interpolate"] and math.isfinite(decrease):
            at_zero, at_gamma = promised(0.0), promised(gamma)
            slope = (at_gamma - at_zero) / gamma
            curvature = 2.0 * ((at_gamma - decrease) / gamma) / gamma
            keep = 1.0 - h["c"]  # the share of the promise the test leaves for curvature
            lead = keep * slope  # (a product, not ** 2: a huge slope gives inf, not an error)
            disc = lead * lead + 2.0 * curvature * keep * at_zero
            if curvature > 0.0 and disc >= 0.0:
                predicted = (lead + math.sqrt(disc)) / curvature
                floor = gamma * INTERPOLATION_FLOOR
                while nxt > predicted and nxt * h["backtrack"] >= floor:
                    nxt *= h["backtrack"]
        return max(nxt, MIN_STEP_SIZE)

    def _watch_loss(
        self, search: SearchState, loss0: float, gamma: float, loss_dtype: torch.dtype
    ) -> tuple[bool, bool]:
        """``loss_rise_guard`` and ``start_rise`` with this step's loss and step size:
        whether either acted, and whether ``z`` restarts at ``x`` (``rise_restart``). Where
        the loss average rose while the step size grew, the step size gets a ceiling
        (``MomentumALSALS``'s rule); where it rose measurably above the run's start level,
        one at half the step size (``start_rise``, once per rise); where either rose and
        ``rise_restart`` is on, ``z`` restarts. Each watch's average starts afresh after it
        acts."""
        guard = self._settings["loss_rise_guard"]
        if guard is None:  # (off, or written off: no ceiling of it stands)
            search.drop_watches()
            return False, False
        # (with warm-up, the first steps' step sizes are the ramp's: no start level)
        fresh = LossWatch(from_start=not self._settings["warmup_steps"])
        watch = LossWatch.from_stored(search.watch) if search.watch else fresh
        watch = watch.after(loss0, gamma)
        resolution = loss_resolution(loss_dtype, watch.mean())
        # A ceiling is lifted where the loss average falls measurably below the lowest it
        # guarded, or where the watch begun under it (each ceiling starts it afresh) finds
        # the loss average, at its lowest, measurably above the level that set the
        # ceiling: with the step size back at most where the loss was lowest the loss went
        # on rising, so the rise was not the step size's doing (the data or the objective
        # changed) and the ceiling has no ground; a new one needs a new rise.
        ceiling = search.step_size_ceiling
        if ceiling < math.inf and watch.lifts(
            search.ceiling_loss, search.ceiling_rise, guard, resolution
        ):
            if watch.stayed_above(search.ceiling_rise, guard, resolution):
                # new data: start_rise's start level goes with it (and any ceiling of it)
                search.drop_start_watch()
            search.step_size_ceiling, search.ceiling_loss = math.inf, 0.0
            search.ceiling_rise = math.inf
        # (at its first judgment of a step that moved: also against the start level)
        judged, watch = watch.look(moved=gamma > 0.0)
        risen = judged.risen(guard, resolution)
        sets_ceiling = risen and gamma > 0.0 and judged.grew()
        if sets_ceiling:
            search.step_size_ceiling = min(search.step_size_ceiling, judged.step_size_at_lowest)
            search.ceiling_loss = judged.lowest
            search.ceiling_rise = judged.mean()
        restart = risen and self._settings["rise_restart"]
        if sets_ceiling or restart:
            search.restarts += restart
            watch = LossWatch(from_start=False)
        search.watch = dict(vars(watch))  # (flat: asdict's deep copy costs 8 us a step)
        # (after the guard's own rule: while a ceiling of it stands, the rise is in hand)
        cut = self._watch_start(search, loss0, gamma, guard, resolution)
        cut_restart = cut and not restart and self._settings["rise_restart"]
        search.restarts += cut_restart
        return sets_ceiling or restart or cut, restart or cut_restart

    def _watch_start(
        self,
        search: SearchState,
        loss0: float,
        gamma: float,
        standard_errors: float,
        resolution: float,
    ) -> bool:
        """``start_rise`` with this step's loss: whether it cut the step size. Where the
        loss average lies measurably above the run's start level (and no ceiling of the
        guard's own stands: the rise is in hand there), the step size gets a ceiling at
        ``START_CUT`` of its value, once: the rule cuts again only after the loss average
        has come measurably below the start level, which also lifts the ceiling; so does
        one horizon of the guard's watch (``WATCH_SAMPLES`` finite losses) under it."""
        if not self._settings["start_rise"]:  # (off, or written off: no ceiling of it stands)
            search.drop_start_watch()
            return False
        start = StartWatch(**search.start_watch) if search.start_watch else StartWatch()
        start = start.after(loss0)
        if start.recovered(standard_errors, resolution):
            search.start_ceiling = math.inf
            start = start.rearmed()
        elif start.expired():
            search.start_ceiling = math.inf
            start = replace(start, held=-1)
        unguarded = search.step_size_ceiling == math.inf
        cut = gamma > 0.0 and unguarded and start.rose(standard_errors, resolution)
        if cut:
            search.start_ceiling = min(search.start_ceiling, search.step_size * START_CUT)
            start = start.cut()
        search.start_watch = dict(vars(start))
        return cut

    # ------------------------------------------------------------------------------ helpers

    def _gather(
        self, averages: list[_Average], root_first: bool
    ) -> tuple[list[_Group], Tensor | None]:
        """This step's tensors per group (``grad`` set; the local shards under FSDP2, the
        copies of ``x`` from ``averages``), with
        ``u`` computed, and the squared norm of the gradients (float64, on the
        device, each shard counted once per rank it is split over so that the mean over
        ranks is the total; ``None`` without any); nothing is written to the state."""
        taking_part = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    "ALSALS does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                    "use dense gradients"
                )
            if params:
                check_eps("ALSALS", group["eps"], params)
                grads = [local_shard(p.grad) for p in params]
                taking_part.append((group, params, grads, [shard_count(p) for p in params]))
        all_grads = [g for _, _, grads, _ in taking_part for g in grads]
        all_counts = [k for *_, counts in taking_part for k in counts]
        # in float32 (on CPU a tenth of float64's cost) but where clipping scales the
        # gradients by it; _run decides again in float64 where float32's is 0 or not finite
        clipping = self._settings["max_grad_norm"] is not None
        squared = _squared_norm(all_grads, all_counts, torch.float64 if clipping else torch.float32)
        sharded = any(k > 1 for k in all_counts)
        scale = self._clip_scale(squared, sharded) if all_grads else None
        copies = {id(p): x for a in averages for p, x in zip(a.params, a.x, strict=True)}
        for group, params, _, _ in taking_part:  # (a gradient train() found no parameter for)
            for p in params:
                if id(p) not in copies:
                    average = next((a for a in averages if a.group is group), None)
                    if average is None:
                        average = _Average(group, [], [], [])
                        averages.append(average)
                    copies[id(p)] = average.add(p)
        groups = []
        for group, params, grads, counts in taking_part:
            # the update's gradient: clipped with max_grad_norm (the test's slope is not)
            moved = grads if scale is None else torch._foreach_mul(grads, scale)
            z_state, v_state, steps = [], [], []
            for p in params:
                state = self.state.get(p, {})  # (no entry before the step commits)
                z_state.append(state["z"] if "z" in state else p.detach().clone())
                v_state.append(
                    state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(p)
                )
                steps.append(int(state.get("step", 0)) + 1)
            z = [local_shard(t) for t in z_state]
            v = [local_shard(t) for t in v_state]
            weights = [local_shard(p.detach()) for p in params]
            # (the clipped gradients are this step's own copy: u takes their place)
            u = _update_direction(group, moved, v, steps, weights, root_first, scale is not None)
            del moved
            x = [copies[id(p)] for p in params]
            groups.append(
                _Group(
                    group,
                    weights,
                    grads,
                    z,
                    x,
                    scale,
                    u,
                    steps,
                    counts,
                    params,
                    z_state,
                    v_state,
                    v,
                )
            )
        return groups, squared

    def _move_slopes(self, groups: list[_Group], zero: Tensor) -> list[Tensor]:
        """Per parameter group ``g . (y - z)`` and ``g . u``, the slopes of the move's two
        parts (0 where this rank holds none of its gradients: every rank issues the same
        collective whatever its local gradients), on the device."""
        by_group = {id(g.group): g for g in groups}
        terms = []
        for group in self.param_groups:
            g = by_group.get(id(group))
            terms += (
                [_dot_sum(g.grads, g.params, g.counts, g.z), _dot_sum(g.grads, g.u, g.counts)]
                if g
                else [zero] * 2
            )
        return [t.to(zero.device) for t in terms]

    @staticmethod
    def _overflow_risks(groups: list[_Group], squared: Tensor | None, zero: Tensor) -> list[Tensor]:
        """Two flags on the device, 1 where this rank's ``||g||^2`` exceeds a quarter of the
        largest value that its gradients' dtypes hold, else 0: (a) over all of them: below
        that no entry's square overflows Adam's second moment, which ``_moments_overflow``
        then checks; (b) over those but float16 (whose bias correction is taken after the
        square root anyway): below that ``v' / (1 - beta2^t)`` cannot overflow where the
        division comes first (``root_first``). Averaged over the ranks with the step's
        other sums, so that every rank takes the same branches (each a synchronisation)."""
        if squared is None:
            return [zero, zero]
        dtypes = {t.dtype for g in groups for t in g.grads}
        limits = {dtype: torch.finfo(dtype).max for dtype in dtypes}
        wide = [m for dtype, m in limits.items() if dtype != torch.float16]
        return [
            (squared > min(found) / 4).to(zero.dtype) if found else zero
            for found in (list(limits.values()), wide)
        ]

    def _moments_overflow(self, groups: list[_Group], device: torch.device) -> bool:
        """Whether Adam's ``v' = beta2 v + (1 - beta2) g^2`` holds an inf on any rank: ``g*g``
        overflows where ``g`` does not, and ``u = g / sqrt(v')`` is then 0 there for good (z
        would stop while the averaging moves x to it). Run on every rank where one found a
        risk (``_overflow_risks``)."""
        moments = [v for g in groups for v in g.new_moments()]
        return any_not_finite(moments, device, self._process_group)

    def _clip_scale(self, squared_norm: Tensor, sharded: bool) -> Tensor | None:
        """``max_grad_norm``'s factor ``min(1, max / (||g|| + 1e-6))`` as
        ``torch.nn.utils.clip_grad_norm_`` computes it (the norm over every parameter, in
        float64; each gradient multiplied by it in its own dtype), on the device: no host
        synchronisation (under FSDP2 the shards' norm is
        averaged over the ranks on the device first). ``None`` without clipping."""
        limit = self._settings["max_grad_norm"]
        if limit is None:
            return None
        if sharded:
            squared_norm = mean_on_device(squared_norm, self._process_group)
        return (limit / (squared_norm.sqrt() + 1e-6)).clamp(max=1.0)

    def _commit(self, groups: list[_Group], gamma: float, restart: bool) -> None:
        """Write ``z' = z - gamma u``, ``v``, ``t`` and the averaging weights of a step of size
        ``gamma``, and turn the copies of ``x`` into ``x' = (1 - alpha) x + alpha z'`` (the
        step's end writes them into the weights); with ``restart``, ``z'`` is then set to
        ``x'`` (for the parameters this step moved). Every group's averaging weights
        advance, also where this rank holds no gradient for it: they must stay equal on
        every rank."""
        fresh = []
        for g in groups:
            g.origin = None  # (the trials are over: y is not needed again)
            # v' allocated before anything is written (an allocation that fails leaves the
            # state as it was), and formed there where unclipped; u, spent once z has
            # moved, holds the clipped gradients the others need
            clipped = g.clip is not None
            fresh.append(
                torch._foreach_mul(g.v, g.group["betas"][1]) if clipped else g.new_moments()
            )
        for g, v_new in zip(groups, fresh, strict=True):
            torch._foreach_add_(g.z, g.u, alpha=representable(-gamma * g.group["lr_scale"], g.z))
            torch._foreach_lerp_(g.x, g.z, averaging_weight(g.group, gamma)[0])
            if restart:
                torch._foreach_copy_(g.z, g.x)
            if g.clip is not None:  # (v' completed in u's place)
                g.add_squared_gradients(v_new, scratch=g.u)
            held = zip(g.owners, g.z_state, g.v_state, v_new, g.steps, strict=True)
            for p, z, v_held, v, t in held:
                if local_shard(v_held) is not v_held:  # a DTensor (FSDP2): keep its wrapper
                    local_shard(v_held).copy_(v)
                    v = v_held
                state = self.state[p]
                state["z"], state["exp_avg_sq"], state["step"] = z, v, t
        for group in self.param_groups:
            _, lr_max, weight = averaging_weight(group, gamma)
            group["lr_max"] = lr_max
            group["weight_sum"] += weight

    def _adopt_written_lr(self, search: SearchState) -> str | None:
        """A group ``lr`` that differs from the one the last step showed (the searched step
        size times the group's ``lr_scale`` then) sets the step size where the next search
        starts, and makes it due (the first such group): ``"set"``; a written 0 in any group
        (as ``CosineAnnealingLR`` writes at its end): ``"zero"``, this step takes no update and
        the step size is kept; ``None`` when nothing was written. A changed ``lr_scale``
        alone is not a write."""
        written = written_lr(self.param_groups, self._shown_lr, search.step_size, MAX_STEP_SIZE)
        if written is None:
            return None
        lr, group = written
        if lr == 0.0:
            return "zero"
        search.step_size = max(lr / group["lr_scale"], MIN_STEP_SIZE)
        search.resume = 0.0  # the user's step size: searched from, as at a written lr
        search.retry_from = 0.0
        search.regrow, search.peak_step_size = False, 0.0  # (no search set it yet)
        search.untested_write = True
        search.drop_watches()
        return "set"

    def _warmup_ramp(self, search: SearchState) -> float:
        """The warm-up ramp's value at this step: ``peak * (k + 1) / warmup_steps``."""
        return self._warmup_peak(search) * (search.steps + 1) / self._settings["warmup_steps"]

    def _warmup_peak(self, search: SearchState) -> float:
        """The ``lr`` the warm-up ramps to: the run's, as its state recorded it (a run
        resumed into an optimizer built with another ``lr`` keeps its own ramp)."""
        peak = search.initial_step_size
        return peak if math.isfinite(peak) else self.defaults["lr"]

    def _finite_at_average(self, averages: list[_Average], evaluator: ClosureEvaluator) -> bool:
        """Whether the closure's loss at ``x`` (one evaluation without gradient, averaged over
        the ranks) is finite; the weights are left at ``x``."""
        for average in averages:
            average.restore()
        (value,) = mean_to_host([evaluator.evaluate()], self._process_group)
        return math.isfinite(value)

    @torch.no_grad()
    def _restart_at_average(self, averages: list[_Average]) -> None:
        """``z := x`` for every parameter that has stepped (then ``y = x``), whether or not
        this step found a gradient for it."""
        for group in self.param_groups:
            held = {
                id(p): x
                for average in averages
                if average.group is group
                for p, x in zip(average.params, average.x, strict=True)
            }
            for p in group["params"]:  # (one not held, frozen since it stepped, is at x)
                if "z" in self.state.get(p, {}):
                    x = held.get(id(p), local_shard(p.detach()))
                    local_shard(self.state[p]["z"]).copy_(x)

    def _placeholder_entries(self, p: Tensor) -> dict[str, Any]:
        return {"z": p.detach().clone(), "exp_avg_sq": torch.zeros_like(p), "step": 0}

    @property
    def search_state(self) -> SearchState:
        """The search's counters and step size, as stored."""
        return self._stored_search_state()


def _unknown_arguments(unknown: dict[str, Any]) -> TypeError:
    """The error for keyword arguments ``ALSALS`` does not take, naming ``MomentumALSALS``
    where they are its own."""
    ours = set(inspect.signature(ALSALS.__init__).parameters)
    theirs = set(inspect.signature(MomentumALSALS.__init__).parameters) - ours
    momentum = sorted(k for k in unknown if k in theirs)
    if momentum:
        listed = ", ".join(momentum)
        return TypeError(
            f"ALSALS got {listed}: argument(s) of MomentumALSALS, the paper's ALSALS along "
            "Adam's momentum direction. ALSALS(params) searches the step size of Schedule-Free "
            f"AdamW's dynamics instead; for the paper's dynamics use MomentumALSALS(params, "
            f"{momentum[0]}=...) (or ALSALS.paper(params) for the paper's exact configuration)"
        )
    return TypeError(f"ALSALS got an unexpected keyword argument {sorted(unknown)[0]!r}")


def trailing_beyond_chance(leading: int, trailing: int) -> bool:
    """Whether ``trailing`` of ``leading + trailing`` signs is more than chance allows: the
    probability of at least that many under a fair coin is at most ``LEAD_TEST_LEVEL``."""
    n = leading + trailing
    if n == 0 or 2 * trailing <= n:  # (at most half: the tail is at least 1/2)
        return False
    # In integers (2.0**n overflows a float from n = 1024, a long full-batch run's kept
    # searches in a row), term by term from the largest, each from the last, stopping once
    # the tail is past the level: linear in n, not quadratic as a sum of math.comb's.
    level = Fraction(LEAD_TEST_LEVEL)
    allowed = level.numerator * 2**n
    term, tail = math.comb(n, trailing), 0
    for k in range(trailing, n + 1):
        tail += term
        if tail * level.denominator > allowed:
            return False
        term = term * (n - k) // (k + 1)
    return True


def _checked_search_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The search's settings (``SEARCH_SETTINGS``) checked, each error naming its setting."""

    def optional(name: str, low: float, closed: bool) -> float | None:
        value = values[name]
        return None if value is None else in_range(name, value, low, closed_low=closed)

    return {
        "c": in_range("c", values["c"], 0.0, 1.0, closed_low=False),
        "growth": in_range("growth", values["growth"], 1.0, closed_low=True),
        "backtrack": in_range("backtrack", values["backtrack"], 0.0, 1.0, closed_low=False),
        "interpolate": flag("interpolate", values["interpolate"]),
        "max_trials": integer("max_trials", values["max_trials"], 1),
        "initial_searches": integer("initial_searches", values["initial_searches"], 1),
        "first_phase": _choice("first_phase", values["first_phase"], FIRST_PHASES),
        "search_interval": integer("search_interval", values["search_interval"], 1),
        "lead_rule": _choice("lead_rule", values["lead_rule"], LEAD_RULES),
        "kept_rule": _choice("kept_rule", values["kept_rule"], KEPT_RULES),
        "cut_retry": flag("cut_retry", values["cut_retry"]),
        "late_retry": flag("late_retry", values["late_retry"]),
        "regrowth": optional("regrowth", 1.0, True),
        "polyak_start": _choice("polyak_start", values["polyak_start"], ("sets", "trial")),
        "loss_floor": loss_floor(values["loss_floor"]),
        "polyak_cap": flag("polyak_cap", values["polyak_cap"]),
        "max_grad_norm": optional("max_grad_norm", 0.0, False),
        "loss_rise_guard": optional("loss_rise_guard", 0.0, False),
        "rise_restart": flag("rise_restart", values["rise_restart"]),
        "start_rise": flag("start_rise", values["start_rise"]),
        "warmup_steps": integer("warmup_steps", values["warmup_steps"], 0),
    }


def _check_groups(groups: list[dict[str, Any]], where: str = "", normalise: bool = False) -> None:
    """Every group's settings checked (the search's in the first, which holds them for
    all), each error naming ``{where}param_groups[i]`` and the setting; with ``normalise``
    the groups then hold them as plain Python numbers (a numpy or tensor value written into
    a group would otherwise reach the state dict, which ``weights_only`` loading refuses)."""
    for index, group in enumerate(groups):
        try:
            search = (  # (the first group holds them for all; the others must equal them)
                _checked_search_settings({key: group[key] for key in SEARCH_SETTINGS})
                if index == 0
                else {}
            )
            settings = _group_settings(group)
            lr = in_range("lr", group["lr"], 0.0, MAX_STEP_SIZE, closed_low=True)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}param_groups[{index}]: {error}") from None
        if normalise:
            group.update(search, **settings, lr=lr)


def _group_settings(group: dict[str, Any]) -> dict[str, Any]:
    """A group's own settings (``betas``, ``eps``, ``weight_decay``, ``lr_scale``) checked,
    as plain floats."""
    betas = group["betas"]
    if isinstance(betas, Tensor) or not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"invalid betas: {betas!r} (expected (beta1, beta2))")
    return {
        "betas": (
            in_range("betas[0]", betas[0], 0.0, 1.0, closed_low=True),
            in_range("betas[1]", betas[1], 0.0, 1.0, closed_low=True),
        ),
        "eps": in_range("eps", group["eps"], 0.0, closed_low=False),
        "weight_decay": in_range("weight_decay", group["weight_decay"], 0.0, closed_low=True),
        "lr_scale": in_range("lr_scale", group["lr_scale"], 0.0, MAX_STEP_SIZE, closed_low=False),
    }


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r} (expected one of {', '.join(choices)})")
    return value


def _update_direction(
    group: dict[str, Any],
    moved: list[Tensor],
    v: list[Tensor],
    steps: list[int],
    weights: list[Tensor],
    root_first: bool,
    in_place: bool,
) -> list[Tensor]:
    """``u = g / (sqrt(v' / (1 - beta2^t)) + eps) + weight_decay * w`` of one group, ``g``
    the update's (clipped) gradients ``moved``, ``v`` Adam's second moment before this
    step; with ``in_place``, ``u`` takes the place of ``moved``. ``v'`` becomes the
    denominator in place: only ``u`` outlives this (``v'`` is formed again at the commit,
    the same bits, rather than held through the trials)."""
    beta2 = group["betas"][1]
    denominators = torch._foreach_mul(v, beta2)
    torch._foreach_addcmul_(denominators, moved, moved, 1.0 - beta2)
    corrections = [1.0 - beta2**t for t in steps]
    _square_roots_of_v_hat_(denominators, corrections, root_first)
    torch._foreach_add_(denominators, group["eps"])
    if in_place:
        torch._foreach_div_(moved, denominators)
        u = moved
    else:
        u = torch._foreach_div(moved, denominators)
    del denominators
    if group["weight_decay"]:
        torch._foreach_add_(u, weights, alpha=group["weight_decay"])
    return u


def _square_roots_of_v_hat_(v: list[Tensor], corrections: list[float], root_first: bool) -> None:
    """``v_i <- sqrt(v_i / corrections_i)`` in place; for float16, and for every dtype with
    ``root_first``, ``sqrt(v_i) / sqrt(corrections_i)``, torch.optim.Adam's order:
    ``v / (1 - beta2^t)`` overflows float16 from a gradient entry of 256 at ``t = 1``, and
    float32 from one near 1.9e19 (where ``(1 - beta2) g^2`` holds), where the square roots
    hold. (Not the default order for the other dtypes: the runs it took stay bit for bit.)"""
    other = [] if root_first else [i for i, t in enumerate(v) if t.dtype != torch.float16]
    if other:
        found = [v[i] for i in other]
        torch._foreach_div_(found, [corrections[i] for i in other])
        torch._foreach_sqrt_(found)
    for i, t in enumerate(v):
        if root_first or t.dtype == torch.float16:
            t.sqrt_().div_(math.sqrt(corrections[i]))


def _squared_norm(grads: list[Tensor], counts: list[int], at_least: torch.dtype) -> Tensor | None:
    """``||g||^2`` on the device, float64, the norms taken in ``at_least`` or the gradients'
    dtype if wider; each shard counted ``counts[i]`` times, so that the mean over ranks is
    the total (FSDP2). ``None`` without any."""
    if not grads:
        return None
    norms = float64_vector(wide_norms(grads, at_least), grads[0].device)
    return scaled(norms**2, counts).sum()


def _dot_sum(
    a: list[Tensor], b: list[Tensor], counts: list[int], minus: list[Tensor] | None = None
) -> Tensor:
    """``sum_i a_i . (b_i - minus_i)`` on the device, in float64 (one temporary at a time);
    a tensor sharded over ``counts[i]`` ranks counts that many times, so that the mean over
    ranks is the sum over its shards (FSDP2)."""
    with torch.no_grad():
        if minus is None:
            dots = wide_dots(a, b)
        else:
            dots = [wide_dot(x, y - m) for x, y, m in zip(a, b, minus, strict=True)]
    return scaled(float64_vector(dots, dots[0].device), counts).sum()


def _info(
    kind: str,
    step_size: float,
    loss: float,
    trials: int = 0,
    loss_rose: bool = False,
    capped: bool = False,
) -> StepInfo:
    return StepInfo(
        kind=kind,
        step_size=step_size,
        loss=loss,
        trials=trials,
        forwards=0,
        backwards=0,
        slope=math.nan,
        loss_decrease=math.nan,
        grad_norm=math.nan,
        capped=capped,
        loss_rose=loss_rose,
    )
