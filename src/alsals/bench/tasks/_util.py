"""Helpers shared by the tasks: evaluation mode, image normalisation and augmentation."""

from __future__ import annotations

from collections.abc import Iterator
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
