"""A LightningModule trained by ALSALS: manual optimization, one line-search step per batch.

    python examples/lightning_train.py                       # one process, CPU
    python examples/lightning_train.py --devices 2 --strategy ddp

The pattern (docs/integrations.md, Lightning): ``automatic_optimization = False`` and
``line_search_step(self, loss_fn)`` in ``training_step``. ``LearningRateMonitor`` logs the
step size the line search picked (``lr-ALSALS``); ``LineSearchCallback`` checks the set-up
and logs the trials of each step. The logged metrics go to ``metrics.csv`` under
``--out DIR`` (default ``runs/lightning``), and with ``--out`` each rank's final weights
too, for the tests.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alsals import ALSALS
from alsals.integrations.lightning import LineSearchCallback, line_search_step


class Classifier(pl.LightningModule):
    def __init__(self, features: int = 20, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.automatic_optimization = False  # the line search drives the step
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 2),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = line_search_step(self, lambda: nn.functional.cross_entropy(self.net(x), y))
        self.log("train_loss", loss, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        accuracy = (self.net(x).argmax(dim=1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        # buffers=: trial evaluations must not move BatchNorm's running statistics
        return ALSALS(self.parameters(), buffers=self.buffers())


def make_data(n: int = 512, features: int = 20, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, :5].sum(dim=1) + 0.5 * torch.randn(n, generator=gen) > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    pl.seed_everything(0, workers=True)
    model = Classifier()
    train = DataLoader(make_data(seed=0), batch_size=32, shuffle=True)
    val = DataLoader(make_data(n=256, seed=1), batch_size=128)
    out = args.out or "runs/lightning"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        callbacks=[LineSearchCallback(), LearningRateMonitor(logging_interval="step")],
        logger=CSVLogger(out, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)
    if trainer.is_global_zero:
        print(
            f"steps {trainer.global_step}  val_acc {trainer.callback_metrics['val_acc']:.3f}  "
            f"step size {trainer.optimizers[0].param_groups[0]['lr']:.3e}"
        )
    if args.out:
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(
            {"weights": weights, "global_step": trainer.global_step},
            os.path.join(args.out, f"rank{trainer.global_rank}.pt"),
        )


if __name__ == "__main__":
    main()
