"""The benchmark models: shapes, and parameter counts against the published figures."""

from __future__ import annotations

import pytest
import torch

from alsals_bench.models import GPT2_SIZES, cifar_resnet, gpt2_config, gpt2_lm, resnet34, resnet50


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "blocks"), [(8, 1), (20, 3)])
def test_cifar_resnet(depth, blocks):
    model = cifar_resnet(depth, num_classes=10, in_channels=1)
    assert [len(stage) for stage in model.stages] == [blocks] * 3
    widths = [stage[0].conv1.out_channels for stage in model.stages]
    assert widths == [16, 32, 64]
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert convs + 1 == depth  # 3x3 convolutions plus the classifier
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_cifar_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n"):
        cifar_resnet(10)


def test_imagenet_resnets_match_torchvision_counts():
    with torch.device("meta"):
        assert n_params(resnet34()) == 21_797_672
        assert n_params(resnet50()) == 25_557_032
        # 10 classes: the classifier shrinks, nothing else changes
        assert n_params(resnet34(10)) == 21_797_672 - 990 * 513
        # CIFAR stem: one 3x3 convolution instead of the 7x7
        assert n_params(resnet34(10, stem="cifar")) == 21_797_672 - 990 * 513 - 64 * 3 * 40


def test_imagenet_resnet_shapes():
    model = resnet50(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model = resnet34(num_classes=100, stem="cifar").eval()
    assert len(model.stem) == 3  # no max-pool
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 100)
    with pytest.raises(ValueError, match="stem"):
        resnet34(stem="tiny")


def test_gpt2_124m_config_and_count():
    config = gpt2_config("124M")
    assert (config.n_layer, config.n_head, config.n_embd) == (12, 12, 768)
    assert (config.vocab_size, config.n_positions) == (50257, 1024)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    with torch.device("meta"):
        model = gpt2_lm("124M")
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    assert n_params(model) == 124_439_808


def test_gpt2_small_model_runs():
    torch.manual_seed(0)
    model = gpt2_lm("tiny", vocab_size=100, n_positions=16, dropout=0.0)
    logits = model(input_ids=torch.randint(0, 100, (2, 16))).logits
    assert logits.shape == (2, 16, 100)
    torch.manual_seed(0)
    again = gpt2_lm("tiny", vocab_size=100, n_positions=16, dropout=0.0)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert set(GPT2_SIZES) >= {"124M", "mini", "tiny"}
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        gpt2_lm("huge")
