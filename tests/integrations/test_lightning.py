"""Lightning: the manual-optimization pattern, LearningRateMonitor, resume, DDP (2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS  # noqa: E402
from alsals.integrations.lightning import LineSearchCallback, line_search_step  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_train.py"


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, float(m[key])) for step, m in self.records if key in m]


class Module(pl.LightningModule):
    def __init__(self, optimizer_cls=MomentumALSALS, dropout: float = 0.1, automatic: bool = False):
        super().__init__()
        self.automatic_optimization = automatic
        self.optimizer_cls = optimizer_cls
        self.net = nn.Sequential(
            nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2)
        )
        self.step_sizes: list[float] = []  # the step size after each optimizer step
        self.taken: list[float] = []  # the step size each update took (last_step)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return nn.functional.cross_entropy(self.net(x), y)
        loss = line_search_step(self, lambda: nn.functional.cross_entropy(self.net(x), y))
        self.step_sizes.append(self.optimizers().param_groups[0]["lr"])
        self.taken.append(self.optimizers().optimizer.last_step.step_size)
        self.losses.append(loss.item())
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), buffers=self.buffers(), slope="analytic")


def data(n: int = 256, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    return TensorDataset(x, (x[:, :3].sum(dim=1) > 0).long())


def trainer(
    tmp_path, max_epochs: int = 2, callbacks=(), guarded: bool = True, **kwargs
) -> pl.Trainer:
    """A CPU trainer with ``LineSearchCallback`` (``guarded=False``: without it, so that
    automatic optimization runs)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=[LineSearchCallback(), *callbacks] if guarded else list(callbacks),
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_learning_rate_monitor_logs_the_line_search_step_size(tmp_path):
    pl.seed_everything(0)
    module = Module()
    logger = MemoryLogger()
    fit = trainer(
        tmp_path,
        callbacks=[LearningRateMonitor(logging_interval="step")],
        logger=logger,
        enable_checkpointing=False,
    )
    fit.fit(module, DataLoader(data(), batch_size=32, shuffle=True))

    steps = len(module.step_sizes)
    assert steps == fit.global_step == 2 * 256 // 32  # every step counted by Lightning
    logged = logger.series("lr-MomentumALSALS")
    # the monitor logs at the start of each batch: the initial lr, then the step size the
    # previous step ended with
    assert [step for step, _ in logged] == list(range(steps))
    assert [lr for _, lr in logged] == [0.1, *module.step_sizes[:-1]]
    assert len(set(module.step_sizes)) > 3, "the step size must come from the search"
    trials = logger.series("line_search/trials")
    assert len(trials) == steps and trials[0][1] > 1  # the first search backtracked
    # the step size each update took: the searched one, or less where the Polyak cap acted
    logged_sizes = [size for _, size in logger.series("line_search/step_size")]
    assert logged_sizes == pytest.approx(module.taken, rel=1e-6)  # Lightning logs float32
    assert all(t <= s for t, s in zip(module.taken, module.step_sizes, strict=True))
    assert module.losses[-1] < 0.5 * module.losses[0]


class ScheduleFreeModule(Module):
    """Records the weights each validation batch sees."""

    def __init__(self) -> None:
        super().__init__(optimizer_cls=ALSALS)
        self.validated: list[list[torch.Tensor]] = []

    def validation_step(self, batch, batch_idx):
        self.validated.append([p.detach().clone() for p in self.parameters()])
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return ALSALS(self.parameters(), buffers=self.buffers())


def test_schedule_free_search_trains_and_validation_sees_the_trained_weights(tmp_path):
    """ALSALS through line_search_step: every batch steps it, and validation
    (no swap call needed) sees the weights the last training step left, the average x: the
    weights of the epoch's end, unchanged until the next training batch."""
    pl.seed_everything(0)
    module = ScheduleFreeModule()
    fit = trainer(tmp_path, enable_checkpointing=False, logger=False, num_sanity_val_steps=0)
    loader = DataLoader(data(), batch_size=32, shuffle=True)
    fit.fit(module, loader, DataLoader(data(64, seed=1), batch_size=32))
    assert fit.global_step == 2 * 256 // 32
    assert len(module.validated) == 2 * 2
    final = [p.detach() for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(module.validated[-1], final, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(module.validated[0], final, strict=True))
    optimizer = fit.optimizers[0]
    assert optimizer.search_state.steps == fit.global_step
    assert module.losses[-1] < 0.5 * module.losses[0]


def test_resume_from_a_lightning_checkpoint_matches_an_uninterrupted_run(tmp_path):
    def run(epochs: int, ckpt_path=None, root=tmp_path / "run"):
        pl.seed_everything(0)
        module = Module(optimizer_cls=AdamSLS, dropout=0.0)
        fit = trainer(root, max_epochs=epochs, logger=False)
        fit.fit(module, DataLoader(data(), batch_size=32), ckpt_path=ckpt_path)
        return module, fit

    straight, _ = run(2, root=tmp_path / "straight")
    _, first = run(1, root=tmp_path / "first")
    checkpoint = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(checkpoint)
    resumed, fit = run(2, ckpt_path=checkpoint, root=tmp_path / "resumed")
    assert fit.global_step == 16
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.buffers(), resumed.buffers(), strict=True):
        assert torch.equal(a, b)
    assert resumed.step_sizes == straight.step_sizes[8:]


def test_automatic_optimization_is_refused_with_the_fix(tmp_path):
    fit = trainer(tmp_path, logger=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        fit.fit(Module(automatic=True), DataLoader(data(), batch_size=32))


def test_automatic_optimization_without_the_callback_takes_the_manual_steps(tmp_path):
    """Without the callback's refusal, automatic optimization runs: Lightning's closure runs
    backward itself, the optimizer takes its gradients, and in trials its backward does
    nothing. The weights follow the manual pattern's (no dropout, same batches)."""
    weights = []
    for automatic in (False, True):
        pl.seed_everything(0)
        module = Module(dropout=0.0, automatic=automatic)
        initial = [p.detach().clone() for p in module.parameters()]
        fit = trainer(tmp_path, 1, guarded=False, logger=False, enable_checkpointing=False)
        fit.fit(module, DataLoader(data(), batch_size=32))
        assert fit.global_step == 256 // 32
        weights.append([p.detach().clone() for p in module.parameters()])
        assert not all(torch.equal(a, b) for a, b in zip(initial, weights[-1], strict=True))
    manual, automatic = weights
    for a, b in zip(manual, automatic, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class DefaultsModule(Module):
    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), buffers=self.buffers())


@pytest.mark.parametrize("optimizer_cls", [MomentumALSALS, ALSALS])
def test_accumulation_under_automatic_optimization_is_warned_about(tmp_path, optimizer_cls):
    """Without the callback, ``accumulate_grad_batches`` runs the first micro-batch's
    backward outside ``step()``, and Lightning's closure computes the step's gradient from
    the last one alone: the optimizer says once that it dropped the others."""
    pl.seed_everything(0)
    fit = trainer(
        tmp_path,
        1,
        guarded=False,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(DefaultsModule(optimizer_cls, automatic=True), DataLoader(data(), batch_size=32))
    dropped = [w for w in caught if "held gradients computed since the last step" in str(w.message)]
    assert fit.global_step == 256 // 64 and len(dropped) == 1


def test_fp16_mixed_is_refused_with_the_fix(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    # On CPU Lightning turns precision="16-mixed" into bf16; its fp16 plugin with a CPU
    # GradScaler is the set-up a GPU run gets.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fit = trainer(tmp_path, logger=False, enable_checkpointing=False, plugins=[plugin])
    assert fit.precision == "16-mixed"
    with pytest.raises(RuntimeError, match="bf16-mixed"):
        fit.fit(Module(), DataLoader(data(), batch_size=32))


def test_bf16_mixed_trains(tmp_path):
    pl.seed_everything(0)
    module = Module()
    fit = trainer(tmp_path, logger=False, enable_checkpointing=False, precision="bf16-mixed")
    fit.fit(module, DataLoader(data(), batch_size=32, shuffle=True))
    assert fit.global_step == 16 and len(module.losses) == 16
    assert module.losses[-1] < 0.5 * module.losses[0]


def test_bf16_true_is_warned_about_and_bf16_mixed_is_not(tmp_path):
    """``bf16-true`` computes the loss in bfloat16 (8 significant bits): the callback says
    so and names ``bf16-mixed``; ``bf16-mixed`` trains without that warning."""
    with pytest.warns(UserWarning, match="bf16-mixed"):
        fit = trainer(tmp_path, logger=False, enable_checkpointing=False, precision="bf16-true")
        fit.fit(Module(), DataLoader(data(), batch_size=32))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*half precision.*")
        fit = trainer(tmp_path, logger=False, enable_checkpointing=False, precision="bf16-mixed")
        fit.fit(Module(), DataLoader(data(), batch_size=32))


@pytest.mark.distributed
def test_ddp_example_keeps_ranks_identical(tmp_path):
    """Two processes (Lightning's ddp strategy on CPU): each rank its own shard, one weight."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(EXAMPLE), "--devices", "2", "--strategy", "ddp",
        "--epochs", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # 512 samples, 2 ranks, batch 32: 8 steps each
    assert rank0["global_step"] == rank1["global_step"] == 8
    assert torch.equal(rank0["weights"], rank1["weights"])
    lr = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    column = lr[0].index("lr-ALSALS")
    logged = [float(row[column]) for row in lr[1:] if row[column]]
    assert len(logged) == 8 and len(set(logged)) > 2


# Several optimizers, the callback's logging and its precision check, on a tiny model.


def _lightning_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    return DataLoader(TensorDataset(x, (x[:, :2].sum(dim=1) > 0).long()), batch_size=16)


def _fit(module, tmp_path, callback, logger):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=[callback],
        logger=logger,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, _lightning_data())
    return trainer


def _two_optimizer_module(record):
    class TwoHeads(pl.LightningModule):
        """Two line-search optimizers, one per layer, each stepped by ``line_search_step``."""

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.a = torch.nn.Linear(6, 2)
            self.b = torch.nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for i, opt in enumerate(self.optimizers()):
                line_search_step(
                    self,
                    lambda: torch.nn.functional.cross_entropy(self.a(x) + self.b(x), y),
                    optimizer=opt,
                )
                info = opt.optimizer.last_step
                record.setdefault(i, []).append((info.trials, info.forwards, info.step_size))

        def configure_optimizers(self):
            return [SLS(self.a.parameters(), lr=10.0), SLS(self.b.parameters(), lr=10.0)]

    return TwoHeads()


def test_the_callback_logs_each_optimizers_numbers_under_its_own_suffix(tmp_path):
    """With two line-search optimizers the callback logs ``line_search/trials_0``,
    ``..._1`` (and forwards, step_size): each optimizer's own last step, trials as trials
    and forwards as forwards, none under the unsuffixed keys."""
    record = {}
    logger = MemoryLogger()
    _fit(_two_optimizer_module(record), tmp_path, LineSearchCallback(), logger)
    assert not [value for _, value in logger.series("line_search/trials")]
    for i in (0, 1):
        trials = [value for _, value in logger.series(f"line_search/trials_{i}")]
        forwards = [value for _, value in logger.series(f"line_search/forwards_{i}")]
        sizes = [value for _, value in logger.series(f"line_search/step_size_{i}")]
        assert trials == [float(t) for t, _, _ in record[i]]
        assert forwards == [float(f) for _, f, _ in record[i]]
        assert sizes == pytest.approx([s for _, _, s in record[i]], rel=1e-6)
        assert any(f != t for t, f, _ in record[i])  # (trials and forwards tell apart)


def test_the_callback_with_log_false_logs_nothing(tmp_path):
    """``LineSearchCallback(log=False)`` checks the set-up but logs no line-search keys."""
    logger = MemoryLogger()
    _fit(_two_optimizer_module({}), tmp_path, LineSearchCallback(log=False), logger)
    assert not [k for _, m in logger.records for k in m if k.startswith("line_search/")]


def test_line_search_step_needs_the_optimizer_named_where_there_are_several(tmp_path):
    """``line_search_step(self, loss_fn)`` on a module with two optimizers is a ValueError
    that says to pass ``optimizer=``."""

    class Unnamed(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.a = torch.nn.Linear(6, 2)
            self.b = torch.nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            line_search_step(self, lambda: torch.nn.functional.cross_entropy(self.a(x), y))

        def configure_optimizers(self):
            return [SLS(self.a.parameters()), SLS(self.b.parameters())]

    with pytest.raises(ValueError, match="optimizer=self.optimizers"):
        _fit(Unnamed(), tmp_path, LineSearchCallback(), False)


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_the_callback_warns_about_half_precision_weights(precision):
    """``16-true`` and ``bf16-true`` compute the loss in half precision: the callback warns
    at fit start (checked on the callback alone, without a half-precision run)."""
    from types import SimpleNamespace

    w = torch.nn.Parameter(torch.zeros(2))
    trainer = SimpleNamespace(optimizers=[SLS([w])], precision=precision)
    module = SimpleNamespace(automatic_optimization=False)
    with pytest.warns(UserWarning, match="half precision"):
        LineSearchCallback().on_fit_start(trainer, module)
