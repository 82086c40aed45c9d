"""Convolutional block attention module (CBAM): channel attention, then spatial attention.

Follows eqs. 6-11 of the ResNext+ paper (after Woo et al., ECCV 2018):

    F_channel = M_c(F) * F,   M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))
    F_spatial = M_s(F_channel) * F_channel,
    M_s(F) = sigmoid(Conv_k([mean_c(F); max_c(F)]))

The shared MLP has one hidden layer of ``C / r`` units (``W_0``, ReLU, ``W_1``); as in the
equations, neither the MLP nor the spatial convolution carries a bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention"]


class ChannelAttention(nn.Module):
    """Channel attention map ``M_c`` of shape ``(N, C, 1, 1)`` (eqs. 8-9).

    Args:
        channels: number of feature maps ``C``.
        reduction: reduction ratio ``r`` of the hidden layer (at least one hidden unit).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be positive, got {channels} and {reduction}")
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
        )
        # The pooled descriptors are non-negative (they follow a ReLU) and nearly equal across
        # channels at initialisation, so a hidden unit whose input weights sum to a negative
        # value would start dead and never receive a gradient: flip the sign of such rows.
        with torch.no_grad():
            first = self.mlp[0].weight
            first.mul_(torch.where(first.sum(dim=1, keepdim=True) < 0, -1.0, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(x.mean(dim=(2, 3)))
        peak = self.mlp(torch.amax(x, dim=(2, 3)))
        return torch.sigmoid(avg + peak)[:, :, None, None]


class SpatialAttention(nn.Module):
    """Spatial attention map ``M_s`` of shape ``(N, 1, H, W)`` (eqs. 10-11).

    Args:
        kernel_size: odd size of the convolution over the two pooled maps (9 in the paper).
    """

    def __init__(self, kernel_size: int = 9) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Refine feature maps by channel attention followed by spatial attention (eqs. 6-7).

    Args:
        channels: number of feature maps (64 after the ResNext+ fusion stem).
        reduction: reduction ratio of the channel-attention MLP.
        spatial_kernel: kernel size of the spatial-attention convolution.

    Shape:
        ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 9) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_attention = SpatialAttention(spatial_kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_attention(x) * x
        return self.spatial_attention(x) * x
