"""Models of the benchmark tasks: ResNets (no torchvision needed) and GPT-2 from scratch."""

from alsals_bench.models.gpt2 import GPT2_SIZES, gpt2_config, gpt2_lm
from alsals_bench.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    cifar_resnet,
    resnet34,
    resnet50,
)

__all__ = [
    "GPT2_SIZES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "cifar_resnet",
    "gpt2_config",
    "gpt2_lm",
    "resnet34",
    "resnet50",
]
