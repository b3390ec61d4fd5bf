"""examples/migrate_from_adamw.py: both loops run, and the ALSALS loop keeps what the AdamW
loop had (clipping, accumulation, fp16 with GradScaler, exact resume) without warnings.

Every comparison is between two runs in this process (bit for bit), or in float64 with a
tolerance: nothing depends on one CPU's float32 or float16 rounding. docs/migration.md and
the README's "Switching from AdamW" quote the example: their snippets are checked against it.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import re
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "migrate_from_adamw.py"


def load_example():
    spec = importlib.util.spec_from_file_location("migrate_from_adamw", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ex = load_example()
STEPS = 16  # per run: the whole file takes a few seconds


def config(**changes) -> ex.Config:
    return ex.Config(**{"steps": STEPS, "device": "cpu", **changes})


def held_out_loss(model: nn.Module) -> float:
    x, y = ex.get_batch(1024, torch.Generator().manual_seed(99), "cpu")
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is faster, most of all for fp16 on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both loops as configured in the example (fp16 + GradScaler, dropout, 4 micro-batches,
    clipping at 1.0), each writing a checkpoint halfway. The ALSALS loop runs with every
    warning an error and a handler on the 'alsals' logger."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, train in (("adamw", ex.train_adamw), ("alsals", ex.train_alsals)):
        cfg = config(
            warmup=STEPS // 4,  # AdamW's schedule: warm-up and decay within the run
            checkpoint=str(folder / (name + "_{step}.pt")),
            checkpoint_every=STEPS // 2,
        )
        handler = Records()
        logging.getLogger("alsals").addHandler(handler)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no known harmless warnings to exempt
                run = train(cfg)
        finally:
            logging.getLogger("alsals").removeHandler(handler)
        out[name] = (train, cfg, run, handler.records)
    return out


# ------------------------------------------------------------------------ the two loops


def test_alsals_loop_trains_without_warnings(runs):
    _, cfg, run, records = runs["alsals"]
    # no skipped step: every step searched, or reused the step size (adaptive cadence)
    assert {info.kind for info in run.log} <= {"search", "reuse"}
    assert run.log[0].kind == "search"
    assert held_out_loss(run.model) < held_out_loss(ex.make_model(cfg)) - 0.2
    # the first search's cost is logged at WARNING level from 20 trials: lr is a good start
    assert records == [], [r.getMessage() for r in records]
    assert run.log[0].trials < 20


def test_adamw_loop_trains(runs):
    _, cfg, run, records = runs["adamw"]
    assert all(map(math.isfinite, run.losses))
    assert held_out_loss(run.model) < held_out_loss(ex.make_model(cfg)) - 0.2
    lrs = [lr for lr, _ in run.log]
    assert lrs[: cfg.warmup] == sorted(lrs[: cfg.warmup])  # warm-up ...
    assert lrs[cfg.warmup - 1] == cfg.lr
    assert lrs[cfg.warmup :] == sorted(lrs[cfg.warmup :], reverse=True)  # ... then decay
    assert lrs[-1] < cfg.lr / 2


def test_both_loops_start_from_the_same_model_and_batch(runs):
    """Same weights, data and dropout masks: the first losses agree."""
    assert runs["adamw"][2].losses[0] == runs["alsals"][2].losses[0]


# ------------------------------------------------------------------------------ clipping


def test_max_grad_norm_clips_what_clip_grad_norm_would():
    """ALSALS measures the norm that clip_grad_norm_ measures in the AdamW loop (after
    accumulation and GradScaler's unscale), and steps with the clipped gradient: Adam's
    second moment after one step is (1 - beta2) * the clipped gradient squared."""
    one = config(steps=1, max_grad_norm=0.25)
    adamw = ex.train_adamw(one)
    clipped = ex.train_alsals(one)
    unclipped = ex.train_alsals(replace(one, max_grad_norm=1e9))
    norm = clipped.log[0].grad_norm
    assert norm > 0.25
    assert unclipped.log[0].grad_norm == norm
    assert adamw.log[0][1] == pytest.approx(norm, rel=1e-5)

    def second_moment_root(run) -> float:
        state = run.optimizer.state
        v = torch.cat([state[p]["exp_avg_sq"].flatten() for p in run.model.parameters()])
        return v.sum().sqrt()

    def grad_norm(run) -> float:
        return torch.cat([p.grad.flatten() for p in run.model.parameters()]).norm()

    root = math.sqrt(1 - 0.999)  # beta2
    assert grad_norm(unclipped) == pytest.approx(norm, rel=1e-4)  # the gradient, unclipped
    assert second_moment_root(clipped) == pytest.approx(root * 0.25, rel=1e-4)
    assert second_moment_root(unclipped) == pytest.approx(root * norm, rel=1e-4)


def test_clipping_is_active_in_the_example(runs):
    _, cfg, run, _ = runs["alsals"]
    assert any(info.grad_norm > cfg.max_grad_norm for info in run.log)


# -------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("name", ["adamw", "alsals"])
def test_accumulation_equals_one_batch(name):
    """4 micro-batches of 16 take the steps one batch of 64 takes (float64, no dropout)."""
    train = {"adamw": ex.train_adamw, "alsals": ex.train_alsals}[name]
    exact = config(steps=6, amp=False, dtype=torch.float64, dropout=0.0)
    accumulated = train(replace(exact, micro_batches=4))
    whole = train(replace(exact, micro_batches=1))
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-12)
    if name == "alsals":
        decisions = [[(i.kind, i.trials) for i in run.log] for run in (accumulated, whole)]
        assert decisions[0] == decisions[1]
    for p, q in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------- resume


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same_state, a, b))
    return a == b


@pytest.mark.parametrize("name", ["adamw", "alsals"])
def test_resume_continues_bit_identically(runs, name):
    train, cfg, full, _ = runs[name]
    half = STEPS // 2
    resumed = train(replace(cfg, checkpoint=None, resume=cfg.checkpoint.format(step=half)))
    assert resumed.losses == full.losses[half:]
    assert ex.same_weights(resumed.model, full.model)
    assert same_state(resumed.optimizer.state_dict(), full.optimizer.state_dict())


@pytest.mark.parametrize("entry", ["torch_rng", "data_rng"])
def test_the_checkpoint_needs_both_random_states(runs, entry, tmp_path):
    """Without the torch random state (dropout) or the data position the run differs."""
    _, cfg, full, _ = runs["alsals"]
    checkpoint = torch.load(cfg.checkpoint.format(step=STEPS // 2), weights_only=True)
    checkpoint[entry] = torch.Generator().manual_seed(123).get_state()
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    resumed = ex.train_alsals(replace(cfg, checkpoint=None, resume=str(tmp_path / "ckpt.pt")))
    assert not ex.same_weights(resumed.model, full.model)


# ------------------------------------------------------------------- the docs quote it


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block not preceded by a '<!-- sketch -->' line."""
    text = path.read_text()
    blocks = re.findall(r"(<!-- sketch[^\n]*-->\n)?```(\w+)\n(.*?)```", text, flags=re.DOTALL)
    return [(lang, body) for sketch, lang, body in blocks if not sketch]


def contains_lines(source: str, snippet: str) -> bool:
    """Whether ``snippet``'s lines occur consecutively in ``source``, at any one indent."""
    lines = textwrap.dedent(snippet).rstrip("\n").split("\n")
    src = source.split("\n")
    for start in range(len(src) - len(lines) + 1):
        indent = len(src[start]) - len(src[start].lstrip())
        if all(
            src[start + i] == (" " * indent + line if line else "") for i, line in enumerate(lines)
        ):
            return True
    return False


def check_diff(body: str) -> list[str]:
    """A diff block: '-' lines come from train_adamw, '+' lines from train_alsals, context
    lines from both (each line stripped; '...' and '@@' lines are separators)."""
    adamw = {line.strip() for line in inspect.getsource(ex.train_adamw).split("\n")}
    alsals = {line.strip() for line in inspect.getsource(ex.train_alsals).split("\n")}
    problems = []
    for line in body.rstrip("\n").split("\n"):
        mark, text = line[:1], line[1:].strip()
        if not text or text == "..." or line.startswith("@@"):
            continue
        wanted = {"-": [adamw], "+": [alsals], " ": [adamw, alsals]}.get(mark)
        if wanted is None or not all(text in lines for lines in wanted):
            problems.append(line)
    return problems


@pytest.mark.parametrize("doc", ["docs/migration.md", "README.md"])
def test_the_docs_quote_the_example(doc):
    source = EXAMPLE.read_text()
    blocks = fenced_blocks(ROOT / doc)
    if doc == "README.md":  # only the "Switching from AdamW" section
        section = (ROOT / doc).read_text().split("## Switching from AdamW")[1].split("\n## ")[0]
        blocks = [b for b in blocks if b[1] in section]
    assert blocks
    for lang, body in blocks:
        if lang == "diff":
            assert check_diff(body) == [], f"{doc}: diff lines not in the example"
        elif lang == "python":
            assert contains_lines(source, body), f"{doc}: not in the example:\n{body}"
