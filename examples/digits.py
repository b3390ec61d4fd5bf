"""ALSALS against Adam on scikit-learn's 8x8 digits: the smallest honest comparison.

A small CNN is trained for a few epochs with each optimizer from the same initial weights and
the same batch order, over several seeds; the script prints the test accuracy and the final
training loss of each. Adam gets its common default learning rate (1e-3); ALSALS gets none.

    python examples/digits.py [--epochs 4] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from alsals import ALSALS


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32 * 4 * 4, 10),
    )


def train(name: str, seed: int, epochs: int, batch_size: int = 64) -> dict[str, float]:
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(seed)
    model = small_cnn()
    if name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = ALSALS(model.parameters(), buffers=model.buffers())
    order_gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=order_gen).split(batch_size):
            xb, yb = x_train[idx], y_train[idx]

            def closure(xb=xb, yb=yb):
                return nn.functional.cross_entropy(model(xb), yb)

            if name == "adam":
                opt.zero_grad()
                loss = closure()
                loss.backward()
                opt.step()
            else:
                loss = opt.step(closure)
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    tail = losses[-len(losses) // epochs :]
    return {
        "accuracy": accuracy,
        "train_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - start,
        "lr": opt.param_groups[0]["lr"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"digits, small CNN, {args.epochs} epochs, {args.seeds} seeds")
    print(f"{'optimizer':<10} {'test acc':>14} {'train loss':>18} {'final lr':>10} {'s/run':>7}")
    for name in ("adam", "alsals"):
        runs = [train(name, seed, args.epochs) for seed in range(args.seeds)]
        acc = [r["accuracy"] for r in runs]
        loss = [r["train_loss"] for r in runs]
        spread = (
            (lambda v: statistics.stdev(v) / len(v) ** 0.5) if len(runs) > 1 else (lambda v: 0.0)
        )
        print(
            f"{name:<10} {statistics.mean(acc):>8.4f} ±{spread(acc):.4f} "
            f"{statistics.mean(loss):>11.4f} ±{spread(loss):.4f} "
            f"{statistics.mean(r['lr'] for r in runs):>10.2e} "
            f"{statistics.mean(r['seconds'] for r in runs):>7.1f}"
        )


if __name__ == "__main__":
    main()
