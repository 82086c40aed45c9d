"""CBAM: channel then spatial attention, checked against the paper's equations 6-11."""

from __future__ import annotations

import pytest
import torch

from networks import CBAM, ChannelAttention, SpatialAttention


def test_channel_attention_matches_equation_9():
    torch.manual_seed(0)
    module = ChannelAttention(channels=32, reduction=8)
    x = torch.rand(3, 32, 10, 12)
    w0, w1 = module.mlp[0].weight, module.mlp[2].weight
    expected = torch.sigmoid(
        torch.relu(x.mean(dim=(2, 3)) @ w0.T) @ w1.T + torch.relu(x.amax(dim=(2, 3)) @ w0.T) @ w1.T
    )
    out = module(x)
    assert out.shape == (3, 32, 1, 1)
    torch.testing.assert_close(out[:, :, 0, 0], expected)
    assert w0.shape == (4, 32) and w1.shape == (32, 4)


def test_spatial_attention_matches_equation_11_with_9x9_kernel():
    torch.manual_seed(0)
    module = SpatialAttention(kernel_size=9)
    x = torch.rand(2, 16, 20, 20)
    pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    expected = torch.sigmoid(torch.nn.functional.conv2d(pooled, module.conv.weight, padding=4))
    out = module(x)
    assert module.conv.weight.shape == (1, 2, 9, 9)
    assert out.shape == (2, 1, 20, 20)
    torch.testing.assert_close(out, expected)


def test_cbam_applies_channel_then_spatial_attention():
    torch.manual_seed(0)
    module = CBAM(64, reduction=16, spatial_kernel=9)
    x = torch.rand(2, 64, 16, 16)
    channel_refined = module.channel_attention(x) * x
    expected = module.spatial_attention(channel_refined) * channel_refined
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)
    # both maps lie in (0, 1), so CBAM only attenuates non-negative features
    assert torch.all(out <= x + 1e-6) and torch.all(out >= 0)


@pytest.mark.parametrize("seed", range(20))
def test_channel_mlp_hidden_units_start_alive(seed):
    torch.manual_seed(seed)
    module = ChannelAttention(channels=64, reduction=16)
    descriptor = torch.full((1, 64), 0.4)  # post-ReLU features look alike across channels at init
    assert torch.all(module.mlp[1](module.mlp[0](descriptor)) > 0)


def test_channel_attention_gets_gradient():
    torch.manual_seed(0)
    module = CBAM(64)
    module(torch.rand(2, 64, 8, 8)).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(kernel_size=4)
    with pytest.raises(ValueError, match="positive"):
        ChannelAttention(channels=64, reduction=0)
