"""Behaviours of the landscape scan, its figures and the mixed-precision helpers that a
mutation audit found unpinned: each test fails on one small, plausible change of the source
(the audit's Hugging Face and Lightning tests stand beside their integrations' own, in
tests/integrations/)."""

from __future__ import annotations

import math

import pytest
import torch

from alsals import SLS, MomentumALSALS
from alsals.acceptance import ArmijoTest, loss_resolution
from alsals.diagnostics import scan_direction
from alsals.diagnostics.scan import log_grid

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64)
W_STAR = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def quadratic(w):
    def closure():
        return 0.5 * (w - W_STAR) @ A @ (w - W_STAR)

    return closure


def squared_distance(w, target):
    def closure():
        return ((w - target) ** 2).sum()

    return closure


def nan_near_the_start(w):
    """``(w - 3)^2``, but NaN while ``0 < w < 1e-3``: from ``w = 0`` the smallest step
    sizes of a grid land in the hole, larger ones do not."""

    def closure():
        loss = ((w - 3.0) ** 2).sum()
        hole = ((w > 0.0) & (w < 1e-3)).any()
        return torch.where(hole, torch.full_like(loss, math.nan), loss)

    return closure


# ---------------------------------------------------------------------------- log_grid


@pytest.mark.parametrize("num", [0, 1])
def test_log_grid_refuses_fewer_than_two_points(num):
    """A log grid has both its ends: ``num`` below 2 is a ValueError (``num=1`` returned
    the two ends, a grid of 2 points where 1 was asked for)."""
    with pytest.raises(ValueError, match="invalid grid"):
        log_grid(1e-3, 1.0, num)


# ---------------------------------------------------------------------- scan's numbers


def test_best_step_size_ignores_non_finite_decreases_wherever_they_lie():
    """``best_step_size`` is the grid point with the largest finite decrease, also when the
    smallest step sizes give a NaN loss (a NaN first in the grid was reported as best)."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=0.1)
    grid = log_grid(1e-6, 10.0, 15)
    scan = scan_direction(opt, nan_near_the_start(w), grid)
    assert math.isnan(scan.decreases[0]) and math.isfinite(scan.decreases[-1])
    finite = [(d, e) for d, e in zip(scan.decreases, grid, strict=True) if math.isfinite(d)]
    assert scan.best_step_size == max(finite)[1]
    assert math.isfinite(scan.decreases[grid.index(scan.best_step_size)])


def test_a_decrease_exactly_on_the_boundary_is_accepted_as_the_search_accepts_it():
    """Eq. 9 is ``>=``: a trial whose decrease equals the boundary passes. On
    ``f(w) = -w + w^2/2`` from 0 with ``c = 0.5`` the step size 1 decreases the loss by
    exactly 0.5 = c * eta * slope (every number exact in float64)."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def closure():
        return (-w + 0.5 * w * w).sum()

    opt = SLS([w], lr=1.0, c=0.5)
    scan = scan_direction(opt, closure, [1.0])
    assert scan.slope == 1.0 and scan.decreases == [0.5] and scan.boundary == [0.5]
    test = ArmijoTest(c=0.5, smoothing=opt.param_groups[0]["smoothing"])
    assert test.accepts(0.5, 1.0, 1.0)  # the search's own test
    assert scan.accepted == [True]


def test_a_negative_slope_uses_one_over_c_in_the_boundary():
    """``c_h`` of Eq. 8 is ``1/c`` where the smoothed slope is not positive (momentum
    pointing against this batch's gradient): the boundary is ``eta G / c`` then, not
    ``c eta G``, and the step size the search accepts passes the scan's test."""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=0.01, search_interval=1, loss_floor=None, smoothing=0.0)
    far = torch.tensor([100.0, 0.0], dtype=torch.float64)
    for _ in range(10):  # momentum builds up towards +x
        opt.step(squared_distance(w, far))
    behind = w.detach() - torch.tensor([0.01, 0.0], dtype=torch.float64)
    closure = squared_distance(w, behind)  # this batch's gradient points back
    grid = [1e-3, 1e-2, 1e-1]
    scan = scan_direction(opt, closure, grid)
    assert scan.kind == "search" and scan.slope < 0.0 and scan.slope_average == scan.slope
    c = opt.param_groups[0]["c"]
    assert scan.boundary == pytest.approx([e * scan.slope / c for e in grid], rel=1e-12)
    assert scan.accepted[0]  # a decrease of -1.9e-5 against a boundary of -3.0e-5
    chosen = scan.chosen_step_size
    assert chosen is not None
    at_chosen = scan_direction(opt, closure, [chosen])
    assert at_chosen.accepted == [True]
    opt.step(closure)
    assert opt.last_step.step_size == chosen


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64])
def test_a_warm_up_boundary_is_minus_the_rounding_of_the_loss_in_its_precision(loss_dtype):
    """During warm-up the boundary is minus the loss's resolution (any trial that does not
    raise the loss measurably passes), in the precision the loss was computed in: a float32
    loss of float64 weights has float32's resolution. A plus sign, or the weights' precision,
    gives another boundary."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    inner = quadratic(w)

    def closure():
        return inner().to(loss_dtype)

    opt = SLS([w], lr=1.0, warmup_steps=3)
    scan = scan_direction(opt, closure, [1e-3, 1e-2])
    assert scan.warmup
    floor = -loss_resolution(loss_dtype, scan.loss)
    assert floor < 0.0
    assert scan.boundary == [floor, floor]
    assert scan.accepted == [True, True]


# --------------------------------------------------------------------------- figures


def _drawn(monkeypatch):
    """The figures ``savefig`` was called on (nothing written)."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    return saved


def _points(ax, color):
    from matplotlib.colors import to_rgba

    found = []
    for collection in ax.collections:
        colors = collection.get_facecolors()
        offsets = collection.get_offsets()
        if len(offsets) and len(colors) and tuple(colors[0][:3]) == to_rgba(color)[:3]:
            found.extend((float(x), float(y)) for x, y in offsets)
    return found


def test_the_chosen_step_is_marked_on_the_curve_at_the_nearest_grid_point(tmp_path, monkeypatch):
    """Fig. 2's red point sits at the chosen step size, at the decrease of the grid point
    nearest to it on the log axis (not the farthest); the green one at the best step."""
    pytest.importorskip("matplotlib")
    from alsals.diagnostics.plots import plot_single

    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=1.0)
    grid = log_grid(1e-4, 10.0, 11)
    scan = scan_direction(opt, quadratic(w), grid)
    chosen = scan.chosen_step_size
    assert chosen is not None
    nearest = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / chosen)))
    saved = _drawn(monkeypatch)
    plot_single(scan, tmp_path / "single.png")
    (ax, *_) = saved[0].axes
    assert _points(ax, "red") == [(chosen, scan.decreases[nearest])]
    best = grid.index(scan.best_step_size)
    assert _points(ax, "green") == [(scan.best_step_size, scan.decreases[best])]


def test_a_scan_with_some_non_finite_decreases_is_still_drawn(tmp_path, monkeypatch):
    """A curve with NaN at a few step sizes (the loss overflowed or is undefined there) is
    drawn with its finite points; only a scan with no finite decrease at all (a step that
    took no update) gets the "no direction to scan" figure."""
    pytest.importorskip("matplotlib")
    from alsals.diagnostics.plots import plot_heatmap, plot_single

    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=0.1)
    scan = scan_direction(opt, nan_near_the_start(w), log_grid(1e-6, 10.0, 15))
    assert any(math.isnan(d) for d in scan.decreases)
    saved = _drawn(monkeypatch)
    plot_single(scan, tmp_path / "single.png")
    plot_heatmap([scan], tmp_path / "heatmap.png")
    single, heatmap = saved
    assert "loss decrease" in [line.get_label() for line in single.axes[0].get_lines()]
    assert heatmap.axes[0].get_xlabel() == "step size"  # a heatmap, not the text figure


def test_consecutive_batches_fade_from_the_newest_to_the_oldest(tmp_path, monkeypatch):
    """Fig. 3 draws older batches fainter: the curves' opacity rises with the scan's place
    in order, the newest fully opaque."""
    pytest.importorskip("matplotlib")
    from alsals.diagnostics.plots import plot_consecutive

    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=1.0)
    scans = []
    for _ in range(4):
        scans.append(scan_direction(opt, quadratic(w), log_grid(1e-4, 1.0, 6)))
        opt.step(quadratic(w))
    saved = _drawn(monkeypatch)
    plot_consecutive(scans, tmp_path / "consecutive.png")
    curves = [line for line in saved[0].axes[0].get_lines() if len(line.get_xdata()) == 6]
    alphas = [line.get_alpha() for line in curves]
    assert len(alphas) == 4
    assert alphas == sorted(alphas) and alphas[0] < alphas[-1] == pytest.approx(1.0)


def test_the_heatmap_scales_its_colours_to_the_rises_where_nothing_decreases(tmp_path, monkeypatch):
    """Where no step size decreases the loss (a tiny step leaves it exactly unchanged, the
    others overshoot), the colours span the largest rise, not a zero-width range that
    paints every cell alike."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import QuadMesh

    from alsals.diagnostics.plots import plot_heatmap

    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def closure():
        return (50.0 * (w - 1.0) ** 2).sum()

    opt = SLS([w], lr=1.0)
    scan = scan_direction(opt, closure, [1e-30, 1.0, 10.0])
    assert scan.decreases[0] == 0.0 and all(d < 0.0 for d in scan.decreases[1:])
    saved = _drawn(monkeypatch)
    plot_heatmap([scan], tmp_path / "heatmap.png")
    (mesh,) = [c for c in saved[0].axes[0].collections if isinstance(c, QuadMesh)]
    largest = max(abs(d) for d in scan.decreases)
    assert mesh.norm.vmax == pytest.approx(largest) and mesh.norm.vmin == pytest.approx(-largest)


# ------------------------------------------------------------------- mixed precision


def test_autocast_closure_widens_a_half_precision_loss_to_float32():
    """``autocast_closure`` returns the loss in float32 or wider: a bfloat16 loss (a
    hand-written reduction) is flagged and then widened, in both closure forms."""
    from alsals.integrations.amp import autocast_closure

    w = torch.ones(3, requires_grad=True)

    def plain():
        return (w.bfloat16() * 2.0).sum()

    def with_backward(backward):
        return (w.bfloat16() * 2.0).sum()

    for closure, args in ((plain, ()), (with_backward, (False,))):
        with pytest.warns(RuntimeWarning, match="bfloat16"):
            loss = autocast_closure(closure, "cpu", torch.bfloat16)(*args)
        assert loss.dtype == torch.float32 and loss.item() == 6.0


def _fp16_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    x = torch.randn(16, 6)
    y = torch.randint(0, 2, (16,))

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.functional.cross_entropy(model(x), y)

    return model, closure


def test_step_with_scaler_leaves_the_update_to_the_caller_with_update_false():
    """``update=False`` leaves ``scaler.update()`` to the caller (several optimizers sharing
    one scaler): the scale stays as it was after an overflow until the caller updates,
    which then backs it off once, with both optimizers' inf checks recorded."""
    from alsals.integrations.amp import step_with_scaler

    first, first_closure = _fp16_problem()
    second, second_closure = _fp16_problem()
    opt1, opt2 = SLS(first.parameters()), SLS(second.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the scaled gradients overflow
    step_with_scaler(opt1, first_closure, scaler, update=False)
    step_with_scaler(opt2, second_closure, scaler, update=False)
    assert opt1.last_step.kind == "nonfinite" and opt2.last_step.kind == "nonfinite"
    assert scaler.get_scale() == 2.0**40
    scaler.update()
    assert scaler.get_scale() == 2.0**39
    step_with_scaler(opt1, first_closure, scaler)  # update=True: the scaler's own update
    assert scaler.get_scale() == 2.0**38
