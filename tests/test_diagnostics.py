"""The landscape scan: exact, side-effect free, and consistent with the step it explains."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from alsals import ALSALS, SLS, MomentumALSALS
from alsals.diagnostics import LandscapeRecorder, scan_direction
from alsals.diagnostics.scan import log_grid
from conftest import SmallNet, bce_closure, make_classification

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64)
W_STAR = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def quadratic(w):
    return lambda: 0.5 * (w - W_STAR) @ A @ (w - W_STAR)


def trained_net(cls, steps=3):
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = cls(model.parameters(), lr=5.0, buffers=model.buffers())
    for _ in range(steps):
        opt.step(bce_closure(model, x, y))
    return model, opt, bce_closure(model, x, y)


def test_scan_changes_nothing(optimizer_class):
    model, opt, closure = trained_net(optimizer_class)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    state = opt.state_dict()
    state_copy = {
        k: {
            n: (v.clone() if torch.is_tensor(v) else (dict(v) if isinstance(v, dict) else v))
            for n, v in s.items()
        }
        for k, s in state["state"].items()
    }
    lrs = [g["lr"] for g in opt.param_groups]
    last = opt.last_step
    torch.manual_seed(42)
    rng = torch.get_rng_state()

    scan = scan_direction(opt, closure, log_grid(1e-6, 1.0, 12))

    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert [g["lr"] for g in opt.param_groups] == lrs and opt.last_step == last
    after = opt.state_dict()["state"]
    for k, entries in state_copy.items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                assert torch.equal(value, after[k][name]), name
            else:
                assert value == after[k][name], name
    assert len(scan.decreases) == 12 and scan.kind == "search"


@pytest.mark.parametrize("cls", [SLS, MomentumALSALS], ids=["SLS", "MomentumALSALS"])
def test_scanned_curve_matches_the_closed_form_on_a_quadratic(cls):
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=1.0)
    grid = log_grid(1e-4, 10.0, 25)
    scan = scan_direction(opt, quadratic(w), grid)
    g = A @ (w.detach() - W_STAR)
    d = -g if cls is SLS else -g / (g.abs() + 1e-8)  # first Adam step: m_hat = g, v_hat = g^2
    expected = [float(-e * (g @ d) - 0.5 * e**2 * (d @ A @ d)) for e in grid]
    assert scan.decreases == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert scan.loss == pytest.approx(float(quadratic(w.detach())()))
    assert scan.best_step_size == grid[max(range(len(grid)), key=lambda i: expected[i])]
    if cls is SLS:  # Armijo boundary with c = 0.1 and no smoothing: 0.1 * eta * ||g||^2
        assert scan.boundary == pytest.approx([0.1 * e * float(g @ g) for e in grid])


def test_a_closure_that_runs_backward_itself_scans_as_the_plain_one(optimizer_class):
    """A closure in the torch.optim.LBFGS style (zero_grad; backward; return loss): the
    scan's evaluations, without gradient, do not fail on its backward and give the plain
    closure's curve."""
    scans = []
    for lbfgs_style in (False, True):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = optimizer_class([w], lr=1.0)

        def closure(w=w, opt=opt, lbfgs_style=lbfgs_style):
            loss = quadratic(w)()
            if lbfgs_style:
                opt.zero_grad()
                loss.backward()
            return loss

        scans.append(scan_direction(opt, closure, log_grid(1e-4, 10.0, 9)))
    plain, lbfgs = scans
    assert lbfgs.decreases == plain.decreases and lbfgs.chosen_step_size == plain.chosen_step_size
    assert any(d > 0 for d in plain.decreases)


def test_chosen_step_size_is_the_one_the_optimizer_then_uses(optimizer_class):
    model, opt, closure = trained_net(optimizer_class, steps=1)
    x, y = make_classification(seed=4)
    for k in range(4):
        closure = bce_closure(model, x[k * 32 : (k + 1) * 32], y[k * 32 : (k + 1) * 32])
        torch.manual_seed(100 + k)
        scan = scan_direction(opt, closure, log_grid(1e-5, 10.0, 10))
        torch.manual_seed(100 + k)
        opt.step(closure)
        assert opt.last_step.kind == "search"
        assert scan.chosen_step_size == opt.last_step.step_size
        assert scan.slope == pytest.approx(opt.last_step.slope)


def test_acceptance_flags_agree_with_the_search(optimizer_class):
    model, opt, closure = trained_net(optimizer_class, steps=2)
    for group in opt.param_groups:
        group["lr"] = 1e3  # the next search backtracks
    torch.manual_seed(5)
    first = scan_direction(opt, closure, [1.0])
    eta = first.chosen_step_size
    torch.manual_seed(5)
    scan = scan_direction(opt, closure, [eta, eta / opt.defaults["backtrack"]])
    assert scan.accepted == [True, False]  # accepted, and the trial before it was not


def test_recorder_scans_every_k_steps():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=0.01)
    recorder = LandscapeRecorder(opt, every=3, step_sizes=log_grid(1e-4, 1.0, 5))
    for _ in range(7):
        recorder.maybe_scan(quadratic(w))
        opt.step(quadratic(w))
    assert [s.step for s in recorder.scans] == [0, 3, 6]
    with pytest.raises(ValueError, match="every"):
        LandscapeRecorder(opt, every=0)


def test_scan_rejects_other_optimizers_and_bad_grids():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="MomentumALSALS, AdamSLS or SLS, got Adam$"):
        scan_direction(torch.optim.Adam([w]), lambda: w.sum())
    with pytest.raises(TypeError, match="scan a MomentumALSALS on the same closure"):
        scan_direction(ALSALS([w]), lambda: w.sum())
    with pytest.raises(ValueError, match="positive"):
        scan_direction(SLS([w]), lambda: w.sum(), [0.0, 1.0])


def test_the_recorder_checks_its_arguments_when_built_and_a_failed_scan_is_retried():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="got Adam"):
        LandscapeRecorder(torch.optim.Adam([w]))
    opt = MomentumALSALS([w], lr=0.01)
    for grid, message in [([], "positive"), ([-1.0], "positive"), (["1e-3"], "numbers")]:
        with pytest.raises(ValueError, match=f"step_sizes must be {message}"):
            LandscapeRecorder(opt, step_sizes=grid)
    recorder = LandscapeRecorder(opt, every=2, step_sizes=[0.1, 1.0])

    def failing():
        raise RuntimeError("a batch that failed to load")

    with pytest.raises(RuntimeError, match="failed to load"):
        recorder.maybe_scan(failing)
    assert recorder.maybe_scan(quadratic(w)) is not None  # the due scan, not the one after
    assert recorder.maybe_scan(quadratic(w)) is None


def test_a_log_grid_spanning_the_float_range_stays_finite_and_ends_at_its_ends():
    grid = log_grid(1e-300, 1e300, 5)
    assert grid[0] == 1e-300 and grid[-1] == 1e300
    assert grid[1:-1] == pytest.approx([1e-150, 1.0, 1e150], rel=1e-12)
    assert log_grid(1e-8, 10.0, 50)[-1] == 10.0


def test_scan_of_a_step_that_reuses_its_step_size_follows_the_update():
    """With the adaptive cadence most steps search nothing; the scan of such a step runs
    along the direction the step moves (so a recorder works with the defaults): at the step
    size the step reuses, the scanned decrease is the decrease the step then makes."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    # the defaults' adaptive cadence; without loss_floor's cap, which can take less than
    # the step size reused (the direction is the same)
    opt = MomentumALSALS([w], lr=0.1, loss_floor=None)
    reused = 0
    for _ in range(30):
        eta = opt.param_groups[0]["lr"]
        scan = scan_direction(opt, quadratic(w), [eta])
        loss = float(quadratic(w.detach())())
        opt.step(quadratic(w))
        assert scan.kind == opt.last_step.kind
        if opt.last_step.kind == "reuse":
            reused += 1
            assert scan.chosen_step_size is None and opt.last_step.step_size == eta
            made = loss - float(quadratic(w.detach())())
            assert scan.decreases[0] == pytest.approx(made, rel=1e-9, abs=1e-15)
    assert reused >= 5


def test_scan_of_a_skipped_step_has_no_decreases():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=0.1)
    scan = scan_direction(opt, lambda: (w * float("nan")).sum(), [1e-3, 1e-2])
    assert scan.kind == "nonfinite" and all(d != d for d in scan.decreases)
    assert torch.equal(w.detach(), torch.zeros(3, dtype=torch.float64))


def test_a_scan_leaves_the_gradients_of_tensors_no_group_holds_alone(optimizer_class):
    """The preview's backward reaches only the optimizer's parameters: a tensor of another
    optimizer (or one left out of the groups) keeps its gradient (it used to be doubled by a
    scan followed by the step)."""
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    other = torch.randn(3, requires_grad=True)
    opt = optimizer_class([w], lr=0.1)

    def closure():
        return ((w - 1.0) ** 2).sum() + (w * other).sum()

    scan_direction(opt, closure, [1e-3, 1e-2])
    assert other.grad is None
    w0 = w.detach().clone()
    opt.step(closure)
    torch.testing.assert_close(other.grad, w0)  # the gradient of one evaluation at w0


@pytest.mark.parametrize("lr", [0.0, 0.1])
def test_the_figures_draw_scans_of_steps_that_took_no_update(tmp_path, lr):
    pytest.importorskip("matplotlib")
    from alsals.diagnostics.plots import plot_consecutive, plot_heatmap, plot_single

    torch.manual_seed(0)
    model, _, closure = trained_net(MomentumALSALS, steps=1)
    opt = MomentumALSALS(model.parameters(), lr=0.1, buffers=model.buffers())
    recorder = LandscapeRecorder(opt, step_sizes=log_grid(1e-6, 1.0, 8))
    for k in range(3):
        if k == 1:
            opt.param_groups[0]["lr"] = lr  # 0: this step takes no update
        recorder.maybe_scan(closure)
        opt.step(closure)
    for plot in (plot_consecutive, plot_heatmap):
        assert plot(recorder.scans, tmp_path / f"{plot.__name__}.png").stat().st_size > 0
    for i, scan in enumerate(recorder.scans):
        assert plot_single(scan, tmp_path / f"single{i}.png").stat().st_size > 0


@pytest.mark.parametrize("cls", [SLS, MomentumALSALS])
def test_a_search_the_polyak_cap_cuts_to_zero_has_no_chosen_step_size(tmp_path, cls):
    """A batch whose loss is at loss_floor: the Polyak cap cuts the search's step size to 0,
    so the step takes nothing and the scan names no chosen step size (it named 0.0, and
    plot_single and plot_consecutive divided by it: ZeroDivisionError)."""
    pytest.importorskip("matplotlib")
    from alsals.diagnostics.plots import plot_consecutive, plot_heatmap, plot_single

    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    target = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def closure():
        return ((w - target) ** 2).sum() - 14.0  # 0 at w = 0: the floor

    opt = cls([w], loss_floor=0.0)
    scan = scan_direction(opt, closure, step_sizes=log_grid(1e-3, 10.0, 9))
    assert scan.kind == "search" and scan.chosen_step_size is None
    assert scan.best_step_size > 0.0
    assert plot_single(scan, tmp_path / "single.png").stat().st_size > 0
    assert plot_consecutive([scan], tmp_path / "consecutive.png").stat().st_size > 0
    assert plot_heatmap([scan], tmp_path / "heatmap.png").stat().st_size > 0
    opt.step(closure)
    assert opt.last_step.step_size == 0.0
    assert torch.equal(w.detach(), torch.zeros(3, dtype=torch.float64))


def test_the_heatmap_refuses_scans_made_on_different_grids(tmp_path):
    """One x axis for all rows: scans on another grid would be drawn at the wrong step
    sizes (or fail inside numpy)."""
    pytest.importorskip("matplotlib")
    from alsals.diagnostics.plots import plot_heatmap

    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=0.01)
    first = scan_direction(opt, quadratic(w), [1e-3, 1e-2, 1e-1])
    opt.step(quadratic(w))
    second = scan_direction(opt, quadratic(w), [1e-2, 1e-1, 1.0])
    with pytest.raises(ValueError, match="another grid"):
        plot_heatmap([first, second], tmp_path / "heatmap.png")


def test_the_figures_leave_the_users_matplotlib_state_alone(tmp_path):
    """A notebook's backend, current figure and open figures are the user's: drawing our
    figures into files switched the backend to Agg for the whole process (a notebook's
    inline plots stopped showing) and went through pyplot's registry."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from alsals.diagnostics.plots import plot_consecutive, plot_heatmap, plot_single

    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = MomentumALSALS([w], lr=0.01)
    recorder = LandscapeRecorder(opt, step_sizes=log_grid(1e-4, 1.0, 6))
    for _ in range(2):
        recorder.maybe_scan(quadratic(w))
        opt.step(quadratic(w))
    backend = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        mine = plt.figure()
        plot_single(recorder.scans[0], tmp_path / "single.png")
        plot_consecutive(recorder.scans, tmp_path / "consecutive.png")
        plot_heatmap(recorder.scans, tmp_path / "heatmap.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.gcf() is mine and plt.get_fignums() == [mine.number]
        assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in ("single", "heatmap"))
    finally:
        plt.close("all")
        matplotlib.use(backend)


def test_the_figures_without_matplotlib_say_what_to_install(tmp_path, monkeypatch):
    from alsals.diagnostics.plots import plot_consecutive

    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # (import raises ImportError)
    with pytest.raises(ImportError, match=r"alsals\[plots\]"):
        plot_consecutive([], tmp_path / "none.png")


def test_a_scan_warns_about_a_closure_that_does_not_replay_its_randomness():
    """A closure that draws its batch with numpy gives another batch at every evaluation:
    the scanned decreases compare different batches (about -0.5 at step sizes where 0 is
    expected). The step warns about it; the scan did not."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = SmallNet(dropout=0.0)
    x, y = make_classification()
    opt = SLS(model.parameters(), lr=1.0, buffers=model.buffers())
    draw = np.random.default_rng(0)

    def closure():
        index = torch.as_tensor(draw.integers(0, len(x), 8))
        return nn.functional.binary_cross_entropy_with_logits(model(x[index]), y[index])

    with pytest.warns(UserWarning, match="does not replay its randomness") as caught:
        scan_direction(opt, closure, log_grid(1e-8, 1.0, 5))
    assert "scan_direction" in str(caught[0].message) and "step size 0" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer, as the step warns
        scan_direction(opt, closure, log_grid(1e-8, 1.0, 5))


def test_a_closure_that_replays_its_randomness_scans_without_a_warning(optimizer_class):
    """Dropout drawn from torch's generator is replayed: no warning."""
    model, opt, closure = trained_net(optimizer_class)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan = scan_direction(opt, closure, log_grid(1e-8, 1.0, 5))
    assert abs(scan.decreases[0]) < 1e-6


def test_a_warm_up_scan_judges_by_the_warm_up_rule():
    """During warm-up the search takes any step that does not raise the loss (from the ramp's
    cap down): the scan judged it by the Armijo boundary and marked the step the optimizer
    takes as failing."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    g = A @ (w.detach() - W_STAR)
    # the ramp's first step lies where Armijo (c = 0.1) fails but the loss still falls
    armijo_fails = 1.9 * float(g @ g) / float(g @ A @ g)
    opt = SLS([w], lr=2 * armijo_fails, warmup_steps=2)
    scan = scan_direction(opt, quadratic(w), [armijo_fails, 10 * armijo_fails])
    assert scan.warmup and scan.warmup_cap == pytest.approx(armijo_fails)
    assert scan.chosen_step_size == pytest.approx(armijo_fails)
    assert 0 < scan.decreases[0] < 0.1 * armijo_fails * float(g @ g)  # Armijo would refuse it
    assert scan.accepted == [True, False]  # the step taken passes; a rise does not
    opt.step(quadratic(w))
    assert opt.last_step.step_size == scan.chosen_step_size
    opt.step(quadratic(w))  # the second and last step of warm-up
    after = scan_direction(opt, quadratic(w), [1e-3])
    assert not after.warmup and after.warmup_cap is None


def test_the_figure_of_a_warm_up_scan_says_so(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from alsals.diagnostics.plots import plot_single

    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=1.0, warmup_steps=4)
    scan = scan_direction(opt, quadratic(w), log_grid(1e-3, 1.0, 6))
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_single(scan, tmp_path / "single.png")
    (ax, *_) = saved[0].axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "warm-up rule: no rise" in labels and "warm-up cap" in labels
    assert "warm-up" in ax.get_title()


def test_a_scan_leaves_buffers_the_optimizer_does_not_protect_alone(buffer_watch):
    """An optimizer built without buffers=: the scan's forward passes (the preview's and the
    grid's) moved BatchNorm's running statistics. A scan is read-only."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = SLS(model.parameters(), lr=1.0)
    buffers = [b.clone() for b in model.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_direction(opt, bce_closure(model, x, y), log_grid(1e-6, 1.0, 6))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_a_preview_leaves_buffers_the_optimizer_does_not_protect_alone(
    optimizer_class, buffer_watch
):
    """An optimizer built without buffers=: the preview's forward passes moved BatchNorm's
    running statistics (whose kernel writes them without raising their version counter),
    though a preview promises nothing changed (a user's audit)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0)
    )
    x, y = make_classification()
    opt = optimizer_class(model.parameters(), lr=50.0)  # (a search of several trials)
    buffers = [b.clone() for b in model.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preview = opt.preview(bce_closure(model, x, y))
    assert preview.info.trials > 1
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_where_it_cannot_watch_the_modules_a_scan_says_so_once(monkeypatch):
    """After torch.compile ran, a global module hook would make compiled models recompile:
    the scan puts back only the optimizer's buffers and says that others may have changed."""
    import alsals.closure

    monkeypatch.setattr(alsals.closure, "_compiled_anything", lambda: True)
    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = SLS(model.parameters(), lr=1.0)
    with pytest.warns(UserWarning, match=r"buffers=model.buffers\(\)"):
        scan_direction(opt, bce_closure(model, x, y), [1e-3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_direction(opt, bce_closure(model, x, y), [1e-3])  # once
        protected = SLS(model.parameters(), lr=1.0, buffers=model.buffers())
        buffers = [b.clone() for b in model.buffers()]
        scan_direction(protected, bce_closure(model, x, y), [1e-3])
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_the_heatmap_draws_scans_that_share_a_step_number(tmp_path, monkeypatch):
    """A search that fails does not advance the step count: rows drawn at their step numbers
    collapsed to nothing (an empty figure). Such scans are drawn in order."""
    pytest.importorskip("matplotlib")
    import numpy as np
    from matplotlib.collections import QuadMesh
    from matplotlib.figure import Figure

    from alsals.diagnostics.plots import plot_heatmap

    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=100.0, max_trials=1)
    recorder = LandscapeRecorder(opt, step_sizes=log_grid(1e-4, 1.0, 6))
    for _ in range(3):
        recorder.maybe_scan(quadratic(w))
        opt.step(quadratic(w))
    assert [s.step for s in recorder.scans] == [0, 0, 0]
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_heatmap(recorder.scans, tmp_path / "heatmap.png")
    (ax, *_) = saved[0].axes
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    rows = mesh.get_coordinates()[:, 0, 1]
    assert len(rows) == 4 and np.all(np.diff(rows) > 0)
    assert "scan" in ax.get_ylabel()


def test_the_scan_explains_arguments_of_the_wrong_kind():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SLS([w], lr=0.1)
    with pytest.raises(TypeError, match="step_sizes must be a sequence of positive numbers"):
        scan_direction(opt, quadratic(w), 0.1)
    with pytest.raises(TypeError, match="step_sizes must be a sequence of positive numbers"):
        LandscapeRecorder(opt, step_sizes=0.1)
    with pytest.raises(TypeError, match="log_grid: num must be an integer"):
        log_grid(1e-3, 1, 5.0)
    with pytest.raises(TypeError, match="log_grid: low must be a number"):
        log_grid("1e-3", 1.0, 5)
    for closure in (None, quadratic(w)()):
        with pytest.raises(TypeError, match="scan_direction needs the closure") as raised:
            scan_direction(opt, closure, [0.1])
        assert "optimizer.step(closure)" not in str(raised.value)
    assert w.grad is None and opt.last_step is None


class Counting(nn.Module):
    """A layer whose forward replaces its buffer with a new tensor (``self.n = self.n + 1``)
    and fills a buffer registered as ``None``; its output depends on the count."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 1, dtype=torch.float64)
        self.register_buffer("n", torch.zeros((), dtype=torch.float64))
        self.register_buffer("lazy", None)

    def forward(self, x):
        self.n = self.n + 1
        if self.lazy is None:
            self.lazy = torch.ones(1, dtype=torch.float64)
        return self.linear(x).squeeze(-1) * (1 + self.n)


def test_a_scan_puts_back_buffers_a_forward_pass_replaced_or_filled(buffer_watch):
    """Replaced buffers come back as the objects they were, after every grid evaluation too
    (the grid drifted with the count: decreases of -2, -5, -9 where 0 is due at tiny step
    sizes), and a buffer filled where it was None is None again."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randn(32, generator=g, dtype=torch.float64)
    model = Counting()
    opt = SLS(model.parameters(), lr=1e-3)
    n = model.n
    scan = scan_direction(opt, lambda: ((model(x) - y) ** 2).mean(), [1e-12, 2e-12, 4e-12])
    assert model.n is n and model.n.item() == 0.0 and model.lazy is None
    assert max(abs(d) for d in scan.decreases) < 1e-9


def test_a_scan_through_functional_call_leaves_the_modules_own_buffers(buffer_watch):
    """torch.func.functional_call swaps the caller's tensors in for the call and puts the
    module's back itself: the scan must not set the caller's tensors on the module."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = SmallNet()
    x, y = make_classification()
    opt = SLS(model.parameters(), lr=1.0, buffers=model.buffers())
    own = {name: b for name, b in model.named_buffers()}
    given = {name: b.clone() for name, b in model.named_buffers()}
    params = dict(model.named_parameters())

    def closure():
        out = functional_call(model, {**params, **given}, (x,))
        return nn.functional.binary_cross_entropy_with_logits(out, y)

    scan_direction(opt, closure, [1e-3, 1e-2])
    assert all(getattr_path(model, name) is b for name, b in own.items())


def getattr_path(module, name):
    for part in name.split("."):
        module = getattr(module, part)
    return module


def test_a_scan_reads_buffers_made_in_inference_mode(buffer_watch):
    """A buffer created under inference_mode that forward only reads: the scan copied every
    buffer back, and an in-place copy into an inference tensor raises outside that mode."""
    with torch.inference_mode():
        scale = torch.full((6,), 2.0, dtype=torch.float64)
    model = nn.Linear(6, 1, dtype=torch.float64)
    model.register_buffer("scale", scale)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    opt = SLS(model.parameters(), lr=1e-2)
    scan = scan_direction(opt, lambda: (model(x * model.scale) ** 2).mean(), [1e-3])
    assert scan.decreases[0] > 0.0


def test_step_sizes_may_be_any_iterable_and_its_own_errors_are_its_own():
    """A one-element integer tensor is a count for log_grid, and a TypeError raised inside a
    user's generator is not reported as a wrong kind of step_sizes."""
    assert len(log_grid(1e-3, 1.0, torch.tensor(4))) == 4
    w = W_STAR.clone().add_(1.0).requires_grad_(True)
    opt = SLS([w], lr=0.1)

    def broken():
        yield 1e-3
        raise TypeError("inside the generator")

    with pytest.raises(TypeError, match="inside the generator"):
        scan_direction(opt, quadratic(w), broken())
    assert len(scan_direction(opt, quadratic(w), (s for s in [1e-3, 1e-2])).decreases) == 2


def test_a_grid_given_out_of_order_is_scanned_in_increasing_order():
    """A grid in another order drew a zigzag line and a heatmap matplotlib warned about (its
    axis not increasing): the scan holds the step sizes sorted, each with its own decrease
    (the same as the sorted grid's scan)."""
    w = W_STAR.clone().add_(1.0).requires_grad_(True)
    opt = SLS([w], lr=0.1)
    shuffled = scan_direction(opt, quadratic(w), [1e-1, 1e-3, 1.0, 1e-2])
    ordered = scan_direction(opt, quadratic(w), [1e-3, 1e-2, 1e-1, 1.0])
    assert shuffled.step_sizes == [1e-3, 1e-2, 1e-1, 1.0]
    assert shuffled.decreases == ordered.decreases and shuffled.boundary == ordered.boundary
