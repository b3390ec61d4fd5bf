"""Search and update directions, and the slope of the loss along them.

The paper's three optimizers move the weights along one of three directions (Sec. II-III):

* ``GRADIENT``         d = -g                              (SGD; SLS, Eq. 1)
* ``PRECONDITIONED``   d = -g / (sqrt(v_hat) + eps)        (Adam with beta1 = 0; Adam + SLS, Eq. 5)
* ``MOMENTUM``         d = -m_hat / (sqrt(v_hat) + eps)    (Adam, Eq. 3; ALSALS)

Each group may scale its direction by ``lr_scale``, so that one line-searched step size
``eta`` moves group ``i`` by ``eta * lr_scale_i * d_i``. All updates are multi-tensor
(``torch._foreach_*``) and never leave the device.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Direction(enum.Enum):
    GRADIENT = "gradient"
    PRECONDITIONED = "preconditioned"
    MOMENTUM = "momentum"


@dataclass
class GroupTensors:
    """The tensors of one parameter group that take part in this step (grad is not None)."""

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    denoms: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)  # the parameters (state keys)
    shards: list[int] = field(default_factory=list)  # ranks a parameter is sharded over

    @property
    def scale(self) -> float:
        return self.group["lr_scale"]


def update_moments(view: GroupTensors) -> None:
    """Adam's moment updates (Eq. 3) and the bias-corrected denominator sqrt(v_hat) + eps."""
    beta1, beta2 = view.group["betas"]
    view.steps = [s + 1 for s in view.steps]
    torch._foreach_lerp_(view.exp_avgs, view.grads, 1.0 - beta1)
    torch._foreach_mul_(view.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(view.exp_avg_sqs, view.grads, view.grads, 1.0 - beta2)
    compute_denominators(view)


def compute_denominators(view: GroupTensors) -> None:
    """``sqrt(v_hat) + eps`` from the current second moments (Eq. 3)."""
    beta2 = view.group["betas"][1]
    view.denoms = torch._foreach_sqrt(view.exp_avg_sqs)
    torch._foreach_div_(view.denoms, [math.sqrt(1.0 - beta2**s) for s in view.steps])
    torch._foreach_add_(view.denoms, view.group["eps"])


def direction_tensors(view: GroupTensors, direction: Direction) -> list[Tensor]:
    """The direction ``d`` (``lr_scale`` included) as new tensors, one per parameter."""
    d = [torch.zeros_like(p) for p in view.params]
    add_direction(GroupTensors(**{**view.__dict__, "params": d}), direction, 1.0)
    return d


def _momentum_scalars(view: GroupTensors, alpha: float) -> list[float]:
    beta1 = view.group["betas"][0]
    return [alpha / (1.0 - beta1**s) for s in view.steps]


def add_direction(view: GroupTensors, direction: Direction, eta: float) -> None:
    """``params += eta * lr_scale * d`` in place."""
    alpha = -eta * view.scale
    if direction is Direction.GRADIENT:
        torch._foreach_add_(view.params, view.grads, alpha=alpha)
    elif direction is Direction.PRECONDITIONED:
        torch._foreach_addcdiv_(view.params, view.grads, view.denoms, value=alpha)
    else:
        torch._foreach_addcdiv_(
            view.params, view.exp_avgs, view.denoms, _momentum_scalars(view, alpha)
        )


def descent_slope(views: list[GroupTensors], direction: Direction) -> Tensor:
    """The analytic slope ``-g . d`` summed over all groups (a device scalar, no host sync).

    For the gradient direction this is ``||g||^2`` (Eq. 1), for the preconditioned one
    ``sum g^2 / (sqrt(v_hat) + eps)`` (Eq. 5); along the momentum direction it is the
    first-order prediction of the loss decrease per unit step that ALSALS otherwise
    estimates by a finite difference (Eq. 6).
    """
    terms: list[Tensor] = []
    for view in views:
        if direction is Direction.GRADIENT:
            norms = torch._foreach_norm(view.grads)
            terms += [n.square() * view.scale * f for n, f in zip(norms, view.shards, strict=True)]
            continue
        if direction is Direction.PRECONDITIONED:
            numerators, scalars = view.grads, [view.scale] * len(view.grads)
        else:
            numerators, scalars = view.exp_avgs, _momentum_scalars(view, view.scale)
        # One temporary the size of a single tensor at a time: g . (n / d) via a dot product.
        terms += [
            torch.dot(g.reshape(-1), (n / d).reshape(-1)) * (k * f)
            for g, n, d, k, f in zip(
                view.grads, numerators, view.denoms, scalars, view.shards, strict=True
            )
        ]
    device = terms[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(device=device, dtype=dtype) for t in terms]).sum()
