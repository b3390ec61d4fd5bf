"""The state a step would create, made ahead of any step for checkpointing tools.

``torch.distributed.checkpoint``'s ``get_state_dict`` / ``set_state_dict`` (FSDP2's usual
checkpointing) give an optimizer without state one step with zero gradients, every ``lr``
set to 0 and no closure, so that the state exists before it saves or loads; with
``flatten_optimizer_state_dict=True`` it then loads only the entries that state holds. The
optimizers here create their state in the first step that commits, a step that needs a
closure: without the entries, the load would silently drop every moment and the search's
state. Their ``step()`` recognises that call and creates each entry instead, marked
``"step": 0`` (a step that commits writes 1 or more): the next step drops what no step has
written, so that it runs exactly as it would have without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def is_state_initialisation(
    state: dict, param_groups: Iterable[dict[str, Any]], closure: Any
) -> bool:
    """Whether ``step(closure)`` is a checkpointing tool's call to create the state: an
    optimizer without state (the tool calls only then), no closure, ``lr`` 0 in every group,
    and every trainable parameter's gradient present and zero (one look per gradient; only
    without a closure, which otherwise is an error)."""
    if closure is not None or state:
        return False
    groups = list(param_groups)
    if not groups or any(float(group["lr"]) != 0.0 for group in groups):
        return False
    params = [p for group in groups for p in group["params"] if p.requires_grad]
    if not params or any(p.grad is None for p in params):
        return False
    return not any(bool(torch.any(p.grad != 0)) for p in params)


def create_placeholders(
    state: dict, param_groups: Iterable[dict[str, Any]], entries: Callable[[Any], dict]
) -> None:
    """Give every trainable parameter that no step has written the entries of
    ``entries(p)``, which must hold ``"step": 0``."""
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and "step" not in state.get(p, {}):
                state[p].update(entries(p))


def without_placeholders(entry: dict, keys: tuple[str, ...]) -> dict:
    """``entry`` without the ``keys`` no step has written: all of them where its ``"step"``
    is 0, and any that holds an empty dict (what the checkpointing tool puts where a
    checkpoint lacks an entry the optimizer held: a parameter the saved run never stepped)."""
    step = entry.get("step")
    unwritten = type(step) is int and step == 0
    return {
        k: v
        for k, v in entry.items()
        if k not in keys or not (unwritten or (isinstance(v, dict) and not v))
    }


def drop_placeholders(state: dict, keys: tuple[str, ...]) -> None:
    """Remove from ``state`` (in place) what :func:`without_placeholders` leaves out, and
    the entries left empty, so that the optimizer is as it would have been without the
    placeholders (an empty ``state`` included: the tool creates them again where it finds
    one)."""
    for p in list(state):
        kept = without_placeholders(state[p], keys)
        if not kept:
            del state[p]
        elif len(kept) != len(state[p]):
            state[p].clear()
            state[p].update(kept)


def state_dict_without_placeholders(state_dict: dict, keys: tuple[str, ...]) -> dict:
    """``state_dict`` with :func:`without_placeholders` applied to each entry of its
    ``"state"`` (a checkpoint taken after the tool created them, before any step)."""
    if "state" not in state_dict:
        return state_dict
    entries = {k: without_placeholders(v, keys) for k, v in state_dict["state"].items()}
    return {**state_dict, "state": {k: v for k, v in entries.items() if v}}
