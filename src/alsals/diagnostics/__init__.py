"""Loss along the search direction: why the line search chose the step size it chose.

The paper's Section III-A explains MomentumALSALS by scanning the loss of one mini-batch along the
update direction over a log-spaced grid of step sizes (Figs. 2-4). ``scan_direction`` does
that for any of our optimizers without changing the model, the optimizer or the random
stream; ``LandscapeRecorder`` records scans every k steps during training; the plots live in
:mod:`alsals.diagnostics.plots` (matplotlib: ``pip install 'alsals[plots]'``).
"""

from alsals.diagnostics.scan import LandscapeRecorder, LandscapeScan, log_grid, scan_direction

__all__ = ["LandscapeRecorder", "LandscapeScan", "log_grid", "scan_direction"]
