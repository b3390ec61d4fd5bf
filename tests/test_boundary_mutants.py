"""Behaviours at the torch.optim boundary that mutation testing found unpinned.

Each test pins one behaviour of the shared base class (``searching_optimizer``), the
state-dict boundary (``torch_optim_boundary``), the closure protocol (``closure``), the
Adam directions (``directions``) or the argument validation (``hyperparameters``): a
small change there that the rest of the suite let through fails here.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS

#: Every optimizer a property holds for, the paper's ALSALS configuration included.
ALL = [ALSALS, ALSALS.paper, SLS, AdamSLS, MomentumALSALS]
ALL_IDS = ["ALSALS", "ALSALS.paper", "SLS", "AdamSLS", "MomentumALSALS"]


@pytest.fixture(params=ALL, ids=ALL_IDS)
def make(request):
    return request.param


@pytest.mark.parametrize(
    "bad",
    [torch.tensor([0.1, 0.2]), torch.tensor([]), torch.tensor(0.1 + 0j)],
    ids=["two-elements", "empty", "complex"],
)
def test_lr_tensor_that_holds_no_one_real_number_is_a_type_error_naming_lr(make, bad):
    """A tensor ``lr`` counts as a number only with exactly one real element: two (or none)
    or a complex one is the ``TypeError`` naming ``lr``, not torch's "cannot be converted
    to Scalar" or Python's "float() argument must be ... not 'complex'"."""
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="invalid lr"):
        make([w], lr=bad)


ADAM = [ALSALS, ALSALS.paper, AdamSLS, MomentumALSALS]
ADAM_IDS = ["ALSALS", "ALSALS.paper", "AdamSLS", "MomentumALSALS"]


@pytest.mark.parametrize("make", ADAM, ids=ADAM_IDS)
@pytest.mark.parametrize("betas", [(0.9, 0.999, 0.5), [0.9], ()])
def test_betas_must_be_a_pair(make, betas):
    """``betas`` of three (or one, or no) values is a ``ValueError`` naming ``betas``: a
    third value is no setting any of them reads, and taking the first two would hide the
    typo."""
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="betas"):
        make([w], betas=betas)


def quadratic(*ws):
    """``sum ||w - 1||^2`` over the tensors: a loss with a known minimum."""

    def closure():
        return sum(((w - 1.0) ** 2).sum() for w in ws)

    return closure


def test_a_state_where_only_some_groups_carry_the_shown_lr_loads(make):
    """``shown_lr`` is used only where every group carries one as a float: a state where
    one group lacks it (edited by hand, merged from two checkpoints) loads as a state without
    any, and the next step runs, instead of failing on the missing one."""
    torch.manual_seed(0)
    w1 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    w2 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = make([{"params": [w1]}, {"params": [w2]}], lr=0.1)
    opt.step(quadratic(w1, w2))
    state = opt.state_dict()
    assert all("shown_lr" in g for g in state["param_groups"])
    del state["param_groups"][1]["shown_lr"]
    opt.load_state_dict(state)
    opt.step(quadratic(w1, w2))
    assert torch.isfinite(w1).all() and torch.isfinite(w2).all()


def test_an_old_checkpoint_with_the_search_state_on_a_frozen_first_parameter_leaves_it_no_entry(
    make,
):
    """A state saved (before 0.2.17) with the search state on a frozen first parameter: the
    load moves it to the anchor and the frozen parameter keeps no state at all, not an empty
    entry that every later checkpoint would carry (and a checkpointing tool take as state)."""
    frozen = torch.zeros(2, dtype=torch.float64, requires_grad=False)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = make([frozen, w], lr=0.1)
    opt.step(quadratic(w))
    saved = copy.deepcopy(opt.state_dict())  # (state_dict() holds the live entries)
    key = opt.STATE_KEY
    assert 0 not in saved["state"] and key in saved["state"][1]
    saved["state"][0] = {key: saved["state"][1].pop(key)}  # where an older version kept it

    resumed = make([frozen, w], lr=0.1)
    resumed.load_state_dict(saved)
    assert frozen not in resumed.state
    again = resumed.state_dict()
    assert 0 not in again["state"]
    assert key in again["state"][1]
    assert again["state"][1][key] == opt.state_dict()["state"][1][key]
    assert resumed.search_state == opt.search_state


def test_a_closure_with_one_required_keyword_only_argument_is_refused_by_name(make):
    """A closure whose one required argument is keyword-only (and not ``backward``) fits
    neither form: the ``TypeError`` names the argument and the two forms, before the
    closure is called with a positional ``backward`` it cannot take."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = make([w], lr=0.1)
    before = w.detach().clone()

    def closure(*, scale):
        return scale * ((w - 1.0) ** 2).sum()

    with pytest.raises(TypeError, match=r"requires the arguments \(scale\)"):
        opt.step(closure)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("signature", ["keyword-only", "default"])
def test_a_closure_taking_backward_by_name_is_called_by_name(make, signature):
    """A closure with a parameter named ``backward`` takes the ``closure(backward)`` form
    whether it is keyword-only or has a default: the first evaluation gets
    ``backward=True`` (and runs backward itself), every trial ``backward=False``."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = make([w], lr=0.1)
    calls = []

    def body(backward):
        calls.append(backward)
        w.grad = None
        loss = ((w - 1.0) ** 2).sum()
        if backward:
            loss.backward()
        return loss

    if signature == "keyword-only":

        def closure(*, backward):
            return body(backward)
    else:

        def closure(backward=False):
            return body(backward)

    for _ in range(3):
        opt.step(closure)
    assert calls[0] is True and calls.count(True) == 3
    assert False in calls  # trials ran, told not to run backward
    assert ((w.detach() - 1.0) ** 2).sum() < 3.0


def test_a_zero_gradient_beside_an_unused_parameter_is_no_forgotten_backward(make):
    """``closure(backward)`` that ran backward at a minimum (the gradient exactly 0) while
    one parameter takes no part in the loss (its ``.grad`` stays ``None``): the step is
    skipped without the warning that says backward was forgotten, which is for a closure
    that left *every* gradient ``None``."""
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)  # at the minimum
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = make([w, unused], lr=0.1)

    def closure(backward):
        w.grad = None
        loss = ((w - 1.0) ** 2).sum()
        if backward:
            loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
    assert w.grad is not None and unused.grad is None
    assert opt.last_step.kind == "zero_grad"
    assert not [m for m in caught if "no parameter has a gradient" in str(m.message)]


def test_a_step_size_beyond_float32_times_lr_scale_is_clamped_not_an_error(make):
    """A step size at float32's largest value times an ``lr_scale`` above 1 moves the weights
    by a factor float32 cannot hold: it is clamped (the move overflows, the trial is
    non-finite and the search cuts it), in the descent direction's sign too, not handed to
    torch, which refuses it with a ``RuntimeError``."""
    w = torch.zeros(3, requires_grad=True)
    opt = make([{"params": [w], "lr_scale": 10.0}], lr=1e45)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            opt.step(quadratic(w))
    assert torch.isfinite(w).all()


def test_groups_with_different_lrs_are_refused_naming_the_one_that_differs(make):
    """Groups that carry different ``lr`` (and do not all agree, so none overrides the
    constructor's): the ``ValueError`` names the group's ``lr`` that differs from the
    constructor's ``lr=0.1`` (0.2), not the other way round."""
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as error:
        make([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 0.1}], lr=0.1)
    message = str(error.value)
    assert "['lr'] = 0.2" in message or "(0.2, the optimizer's is 0.1)" in message, message


@pytest.mark.parametrize(
    "make",
    [ALSALS.paper, AdamSLS, MomentumALSALS],
    ids=["ALSALS.paper", "AdamSLS", "MomentumALSALS"],
)
def test_adam_moments_follow_the_recursion_of_the_gradients_taken(make):
    """After ``t`` steps the state holds Adam's moments of the gradients the steps took,
    ``m <- beta1 m + (1 - beta1) g`` and ``v <- beta2 v + (1 - beta2) g^2`` (Eq. 3), and
    ``step = t``: the second moment decays by ``beta2`` at every commit, it does not only
    accumulate (float64, a quadratic of four curvatures, ``beta2 = 0.5`` so the decay
    shows)."""
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    curvature = torch.tensor([1.0, 2.0, 5.0, 0.5], dtype=torch.float64)
    opt = make([w], lr=0.1, betas=(0.9, 0.5))
    grads = []

    def closure(backward):
        w.grad = None
        loss = (curvature * (w - 1.0) ** 2).sum()
        if backward:
            loss.backward()
            grads.append(w.grad.clone())
        return loss

    for _ in range(6):
        opt.step(closure)
        assert opt.last_step.kind == "search"
    m = torch.zeros(4, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    for g in grads:
        m = 0.9 * m + 0.1 * g
        v = 0.5 * v + 0.5 * g * g
    state = opt.state[w]
    assert state["step"] == len(grads) == 6
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_loss_of_one_element_in_any_shape_is_taken_as_the_scalar(make, shape):
    """A closure may return its loss as any one-element tensor (a model's ``(1,)`` or
    ``(1, 1)`` output left unsqueezed): it is the scalar loss, the step differentiates it
    and the search lowers it, instead of refusing it as a tensor of the wrong shape."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = make([w], lr=0.1)

    def closure():
        return ((w - 1.0) ** 2).sum().reshape(shape)

    start = closure().item()
    for _ in range(3):
        loss = opt.step(closure)
    assert loss.numel() == 1
    assert closure().item() < start
