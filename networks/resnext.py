"""ResNeXt backbone with the parameter names and shapes of torchvision's ``resnext50_32x4d``.

MONAI's ``ResNet`` has no grouped convolutions and torchvision is not a dependency, so the
backbone is written out here in the style of torchvision's ``models/resnet.py``. Keeping its
state-dict layout (``conv1.weight``, ``bn1.*``, ``layer1.0.conv2.weight``, ...) lets
:func:`networks.pretrained.load_pretrained` read an ImageNet file saved from torchvision.
The classification head (``fc``) is left out: the backbone returns one pooled feature vector
per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Bottleneck", "ResNeXt", "resnext50_32x4d"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3 x 3 convolution with padding 1 and no bias (followed by batch norm)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1 x 1 convolution without bias (followed by batch norm)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1 x 1 reduce, grouped 3 x 3 (carrying the stride), 1 x 1 expand.

    Args:
        inplanes: channels entering the block.
        planes: base channels of the block; it outputs ``planes * expansion`` channels.
        stride: stride of the grouped 3 x 3 convolution.
        downsample: projection of the identity path when shape or stride change.
        groups: cardinality (number of convolution groups).
        base_width: channels per group at ``planes == 64``.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNeXt(nn.Module):
    """ResNeXt feature extractor: stem, four residual stages, global average pooling.

    Args:
        layers: number of bottlenecks in each of the four stages.
        groups: cardinality of the grouped convolutions.
        width_per_group: channels per group in the first stage.
        in_channels: channels of the input image (1 for a CT slice).
        zero_init_residual: zero the last batch-norm weight of every block, so that each
            residual branch starts as the identity (stable training from scratch).

    Shape:
        ``(N, in_channels, H, W) -> (N, 2048)`` for the 50-layer configuration.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        groups: int = 32,
        width_per_group: int = 4,
        in_channels: int = 1,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of 4 stages, got {list(layers)}")
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = 512 * Bottleneck.expansion

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        block_list = [Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * Bottleneck.expansion
        block_list += [
            Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*block_list)

    def forward_stages(self, x: Tensor) -> Tensor:
        """Run the four residual stages and the pooling on stem output (after max-pooling).

        Args:
            x: stem features of shape ``(N, 64, H', W')``.

        Returns:
            Pooled features of shape ``(N, out_features)``.
        """
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.forward_stages(x)


def resnext50_32x4d(in_channels: int = 1, zero_init_residual: bool = True) -> ResNeXt:
    """ResNeXt-50 with 32 groups of width 4 (torchvision's ``resnext50_32x4d`` without ``fc``).

    Args:
        in_channels: channels of the input image.
        zero_init_residual: zero the last batch-norm weight of every block.
    """
    return ResNeXt(
        (3, 4, 6, 3),
        groups=32,
        width_per_group=4,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )
