"""Helpers shared by the tasks: evaluation mode, image normalisation and augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm running statistics, no dropout), then restore it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def normalize_uint8(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B, C, H, W] (or [B, H, W] for one channel) to normalised float32."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, device=images.device).view(shape)
    std_t = torch.tensor(std, device=images.device).view(shape)
    return (images.float().div_(255.0) - mean_t) / std_t


def crop_flip(
    images: Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> Tensor:
    """Zero-pad by ``pad``, take a random crop of the original size, flip half horizontally.

    The ResNet paper's CIFAR augmentation. Offsets and flips come from ``generator`` (a CPU
    generator, never the global one) and are applied on the images' device; ``pad=0``
    skips cropping.
    """
    b, c, h, w = images.shape
    device = images.device
    if pad > 0:
        padded = nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(b, device=device)[:, None, None, None]
        chans = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(device)
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    return images


def fixed_subset(n: int, size: int | None) -> Tensor | None:
    """Indices of a fixed evaluation subset (the same for every seed), or None for all."""
    if size is None or size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size]


def tensor_dataset_run(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    batch_size: int,
    seed: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    evaluate: Callable[[nn.Module], dict[str, float]],
):
    """A task run on in-memory tensors: batches of ``train`` (inputs, targets) shuffled with
    ``batch_stream(seed)``, the loss ``loss_fn(model(x), y)``, and ``evaluate`` run in eval
    mode (the model's mode restored after)."""
    from alsals_bench.tasks.base import TaskRun, batch_stream

    x_train, y_train = train
    indices = batch_stream(len(x_train), batch_size, seed)

    def next_batch():
        idx = indices().to(x_train.device)
        return x_train[idx], y_train[idx]

    def loss(model, batch):
        x, y = batch
        return loss_fn(model(x), y)

    def evaluate_in_eval_mode(model):
        with eval_mode(model):
            return evaluate(model)

    return TaskRun(model=model, next_batch=next_batch, loss=loss, evaluate=evaluate_in_eval_mode)


def tensor_classification_run(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    batch_size: int,
    seed: int,
    eval_batch: int,
):
    """``tensor_dataset_run`` with the cross-entropy loss and, as evaluation, the accuracy and
    loss on ``test`` (inputs, labels) in batches of ``eval_batch``."""
    from alsals_bench.tasks.base import classification_metrics

    x_test, y_test = test
    return tensor_dataset_run(
        model,
        train,
        batch_size,
        seed,
        nn.functional.cross_entropy,
        lambda m: classification_metrics(m, x_test, y_test, eval_batch, lambda m, x, s: m(x[s])),
    )


def image_classification_run(
    model: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    normalisation: tuple[tuple[float, ...], tuple[float, ...]],
    batch_size: int,
    seed: int,
    augment_pad: int | None,
    eval_batch: int,
    device: torch.device,
):
    """The training stream, loss and evaluation shared by the image classification tasks.

    ``data`` is (uint8 train images, train labels, normalised test images, test labels) on
    ``device``; batches are shuffled with ``batch_stream(seed)`` and, when ``augment_pad`` is
    set, padded, randomly cropped and flipped with a generator seeded ``seed + 1``.
    """
    from alsals_bench.tasks.base import TaskRun, batch_stream, classification_metrics

    x_train, y_train, x_test, y_test = data
    mean, std = normalisation
    indices = batch_stream(len(y_train), batch_size, seed)
    augment = torch.Generator().manual_seed(seed + 1) if augment_pad is not None else None

    def next_batch():
        idx = indices().to(device)
        x = normalize_uint8(x_train[idx], mean, std)
        if augment is not None:
            x = crop_flip(x, augment, pad=augment_pad)
        return x, y_train[idx]

    def loss(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(model):
        with eval_mode(model):
            return classification_metrics(
                model, x_test, y_test, eval_batch, lambda m, x, s: m(x[s])
            )

    return TaskRun(model=model, next_batch=next_batch, loss=loss, evaluate=evaluate)
