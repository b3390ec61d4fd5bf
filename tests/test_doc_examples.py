"""The Python examples of the docs other than the README run, and do what their text says.

Every ```python block of the docs in ``DOCS`` carries a marker comment on the line(s) just
above its fence:

* ``<!-- doc-test: NAME -->``: run here, with ``EXAMPLES[NAME]``;
* ``<!-- doc-test: not run: REASON -->``: not run, for the reason given.

A block without a marker, a marker naming no entry of ``EXAMPLES`` or an entry no block
names fails ``test_every_block_is_marked``. Each example runs as a script in a fresh process
(a temporary folder), like the README's (``tests/test_readme.py``):

* ``setup``: a function ``setup()`` building what the block takes from the reader (their
  model, batch, optimizer); only the names it returns reach the block, so a missing import
  in the block is a ``NameError`` here too;
* ``replace``: substitutions for what cannot run here as written (a GPU, several
  processes, 1000 epochs); each must occur in the block. No line that calls alsals is
  replaced;
* ``check``: runs after the block and asserts what the surrounding text promises.
  ``ALSALS_WARNINGS`` lists the warnings raised from inside alsals during the run.

Blocks that need several processes run in a one-process gloo group here; their two-rank
runs are tested on the examples (``tests/integrations/test_ddp_torchrun.py``,
``test_fsdp.py``).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    "docs/integrations.md",
    "docs/migration.md",
    "docs/diagnostics.md",
    "benchmarks/docs/data.md",
    "benchmarks/docs/performance.md",
    "benchmarks/docs/tasks.md",
]

FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", flags=re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!-- doc-test: (.*?) -->")


@dataclass(frozen=True)
class Block:
    doc: str
    index: int  # among the doc's python blocks
    marker: str | None
    code: str


def blocks() -> list[Block]:
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for index, match in enumerate(FENCE.finditer(text)):
            above = text[: match.start()].rstrip("\n").split("\n")
            marker = None
            while above and above[-1].strip().startswith("<!--"):  # the comments just above
                found = MARKER.search(above.pop())
                if found:
                    marker = found.group(1)
                    break
            out.append(Block(doc, index, marker, textwrap.dedent(match.group(2))))
    return out


BLOCKS = blocks()

# -------------------------------------------------------------------------- the examples

PRELUDE = """
import os as _os, sys as _sys, warnings as _warnings
import alsals as _alsals

_ALSALS_DIR = _os.path.dirname(_alsals.__file__)
ALSALS_WARNINGS = []
_show = _warnings.showwarning


def _record(message, category, filename, lineno, file=None, line=None):
    frame = _sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ALSALS_DIR):
            ALSALS_WARNINGS.append(f"{category.__name__}: {message}")
            break
        frame = frame.f_back
    _show(message, category, filename, lineno, file, line)


_warnings.showwarning = _record
"""

ONE_RANK_GROUP = """
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
"""
#: The end of a check whose set-up began ``ONE_RANK_GROUP``.
ENDS_ONE_RANK_GROUP = """import torch.distributed

torch.distributed.destroy_process_group()
"""

CLASSIFIER = """
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 3)
    )
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
"""


def _data_present(name: str) -> str | None:
    """None where the benchmark's offline source ``name`` is fetched, else why not."""
    try:
        from alsals_bench.data._store import data_dir
    except ImportError as error:
        return f"alsals_bench is not importable: {error}"
    folder = data_dir() / name
    return None if (folder / "MANIFEST.json").exists() else f"{folder} not fetched"


EXAMPLES: dict[str, dict] = {
    "hf-trainer": {
        "modules": ["transformers", "accelerate"],
        # a tiny BERT built from a config instead of a pretrained one: nothing downloads
        "setup": """
def setup():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )
    gen = torch.Generator().manual_seed(0)
    train = [
        {"input_ids": torch.randint(0, 50, (8,), generator=gen), "labels": torch.tensor(i % 2)}
        for i in range(32)
    ]  # 3 epochs of 2 steps (batches of 8, 2 micro-batches a step)
    return {"model": BertForSequenceClassification(config), "train": train}
""",
        "check": """
from alsals.integrations.hf import FollowStepSize

held = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
assert type(held) is ALSALS and held.defaults["lr"] == 1e-3
assert trainer.state.global_step == 6
assert held.last_step.kind in ("search", "reuse") and held.last_step.backwards == 1
# the Trainer neither clips nor schedules on top: the optimizer clips, the search sets lr
assert trainer.args.max_grad_norm == 0 and held.param_groups[0]["max_grad_norm"] == 1.0
assert isinstance(trainer.lr_scheduler, FollowStepSize)
assert trainer.lr_scheduler.get_last_lr()[0] == held.param_groups[0]["lr"]
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "accelerate": {
        "modules": ["accelerate"],
        "setup": "def setup():"
        + CLASSIFIER
        + """
    data = torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randint(0, 3, (128,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    return {"model": model, "loader": loader, "k": 4}
""",
        "check": """
assert info.kind in ("search", "reuse") and info.backwards == 1
assert optimizer.step(closure) is None  # returns None under accelerate
assert optimizer.optimizer.last_step.grad_norm > 0  # max_grad_norm measures the norm
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "lightning": {
        "modules": ["lightning"],
        "setup": """
def setup():
    import torch

    def make_net():
        return torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
            torch.nn.Linear(32, 3),
        )

    return {"make_net": make_net}
""",
        "replace": [("self.net = ...", "self.net = make_net()")],
        "check": """
import torch

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
trainer.fit_loop.epoch_loop.max_steps = 8  # a few steps, not the default 1000 epochs
trainer.log_every_n_steps = 1  # (the monitor logs on the logging steps)
sizes = []  # the step size each step ended with


class StepSizes(pl.Callback):
    def on_train_batch_end(self, trainer, module, *args):
        sizes.append(module.optimizers().optimizer.param_groups[0]["lr"])


trainer.callbacks.append(StepSizes())
module = Model()
trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=32))
assert trainer.global_step == 8  # Lightning counts the line-search steps
optimizer = module.optimizers().optimizer
assert type(optimizer) is ALSALS and optimizer.last_step.kind in ("search", "reuse")
monitor = next(c for c in trainer.callbacks if isinstance(c, LearningRateMonitor))
# the initial lr at the first batch, then the step size each step ended with
assert monitor.lrs == {"lr-ALSALS": [0.1] + sizes[:-1]}, (monitor.lrs, sizes)
for name in ("train_loss", "line_search/trials", "line_search/step_size"):
    assert name in trainer.logged_metrics, name
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "ddp": {
        "setup": "def setup():"
        + ONE_RANK_GROUP
        + CLASSIFIER
        + """
    micro_batches = list(zip(x.chunk(4), y.chunk(4)))
    return {"model": model, "micro_batches": micro_batches, "n": len(x)}
""",
        "check": """
assert optimizer.last_step.kind == "search" and optimizer.last_step.backwards == 1
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
"""
        + ENDS_ONE_RANK_GROUP,
    },
    "fsdp2": {
        "setup": "def setup():"
        + ONE_RANK_GROUP
        + """
    import torch
    import torch.nn.functional as F

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)])

        def forward(self, x):
            return self.layers[1](torch.tanh(self.layers[0](x)))

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    return {"model": Net(), "loss_fn": F.cross_entropy, "x": x, "y": y}
""",
        "check": """
assert type(next(model.parameters())).__name__ == "DTensor"
assert optimizer.last_step.kind == "search" and optimizer.last_step.backwards == 1
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
"""
        + ENDS_ONE_RANK_GROUP,
    },
    "autocast": {
        "setup": "def setup():"
        + CLASSIFIER
        + """
    from alsals import ALSALS

    return {"model": model, "x": x, "y": y, "optimizer": ALSALS(model.parameters())}
""",
        "replace": [('"cuda"', '"cpu"')],  # bf16 autocast on the CPU
        "check": """
import warnings

assert optimizer.last_step.kind == "search"
assert not ALSALS_WARNINGS, ALSALS_WARNINGS  # cross_entropy's loss is float32
with warnings.catch_warnings(record=True) as caught:  # a bf16 loss is warned about
    warnings.simplefilter("always")
    autocast_closure(lambda: model(x).float().square().mean().bfloat16(), "cpu")()
assert any("torch.bfloat16" in str(w.message) for w in caught)
""",
    },
    "grad-scaler": {
        "setup": "def setup():"
        + CLASSIFIER
        + """
    from alsals import ALSALS

    optimizer = ALSALS(model.parameters(), max_grad_norm=1.0)
    return {"model": model, "x": x, "y": y, "optimizer": optimizer}
""",
        "replace": [('"cuda"', '"cpu"')],  # fp16 autocast and the scaler on the CPU
        "check": """
assert optimizer.last_step.kind == "search" and loss.dtype == torch.float32
# an overflow skips the step, leaves the weights alone and backs the scale off, silently
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
weights = [p.clone() for p in model.parameters()]
step_with_scaler(optimizer, closure, scaler)
assert optimizer.last_step.kind == "nonfinite" and scaler.get_scale() == 2.0**126
assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "compile": {
        "setup": "def setup():"
        + CLASSIFIER
        + """
    from alsals import ALSALS

    return {"model": model, "x": x, "y": y, "optimizer": ALSALS(model.parameters())}
""",
        # the eager autograd backend: what is checked is the guards, not inductor's kernels
        "replace": [("torch.compile(model)", 'torch.compile(model, backend="aot_eager")')],
        "check": """
assert optimizer.last_step.kind == "search" and optimizer.last_step.trials >= 2
with torch.compiler.set_stance("fail_on_recompile"):  # later steps reuse both graphs
    for _ in range(3):
        optimizer.step(lambda: F.cross_entropy(compiled(x), y))
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "migration-checkpoint": {
        # an excerpt of examples/migrate_from_adamw.py, which imports torch
        "setup": """
def setup():
    import torch

    return {"torch": torch}
""",
        "check": """
from alsals import ALSALS

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizer = ALSALS(model.parameters())
x, y = torch.randn(16, 4), torch.randn(16, 2)
optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
scaler = torch.amp.GradScaler("cpu", enabled=False)
save_checkpoint("ckpt.pt", 1, model, optimizer, scaler, torch.Generator().manual_seed(0))
checkpoint = torch.load("ckpt.pt", weights_only=True)  # loads with weights_only=True
fresh = ALSALS(torch.nn.Linear(4, 2).parameters())
fresh.load_state_dict(checkpoint["optimizer"])
assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "migration-ddp-sketch": {
        "setup": "def setup():"
        + ONE_RANK_GROUP
        + CLASSIFIER
        + """
    from torch.nn.parallel import DistributedDataParallel

    from alsals import ALSALS

    return {
        "ddp": DistributedDataParallel(model), "model": model,
        "micro": list(zip(x.chunk(4), y.chunk(4))), "contextlib": __import__("contextlib"),
        "F": torch.nn.functional, "torch": torch,
        "optimizer": ALSALS(model.parameters(), max_grad_norm=1.0),
        "scaler": torch.amp.GradScaler("cpu"),
    }
""",
        "replace": [('"cuda"', '"cpu"')],  # fp16 autocast on the CPU
        "check": """
from alsals.integrations.amp import step_with_scaler

step_with_scaler(optimizer, closure, scaler)
assert optimizer.last_step.kind == "search" and optimizer.last_step.backwards == 1
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
"""
        + ENDS_ONE_RANK_GROUP,
    },
    "diagnostics-scan": {
        "setup": "def setup():"
        + CLASSIFIER
        + """
    import torch.nn.functional as F

    from alsals import MomentumALSALS  # ALSALS has no one direction to scan

    optimizer = MomentumALSALS(model.parameters())

    def closure():
        return F.cross_entropy(model(x), y)

    for _ in range(3):
        optimizer.step(closure)
    return {"optimizer": optimizer, "closure": closure}
""",
        "check": """
assert len(scan.decreases) == len(scan.step_sizes) == len(scan.accepted) == 36
assert optimizer.last_step.step_size == scan.chosen_step_size  # the step takes it
assert not ALSALS_WARNINGS, ALSALS_WARNINGS
""",
    },
    "bench-task": {
        "data": ["fashion-mnist"],
        "check": """
assert run.model.training  # evaluate switched back to the mode the model was in
metrics = run.evaluate(run.model)
assert set(metrics) >= {"accuracy", "val_loss"} and loss.requires_grad
""",
    },
    "minilm-offline": {
        "modules": ["transformers"],
        "data": ["minilm"],
        "check": """
assert sum(p.numel() for p in model.parameters()) == 22_713_986  # 22.7M with the head
assert tokenizer("Hello world")["input_ids"][0] == tokenizer.cls_token_id
""",
    },
}


def script_for(block: Block) -> str:
    spec = EXAMPLES[block.marker]
    code = block.code
    for old, new in spec.get("replace", []):
        assert old in code, f"{block.doc}: {old!r} is no longer in the block {block.marker}"
        code = code.replace(old, new)
    parts = [PRELUDE]
    if "setup" in spec:
        parts += [spec["setup"], "globals().update(setup())\ndel setup\n"]
    parts += ["# ---- the block\n" + code, "# ---- the checks\n" + spec.get("check", "")]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- the tests


def test_every_block_is_marked():
    unmarked = [f"{b.doc} block {b.index}" for b in BLOCKS if b.marker is None]
    assert not unmarked, f"python blocks without a <!-- doc-test: ... --> marker: {unmarked}"
    names = [b.marker for b in BLOCKS if not b.marker.startswith("not run:")]
    assert sorted(names) == sorted(EXAMPLES), "doc-test markers and EXAMPLES differ"


RUN = [b for b in BLOCKS if b.marker in EXAMPLES]


def why_not_here(block: Block) -> str | None:
    """Why ``block`` cannot run on this machine (a package or benchmark data missing)."""
    spec = EXAMPLES[block.marker]
    for module in spec.get("modules", []):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    for name in spec.get("data", []):
        missing = _data_present(name)
        if missing:
            return f"benchmark data: {missing} (alsals-bench fetch --only {name})"
    return None


def run_example(block: Block, folder: Path) -> subprocess.CompletedProcess:
    folder.mkdir()
    script = folder / "doc_example.py"  # (not the name of a package it imports)
    script.write_text(script_for(block))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",  # nothing downloads
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(ROOT / "benchmarks" / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
        env=env,
    )


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Every selected example that can run here, run side by side, one per CPU: each is a
    process of its own, most of whose time is importing torch and the framework."""
    selected = {
        item.callspec.params["block"].marker
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_doc_example_runs"
    }
    todo = [b for b in RUN if b.marker in selected and why_not_here(b) is None]
    root = tmp_path_factory.mktemp("doc_examples")
    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {b.marker: pool.submit(run_example, b, root / b.marker) for b in todo}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("block", RUN, ids=[b.marker for b in RUN])
def test_doc_example_runs(block, results):
    reason = why_not_here(block)
    if reason:
        pytest.skip(reason)
    result = results[block.marker]
    assert result.returncode == 0, result.stderr[-4000:]
