"""The Polyak cap: no update larger than the Polyak step on a model of the loss (``loss_floor``).

A line search on the mini-batch takes about the step the batch's curvature allows. Where the
gradient noise dominates, that step is too large for the expected loss: the run stalls at a
noise floor (a noisy tabular problem, fine-tuning) that a decaying learning rate would go
below. MoMo (Schaipp, Ohana, Eickenberg, Defazio & Gower, ICML 2024) bounds each step by the
Polyak step on a model built from past batches,

    h(w)  = sum_j rho_j [f_j(w_j) + g_j . (w - w_j)]      (rho: Adam's beta1 EMA weights)
    eta  <= (h(w_k) - f*) / (m_hat . u)                  (u: the update per unit step)

with ``f*`` a lower bound on the loss (``loss_floor``; 0 for cross-entropy and squared
errors). Where the recent linear models agree with the loss, ``h`` is close to it and the
bound is loose; where the batches' gradients disagree (noise), the moves they caused make
``h`` fall below the loss and the bound tightens, and it shrinks with ``f - f*`` as the loss
approaches its floor. Here the bound caps the step size the search found (the search's own
``eta`` is kept for the next search): MoMo with the line search in place of its learning
rate. With ``beta1 = 0`` (SLS, no momentum) the model is the batch's linearisation and the
bound is the batch's Polyak step ``(L0 - f*) / ||g||^2``.

In Adam's notation ``m' = beta1 m + (1 - beta1) g`` is the raw momentum (MoMo's ``d_k``),
``h(w_k) = L_avg + w_k . m' - gamma`` with ``L_avg`` and ``gamma`` the EMAs (factor
``beta1``, no bias correction) of the batch losses and of ``w_j . g_j``; with
``b1 = 1 - beta1^k`` the cap is ``eta <= b1 (h - b1 f*) / sum_groups lr_scale m' . m' /
(sqrt(v_hat') + eps)``. The three sums this step adds are reduced on the device and reach
the host with the step's first synchronisation.

A wrong floor (a loss that can go below ``f*``: a Gaussian negative log-likelihood, a loss
with a negative constant) would stall the run at ``f*``: the Polyak step shrinks with
``f - f*`` while the gradient does not, so the loss creeps up to the floor and never crosses
it, and nothing warns. :func:`floor_word` reads each search's trials for the evidence
(the search state counts it); after ``FLOOR_HITS`` searches in a row the floor is taken to
be wrong and the cap, and the Polyak start that uses the same floor, are off for the rest
of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from alsals.directions import GroupStep, denominators_after, float64_vector, scaled, wide_dots

#: Searches in a row whose trials showed a loss below the floor before the run stops using it.
FLOOR_HITS = 3
#: A trial at the Polyak step ``(L0 - f*) / s`` that ends closer to ``f*`` than this fraction
#: of ``L0 - f*`` makes the floor suspect (a trial at twice the step then decides). Where
#: ``f*`` is right, a slice that is quadratic down to its minimum (at ``f*`` or above) ends
#: at least 1/4 of the way above it, an exponential tail (cross-entropy near 0) 1/e; a loss
#: that falls straight through a wrong floor ends a vanishing fraction above it (its
#: curvature term, ``O(eta^2)``).
FLOOR_HIT_FRACTION = 1.0 / 64.0


def floor_word(
    loss0: float, trial_loss: float, floor: float, resolution: float, at_polyak_step: bool
) -> str | None:
    """What a trial of a search (its loss ``trial_loss``) says of the floor ``f*``:
    ``"below"`` (it is wrong), ``"near"`` (suspect), ``"holds"``, or ``None`` (nothing: the
    loss is at the floor within ``resolution`` and the trial not below it, the loss is below
    the floor already, which its own warning reports, or the trial is not finite).

    A trial below the floor by more than the loss's rounding is direct evidence. A trial at
    the Polyak step (``at_polyak_step``) that ends within ``FLOOR_HIT_FRACTION`` of the
    height ``L0 - f*`` above the floor is the mark of a loss that would go on through it,
    but also of a piecewise-linear loss whose kink is at the floor (an L1 fit of one sample):
    a trial at twice the Polyak step tells them apart (below the floor, or back up).
    """
    height = loss0 - floor
    if not math.isfinite(trial_loss) or height < -resolution:  # (a loss below it says so)
        return None
    above = trial_loss - floor
    if above < -resolution:  # (also from a loss at the floor: a critic's 0 at its start)
        return "below"
    if not height > resolution:
        return None
    return "near" if at_polyak_step and above < FLOOR_HIT_FRACTION * height else "holds"


@dataclass(frozen=True)
class ModelTerms:
    """This step's sums over all parameters (and ranks, shards counted once each)."""

    weights_dot_grad: float  # w_k . g_k
    weights_dot_momentum: float  # w_k . m'
    momentum_norm: float  # sum lr_scale m' . P m'  (the slope of the update along m')


def model_terms(steps: list[GroupStep], uses_moments: bool, device: torch.device) -> list[Tensor]:
    """``[w . g, w . m', sum lr_scale m' . P m']`` as float64 device scalars (no host sync);
    without moments ``m' = g`` and ``P = 1``. A parameter sharded over ``k`` ranks counts
    ``k`` times, so that the mean over ranks is the sum over shards.

    ``m' = beta1 m + (1 - beta1) g`` is not built: with ``P = 1 / (sqrt(v_hat') + eps)``,
    ``m' . P m' = beta1^2 m.Pm + 2 beta1 (1 - beta1) g.Pm + (1 - beta1)^2 g.Pg`` and
    ``w . m' = beta1 w.m + (1 - beta1) w.g``, from two multi-tensor passes that each hold
    one parameter-sized buffer (``Pm``, then ``Pg``): a step that reuses its step size
    holds no more memory than Adam's. Each tensor's dot products are taken in its dtype,
    then converted to float64 and combined together, one vector per group (a few small
    kernels per group, not per tensor).
    """
    dot_wg: list[Tensor] = []
    dot_wm: list[Tensor] = []
    norm: list[Tensor] = []

    def per_tensor(dots: list[Tensor], scales: list[float]) -> Tensor:
        """``scales_i * dots_i`` as one float64 vector."""
        return scaled(float64_vector(dots, device), scales)

    def preconditioned(step: GroupStep, tensors: list[Tensor]) -> list[Tensor]:
        buffer = denominators_after(step)  # sqrt(v_hat') + eps
        torch._foreach_reciprocal_(buffer)
        torch._foreach_mul_(buffer, tensors)
        return buffer

    for step in steps:  # (each holds weights: a step gathers only groups that do)
        k = [float(n) for n in step.shard_counts]
        weighted = [n * step.lr_scale for n in k]
        ws, gs = step.weights, step.grads
        w_g = per_tensor(wide_dots(ws, gs), k)
        dot_wg.append(w_g)
        if not uses_moments:
            dot_wm.append(w_g)
            norm.append(per_tensor(wide_dots(gs, gs), weighted))
            continue
        beta1 = step.group["betas"][0]
        ms = step.exp_avgs
        dot_wm.append(beta1 * per_tensor(wide_dots(ws, ms), k) + (1.0 - beta1) * w_g)
        pm = preconditioned(step, step.exp_avgs)
        m_pm, g_pm = wide_dots(ms, pm), wide_dots(gs, pm)
        del pm
        g_pg = wide_dots(gs, preconditioned(step, step.grads))
        a, b, c = (per_tensor(x, weighted) for x in (m_pm, g_pm, g_pg))
        norm.append(beta1 * beta1 * a + 2.0 * beta1 * (1.0 - beta1) * b + (1.0 - beta1) ** 2 * c)
    zero = torch.zeros((), device=device, dtype=torch.float64)
    return [torch.cat(terms).sum() if terms else zero for terms in (dot_wg, dot_wm, norm)]


@dataclass
class MomentumModel:
    """The stored part of the model: the EMAs of the batch losses and of ``w_j . g_j``, and
    the number of steps in them (``state["line_search"]``)."""

    loss_avg: float
    anchor_avg: float  # gamma: the EMA of w_j . g_j
    steps: int

    def after(self, terms: ModelTerms, loss0: float, beta1: float) -> MomentumModel:
        """The model with this step's batch in it."""
        return MomentumModel(
            loss_avg=beta1 * self.loss_avg + (1.0 - beta1) * loss0,
            anchor_avg=beta1 * self.anchor_avg + (1.0 - beta1) * terms.weights_dot_grad,
            steps=self.steps + 1,
        )

    def cap(self, terms: ModelTerms, beta1: float, loss_floor: float) -> float:
        """The largest step size this model allows (a model that includes this step's
        batch, ``after``); ``inf`` where the update has no slope along the momentum."""
        if not terms.momentum_norm > 0.0:
            return math.inf
        b1 = 1.0 - beta1**self.steps if beta1 > 0.0 else 1.0
        height = self.loss_avg + terms.weights_dot_momentum - self.anchor_avg - b1 * loss_floor
        return max(height, 0.0) * b1 / terms.momentum_norm
