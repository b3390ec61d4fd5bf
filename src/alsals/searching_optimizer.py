"""The ``torch.optim`` protocol code both optimizer families share.

``LineSearchOptimizer`` (SLS, AdamSLS, MomentumALSALS) and ``ALSALS`` each search one step
size for all parameters and keep the search's state in
``optimizer.state[anchor][STATE_KEY]``, the anchor being the first parameter that requires
grad (:func:`anchor_parameter`); :class:`SearchingOptimizer` holds the code that is the same in
both, down to the letter: the placeholders a checkpointing tool's first call creates, the
stored search state, copies and pickles, the step's first checks, what a group added
shows and the one-time warnings. Where the two differ only by a constant, a class
attribute of each family carries it (``STATE_KEY``, ``PLACEHOLDER_KEYS``,
``SEARCH_STATE``, ``NOT_COPIED``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from alsals.distributed import (
    RankMarks,
    check_meshes_span_group,
    check_same_settings,
    copy_sharing_process_group,
    settings_mark,
    shapes_mark,
    world_size,
)
from alsals.messages import IN_STEP_REFUSED, IN_STEP_STATE_DICT
from alsals.state_placeholders import create_placeholders, drop_placeholders
from alsals.torch_optim_boundary import (
    anchor_parameter,
    caller_stacklevel,
    check_state_like,
    plain_settings,
    refuse_inference_mode,
    with_shown_lr,
)


class SearchingOptimizer(torch.optim.Optimizer):
    """Base class of ``LineSearchOptimizer`` and ``ALSALS``: ``torch.optim``'s protocol
    around one searched step size (module docstring). Subclasses set the class attributes
    below, :meth:`_placeholder_entries`, and :meth:`_fresh_bookkeeping` with the
    attributes of their own; their ``__init__`` sets it before the groups are added."""

    #: The key of the search state in the anchor's ``state`` (:func:`anchor_parameter`).
    STATE_KEY: ClassVar[str]
    #: The per-parameter entries a step writes (:mod:`alsals.state_placeholders`).
    PLACEHOLDER_KEYS: ClassVar[tuple[str, ...]]
    #: The search state's class: ``from_dict``, ``to_dict`` and a constructor taking
    #: ``step_size`` and ``initial_step_size``.
    SEARCH_STATE: ClassVar[type[Any]]
    #: The attributes a copy (deepcopy, pickle) leaves out.
    NOT_COPIED: ClassVar[tuple[str, ...]] = ("_left_grads", "_in_step")

    # ------------------------------------------------------------------ torch.optim protocol

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; a copy must also keep the
        # protected buffers, the process group, the one-time warnings and last_step. The
        # marks of the gradients left in .grad (weak references) belong to this object only.
        return {k: v for k, v in self.__dict__.items() if k not in self.NOT_COPIED}

    @classmethod
    def _fresh_bookkeeping(cls) -> dict[str, Any]:
        """What an optimizer keeps outside ``state`` and the groups, by attribute, as a new
        one holds it: the one-time checks and warnings, counts of what the loop did, the
        last step's report. ``__init__`` sets it before the groups are added; a copy
        pickled by an older version takes what it lacks. Each family adds its own."""
        return {
            "_left_grads": None,  # the marks of the gradients left in .grad (LeftGradients)
            "_grad_norm": math.nan,  # the last gradient's norm (max_grad_norm)
            "_warned": set(),  # the one-time warnings given
            "_dropped_looked": False,  # looked once for gradients a closure() dropped
            "_trials_with_grad": False,  # the closure differentiates inside (ClosureEvaluator)
            "_streaks": {},  # how many steps in a row each stall warning's condition held
            "_written_lr_steps": 0,  # steps in a row that found lr written
            "_lr_cuts": 0,  # writes that lowered lr, over the run
            "_buffers_checked": False,  # the buffers' dtypes and devices checked
            "_shown_lr": None,  # each group's lr as the last step left it
            "_ranks_checked": False,  # every rank holds the same settings (first step)
            "_meshes_checked": False,  # the DTensors' meshes fit the process group
            "_shapes_mark": None,  # (see _rank_marks)
            "_placeholders": False,  # the state holds entries a checkpointing tool had made
            "_signature": None,  # the parameters' dtypes and devices, checked
            "_last_stored": None,  # the search state stored last (_put_entry)
            "last_step": None,  # the last step's report (StepInfo)
            "_in_step": False,  # a step (or preview) is running the closure
        }

    def _streak(self, condition: str, holds: bool) -> int:
        """How many steps in a row, this one included, ``condition`` has held (0 where it
        does not now): a stall warning waits for a streak that one unlucky step would not
        make."""
        self._streaks[condition] = self._streaks.get(condition, 0) + 1 if holds else 0
        return self._streaks[condition]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # (torch adds "differentiable" to the defaults here, which add_param_group would
        # copy into a new group: a setting of another optimizer in the next state_dict)
        self.defaults.pop("differentiable", None)
        for name, value in self._fresh_bookkeeping().items():
            self.__dict__.setdefault(name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> SearchingOptimizer:
        return copy_sharing_process_group(self, memo)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict; each group also records the ``lr`` the last step
        showed (:func:`alsals.torch_optim_boundary.with_shown_lr`). Where surgery since the
        last step left the search state off the anchor, it is put there first (the
        checkpoint carries it)."""
        if self._in_step:
            self._warn_once("in_step_state_dict", IN_STEP_STATE_DICT.format(name=self._name))
        entry = self._stored_entry()
        if entry is not None and entry is not self._anchor_entry():
            self._put_entry(entry)
        return with_shown_lr(plain_settings(super().state_dict()), self._shown_lr)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim``'s load; the loaded search state is then the one stored last
        (surgery right after a resume keeps it), and the replaced state is not kept alive."""
        self._refuse_in_step("load_state_dict()")
        super().load_state_dict(state_dict)
        self._entry_to_anchor()
        self._last_stored = self._anchor_entry()

    def _show_new_group(self, group: dict[str, Any]) -> None:
        """The end of ``add_param_group``: the last step's shown ``lr`` and the marks of the
        gradients left in ``.grad`` take in the group."""
        # what the group shows: the searched step size times its lr_scale
        group["lr"] = self._stored_search_state().step_size * group["lr_scale"]
        if self._shown_lr is not None:
            self._shown_lr.append(group["lr"])
        if self._left_grads is not None:
            self._left_grads.add(group["params"])
        # (the next step compares the new group's settings and shapes across the ranks in
        # its first collective, and checks its meshes)
        self._meshes_checked = False

    # ------------------------------------------------------------------------------ the step

    @property
    def _name(self) -> str:
        return type(self).__name__

    @property
    def protected_buffers(self) -> list[Tensor]:
        """The module buffers trial evaluations leave untouched (``buffers=``)."""
        return list(self._buffers)

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The ranks that take the same decisions (``process_group=``; ``None``: default)."""
        return self._process_group

    @contextlib.contextmanager
    def _running_closure(self, what: str = "step()") -> Iterator[None]:
        """The time a step (or a preview) runs: the closure may look at the optimizer
        (``state_dict()`` warns that the state is the one before this step) but not change
        it (:meth:`_refuse_in_step`), nor step or preview it again."""
        self._refuse_in_step(what)
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    def _refuse_in_step(self, what: str) -> None:
        """An error, before anything changes, where ``what`` is called inside the closure."""
        if self._in_step:
            raise RuntimeError(IN_STEP_REFUSED.format(name=self._name, what=what))

    def _check_state(self, name: str) -> None:
        """The step's first checks, before the settings': not in inference mode, the
        placeholders dropped, the state like the parameters (dtypes and devices)."""
        refuse_inference_mode(name)
        self._drop_placeholders()
        signature = check_state_like(name, self.state, self.param_groups, self._signature)
        if signature != self._signature:  # converted (or loaded): buffers may be new tensors
            self._buffers_checked = False
        self._signature = signature

    def _check_ranks(self, name: str) -> None:
        """The DTensors' meshes fit the process group (looked at once, and again after
        ``add_param_group``), and every rank holds the same settings and parameters: at the
        first step in a collective of its own, before the closure runs; at every step in
        its first collective (:meth:`_rank_marks`)."""
        if self._meshes_checked and self._ranks_checked:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        if not self._meshes_checked:
            check_meshes_span_group(params, self._process_group)
            self._meshes_checked = True
        if not self._ranks_checked:
            device = params[0].device if params else None
            check_same_settings(name, self.param_groups, self._process_group, device)
            self._ranks_checked = True

    def _rank_marks(self, name: str) -> RankMarks | None:
        """What the step's first collective compares across the ranks: the settings as the
        groups hold them now (a loop may have written one on some ranks only) and the
        parameters' shapes (a group added on some ranks only); ``None`` in one process."""
        if world_size(self._process_group) == 1:
            return None
        # (the shapes' mark kept while the groups hold the same parameters; the settings'
        # taken afresh, some 15 us a group: the step size they show changes at most steps)
        params = tuple(tuple(id(p) for p in g["params"]) for g in self.param_groups)
        if self._shapes_mark is None or self._shapes_mark[0] != params:
            self._shapes_mark = (params, shapes_mark(self.param_groups))
        return RankMarks(name, settings_mark(name, self.param_groups), self._shapes_mark[1])

    # ------------------------------------------------------------------------------- helpers

    def _placeholder_entries(self, p: Tensor) -> dict[str, Any]:
        """The entries a first step creates for ``p`` (``"step": 0`` among them)."""
        raise NotImplementedError

    def _drop_placeholders(self) -> None:
        if self._placeholders:
            drop_placeholders(self.state, self.PLACEHOLDER_KEYS)
            self._placeholders = False

    def _create_placeholders(self) -> None:
        """The entries a first step creates, marked as written by none
        (:mod:`alsals.state_placeholders`): ``torch.distributed.checkpoint`` loads only the
        entries an optimizer holds."""
        self._forget_if_cleared()
        create_placeholders(self.state, self.param_groups, self._placeholder_entries)
        anchor = anchor_parameter(self.param_groups)
        if anchor is not None and self.state[anchor].get("step") == 0:
            self.state[anchor][self.STATE_KEY] = self._stored_search_state().to_dict()
        self._placeholders = True

    def _anchor_entry(self) -> dict[str, Any] | None:
        """The search state the anchor's state holds (``None`` where it holds none)."""
        anchor = anchor_parameter(self.param_groups)
        return self.state.get(anchor, {}).get(self.STATE_KEY) if anchor is not None else None

    def _stored_entry(self) -> dict[str, Any] | None:
        """The stored search state: the anchor's; where that parameter holds none
        while the state holds entries (surgery took the one that held it out of the groups,
        its state with it or not), the one stored last, by a step or a load (``None``
        before a first step, and after ``optimizer.state.clear()``)."""
        stored = self._anchor_entry()
        if stored is None:
            self._forget_if_cleared()
            return self._last_stored
        return stored

    def _entry_to_anchor(self) -> None:
        """A loaded search state that another parameter holds (saved while that one was the
        anchor: the first parameter, frozen then or since, or saved by a version that kept
        it on the first parameter whether frozen or not) moves to the anchor."""
        anchor = anchor_parameter(self.param_groups)
        if anchor is None or self.STATE_KEY in self.state.get(anchor, {}):
            return
        for p, entries in list(self.state.items()):
            if isinstance(entries, dict) and self.STATE_KEY in entries:
                self.state[anchor][self.STATE_KEY] = entries.pop(self.STATE_KEY)
                if not entries:
                    del self.state[p]
                return

    def _forget_if_cleared(self) -> None:
        """After ``optimizer.state.clear()`` (no entries left) the search state stored last
        is no longer the run's: the run starts afresh."""
        if self._last_stored is not None and not any(self.state.values()):
            self._last_stored = None

    def _stored_search_state(self) -> Any:
        stored = self._stored_entry()
        if stored is None:
            lr = self.defaults["lr"]
            return self.SEARCH_STATE(step_size=lr, initial_step_size=lr)
        return self.SEARCH_STATE.from_dict(stored)

    def _put_entry(self, entry: dict[str, Any]) -> None:
        """``entry`` stored with the anchor; where the search state was not there
        (surgery moved it), no other parameter keeps a copy, which would take the run back
        if that parameter came back first (a state edited by hand, in place or replaced, is
        read as it is)."""
        anchor = anchor_parameter(self.param_groups)
        if anchor is None:
            return
        moved = self._anchor_entry() is not self._last_stored
        self._last_stored = self.state[anchor][self.STATE_KEY] = entry
        if moved:
            for p, entries in self.state.items():
                if p is not anchor and isinstance(entries, dict):
                    entries.pop(self.STATE_KEY, None)

    def _store(self, search: Any) -> None:
        """The search state stored, and the step size it holds shown in the groups' ``lr``."""
        self._put_entry(search.to_dict())
        for group in self.param_groups:
            group["lr"] = search.step_size * group["lr_scale"]
        self._shown_lr = [g["lr"] for g in self.param_groups]

    def _warn_once(self, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=caller_stacklevel())
