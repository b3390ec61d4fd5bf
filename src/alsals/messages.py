"""The words the optimizers say to users, in one place.

The warnings and errors that ``LineSearchOptimizer`` (SLS, AdamSLS, MomentumALSALS) and
``ALSALS`` give, as templates (``str.format`` fills in the optimizer's name and the
numbers), the culprits a skipped step names, and the functions that only build a message's
text from what a step measured. The optimizers decide when to say each; here is what they
say, so that a message is worded once and read together with the others.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

#: A closure whose loss at the same weights differs by more than this (relative) does not
#: replay its randomness.
REPLAY_TOLERANCE = 1e-4
#: The culprit a skipped step names where the loss without gradient is not finite at its
#: starting weights either (``LineSearchOptimizer``'s check after
#: ``NONFINITE_TRIALS_BEFORE_CHECK`` non-finite trials).
NO_GRAD_NONFINITE = (
    "the closure's loss without gradient (as trials evaluate it: under torch.no_grad(), or "
    "closure(False)) at the step's starting weights, where its loss with gradient was finite,"
)
#: The culprit phase 2 names for a non-finite loss at ``w0``.
LOSS_CULPRIT = "the loss"
SCHEDULE_WARNING = (
    "{name}: param_groups[...]['lr'] was overwritten before {n} steps in a row, or lowered "
    "{n} times (a learning-rate schedule, or ReduceLROnPlateau, left in the loop?). Each "
    "write restarts the search from the written value: a schedule that writes before every step makes it backtrack every "
    "step, and one that lowers lr now and then (StepLR, ReduceLROnPlateau) compounds its cuts "
    "with the search's, so the step size falls far below what the search finds: delete the "
    "schedule (the line search picks the step size), or write lr only to set where the next "
    "search starts."
)
#: Appended to the warning that a loss went below ``loss_floor``: a loss that has no lower
#: bound at all is no objective for a line search.
UNBOUNDED_LOSS_HINT = (
    " (A negative log-likelihood that goes below 0 is fine with either.) Only where the "
    "loss has no lower bound at all (a policy gradient's surrogate, -log p times the "
    "advantage) does a line search have nothing to judge: larger steps keep lowering it, and "
    "the policy collapses; train such a loss with AdamW."
)
BUFFERS_WARNING = (
    "{name}: {modules} updated its buffers (running statistics, power-iteration vectors) "
    "during a trial evaluation, "
    "at weights the search may reject: pass buffers=model.buffers() to {name} so that "
    "trials leave them alone"
)
#: Added to it when buffers were given: converting the model after building the optimizer
#: replaces the buffer tensors, so the ones given are no longer the model's.
STALE_BUFFERS_HINT = (
    " (buffers were given, but not these: if the model was moved or converted, model.to() or "
    ".double(), after the optimizer was built, the conversion replaced its buffers; build "
    "the optimizer after it)"
)
#: Added to the warnings that the loss does not follow the gradient, where trials moved
#: unprotected buffers (``BUFFERS_WARNING``, given before): a cause of its own.
BUFFERS_MOVED_HINT = (
    ". The trials also moved module buffers that buffers= does not protect (named in an "
    "earlier warning), which alone makes the loss not follow the gradient: pass "
    "buffers=model.buffers() first"
)
#: A closure that gives no parameter a gradient, or whose loss no trial moves by a single
#: bit, this many steps in a row is one the search cannot use: the optimizer warns.
STALL_WARNING_STEPS = 3
#: Parameters with Adam moments and no gradient this step, under the Polyak cap.
PARTIAL_MODEL_WARNING = (
    "{name}: some parameters with Adam moments got no gradient this step (conditional "
    "computation such as mixture-of-experts routing, or a layer frozen mid-run). loss_floor's "
    "cap models the loss from every parameter's momentum and the running average of w.g; "
    "where parameters drop out and come back the two no longer match, by an amount that grows "
    "with those weights' values, and the cap can stop the steps or stop acting. Pass "
    "loss_floor=None for such a model (ALSALS, whose cap uses the batch's own linear model "
    "only, is not affected)"
)
UNCHANGED_LOSS_WARNING = (
    "{name}: the loss did not change when the weights moved: in {n} searches in a row every "
    "trial, up to a move as large as the weights themselves (of norm 1 where they are "
    "smaller), gave exactly the loss at the start, so no step was taken. Either the closure does not compute the loss from the "
    "model's current weights (call the model inside the closure: outputs computed before it, "
    "or a loss of another model, stay the same whatever the optimizer does to the weights), "
    "or the loss changes by less than its own rounding (compute it in a wider dtype)"
)
#: Searches in a row whose finite-difference probe changed the loss by less than its
#: rounding before the optimizer says so (on our digits task in float32 one probe in ten
#: is hidden; on a float32 loss of order 1, a cross-entropy or the GPT-2 stand-in's, nearly
#: every probe is: the paper's fd_step lies below float32's resolution of such a loss).
HIDDEN_PROBE_SEARCHES = 10
HIDDEN_PROBE_WARNING = (
    "{name}: in {n} searches in a row the finite-difference probe (a move of fd_step={fd_step:g} "
    "along the search direction) changed the loss ({loss:.6g}, in {dtype}) by less than its "
    "rounding, so the slope f_a is 0 or a rounding step divided by fd_step, and the Armijo "
    "test measures little (with f_a = 0 it only asks that the loss not rise, and the step "
    "size may grow while the loss climbs; the paper's fd_step=5e-8 lies below float32's "
    "resolution of most losses of order 1). Compute the loss in float64, or leave out a "
    "large constant part of it, or use the exact slope (slope='analytic', MomentumALSALS's "
    "default)"
)
FAILED_SEARCHES_WARNING = (
    "{name}: {n} searches in a row tried max_trials step sizes each and none passed the Armijo "
    "test, so no step was taken (the next search starts at {next:.3g}): the step size is far "
    "above any the loss accepts (an lr or a growth_interval too large: each "
    "search starts from where the last one left the step size), or the loss's gradient does "
    "not describe it along the move (see the warnings before this one, if any)"
)
UNRESOLVED_WARNING = (
    "{name}: {n} searches in a row ended unresolved, without a step: the loss is computed in "
    "{dtype}, whose rounding ({ulps} units in the last place: {resolution:.3g} at a loss of "
    "{loss:.3g}) is larger than the decreases the trials could show, so the test cannot "
    "judge any step. Compute the loss in float32 (cast the model's output before the loss, "
    "e.g. loss_fn(output.float(), target)); the weights may stay in {dtype}"
)
DISCONNECTED_WARNING = (
    "{name}: the loss returned by closure() does not depend on the parameters this optimizer "
    "holds (after backward none has a gradient), so {n} steps in a row were skipped. Build "
    "the optimizer from the parameters of the model the closure evaluates (after replacing or "
    "copying the model, pass the new model's parameters)"
)
OVERSTATED_WARNING = (
    "{name}: the loss fell by about 1/{factor:.2g} of what the gradient promised at every "
    "trial of a search, however small the step, and {outcome}. Either the gradient is about "
    "{factor:.2g}x the loss the closure returns (a closure that accumulates gradients over micro-batches without dividing each one's "
    "loss by their number, runs backward twice, or returns a loss scaled otherwise than the "
    "one it differentiates; AdamW does not notice: its update ignores the gradient's scale): "
    "return the loss whose gradient the closure computes; or the loss has a kink at these "
    "weights that its gradient does not see (an L1 term |w| at exactly 0, whose gradient "
    "autograd takes as 0): start such weights away from the kink, or smooth the term; or "
    "the forward pass writes the weights itself (a max-norm constraint through .data), "
    "undoing part of each trial's move: apply it after the step instead"
)
#: Added to it where some weights are of a dtype coarser than float32.
COARSE_WEIGHTS_HINT = (
    "; or the weights are {dtype}, whose rounding moves them other than each trial says "
    "(a small move rounds away, a larger one to the grid): keep float32 weights and run the "
    "forward pass in {dtype} under torch.autocast"
)
NO_BACKWARD_WARNING = (
    "{name}: closure(backward) returned a loss that requires grad but no parameter has a "
    "gradient, so the step was skipped: call loss.backward() in the closure when its argument "
    "is True (or use the form closure() without arguments, which leaves backward to the "
    "optimizer); if it does, the loss does not depend on this optimizer's parameters (build "
    "the optimizer from the parameters of the model the closure runs)"
)
COMPLEX_PARAMETERS = (
    "complex parameters are not supported (the Armijo test and Adam's moments are defined for "
    "real weights): hold each as a real tensor of (real, imaginary) pairs and view it as "
    "complex where the model uses it (torch.view_as_complex)"
)
DROPPED_GRADIENTS_WARNING = (
    "{name}: .grad held gradients computed since the last step (a backward pass outside "
    "step(), a trainer's gradient accumulation before it, or another optimizer's step over "
    "the same parameters in between) and were dropped: a closure() "
    "that returns the loss gets the step's gradient from that loss alone. To accumulate "
    "micro-batches, run them inside a closure(backward) (README, 'The closure'); in Lightning, "
    "use manual optimization with alsals.integrations.lightning.line_search_step; to say "
    "that nothing is lost, set the gradients to None (optimizer.zero_grad()) before step()"
)
CONTRADICTED_WARNING = (
    "{name}: at two searches, with none in between that the gradient's slope accepted, "
    "every trial raised the loss in proportion to the step size where the slope -g.d said "
    "it would fall. Once, that is a kink of the loss, and the search stepped through it; "
    "again, the gradient is likely not the loss's own: a term computed from detached "
    "tensors, a surrogate or straight-through gradient, or a closure that returns another "
    "loss than the one it differentiates. This search ended {kind}, without a step, and so "
    "will the next ones while it lasts (counted in the state's 'kinks_in_a_row')."
)
UNDONE_WARNING = (
    "{name}: the loss was not finite on two steps in a row after an update that no "
    "evaluation had tested (a step reusing the last search's step size, or AdamSLS's update "
    "along the momentum, which its search along the preconditioned gradient does not test): "
    "that update was undone (the weights moved back, Adam's moments kept) and the next step "
    "searches from a smaller step size. A loss that is not finite beyond some weights (a "
    "log or a square root of them) causes this; further undos are counted in the state's "
    "'undone_updates' without warning."
)
#: What to do instead of a group ``lr`` of 0 (frozen parameters, AdamW's idiom), which no
#: ``lr_scale`` can express (it must be > 0).
FROZEN_GROUP_ADVICE = (
    "a group with lr 0 (parameters frozen by their rate, as AdamW allows) cannot be one here, "
    "as the searched step size moves every group: freeze those parameters with "
    "requires_grad_(False) (a parameter without a gradient stays where it is) or leave them "
    "out of the optimizer"
)


#: What the search did, in ``OVERSTATED_WARNING``: it passed no trial, or one that did not
#: lower the loss by more than its rounding resolves (a line search's pass by rounding;
#: ``ALSALS``'s, whose test credits the averaging move, may even have raised it).
OVERSTATED_OUTCOMES = (
    "none could pass the Armijo test, so no step was taken",
    "the trial it passed did not lower the loss by more than its rounding resolves",
)


def overstated_message(
    name: str, factor: float, params: Iterable[Tensor], taken: bool = False
) -> str:
    """``OVERSTATED_WARNING``, with ``COARSE_WEIGHTS_HINT`` where some weights are coarser
    than float32 (bfloat16, float16): their rounding, not the closure, may be the cause.
    ``taken``: the search passed a trial, which lowered the loss by no more than its
    rounding resolves."""
    outcome = OVERSTATED_OUTCOMES[taken]
    message = OVERSTATED_WARNING.format(name=name, factor=factor, outcome=outcome)
    eps32 = torch.finfo(torch.float32).eps
    coarse = sorted({str(p.dtype) for p in params if torch.finfo(p.dtype).eps > eps32})
    return message + (COARSE_WEIGHTS_HINT.format(dtype=", ".join(coarse)) if coarse else "")


def not_replayed_message(name: str, loss0: float, again: float) -> str | None:
    """The warning for a closure that gave ``again`` at the weights where it had given
    ``loss0`` (``None`` where the two agree to ``REPLAY_TOLERANCE``, or ``again`` is not
    finite: the skip of a non-finite trial names that): it does not replay its randomness."""
    if not abs(again - loss0) > REPLAY_TOLERANCE * max(abs(loss0), 1e-12):
        return None
    return (
        f"{name}: the closure gave {again:.6g} at the same weights where it had given "
        f"{loss0:.6g}: it does not replay its randomness, or it changes what its next call "
        "reads, so the line search compares losses of different batches, augmentations or "
        "inputs. Draw data and numpy/random augmentation before building the closure; inside "
        "it, use torch's random generator only (replayed for every evaluation); carry state "
        "between batches (an RNN's hidden state, a counter) after step(), or in a "
        "closure(backward) only when backward is True."
    )


# ALSALS's own (alsals.schedule_free); the ones above are LineSearchOptimizer's, and
# ALSALS's too where it imports them

#: The culprit a skipped step names when its trials' losses were not finite, nor the loss at
#: ``y`` (at the first step) or at the averaging move alone evaluated without gradient.
TRIALS_NONFINITE = (
    "the closure's loss without gradient (as trials evaluate it: under torch.no_grad(), or "
    "closure(False)), at the trials and at the point that needs no step size (y at a run's "
    "first step, the averaging move alone after it), where its loss with gradient at y was "
    "finite,"
)
UNCHANGED_WARNING = (
    "ALSALS: the loss did not change when the weights moved: in {n} searches in a row every "
    "evaluation gave exactly the loss at the start ({loss:.3g}; {first:.3g} at the run's first "
    "step), so each ended without a step size (only Schedule-Free's averaging move was taken). "
    "Either the closure does not compute the loss from the model's current weights (call the "
    "model inside the closure: outputs computed before it, or a loss of another model, stay "
    "the same whatever the optimizer does to the weights), or the loss changes by less than "
    "its own rounding (compute it in a wider dtype, or leave out a large constant part), or it is flat along the move where its "
    "gradient says otherwise (a kink: a clamp or ReLU at its bound, whose gradient there "
    "autograd takes from the other side)"
)
#: A loss this many times below the run's first that no move changes has converged to what
#: its rounding resolves: the warning then says so instead of suspecting the closure.
CONVERGED_RATIO = 1e-4
CONVERGED_WARNING = (
    "ALSALS: the loss no longer changes when the weights move ({n} searches in a row): at "
    "{loss:.3g}, against {first:.3g} at the run's first step, it has reached what its "
    "rounding resolves, and the run has converged (only Schedule-Free's averaging moves the "
    "weights now). Nothing is wrong; to go further, compute the loss in float64"
)
#: ``state_dict()`` called while a step (or a preview) runs the closure.
IN_STEP_STATE_DICT = (
    "{name}: state_dict() was taken inside the closure of a step (or a preview): it holds the "
    "optimizer's state as it was before this step, while the model's weights are where the "
    "step evaluates the loss (a trial point during a search), so a checkpoint of both taken "
    "now does not resume this run. Take checkpoints between steps"
)
#: A call that would change the optimizer while a step (or a preview) runs the closure.
IN_STEP_REFUSED = (
    "{name}.{what} was called inside the closure of a step (or a preview), while the "
    "optimizer is using its state and the parameters; call it between steps"
)

#: Saving or copying between ``train()`` and the step: the model holds ``y``, and the copy of
#: ``x`` that ``train()`` holds aside is in no checkpoint.
HELD_WARNING = (
    "ALSALS: {what} was taken while train() holds the weights at y (the point of the "
    "gradient), not at the average x they hold between steps; the copy of x train() keeps "
    "is not part of it, so a model saved or copied now, and the run resumed from it, "
    "continue from y. Call optimizer.eval() before saving or copying (and train() after)"
)


def unchanged_message(loss: float, first: float, followed: bool, predicted: bool) -> str:
    """The warning for searches whose every evaluation gave the starting loss: a converged
    run's where an earlier search saw the loss follow the weights (``followed``: the closure
    computed it from them), or where the loss has fallen ``CONVERGED_RATIO`` below the
    run's first, unless the gradient ``predicted`` a change far above the loss's rounding
    (a loss computed outside the closure after some steps); else the one that suspects the
    closure."""
    converged = not predicted and (followed or 0.0 <= loss <= CONVERGED_RATIO * first)
    template = CONVERGED_WARNING if converged else UNCHANGED_WARNING
    return template.format(n=STALL_WARNING_STEPS, loss=loss, first=first)
