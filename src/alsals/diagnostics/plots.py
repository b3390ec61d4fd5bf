"""The paper's landscape figures from scans (matplotlib: ``pip install 'alsals[plots]'``).

* ``plot_single``: Fig. 2, loss decrease against step size for one batch, with the step the
  line search chose (red), the best step on the batch (green) and the acceptance boundary
  (black line; the region above it passes the test). A scan made during warm-up shows the
  warm-up rule the search used (any step that does not raise the loss) and its cap (dotted),
  and says "warm-up" in its title.
* ``plot_consecutive``: Fig. 3, the same for consecutive batches, older ones fading.
* ``plot_heatmap``: Fig. 4, loss decrease as colour over steps x step sizes, with the chosen
  step sizes as a green line. A search that ends without a step (failed, unresolved) does
  not advance the step count, so scans can share a step number: their rows are then the
  scans in order (the y axis says so), not training steps.

Each function writes its figure to ``path`` and returns it. Figures are built with
matplotlib's object interface, not ``pyplot``: the user's backend, current figure and open
windows are left as they were (a notebook keeps its inline backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alsals.diagnostics.scan import LandscapeScan


def _figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure and its axes, outside pyplot's registry (saved, never shown)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "alsals.diagnostics.plots draws with matplotlib, which is not installed: "
            "pip install 'alsals[plots]' (or matplotlib)"
        ) from error
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _scanned(scans: Sequence[LandscapeScan]) -> list[LandscapeScan]:
    """The scans with a curve: a step that took no update (skipped, ``lr`` 0) has none."""
    return [s for s in scans if any(math.isfinite(d) for d in s.decreases)]


def _nothing_to_plot(path: Path, title: str, why: str) -> Path:
    fig, ax = _figure((6, 4))
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    return path


def _mark(ax, scan: LandscapeScan, alpha: float = 1.0) -> None:
    pairs = dict(zip(scan.step_sizes, scan.decreases, strict=True))
    if scan.chosen_step_size is not None:
        nearest = min(scan.step_sizes, key=lambda e: abs(math.log(e / scan.chosen_step_size)))
        ax.scatter(
            [scan.chosen_step_size], [pairs[nearest]], color="red", zorder=3, alpha=alpha, s=25
        )
    if math.isfinite(scan.best_step_size):
        ax.scatter(
            [scan.best_step_size],
            [pairs[scan.best_step_size]],
            color="green",
            zorder=3,
            alpha=alpha,
            s=25,
        )


def _decorate(ax, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("step size")
    ax.set_ylabel("loss decrease f(w) - f(w + step d)")
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _ylim(ax, scans: Sequence[LandscapeScan]) -> None:
    """Keep the interesting part: the decreases, not the blow-up at huge steps."""
    values = [d for s in scans for d in s.decreases if math.isfinite(d)]
    if values:
        top = max(values)
        ax.set_ylim(-1.5 * abs(top) - 1e-12, 1.3 * abs(top) + 1e-12)


def plot_single(scan: LandscapeScan, path: Path, title: str = "") -> Path:
    default_title = f"step {scan.step}: one batch" + (" (warm-up)" if scan.warmup else "")
    if not _scanned([scan]):
        why = f"step {scan.step} took no update ({scan.kind}): no direction to scan"
        return _nothing_to_plot(path, title or default_title, why)
    fig, ax = _figure((6, 4))
    ax.plot(scan.step_sizes, scan.decreases, color="tab:blue", label="loss decrease")
    # During warm-up the search takes any step that does not raise the loss, not Eq. 9's.
    rule = "warm-up rule: no rise" if scan.warmup else "acceptance boundary"
    ax.plot(scan.step_sizes, scan.boundary, color="black", linewidth=1, label=rule)
    if scan.warmup_cap is not None:
        ax.axvline(scan.warmup_cap, color="black", linestyle=":", linewidth=1, label="warm-up cap")
    ax.fill_between(
        scan.step_sizes,
        scan.boundary,
        [max(scan.boundary + scan.decreases)] * len(scan.step_sizes),
        color="grey",
        alpha=0.08,
        linewidth=0,
    )
    _mark(ax, scan)
    ax.scatter([], [], color="red", label="chosen step size")
    ax.scatter([], [], color="green", label="best step on this batch")
    _decorate(ax, title or default_title)
    _ylim(ax, [scan])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_consecutive(scans: Sequence[LandscapeScan], path: Path, title: str = "") -> Path:
    scans = _scanned(scans)
    if not scans:
        return _nothing_to_plot(path, title, "no scanned step took an update")
    fig, ax = _figure((6, 4))
    for i, scan in enumerate(scans):
        alpha = 0.15 + 0.85 * (i + 1) / len(scans)
        ax.plot(scan.step_sizes, scan.decreases, color="tab:blue", alpha=alpha)
        _mark(ax, scan, alpha)
    _decorate(ax, title or f"{len(scans)} consecutive batches (older fading)")
    _ylim(ax, scans)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _rows(scans: Sequence[LandscapeScan]) -> tuple[list[int], str]:
    """The heatmap's row of each scan and the y axis's label: the training step where the
    steps increase from scan to scan; else the scan's place in order, since a search that
    ends without a step (failed, unresolved) does not advance the step count, and rows at
    equal steps would collapse to nothing."""
    steps = [s.step for s in scans]
    if all(a < b for a, b in zip(steps, steps[1:], strict=False)):
        return steps, "training step"
    return list(range(len(scans))), "scan, in order (steps repeat: failed searches)"


def plot_heatmap(scans: Sequence[LandscapeScan], path: Path, title: str = "") -> Path:
    scans = _scanned(scans)  # (a step without an update has no curve: left out)
    if not scans:
        return _nothing_to_plot(path, title, "no scanned step took an update")
    other = next((s for s in scans if list(s.step_sizes) != list(scans[0].step_sizes)), None)
    if other is not None:
        raise ValueError(
            "plot_heatmap draws scans made on one grid of step sizes: the scan at step "
            f"{other.step} used another grid than the one at step {scans[0].step}"
        )
    fig, ax = _figure((7, 4.5))
    import numpy as np  # (both with matplotlib, which _figure found)
    from matplotlib.colors import SymLogNorm

    grid = np.array(scans[0].step_sizes)
    values = np.array([s.decreases for s in scans], dtype=float)
    finite = values[np.isfinite(values)]
    # Scale the colours to the decreases; increases beyond that saturate (red).
    positive = finite[finite > 0]
    scale = float(positive.max()) if positive.size else float(np.abs(finite).max(initial=1.0))
    values = np.clip(np.nan_to_num(values, nan=-scale, neginf=-scale), -scale, scale)
    rows, row_label = _rows(scans)
    mesh = ax.pcolormesh(
        grid,
        rows,
        values,
        shading="nearest",
        cmap="RdBu",
        norm=SymLogNorm(linthresh=max(scale * 1e-2, 1e-12), vmin=-scale, vmax=scale),
    )
    chosen = [
        (s.chosen_step_size, row)
        for s, row in zip(scans, rows, strict=True)
        if s.chosen_step_size is not None
    ]
    if chosen:
        ax.plot(
            [c[0] for c in chosen],
            [c[1] for c in chosen],
            color="green",
            linewidth=1.5,
            label="chosen",
        )
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xscale("log")
    ax.set_xlabel("step size")
    ax.set_ylabel(row_label)
    ax.set_title(title or "loss decrease over steps and step sizes")
    fig.colorbar(mesh, ax=ax, label="loss decrease (symlog)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
