"""What a line search costs per step: wall time and memory against Adam and SaLSa.

``alsals-bench speed`` times, side by side in one process, one training step of:

* ``adam``: ``torch.optim.Adam(foreach=True)``, one forward and one backward pass per step;
* our line searches, by the registry's names: ``sls``, ``adam-sls``, ``alsals`` (the paper's
  defaults: finite-difference slope, a search every step), ``alsals-analytic`` (slope
  ``-g.d``, no probe pass), ``alsals-adaptive`` (finite difference, SaLSa's cadence) and
  ``alsals-fast`` (analytic slope and adaptive cadence);
* the authors' reference SaLSa (``salsa-optimizer`` from PyPI, used as it is): ``salsa``
  (its default ``speed_up=True``: adaptive cadence, slope ``g.g/sqrt(v)``, no probe pass)
  and ``salsa-every`` (``speed_up=False``: a search every step).

Method, per model (one model and one fixed sequence of synthetic batches):

1. Warm-up, once per configuration: from the same initial weights and random state, run
   ``--warmup`` steps so that the search has settled (the first steps of a line search
   backtrack from the initial step size, tens of trials) and the adaptive cadences have
   reached their regime; keep the weights, buffers and optimizer (a deep copy) as a snapshot.
2. Timing: for each repeat, for each configuration in an order rotated by one per repeat,
   restore the configuration's snapshot, then time ``--steps`` steps (the same batches and
   random state for every configuration). The step time is the wall time of the whole step,
   the closure's passes included; the closure's own time is measured inside it, so the
   optimizer's own time is the step time minus the closure time (for Adam: ``step()``).
   Medians over repeats are reported with their min-max spread.
3. Memory: restore the snapshot once more and run ``--memory-steps`` steps while tracking
   every tensor storage allocated by an operator (a ``TorchDispatchMode``; on CUDA,
   ``torch.cuda.max_memory_allocated``). The peak is the bytes alive at the worst moment of
   a step: weights, buffers and optimizer state that persist, plus gradients, activations
   and the optimizer's temporaries.

Every optimizer is driven by the benchmark's stepper for it (``alsals_bench.registry``, the
same that drives the training runs): the stepper counts the passes, forward with and
without backward, and runs each inside the clock. Our optimizers get the
``closure(backward)`` form, so that the backward pass runs inside the closure and is timed
as part of it, as it is for Adam and SaLSa.

Every time is taken twice: wall clock (``time.perf_counter``) and the process's CPU time
(``time.process_time``). On a machine shared with other jobs the CPU time is the steadier of
the two (it does not count the time the process waits for a core); on CUDA only wall time
means anything, and each pass synchronises the device on entry and exit. The CPU run uses
one torch thread by default (``--threads``): two threads on two busy cores stall each other.
Before the warm-up, the cost of the passes themselves is measured (a training forward and
backward, and a forward under ``no_grad`` as the trials run it), which gives each
configuration's lower bound from its pass counts alone.

``--profile NAME,...`` prints a cProfile of those configurations' timed steps, sorted by own
time: the evidence for where an optimizer spends its time.

The package, section by section: ``workloads`` (the models and their batches), ``configs``
(what is compared), ``measure`` (the method above), ``report`` (tables, targets, chart) and
``cli`` (the command's options).
"""
