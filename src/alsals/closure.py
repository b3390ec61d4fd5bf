"""The closure protocol: how a line search evaluates the user's loss inside one step.

A line search evaluates the same mini-batch loss at several points. For those values to be
comparable, every evaluation in one step must see the same randomness (dropout masks, noise
drawn inside the closure) and must leave nothing behind in the model (BatchNorm running
statistics updated at trial weights, gradients zeroed by a trial). After the step, the random
stream and the buffers must be where one plain training step would have left them; after an
exception, where they were before the step. This module owns exactly that, and it is the one
place that calls a closure: the optimizers, :mod:`alsals.diagnostics` and
:mod:`alsals.integrations` all go through it.

A closure takes one of two forms:

* ``closure()`` returns the loss. The optimizer sets the gradients to ``None``, calls it
  with autograd on and runs ``loss.backward()``, unless the closure set gradients itself
  (the ``torch.optim.LBFGS`` style: ``zero_grad(); loss.backward(); return loss``), whose
  gradients it then takes as they are; trials run under ``torch.no_grad()``, where the
  backward call of such a closure does nothing (:class:`BackwardSuppressed`).
* ``closure(backward)`` (one parameter, whatever its name) runs backward itself when called
  with ``True`` (gradient accumulation, DDP ``no_sync``, clipping, loss scaling) and returns
  the loss; it is called with ``False`` under ``torch.no_grad()`` for trials.
"""

from __future__ import annotations

import inspect
import numbers
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from alsals.directions import float64_vector
from alsals.distributed import local_shard, world_size

__all__ = [
    "BackwardSuppressed",
    "BufferGuard",
    "Closure",
    "ClosureEvaluator",
    "ClosureForm",
    "LeftGradients",
    "RandomState",
    "as_loss_tensor",
]

Closure = Callable[..., Tensor | float]

_FORMS = (
    "a closure takes no argument (closure(): returns the loss, the optimizer runs backward) "
    "or one (closure(backward): runs backward itself when backward is True)"
)


class BackwardSuppressed(TorchFunctionMode):
    """Inside it ``loss.backward()`` and ``torch.autograd.backward`` do nothing: a trial
    evaluation of a closure that runs backward itself without being told when (the LBFGS
    style, or a declared ``closure_runs_backward=True`` one) returns its loss, under
    ``torch.no_grad()``, instead of failing on a loss without a graph. Every other torch
    call goes through unchanged."""

    def __torch_function__(
        self,
        func: Callable[..., object],
        types: object,
        args: Sequence[object] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        if func is Tensor.backward or func is torch.autograd.backward:
            return None
        return func(*args, **(kwargs or {}))


class ClosureForm:
    """A closure with its form detected once: ``form(backward)`` calls it either way.

    For the plain form ``form(True)`` calls ``closure()``: running backward is then the
    caller's job, unless the closure ran it (:class:`ClosureEvaluator` sees the gradients
    set). ``runs_backward=True`` declares a closure that takes no argument but runs backward
    itself whenever autograd is enabled (its first call): for wrappers that hide the
    signature, such as Lightning's ``functools.partial``; in trials, under
    ``torch.no_grad()``, its backward does nothing. The optimizer sets the gradients to
    ``None`` before that first call.
    """

    def __init__(self, closure: Closure, runs_backward: bool | None = None) -> None:
        self.closure = closure
        self.takes_backward = False
        self.by_keyword = False
        self.by_grad_mode = False
        self._detect()
        if runs_backward is not None and runs_backward != self.takes_backward:
            if not runs_backward:
                raise TypeError(
                    "closure_runs_backward=False, but the closure takes a backward argument"
                )
            self.takes_backward = self.by_grad_mode = True

    def _detect(self) -> None:
        closure = self.closure
        try:
            parameters = list(inspect.signature(closure).parameters.values())
        except (TypeError, ValueError):  # builtins and some C-implemented callables
            return
        if any(p.name == "backward" for p in parameters):
            self.takes_backward = self.by_keyword = True
            return
        required = [
            p
            for p in parameters
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if len(required) == 1 and required[0].kind != inspect.Parameter.KEYWORD_ONLY:
            self.takes_backward = True
        elif required:
            names = ", ".join(p.name for p in required)
            raise TypeError(f"the closure requires the arguments ({names}); {_FORMS}")

    def __call__(self, backward: bool) -> Tensor | float:
        if not self.takes_backward or self.by_grad_mode:
            return self.closure()
        if self.by_keyword:
            return self.closure(backward=backward)
        return self.closure(backward)


def _widest_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The most precise floating dtype among ``params`` (float32 if none): the precision a
    loss returned as a Python number was most likely computed in."""
    dtypes = [p.dtype for p in params if p.is_floating_point()]
    return min(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def _graph_reaches(loss: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether ``loss``'s autograd graph leads to any of ``params`` (read where a backward
    pass has already used the graph, to tell a loss computed before the closure from one
    that does not depend on these parameters)."""
    wanted = {id(p) for p in params}
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in wanted:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def as_loss_tensor(value: object, role: str) -> Tensor:
    """The closure's return value as a 0-dim tensor, or an error that says what came back."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"closure must return the loss as a scalar tensor; {role} returned a tensor "
                f"of shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(
                f"closure must return the loss as a real floating-point tensor; {role} returned "
                f"a tensor of dtype {value.dtype}"
                + (
                    " (a complex value has no order to decrease: return a real loss, such as "
                    "its absolute value)"
                    if value.is_complex()
                    else " (a count or a flag is no loss to differentiate: return the "
                    "differentiable loss)"
                )
            )
        return value.reshape(())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # float64 loses nothing of a float64 loss returned as .item(); the resolution of
        # the test is taken from the parameters' precision (ClosureEvaluator.loss_dtype)
        return torch.tensor(float(value), dtype=torch.float64)
    hint = ""
    if isinstance(value, (tuple, list, dict)) or hasattr(value, "loss"):
        hint = " (of a model's output, return the loss alone: output.loss or output[0])"
    raise TypeError(
        f"closure must return the loss (a scalar tensor); {role} returned "
        f"{type(value).__name__}{hint}"
    )


#: The gradient tensors some optimizer's step left in ``.grad`` (weakly, by id) and their
#: versions then: another optimizer over the same weights (a restart's, built from the model
#: mid-run, or one used in turn) drops them as the one that stepped would have
#: (:func:`left_by_a_step`). Entries of freed tensors are swept once the table has doubled
#: since the last sweep.
_LEFT_BY_STEPS: dict[int, tuple[weakref.ref, int]] = {}
_sweep_above = 1024


def _remember_left(marks: Iterable[tuple[weakref.ref, int] | None]) -> None:
    global _sweep_above
    for mark in marks:
        grad = None if mark is None else mark[0]()
        if grad is not None:
            _LEFT_BY_STEPS[id(grad)] = mark
    if len(_LEFT_BY_STEPS) > _sweep_above:
        # (a snapshot: an optimizer stepping in another thread may add entries meanwhile)
        for key, (ref, _) in list(_LEFT_BY_STEPS.items()):
            if ref() is None:
                _LEFT_BY_STEPS.pop(key, None)
        _sweep_above = max(1024, 2 * len(_LEFT_BY_STEPS))


def left_by_a_step(params: Sequence[Tensor]) -> bool:
    """Whether ``params`` hold exactly the gradients some optimizer's step left them (this
    one's, or another's over the same weights: the one a restart replaced, or one used in
    turn), untouched since, at least one of them."""
    held = False
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        mark = _LEFT_BY_STEPS.get(id(grad))
        if mark is None or mark[0]() is not grad or grad._version != mark[1]:
            return False
        held = True
    return held


class LeftGradients:
    """The gradients a step left in ``.grad``, remembered without keeping them alive.

    A ``closure(backward)`` that does not zero the gradients adds its own to whatever is in
    ``.grad``. When that is exactly what the previous step left there, untouched since (the
    same tensors, not modified in place), the previous step's gradient would silently be
    added to this one: no training loop wants that, so the optimizer drops them before the
    closure runs. Gradients accumulated, zeroed or replaced since (micro-batches run outside
    the closure, a Trainer's backward) are not untouched and stay. Those another optimizer's
    step left are dropped too (the one a restart replaced, or one used in turn over the same
    weights): :func:`left_by_a_step`.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._marks: dict[int, tuple[weakref.ref, int] | None] = {}
        self.add(params)

    @classmethod
    def at_step_end(cls, params: Sequence[Tensor]) -> LeftGradients:
        """The marks of what a step (or a failed attempt at one) leaves ``params``, also
        remembered for a new optimizer over the same weights."""
        left = cls(params)
        _remember_left(left._marks.values())
        return left

    def add(self, params: Sequence[Tensor]) -> None:
        """Mark ``params`` as holding what a backward pass left them (at a step's end, and for
        a group added between steps): their gradients now, untouched until the next step,
        are dropped before it."""
        for p in params:
            self._marks[id(p)] = None if p.grad is None else (weakref.ref(p.grad), p.grad._version)

    def created(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The gradients of ``params`` that are new tensors since they were marked: a
        backward pass after the gradients were set to ``None`` (``zero_grad()``), which is
        how a training loop or a trainer accumulates micro-batches. Not those changed in
        place (clipped after the step, or accumulated into by another optimizer's backward
        pass over the whole model), which say nothing about what a user meant to add."""
        found = []
        for p in params:
            if p.grad is None:
                continue
            mark = self._marks.get(id(p))
            if mark is None or mark[0]() is not p.grad:
                found.append(p.grad)
        return found

    def untouched(self, params: Sequence[Tensor]) -> bool:
        """Whether ``params`` hold exactly the gradients recorded, at least one of them (a
        parameter added since, by ``add_param_group``, must hold none)."""
        held = False
        for p in params:
            mark = self._marks.get(id(p))
            if mark is None:
                if p.grad is not None:
                    return False
                continue
            tensor, version = mark
            if p.grad is None or tensor() is not p.grad or p.grad._version != version:
                return False
            held = True
        return held


def _any_nonzero(grads: Sequence[Tensor]) -> bool:
    """Whether any of the gradients holds a value other than 0 (a NaN counts): one
    synchronisation over all of them."""
    present = [local_shard(g) for g in grads]
    if any(g.is_sparse for g in present):  # (the optimizer refuses them: no look here)
        return True
    device = present[0].device  # (a norm would underflow to 0 for tiny gradients)
    return bool(torch.stack([g.ne(0).any().to(device) for g in present]).any())


class RandomState:
    """A snapshot of torch's global generators: the CPU one and every initialised CUDA device.

    Numpy's and Python's generators are deliberately not touched: replaying them would change
    the user's program in ways they cannot see. Randomness inside a closure should come from
    torch (dropout, ``torch.rand``) to be replayed across the evaluations of one step.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_ready else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def checked_buffers(buffers: Iterable[Tensor] | None) -> list[Tensor]:
    """The ``buffers=`` argument as a list of tensors, or a ``TypeError`` saying what to pass."""
    if buffers is None:
        return []
    if isinstance(buffers, nn.Module):
        raise TypeError("buffers= takes tensors, not a module: pass model.buffers()")
    if isinstance(buffers, Tensor):
        return [buffers]
    out = []
    for item in buffers:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            raise TypeError(
                "buffers= got (name, tensor) pairs: pass model.buffers(), not model.named_buffers()"
            )
        if item is None:
            continue
        if not isinstance(item, Tensor):
            raise TypeError(
                f"buffers= must hold tensors (model.buffers()); got {type(item).__name__}"
            )
        out.append(item)
    return out


def _storage(t: Tensor) -> int | None:
    """The address of ``t``'s storage (``None`` where it has none to read: a DTensor)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _buffer_key(t: Tensor) -> tuple[str, int]:
    """What identifies a buffer's values: its storage (``id`` where it has none, or none
    allocated: every empty tensor's address is 0)."""
    address = _storage(t)
    return ("storage", address) if address else ("tensor", id(t))


def expanded(t: Tensor) -> bool:
    """Whether ``t`` repeats its elements along a dimension (an ``expand``-ed buffer, such
    as ``position_ids``): no in-place write may change it, so a forward pass never moved
    it, and a copy into it is refused. (A sparse tensor reports strides of 0: not one.)"""
    if t.layout != torch.strided:
        return False
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True))


def _not_the_weights(buffers: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """``buffers`` without the tensors that hold the optimizer's own weights
    (``buffers=model.state_dict().values()`` has them): the weights are the step's to move,
    and putting them back before a trial would evaluate it at the starting point."""
    if not buffers:
        return list(buffers)
    weights = {_storage(p) for p in params} - {None}
    return [b for b in buffers if _storage(b) not in weights]


class BufferGuard:
    """Keeps trial evaluations from changing module buffers (BatchNorm running statistics).

    ``capture`` records the buffers; ``restore`` puts the recorded values back.
    """

    def __init__(self, buffers: Sequence[Tensor]) -> None:
        self.buffers = list(buffers)
        self.saved: list[Tensor] = []

    def capture(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    def restore(self) -> None:
        if not (self.buffers and self.saved):
            return
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved, strict=True):
                if buffer.shape != saved.shape:  # (resized in forward: a lazy observer's)
                    buffer.resize_(saved.shape)
            torch._foreach_copy_(self.buffers, self.saved)


class _UnprotectedBufferWatch:
    """Records modules whose unprotected buffers a trial changed (typically BatchNorm created
    without ``buffers=model.buffers()``), and whether any module ran in training mode at all
    (a model in ``eval()`` says nothing about what training-mode trials would do). Buffers
    that stay constant (position ids, masks) are not reported."""

    def __init__(self, protected: Sequence[Tensor]) -> None:
        # (by storage: model.state_dict().values() protects the buffers through views)
        self.protected = {_buffer_key(b) for b in protected}
        self.found: list[str] = []
        self.trained = False
        self._before: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def before(self, module: nn.Module, args: object) -> None:
        if not module.training:
            return
        self.trained = True
        # (a sparse buffer, a graph's adjacency, is not compared: torch.equal has no sparse
        # kernel, and no layer updates one as BatchNorm updates its statistics)
        own = [
            b
            for b in module.buffers(recurse=False)
            if _buffer_key(b) not in self.protected and b.layout == torch.strided
        ]
        if own:
            self._before[id(module)] = [(b, b.detach().clone()) for b in own]

    def after(self, module: nn.Module, args: object, output: object) -> None:
        held = self._before.pop(id(module), None)
        name = type(module).__name__
        if held is None or name in self.found or len(self.found) >= 3:
            return
        if any(not torch.equal(b, old) for b, old in held):
            self.found.append(name)

    def observed(self) -> list[str] | None:
        """The modules found, or ``None`` if nothing ran in training mode."""
        return self.found if self.trained else None


def _compiled_anything() -> bool:
    """Whether torch.compile has compiled a frame in this process: a global module hook
    would then make compiled models recompile, so the buffer watch stays off."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return dynamo is not None and dynamo.counters["frames"]["total"] > 0


class ClosureEvaluator:
    """Evaluates a closure once with gradients, then any number of times without.

    Every trial replays the random state captured before the first evaluation, runs with the
    protected buffers as they were before it (but where it wrote the weights) and leaves them
    as it left them, and hides the gradients from the closure (so a
    ``zero_grad()`` inside it cannot change the direction being searched). ``finish`` leaves
    the random stream as one plain evaluation would; ``abort`` (after an exception) puts the
    random stream and the buffers back to where they were before the step.
    """

    def __init__(
        self,
        closure: Closure,
        params: Iterable[Tensor],
        buffers: Sequence[Tensor],
        runs_backward: bool | None = None,
        left: LeftGradients | None = None,
        own_grads_only: bool = False,
        watch_dropped: bool = True,
        trials_with_grad: bool = False,
    ) -> None:
        if isinstance(closure, Tensor):
            raise TypeError(
                "step() got a tensor, not a closure: pass the function that computes the loss, "
                "optimizer.step(closure), not its value optimizer.step(closure()); the line "
                "search calls it once per trial"
            )
        if closure is None or not callable(closure):
            raise TypeError(
                "this optimizer needs a closure: call optimizer.step(closure) with a function "
                "that computes and returns the loss (see the alsals README, 'The closure'); "
                "trainers that call step() without one (Hugging Face Trainer, Lightning, "
                "GradScaler) have adapters in alsals.integrations (docs/integrations.md)"
            )
        self.closure = ClosureForm(closure, runs_backward)
        self.params = list(params)
        self.runs_backward_itself = self.closure.takes_backward
        self.left = left
        self.own_grads_only = own_grads_only
        # whether to look for nonzero gradients computed since the last step that a closure()
        # drops (one synchronisation where there are any): ``dropped_gradients`` says what
        # the look found, ``None`` where it did not look (none created, or not watching)
        self.watch_dropped = watch_dropped
        self.dropped_gradients: bool | None = None
        # (an expand-ed buffer is not put back either: nothing writes it in place)
        buffers = [b for b in _not_the_weights(buffers, self.params) if not expanded(b)]
        self.before = BufferGuard(buffers)
        self.after_first = BufferGuard(buffers)
        self.rng_before: RandomState | None = None
        self.rng_after: RandomState | None = None
        self._grads_found: LeftGradients | None = None  # .grad as the first evaluation found it
        self.loss_dtype = torch.float32
        self.forwards = 0
        self.backwards = 0
        self.unprotected_modules: list[str] | None = None
        # the weights' norms before and after the first evaluation, where buffers are
        # protected: whether it wrote the weights (a data-dependent initialisation) is read
        # at the first trial
        self._norms: tuple[Tensor, Tensor] | None = None
        self._first_wrote_weights: bool | None = None
        # closure(backward) returned a loss with a graph but left every gradient None
        self.backward_forgotten = False
        # closure() returned a loss with a graph, and the optimizer ran its backward
        self._ran_backward = False
        # trials run the closure's own backward as a no-op (BackwardSuppressed): a declared
        # closure_runs_backward=True one, a closure() that set the gradients itself (the
        # LBFGS style; found at the first evaluation), or any without a first evaluation
        self._suppress_backward = self.closure.by_grad_mode
        self._buffers_after_first = False
        # trials run with autograd on: the closure differentiates inside (a gradient
        # penalty, a physics-informed residual: torch.autograd.grad with create_graph),
        # which fails under torch.no_grad(); found at the first trial that fails so, and
        # kept by the optimizer for its later steps
        self.trials_with_grad = trials_with_grad

    def evaluate_with_grad(self) -> Tensor:
        """First evaluation of the step: loss and gradients at the starting point.

        A ``closure(backward)`` finds the gradients set to ``None`` where they are still the
        ones the previous step left (``left``, see :class:`LeftGradients`). With no trainable
        parameter the plain form returns the loss without a backward pass (the step is then a
        no-op, as in ``torch.optim``).
        """
        self.rng_before = RandomState()
        self.before.capture()
        watched = self._weight_norms() if self.before.buffers else None
        held = [p.grad for p in self.params]
        dropped = not self.runs_backward_itself or self.closure.by_grad_mode
        # a closure() (or one declared to run backward) computes the step's gradient from
        # its own loss alone: gradients computed since the last step (a backward pass outside
        # step() after zero_grad(), Lightning's accumulation) are dropped, which the optimizer
        # says once (not at its first step, whose .grad may hold what an earlier optimizer or
        # loop left; a wrapper that sets them to None itself says so: step_with_scaler's)
        drops = dropped or getattr(self.closure.closure, "drops_gradients", False)
        if self.watch_dropped and drops and self.left is not None:
            created = self.left.created(self.params)
            self.dropped_gradients = _any_nonzero(created) if created else None
        dropped = (
            dropped
            or (self.left is not None and self.left.untouched(self.params))
            or left_by_a_step(self.params)
        )
        # gradients the closure adds to (accumulated outside it): remembered, so that an
        # exception can tell them from this attempt's (not on the plain closure's path)
        self._grads_found = None if dropped else LeftGradients(self.params)
        try:
            with torch.enable_grad():
                if dropped:
                    for p in self.params:
                        p.grad = None
                value = self.closure(True)
                role = "closure(backward=True)" if self.runs_backward_itself else "closure()"
                loss = as_loss_tensor(value, role)
                if not self.runs_backward_itself:
                    # the LBFGS style: the closure ran backward, its gradients are the step's
                    self._suppress_backward = any(p.grad is not None for p in self.params)
                    if self._suppress_backward:
                        self.backwards += 1
                    else:
                        self._check_plain_closure(loss)
                        if loss.requires_grad:
                            self._backward(loss)
                            self._ran_backward = True
        except BaseException:
            # before a completed backward pass: the gradients as they were, where the step or
            # the closure set them to None or replaced them (a closure(backward)'s zero_grad(),
            # its backward pass failing halfway: some new tensors, others not yet); gradients
            # the closure added to in place cannot be told from those it found
            for p, g in zip(self.params, held, strict=True):
                p.grad = g
            raise
        if self.runs_backward_itself:
            self.backwards += 1
            self.backward_forgotten = loss.requires_grad and all(
                p.grad is None for p in self.params
            )
        self.forwards += 1
        self.loss_dtype = loss.dtype if isinstance(value, Tensor) else _widest_dtype(self.params)
        self.rng_after = RandomState()
        if watched is not None:  # (on the device: compared at the first trial, if any)
            self._norms = watched, self._weight_norms()
        return loss.detach()

    def first_wrote_weights(self) -> bool:
        """Whether the first evaluation wrote the weights (through ``.data`` too, which no
        version counter sees): one synchronisation, at a step's first trial."""
        if self._first_wrote_weights is None:
            self._first_wrote_weights = self._norms is not None and not torch.equal(*self._norms)
        return self._first_wrote_weights

    def _weight_norms(self) -> Tensor:
        """Each trained floating-point weight's norm, to tell a first evaluation that wrote
        weights (through ``.data`` too, which no version counter sees) from one that did not.
        Frozen weights are left out: a forward may update them every step by design (MoCo's
        momentum key encoder), which is no initialisation of what the search moves."""
        weights = [
            p.detach()
            for p in self.params
            if p.requires_grad and p.is_floating_point() and p.numel()
        ]
        weights = [local_shard(w) for w in weights]
        if not weights:
            return torch.zeros(0)
        # compared in float32: a forward that rewrites float64 weights by their rounding (a
        # renormalisation) initialises nothing, while a data-dependent initialisation moves
        # a norm by far more than float32's 6e-8 of it
        norms = float64_vector(torch._foreach_norm(weights), weights[0].device)
        return norms.to(torch.float32)

    @property
    def disconnected(self) -> bool:
        """The backward the optimizer ran on ``closure()``'s loss gave no trainable parameter
        a gradient: the loss does not depend on them. Read only for a step that found no
        gradient (not on every step's path)."""
        trainable = [p for p in self.params if p.requires_grad]
        return self._ran_backward and bool(trainable) and all(p.grad is None for p in trainable)

    def _backward(self, loss: Tensor) -> None:
        """``loss.backward()`` for the plain form; a preview (``own_grads_only``) leaves no
        trace in tensors no group holds."""
        try:
            if self.own_grads_only:
                inputs = [p for p in self.params if p.requires_grad]
                if not inputs:
                    return
                loss.backward(inputs=inputs)
            else:
                loss.backward()
        except RuntimeError as err:
            if "modified by an inplace operation" in str(err):
                raise RuntimeError(
                    "closure() returned a loss whose graph holds weights the optimizer has "
                    "moved since (ALSALS moves them to y before taking the gradient): the "
                    "model ran before the closure. Call the model inside the closure"
                ) from err
            if "backward through the graph a second time" not in str(err):
                raise
            if not _graph_reaches(loss, self.params):
                # the closure ran backward itself (the LBFGS form) on a loss none of this
                # optimizer's parameters take part in: a step without gradient, as the plain
                # form's would be (``disconnected``), not a loss computed before the closure
                self.backwards += 1
                return
            raise RuntimeError(
                "closure() returned a loss whose graph a backward pass has already used: it "
                "was computed before the closure (and its backward called there). Compute the "
                "loss inside the closure, and leave backward to the optimizer (retain_graph "
                "would not help: the trials need the loss at the weights they move to)"
            ) from err
        self.backwards += 1

    def _check_plain_closure(self, loss: Tensor) -> None:
        if not loss.requires_grad and any(p.requires_grad for p in self.params):
            raise RuntimeError(
                "the loss returned by closure() does not require grad, so the optimizer "
                "cannot run backward on it: return the loss without .detach() or "
                ".item(), and do not compute it under torch.no_grad() (or run "
                "loss.backward() in the closure before detaching it)"
            )

    def evaluate(self, watch_buffers: bool = False) -> Tensor:
        """A trial evaluation: same randomness as the first one, no autograd, no side effects.
        (A closure that differentiates inside, ``torch.autograd.grad``, fails without
        autograd: its trials run with it, from the first that failed so.)

        With ``watch_buffers``, modules whose unprotected buffers the trial changed are
        recorded in ``unprotected_modules`` (``None`` if no module ran in training mode).
        """
        assert self.rng_before is not None, "evaluate_with_grad must run first"
        if not self._buffers_after_first:  # as the first evaluation left them
            self.after_first.capture()
            self._buffers_after_first = True
        try:
            return self._trial(watch_buffers)
        except RuntimeError as error:
            if self.trials_with_grad or "does not require grad" not in str(error):
                raise
            if world_size(None) > 1:
                # (a rank that alone turned autograd on would run other collectives than the
                # others in its forward passes, DDP's buffer broadcast: a hang)
                raise RuntimeError(
                    f"{error}. In a trial, under torch.no_grad(): a closure that "
                    "differentiates inside (torch.autograd.grad) needs autograd on; under "
                    "torch.distributed, where every rank must run the same trials, turn it on "
                    "inside the closure yourself (with torch.enable_grad(): ...)"
                ) from error
            self.trials_with_grad = True  # (the closure differentiates: the trial again)
            self.forwards += 1  # (the failed one ran its forward pass)
            return self._trial(watch_buffers)

    def _trial(self, watch_buffers: bool) -> Tensor:
        """One trial evaluation (``evaluate``), under ``torch.no_grad()`` unless
        ``trials_with_grad``."""
        assert self.rng_before is not None
        # the trial reads the buffers the first evaluation read (a running mean subtracted
        # in forward, spectral_norm's power iteration, an observer's range, a step counter),
        # and leaves them as that one left them; not after a first evaluation that wrote the
        # weights (a data-dependent initialisation, ActNorm's: put back the flag it set, and
        # every trial would initialise the weights again over the trial's move)
        if not self.first_wrote_weights():
            self.before.restore()
        self.rng_before.restore()
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        watch_buffers = watch_buffers and not _compiled_anything()
        watch = _UnprotectedBufferWatch(self.before.buffers) if watch_buffers else None
        handles = []
        if watch is not None:
            handles.append(nn.modules.module.register_module_forward_pre_hook(watch.before))
            handles.append(nn.modules.module.register_module_forward_hook(watch.after))
        try:
            # (with autograd on, a backward call in a trial would run: none does)
            suppress = self._suppress_backward or self.trials_with_grad
            suppressed = BackwardSuppressed() if suppress else nullcontext()
            grad_mode = torch.enable_grad() if self.trials_with_grad else torch.no_grad()
            with grad_mode, suppressed:
                value = self.closure(False)
                loss = as_loss_tensor(value, "the closure in a trial")
        finally:
            for handle in handles:
                handle.remove()
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self.after_first.restore()
        if watch is not None:
            self.unprotected_modules = watch.observed()
        self.forwards += 1
        return loss.detach()

    def start_without_grad(self) -> None:
        """Evaluate trials only (no first evaluation): each replays the random state and
        restores the buffers as they are now (:mod:`alsals.diagnostics` scans this way); a
        closure that runs backward itself may (its backward does nothing)."""
        self._suppress_backward = True
        self.rng_before = RandomState()
        self.before.capture()
        self.after_first.capture()
        self._buffers_after_first = True

    def finish(self) -> None:
        """Leave the random stream where one plain training evaluation would have left it."""
        if self.rng_after is not None and self.forwards > 1:
            self.rng_after.restore()

    def grads_as_found(self) -> bool:
        """Whether ``.grad`` holds exactly the gradients the step found (the closure's
        evaluation did not change them: gradients accumulated outside the closure, or an
        exception before its backward pass): after an exception they are the user's, not
        this attempt's, and a retry must keep them. Where the step set them to ``None``
        before the closure ran, no: a retry recomputes them (or they are the last step's)."""
        return self._grads_found is not None and self._grads_found.untouched(self.params)

    def abort(self) -> None:
        """After an exception: the random stream and buffers as they were before the step."""
        if self.rng_before is not None:
            self.rng_before.restore()
        self.before.restore()
