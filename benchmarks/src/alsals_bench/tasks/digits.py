"""The embedded default task: a small CNN on scikit-learn's 8x8 digits (no fetch needed)."""

from __future__ import annotations

import torch
from torch import nn

from alsals_bench.data.offline import load_digits_dataset
from alsals_bench.tasks._util import tensor_classification_run
from alsals_bench.tasks.base import (
    Budget,
    Task,
    TaskRun,
    long_budget,
)

QUICK = Budget(steps=300, batch_size=64, eval_every=25)


def digits_cnn(width: int = 16, num_classes: int = 10) -> nn.Module:
    """Two convolutions with BatchNorm, dropout and a linear head: BatchNorm and dropout make
    it exercise the line search's buffer protection and randomness replay."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(2 * width * 4 * 4, num_classes),
    )


class DigitsCNN(Task):
    name = "digits-cnn"
    description = "small CNN on scikit-learn digits (1437 train / 360 test, 8x8): built in"
    domain = "image"
    adam_lr = 1e-3
    adam_grid = (3e-4, 1e-3, 3e-3, 1e-2)
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": QUICK,
        "long": long_budget(QUICK),
        "paper": Budget(steps=2300, batch_size=64, eval_every=100),  # 100 epochs
    }

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        data = load_digits_dataset()
        x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
        x_test, y_test = data["x_test"].to(device), data["y_test"].to(device)
        torch.manual_seed(seed)
        model = digits_cnn().to(device)
        return tensor_classification_run(
            model, (x_train, y_train), (x_test, y_test), budget.batch_size, seed, 512
        )
