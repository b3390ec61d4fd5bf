"""Search and update directions, Adam's moments, and the slope of the loss along a direction.

The paper's three optimizers move the weights along one of three directions (Sec. II-III):

* ``GRADIENT``         d = -g                              (SGD; SLS, Eq. 1)
* ``PRECONDITIONED``   d = -g / (sqrt(v_hat) + eps)        (Adam with beta1 = 0; Adam + SLS, Eq. 5)
* ``MOMENTUM``         d = -m_hat / (sqrt(v_hat) + eps)    (Adam, Eq. 3; MomentumALSALS)

Each group scales its direction by ``lr_scale``, so that one line-searched step size ``eta``
moves group ``i`` by ``eta * lr_scale_i * d_i``.

Adam's moments are not changed while a step is in progress: the direction is built from the
moments this step *would* have (``m' = beta1 m + (1 - beta1) g``, ``v' = beta2 v + (1 - beta2)
g^2``), and :func:`commit_moments` writes them once the step is taken. An exception or a
skipped step therefore leaves the moments as they were. All updates are multi-tensor
(``torch._foreach_*``) and never leave the device.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Direction(enum.Enum):
    GRADIENT = "gradient"
    PRECONDITIONED = "preconditioned"
    MOMENTUM = "momentum"

    @property
    def uses_moments(self) -> bool:
        return self is not Direction.GRADIENT


@dataclass
class GroupStep:
    """The tensors of one parameter group that take part in this step (``grad`` is set).

    ``weights``, ``grads`` and the moments are the local shards (FSDP2) that the update
    writes; ``params`` are the parameters themselves (the keys of ``optimizer.state``).
    ``steps`` holds Adam's ``t`` after this step.
    """

    group: dict
    params: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    shard_counts: list[int] = field(default_factory=list)

    @property
    def lr_scale(self) -> float:
        return self.group["lr_scale"]

    def bias_corrections(self) -> tuple[list[float], list[float]]:
        """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` for each tensor, at this step's ``t``."""
        beta1, beta2 = self.group["betas"]
        return [1.0 - beta1**t for t in self.steps], [math.sqrt(1.0 - beta2**t) for t in self.steps]


@dataclass
class StepDirection:
    """``d`` of one group as ``d_i = scales_i * tensors_i [/ divisors_i]``.

    Without divisors all tensors share one scale (``scales[0]``).
    """

    tensors: list[Tensor]
    divisors: list[Tensor] | None
    scales: list[float]

    def add_to(self, weights: list[Tensor], eta: float) -> None:
        """``weights += eta * d`` in place."""
        if self.divisors is None:
            alpha = representable(eta * self.scales[0], weights)
            torch._foreach_add_(weights, self.tensors, alpha=alpha)
        else:
            torch._foreach_addcdiv_(
                weights,
                self.tensors,
                self.divisors,
                [representable(eta * s, weights) for s in self.scales],
            )

    def materialize(self) -> list[Tensor]:
        """``d`` as new tensors, one per parameter."""
        d = [torch.zeros_like(t) for t in self.tensors]
        self.add_to(d, 1.0)
        return d


def second_moments_after(step: GroupStep) -> list[Tensor]:
    """``v' = beta2 v + (1 - beta2) g^2`` as new tensors (the same operations as the commit)."""
    beta2 = step.group["betas"][1]
    v_new = torch._foreach_mul(step.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(v_new, step.grads, step.grads, 1.0 - beta2)
    return v_new


def denominators_after(step: GroupStep) -> list[Tensor]:
    """``sqrt(v_hat') + eps`` of this step, as new tensors (Eq. 3), before the commit."""
    denominators = second_moments_after(step)
    torch._foreach_sqrt_(denominators)
    return _bias_corrected_plus_eps_(step, denominators)


def committed_denominators(step: GroupStep) -> list[Tensor]:
    """The same from the second moments already committed (a step that searched nothing:
    ``v'`` is not computed twice). Bit for bit the values of ``denominators_after``, but
    for float16 tensors on CPU, where torch's in-place ``_foreach_mul_`` (the commit's)
    rounds ``beta2`` to float16 first and the out-of-place product does not: some entries
    differ in their last bit (a reused step's move, never a judged trial's)."""
    return _bias_corrected_plus_eps_(step, torch._foreach_sqrt(step.exp_avg_sqs))


def _bias_corrected_plus_eps_(step: GroupStep, roots: list[Tensor]) -> list[Tensor]:
    torch._foreach_div_(roots, step.bias_corrections()[1])
    torch._foreach_add_(roots, step.group["eps"])
    return roots


def build_direction(
    step: GroupStep, direction: Direction, denominators: list[Tensor] | None
) -> StepDirection:
    """The direction ``direction`` of this step, from the moments the step would commit.

    ``denominators`` (``sqrt(v_hat') + eps``) are needed by the Adam directions. The momentum
    direction is written into one new parameter-sized buffer; the others reuse the gradients
    and the denominators.
    """
    scale = -step.lr_scale
    if direction is Direction.GRADIENT:
        return StepDirection(step.grads, None, [scale])
    assert denominators is not None
    if direction is Direction.PRECONDITIONED:
        return StepDirection(step.grads, denominators, [scale] * len(step.grads))
    beta1 = step.group["betas"][0]
    d = torch._foreach_lerp(step.exp_avgs, step.grads, 1.0 - beta1)  # m'
    torch._foreach_div_(d, denominators)
    torch._foreach_mul_(d, [scale / b for b in step.bias_corrections()[0]])
    return StepDirection(d, None, [1.0])


def committed_momentum_direction(step: GroupStep, denominators: list[Tensor]) -> StepDirection:
    """The momentum direction from moments already committed (Adam + SLS's update)."""
    return StepDirection(
        step.exp_avgs,
        denominators,
        [-step.lr_scale / b for b in step.bias_corrections()[0]],
    )


def commit_moments(step: GroupStep, state: dict) -> None:
    """Write this step's Adam moments (Eq. 3) and ``t`` into the optimizer state."""
    beta1, beta2 = step.group["betas"]
    torch._foreach_lerp_(step.exp_avgs, step.grads, 1.0 - beta1)
    torch._foreach_mul_(step.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(step.exp_avg_sqs, step.grads, step.grads, 1.0 - beta2)
    for p, t in zip(step.params, step.steps, strict=True):
        state[p]["step"] = t


#: Every factor up to float16's largest value is one every dtype the optimizers train
#: (float16 and wider) holds: below it ``representable`` looks at no tensor (the hot path).
ALWAYS_REPRESENTABLE = float(torch.finfo(torch.float16).max)


def largest_representable(tensors: Iterable[Tensor]) -> float:
    """The largest value every floating-point tensor's dtype can hold (``inf`` for none; a
    frozen integer parameter, as 8-bit quantized layers hold, takes no step)."""
    dtypes = {t.dtype for t in tensors if t.is_floating_point() or t.is_complex()}
    return min((torch.finfo(d).max for d in dtypes), default=math.inf)


def representable(factor: float, tensors: list[Tensor]) -> float:
    """``factor`` clamped to what every tensor's dtype can hold (a step size above float32's
    3.4e38 is refused by torch's arithmetic; the move it makes overflows the weights anyway,
    which the search sees as a non-finite trial and cuts)."""
    if abs(factor) <= ALWAYS_REPRESENTABLE or math.isnan(factor):
        return factor
    largest = largest_representable(tensors)
    return max(min(factor, largest), -largest)


_WIDE_ENOUGH = frozenset({torch.float32, torch.float64})


def wide_dot(a: Tensor, b: Tensor) -> Tensor:
    """``a . b`` over all elements, in at least float32: a dot product of float16 tensors
    ends in float16, which overflows past 65504 (the squared norm of a large layer's
    gradient whose every entry is small), and bfloat16's total keeps 8 bits. One
    ``torch.dot`` and nothing else where no conversion or reshape is needed: a model of a
    thousand small tensors pays for every call."""
    if a.dtype != b.dtype or a.dtype not in _WIDE_ENOUGH:
        wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        a, b = a.to(wide), b.to(wide)
    return torch.dot(a if a.dim() == 1 else a.reshape(-1), b if b.dim() == 1 else b.reshape(-1))


def wide_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``wide_dot`` of each pair."""
    return [wide_dot(x, y) for x, y in zip(a, b, strict=True)]


def detached_copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies of ``tensors`` (their strides kept), in one multi-tensor copy."""
    copies = [torch.empty_like(t) for t in tensors]
    with torch.no_grad():
        torch._foreach_copy_(copies, list(tensors))
    return copies


def float64_vector(scalars: Sequence[Tensor], device: torch.device) -> Tensor:
    """0-d tensors as one float64 vector on ``device`` (the conversion is exact): one stack
    where they are on ``device`` already, else one copy each (a model spread over devices)."""
    if all(s.device == device for s in scalars):
        return torch.stack(list(scalars)).to(torch.float64)
    return torch.stack([s.to(device, torch.float64) for s in scalars])


def scaled(vector: Tensor, factors: Sequence[float]) -> Tensor:
    """``vector_i * factors_i`` in the vector's dtype (a tensor sharded over ``k`` ranks
    counts ``k`` times, so that the mean over ranks is the sum over shards: FSDP2): the
    vector itself where every factor is 1, one product where they agree, else one per
    entry (no host-to-device copy of the factors)."""
    if all(f == 1 for f in factors):
        return vector
    if all(f == factors[0] for f in factors):
        return vector * factors[0]
    return torch.stack([x * f for x, f in zip(vector.unbind(), factors, strict=True)])


def wide_norms(tensors: list[Tensor], at_least: torch.dtype = torch.float32) -> list[Tensor]:
    """Each tensor's 2-norm, computed in ``at_least`` or the tensor's dtype if wider (a
    float16 norm overflows past 65504; a float32 one of entries below 1e-23 underflows to
    0): one ``torch._foreach_norm`` per dtype."""
    norms: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(index)
    for dtype, indices in by_dtype.items():
        wide = torch.promote_types(dtype, at_least)
        group = [tensors[i] for i in indices]
        found = (
            torch._foreach_norm(group, 2, dtype=wide)
            if wide != dtype
            else torch._foreach_norm(group)
        )
        for i, n in zip(indices, found, strict=True):
            norms[i] = n
    return norms  # type: ignore[return-value]


def analytic_slope(steps: list[GroupStep], directions: list[StepDirection]) -> list[Tensor]:
    """The terms of the analytic slope ``-g . d`` (device vectors, one per group; no host
    sync).

    For the gradient direction this is ``||g||^2`` (Eq. 1), for the preconditioned one
    ``sum g^2 / (sqrt(v_hat) + eps)`` (Eq. 5); along the momentum direction it is the
    first-order prediction of the loss decrease per unit step that MomentumALSALS otherwise
    estimates by a finite difference (Eq. 6). A parameter sharded over ``k`` ranks counts
    ``k`` times, so that the mean over ranks is the sum over shards.
    """
    terms: list[Tensor] = []
    for step, d in zip(steps, directions, strict=True):
        if d.divisors is None:
            # One dot product per tensor: no temporary the size of the parameters.
            dots = wide_dots(step.grads, d.tensors)
            factors = [-d.scales[0] * k for k in step.shard_counts]
        else:
            dots = [
                wide_dot(g, t / q)
                for g, t, q in zip(step.grads, d.tensors, d.divisors, strict=True)
            ]
            factors = [-s * k for s, k in zip(d.scales, step.shard_counts, strict=True)]
        if all(x.dtype == dots[0].dtype for x in dots):
            terms.append(scaled(torch.stack(dots), factors))
        else:  # (each term rounded in its own dtype, not in the widest of the group's)
            terms.append(torch.stack([x * f for x, f in zip(dots, factors, strict=True)]))
    return terms
