"""Fashion-MNIST with a CIFAR-style ResNet-8: the offline stand-in for ResNet34 on CIFAR-10."""

from __future__ import annotations

import torch

from alsals_bench.data.offline import load_fashion_mnist
from alsals_bench.models.resnet import cifar_resnet
from alsals_bench.tasks._util import fixed_subset, image_classification_run, normalize_uint8
from alsals_bench.tasks.base import Budget, Task, TaskRun, long_budget

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
QUICK = Budget(steps=400, batch_size=128, eval_every=100, options={"depth": 8, "eval_size": 2000})


class FashionResNet(Task):
    name = "fashion-resnet"
    description = (
        "CIFAR-style ResNet-8 (16/32/64 channels, BatchNorm) on Fashion-MNIST 28x28 "
        "(60k train / 10k test): stand-in for ResNet34 on CIFAR-10"
    )
    domain = "image"
    adam_lr = 1e-3
    adam_grid = (3e-4, 1e-3, 3e-3, 1e-2)
    metrics = ("accuracy", "val_loss")
    requires = ("fashion-mnist",)
    budgets = {
        "smoke": Budget(
            steps=4, batch_size=16, eval_every=2, options={"depth": 8, "eval_size": 64}
        ),
        "quick": QUICK,
        "long": long_budget(QUICK),
        # The paper's CIFAR protocol: batch 128, 100 epochs (60000 // 128 = 468 steps
        # each), the ResNet paper's augmentation, the whole test set.
        "paper": Budget(
            steps=46800,
            batch_size=128,
            eval_every=468,
            options={"depth": 20, "eval_size": None, "augment": True},
        ),
    }

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        opts = budget.options
        data = load_fashion_mnist()
        x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
        x_test, y_test = data["x_test"], data["y_test"]
        keep = fixed_subset(len(y_test), opts.get("eval_size"))
        if keep is not None:
            x_test, y_test = x_test[keep], y_test[keep]
        x_test = normalize_uint8(x_test.to(device), FASHION_MEAN, FASHION_STD)
        y_test = y_test.to(device)

        torch.manual_seed(seed)
        model = cifar_resnet(opts.get("depth", 8), num_classes=10, in_channels=1).to(device)
        return image_classification_run(
            model,
            (x_train, y_train, x_test, y_test),
            (FASHION_MEAN, FASHION_STD),
            budget.batch_size,
            seed,
            2 if opts.get("augment") else None,
            1000,
            device,
        )
