"""ResNeXt-50 32x4d backbone: output, grouped bottlenecks, residual zero-initialisation."""

from __future__ import annotations

import pytest
import torch

from networks import Bottleneck, ResNeXt, resnext50_32x4d


@pytest.fixture(scope="module")
def backbone() -> ResNeXt:
    torch.manual_seed(0)
    return resnext50_32x4d(in_channels=1).eval()


@pytest.mark.parametrize("size", [32, 64, 75])
def test_one_pooled_2048_vector_per_image(backbone, size):
    with torch.no_grad():
        out = backbone(torch.rand(3, 1, size, size))
    assert out.shape == (3, 2048)
    assert backbone.out_features == 2048
    assert torch.isfinite(out).all()


def test_images_are_processed_independently_in_eval(backbone):
    images = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        together = backbone(images)
        alone = backbone(images[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-4, atol=1e-5)


def test_bottlenecks_are_grouped_32x4d(backbone):
    blocks = [m for m in backbone.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    assert all(block.conv2.groups == 32 for block in blocks)
    assert backbone.layer1[0].conv2.weight.shape == (128, 4, 3, 3)
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].conv1.stride == (1, 1)


def test_zero_init_residual_makes_each_block_start_as_identity_branch():
    torch.manual_seed(0)
    zeroed = resnext50_32x4d(zero_init_residual=True)
    plain = resnext50_32x4d(zero_init_residual=False)
    assert all(torch.all(m.bn3.weight == 0) for m in zeroed.modules() if isinstance(m, Bottleneck))
    assert all(torch.all(m.bn3.weight == 1) for m in plain.modules() if isinstance(m, Bottleneck))
    block = zeroed.layer1[1].eval()
    x = torch.rand(2, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))


def test_rejects_wrong_number_of_stages():
    with pytest.raises(ValueError, match="4 stages"):
        ResNeXt(layers=(3, 4, 6))
