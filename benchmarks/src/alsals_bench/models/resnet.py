"""Residual networks (He et al., 2016) written here, so torchvision is not needed.

- ``cifar_resnet(depth)``: the paper's CIFAR family (Sec. 4.2 of He et al.): a 3x3 stem,
  three stages of basic blocks with 16/32/64 channels, ``depth = 6n + 2`` (8, 20, 32, ...).
- ``resnet34`` / ``resnet50``: the ImageNet architectures (basic blocks [3, 4, 6, 3];
  bottlenecks [3, 4, 6, 3]), layer for layer as torchvision builds them, so parameter
  counts match (21,797,672 and 25,557,032 with 1000 classes). ``stem="cifar"`` swaps the
  7x7/2 convolution and max-pool for one 3x3/1 convolution, the usual way to train them
  on 32x32 images (the paper trains ResNet34 on CIFAR).

Downsampling shortcuts are 1x1 convolutions with BatchNorm (option B of He et al.).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or projection) shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, stages of residual blocks, global average pooling and a linear classifier."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int] | tuple[int, ...],
        widths: list[int] | tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        stem: Literal["imagenet", "cifar"] = "imagenet",
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"{len(layers)} stages but {len(widths)} widths")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        stem_width = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                _conv3x3(in_channels, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
            )
        stages, in_ch = [], stem_width
        for i, (count, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, width, stride))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """He et al.'s CIFAR ResNet: ``depth = 6n + 2`` (ResNet-8: n=1, ResNet-20: n=3)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n] * 3, [16, 32, 64], num_classes, in_channels, stem="cifar")


def resnet34(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: Literal["imagenet", "cifar"] = "imagenet",
) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3], 64-512 channels."""
    return ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, stem)


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: Literal["imagenet", "cifar"] = "imagenet",
) -> ResNet:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3], 256-2048 output channels."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, stem)
