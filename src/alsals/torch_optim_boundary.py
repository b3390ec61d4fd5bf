"""The ``torch.optim`` boundary that both optimizer families share.

``LineSearchOptimizer`` (SLS, AdamSLS, MomentumALSALS) and ``ALSALS`` are
``torch.optim.Optimizer`` subclasses that search one step size for every group. Where
that meets what ``torch.optim`` users and tools do, both behave the same way, by the
functions here: parameter groups as given (another optimizer's groups and settings
included), an ``lr`` written into ``param_groups`` by the user or a schedule,
``state_dict()`` and its load, the checks a state or a group must pass before a step, and
warnings that point at the user's line rather than the library's.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from alsals.distributed import local_shard
from alsals.hyperparameters import in_range

#: The key under which ``state_dict()`` records each group's ``lr`` as the last step showed it.
SHOWN_LR_KEY = "shown_lr"
#: A learning rate written before this many steps in a row, or lowered by this many writes
#: over a run (a step decay, ReduceLROnPlateau), is a schedule left in the loop.
SCHEDULE_WARNING_STEPS = 3
#: Keys of other torch.optim optimizers' groups, and what to do instead of each.
FOREIGN_GROUP_KEYS = {
    "maximize": "alsals minimises the loss; maximize=True is refused",
    "amsgrad": "not supported",
    "foreach": "alsals always uses multi-tensor kernels",
    "fused": "alsals always uses multi-tensor kernels",
    "capturable": "not supported",
    "differentiable": "not supported",
    "decoupled_weight_decay": "weight_decay is always decoupled (AdamW's form)",
    "momentum": "MomentumALSALS and AdamSLS use betas",
    "dampening": "not supported",
    "nesterov": "not supported",
}


def group_params(param_group: dict[str, Any]) -> list[Tensor]:
    """A group's ``params`` as a list (a single tensor included), refusing a parameter that
    appears twice: it would be updated twice."""
    params = param_group.get("params", [])
    if isinstance(params, (set, frozenset)):  # torch.optim's rule, before the list loses it
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the "
            "ordering of tensors in sets will change between runs: pass a list"
        )
    params = [params] if isinstance(params, Tensor) else list(params)
    if len({id(p) for p in params}) != len(params):
        raise ValueError(
            "a parameter appears twice in one parameter group: it would be updated twice"
        )
    if any(isinstance(p, torch.nn.parameter.UninitializedTensorMixin) for p in params):
        raise ValueError(
            "a parameter is not initialised yet (a lazy module, nn.LazyLinear or another "
            "Lazy* module, before its first forward pass): run one forward pass through the "
            "model (a dummy batch) before building the optimizer"
        )
    return params


def with_shown_lr(state: dict[str, Any], shown: list[float] | None) -> dict[str, Any]:
    """``state`` (a ``state_dict()``) with each group's ``lr`` as the last step showed it
    under ``SHOWN_LR_KEY``, so that a resumed run tells a written ``lr`` from a changed
    ``lr_scale`` exactly as the uninterrupted one would."""
    if shown is not None and len(shown) == len(state["param_groups"]):
        for group, lr in zip(state["param_groups"], shown, strict=True):
            group[SHOWN_LR_KEY] = lr
    return state


def plain_settings(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a fresh ``state_dict()``) with NumPy scalars in its groups' settings (an
    ``lr`` a NumPy-computed schedule wrote) as Python numbers: ``torch.load`` with
    ``weights_only=True``, torch's default, refuses NumPy objects."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(plain(v) for v in value)
        if type(value).__module__ == "numpy" and hasattr(value, "item"):
            return value.item()
        return value

    for group in state["param_groups"]:
        group.update({k: plain(v) for k, v in group.items() if k != "params"})
    return state


def split_shown_lr(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[float] | None]:
    """A state to load without ``SHOWN_LR_KEY`` in its groups, and the shown ``lr`` they
    carried (``None`` where not every group carried one)."""
    groups = state_dict.get("param_groups", [])
    shown = [g.get(SHOWN_LR_KEY) for g in groups]
    state_dict = {
        **state_dict,
        "param_groups": [{k: v for k, v in g.items() if k != SHOWN_LR_KEY} for g in groups],
    }
    known = bool(shown) and all(isinstance(v, float) for v in shown)
    return state_dict, [float(v) for v in shown] if known else None


def groups_with_one_lr(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float
) -> tuple[list[Any], float]:
    """``params`` as a list, and where the first search starts: the ``lr`` that every
    parameter group carries where all carry the same one (groups built for another
    optimizer, ``adamw.param_groups``: a group's setting overrides the constructor's, as in
    ``torch.optim``), else ``lr``. Groups with different rates are left to the per-group
    check, whose error says to use ``lr_scale``."""
    if isinstance(params, Tensor):  # (torch's own error names it)
        return params, lr  # type: ignore[return-value]
    params = list(params)
    rates = [g["lr"] for g in params if isinstance(g, dict) and "lr" in g]
    if params and len(rates) == len(params) and all(r == rates[0] for r in rates):
        return params, rates[0]
    return params, lr


def schedule_suspected(writes_in_a_row: int, cuts: int) -> bool:
    """``lr`` written before ``SCHEDULE_WARNING_STEPS`` steps in a row (a schedule that writes
    every step), or lowered by as many writes over the run (one that cuts now and then, whose
    cuts compound with the search's); a write now and then that does not lower it (a start,
    a restart from a larger value) is no schedule."""
    return max(writes_in_a_row, cuts) >= SCHEDULE_WARNING_STEPS


def refuse_inference_mode(name: str) -> None:
    """A step under ``torch.inference_mode()`` is refused, naming it: no tensor made there
    can take part in autograd, and the closure's loss would be blamed instead."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name}.step() cannot run under torch.inference_mode(): the step needs the "
            "gradient of the closure's loss (take the step outside it)"
        )


def warn_about_other_settings(
    name: str, saved: dict[str, Any], here: dict[str, Any], keys: Iterable[str]
) -> None:
    """Warn where a state about to be loaded carries other search settings than the
    optimizer was built with: as in ``torch.optim``, the saved ones are used (a changed
    setting passed to the constructor of a resumed run does not take effect)."""
    differing = {k: (saved[k], here[k]) for k in keys if saved[k] != here[k]}
    if differing:
        listed = ", ".join(f"{k}={a!r} (here {b!r})" for k, (a, b) in differing.items())
        warnings.warn(
            f"the state loaded into {name} was saved with other search settings: {listed}; "
            "the saved ones are used. Was it saved by another optimizer class or "
            "configuration?",
            UserWarning,
            stacklevel=3,
        )


def written_lr(
    groups: list[dict[str, Any]],
    shown: list[float] | None,
    step_size: float,
    largest: float = math.inf,
) -> tuple[float, dict[str, Any]] | None:
    """The written ``lr`` that decides this step, checked to lie in ``[0, largest)``, with
    its group: a written 0 in any group (one step size for all, so
    a 0 anywhere stops every group for the step), else the first group whose ``lr`` differs
    from the one the last step showed (``shown``; without it, ``step_size`` times the
    group's ``lr_scale``). ``None`` where nothing was written; every written value is
    checked. A changed ``lr_scale`` alone is no write."""
    if shown is None or len(shown) != len(groups):
        shown = [step_size * g["lr_scale"] for g in groups]
    written = [
        (in_range(f"param_groups[{index}]['lr']", g["lr"], 0.0, largest, closed_low=True), g)
        for index, (g, lr_shown) in enumerate(zip(groups, shown, strict=True))
        if g["lr"] != lr_shown
    ]
    zero = [w for w in written if w[0] == 0.0]
    decisive = (zero or written)[0] if written else None
    if decisive is not None and len(groups) > 1:
        implied = [g["lr"] / g["lr_scale"] for g in groups]
        if not all(math.isclose(v, implied[0], rel_tol=1e-6) for v in implied[1:]):
            index = next(i for i, g in enumerate(groups) if g is decisive[1])
            lrs = ", ".join(f"[{i}] {g['lr']:g}" for i, g in enumerate(groups))
            scales = ", ".join(f"{g['lr_scale']:g}" for g in groups)
            warnings.warn(
                f"param_groups' lr written out of the ratio of their lr_scale (lr {lrs}; "
                f"lr_scale {scales}): the search sets one step size for every group (each "
                f"moves by it times its lr_scale), so param_groups[{index}]'s write sets it "
                "for all of them (a 0 in any group stops every group for the step). For a "
                "group's own rate set param_groups[i]['lr_scale']; to freeze a group, call "
                "requires_grad_(False) on its parameters",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
    return decisive


def refuse_maximize(name: str, groups: Iterable[dict[str, Any]]) -> None:
    """A group of another optimizer with ``maximize=True`` (ascend the objective) is an
    error, not a setting to drop with the others: every alsals optimizer minimises the
    closure's loss, and would descend what the run meant to ascend."""
    for index, group in enumerate(groups):
        if group.get("maximize") is True:
            raise ValueError(
                f"param_groups[{index}] has maximize=True: {name} minimises the loss the "
                "closure returns, so return the objective negated (-objective) and drop the "
                "key (a saved state's Adam moments, of the negated gradient, then fit: "
                "for g in state['param_groups']: g.pop('maximize'))"
            )


def drop_foreign_keys(
    name: str, param_group: dict[str, Any], known: set[str], per_group: Iterable[str]
) -> None:
    """Delete another ``torch.optim`` optimizer's group settings (``FOREIGN_GROUP_KEYS``)
    from ``param_group`` with one warning that says what to do instead of each, and warn
    about the keys that are neither ``known`` nor foreign (kept as they are)."""
    refuse_maximize(name, [param_group])
    foreign = {k: FOREIGN_GROUP_KEYS[k] for k in param_group if k in FOREIGN_GROUP_KEYS}
    for key in foreign:
        del param_group[key]
    if foreign:
        advice = "; ".join(f"{k}: {why}" for k, why in foreign.items())
        warnings.warn(
            f"{name} ignores the parameter-group settings of another optimizer ({advice})",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    unknown = [k for k in param_group if k not in known]
    if unknown:
        warnings.warn(
            f"{name} does not use the parameter-group keys {unknown}; they are kept as they "
            f"are (its per-group settings: {', '.join(per_group)})",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


#: The folders of the packages whose frames a warning skips to reach the user's line.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules["alsals"], torch)
)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line calling ``step``:
    the first frame outside the alsals and torch packages (torch.optim wraps ``step``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
            return level
        frame, level = frame.f_back, level + 1
    return 1


@functools.lru_cache(maxsize=16)
def _vanishes(eps: float, dtype: torch.dtype) -> bool:
    """Whether ``eps`` rounds to 0 in ``dtype``."""
    return float(torch.tensor(eps, dtype=dtype)) == 0.0


def anchor_parameter(param_groups: list[dict[str, Any]]) -> Tensor | None:
    """The parameter whose state holds an optimizer's search state: the first of all
    groups that requires grad (``torch.distributed.checkpoint`` saves and loads the state
    of those alone), else the first of all (``None`` without any). Freezing or unfreezing
    parameters may move it; the optimizers carry the entry over."""
    first = None
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad:
                return p
            if first is None:
                first = p
    return first


def check_state_dict_form(owner: str, state_dict: Any) -> None:
    """A ``TypeError`` where ``state_dict`` is no mapping, a ``ValueError`` where it lacks
    ``"state"`` or ``"param_groups"`` (a model's state dict, or a checkpoint's outer dict,
    passed by mistake): torch's load would fail on a bare ``KeyError`` or ``AttributeError``."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{owner}.load_state_dict expects the dict optimizer.state_dict() returns, got "
            f"{type(state_dict).__name__}"
        )
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        present = ", ".join(repr(k) for k in list(state_dict)[:5]) or "none"
        raise ValueError(
            f"{owner}.load_state_dict expects the dict optimizer.state_dict() returns, with "
            f"'state' and 'param_groups'; this one lacks {' and '.join(map(repr, missing))} "
            f"(its keys: {present}): a model's state dict, or the checkpoint around the "
            "optimizer's?"
        )


def check_state_like(
    owner: str,
    state: dict,
    param_groups: list[dict[str, Any]],
    checked: tuple | None = None,
) -> tuple:
    """Raise a ``ValueError`` where a parameter's stored tensors are not of its shape (a
    state saved for parameters in another order), a ``TypeError`` where they are not of its
    dtype and on its device: the model was converted (``.double()``, ``.half()``, ``.to(device)``) after
    the optimizer stepped, which torch's ``load_state_dict`` converts the state for. Returns
    the parameters' dtypes and devices; the state is read only where they differ from
    ``checked`` (what the last call returned: ``None`` after a load). A parameter on the
    meta device (no values) is a ``ValueError`` there too."""
    signature = tuple((p.dtype, p.device) for group in param_groups for p in group["params"])
    if signature == checked:
        return signature
    meta = next((p for g in param_groups for p in g["params"] if p.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(
            f"{owner}: a parameter of shape {tuple(meta.shape)} is on the meta device: it "
            "holds no values, and a line search evaluates the loss at the weights it tries. "
            "Materialise the model first (module.to_empty(device=...), then initialise the "
            "weights) and build the optimizer from its parameters after that"
        )
    for group in param_groups:
        for p in group["params"]:
            for name, stored in state.get(p, {}).items():
                if not isinstance(stored, Tensor) or not stored.dim():
                    continue
                # (a sharded parameter's state may hold its local shard alone: FSDP2's)
                shapes = {tuple(t.shape) for t in (stored, local_shard(stored))}
                if not shapes & {tuple(p.shape), tuple(local_shard(p).shape)}:
                    raise ValueError(
                        f"{owner}: a parameter of shape {tuple(p.shape)} holds optimizer "
                        f"state {name!r} of shape {tuple(stored.shape)}: the state loaded was "
                        "saved for other parameters, or in another order (parameter groups "
                        "built in another order than when it was saved?)"
                    )
                if stored.dtype != p.dtype or stored.device != p.device:
                    raise TypeError(
                        f"{owner}: a parameter of shape {tuple(p.shape)} is {p.dtype} on "
                        f"{p.device}, but its optimizer state ({name!r}) is {stored.dtype} on "
                        f"{stored.device}: the model was converted after the optimizer "
                        "stepped. Convert the state with it, "
                        "optimizer.load_state_dict(optimizer.state_dict()) after the "
                        "conversion (a model with BatchNorm: the conversion replaced its "
                        "buffers, which buffers= protects, so build a new optimizer with "
                        "buffers=model.buffers() and load the old one's state into it), or "
                        "convert the model before building the optimizer"
                    )
    return signature


def check_eps(owner: str, eps: float, params: list[Tensor]) -> None:
    """A ``ValueError`` where ``eps`` rounds to 0 in a parameter's dtype (float16 and
    the default 1e-8): Adam's direction would be 0/0 wherever a gradient entry and its
    moments are 0 (a dead unit), and every step would be skipped as non-finite. Checked
    once per dtype of the group, before anything is written."""
    first_of_dtype = {p.dtype: p for p in reversed(params)}
    bad = [p for d, p in first_of_dtype.items() if d.is_floating_point and _vanishes(eps, d)]
    if not bad:
        return
    p = bad[0]
    raise ValueError(
        f"{owner}: eps={eps:g} is 0 in {p.dtype} (a parameter of shape "
        f"{tuple(p.shape)}): Adam's direction would be 0/0 where a gradient entry and its "
        "moments are 0, and every step would be skipped as non-finite. Pass "
        f"eps >= {torch.finfo(p.dtype).tiny:.2g} (1e-4 is common for float16), or keep "
        "float32 weights and train under torch.autocast"
    )
