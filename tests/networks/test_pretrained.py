"""The backbone's state-dict layout is torchvision's resnext50_32x4d, and load_pretrained reads it."""

from __future__ import annotations

import logging

import pytest
import torch

from networks import ResNextPlus, load_pretrained, resnext50_32x4d

# Written from torchvision's definition (models/resnet.py: Bottleneck with width =
# planes * base_width / 64 * groups, stride on the 3 x 3 conv, downsample = conv1x1 + BN on
# the first block of each stage), independently of networks.resnext.
STAGES = {"layer1": (3, 64), "layer2": (4, 128), "layer3": (6, 256), "layer4": (3, 512)}
GROUPS, WIDTH_PER_GROUP, EXPANSION = 32, 4, 4

# A few tensors as torchvision's resnext50_32x4d().state_dict() lists them.
KNOWN_SHAPES = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "layer1.0.conv1.weight": (128, 64, 1, 1),
    "layer1.0.conv2.weight": (128, 4, 3, 3),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer3.5.bn2.running_var": (512,),
    "layer4.0.conv2.weight": (1024, 32, 3, 3),
    "layer4.2.conv3.weight": (2048, 1024, 1, 1),
    "layer4.2.bn3.num_batches_tracked": (),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}


def _batch_norm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")
    }
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def torchvision_resnext50_32x4d_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict key of torchvision's resnext50_32x4d with its shape, fc included."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **_batch_norm("bn1", 64)}
    inplanes = 64
    for stage, (blocks, planes) in STAGES.items():
        width = planes * WIDTH_PER_GROUP // 64 * GROUPS
        out = planes * EXPANSION
        for index in range(blocks):
            block = f"{stage}.{index}"
            shapes[f"{block}.conv1.weight"] = (width, inplanes, 1, 1)
            shapes.update(_batch_norm(f"{block}.bn1", width))
            shapes[f"{block}.conv2.weight"] = (width, width // GROUPS, 3, 3)
            shapes.update(_batch_norm(f"{block}.bn2", width))
            shapes[f"{block}.conv3.weight"] = (out, width, 1, 1)
            shapes.update(_batch_norm(f"{block}.bn3", out))
            if index == 0:
                shapes[f"{block}.downsample.0.weight"] = (out, inplanes, 1, 1)
                shapes.update(_batch_norm(f"{block}.downsample.1", out))
            inplanes = out
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's names and shapes and random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnext50_32x4d_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("weights") / "resnext50_32x4d.pth"
    state = torchvision_state_dict()
    torch.save(state, path)
    return path, state


def test_expected_layout_matches_known_torchvision_tensors():
    shapes = torchvision_resnext50_32x4d_shapes()
    for key, shape in KNOWN_SHAPES.items():
        assert shapes[key] == shape, key
    # 1 stem conv + 1 BN (5 tensors) + 16 blocks x (3 convs + 3 BNs) + 4 downsamples x (conv + BN) + fc (2)
    assert len(shapes) == 6 + 16 * 18 + 4 * 6 + 2 == 320


def test_backbone_state_dict_has_torchvision_names_and_shapes():
    backbone = resnext50_32x4d(in_channels=3)
    actual = {key: tuple(value.shape) for key, value in backbone.state_dict().items()}
    expected = {k: v for k, v in torchvision_resnext50_32x4d_shapes().items() if not k.startswith("fc.")}
    assert len(actual) == 318
    assert actual == expected


def test_load_pretrained_loads_every_backbone_tensor(weights_file):
    path, state = weights_file
    backbone = resnext50_32x4d(in_channels=1)
    result = load_pretrained(backbone, path)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    loaded = backbone.state_dict()
    assert len(loaded) == 318
    for key, value in loaded.items():
        expected = state[key].sum(dim=1, keepdim=True) if key == "conv1.weight" else state[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)


def test_load_pretrained_keeps_rgb_stem_for_three_channels(weights_file):
    path, state = weights_file
    backbone = resnext50_32x4d(in_channels=3)
    load_pretrained(backbone, path)
    torch.testing.assert_close(backbone.conv1.weight, state["conv1.weight"], rtol=0, atol=0)


def test_resnextplus_pretrained_loads_backbone_and_freezes_bn_stats(weights_file):
    path, state = weights_file
    model = ResNextPlus(pretrained=path)
    backbone = model.encoder.backbone
    torch.testing.assert_close(
        backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        backbone.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True), rtol=0, atol=0
    )
    assert model.freeze_bn_stats
    assert not ResNextPlus(pretrained=path, freeze_bn_stats=False).freeze_bn_stats


def test_load_pretrained_reports_missing_and_unexpected_keys(tmp_path, caplog):
    state = torchvision_state_dict()
    del state["layer3.1.conv2.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    backbone = resnext50_32x4d()
    before = backbone.layer3[1].conv2.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="networks.pretrained"):
        result = load_pretrained(backbone, path)
    assert result.missing_keys == ["layer3.1.conv2.weight"]
    assert result.unexpected_keys == ["extra.weight"]
    assert "layer3.1.conv2.weight" in caplog.text and "extra.weight" in caplog.text
    torch.testing.assert_close(backbone.layer3[1].conv2.weight, before, rtol=0, atol=0)


def test_load_pretrained_rejects_wrong_shape_naming_key_and_shapes(tmp_path):
    state = torchvision_state_dict()
    state["layer2.0.downsample.0.weight"] = torch.zeros(512, 128, 1, 1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"layer2\.0\.downsample\.0\.weight: file \[512, 128, 1, 1\] "
        r"vs backbone \[512, 256, 1, 1\]",
    ):
        load_pretrained(resnext50_32x4d(), path)


def test_load_pretrained_missing_file_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_pretrained(resnext50_32x4d(), tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError):
        ResNextPlus(pretrained=tmp_path / "absent.pth")


def test_load_pretrained_rejects_non_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"list.pth: holds no ResNeXt weights; it holds a list of 1 items"):
        load_pretrained(resnext50_32x4d(), path)


def test_load_pretrained_needs_a_backbone(tmp_path):
    with pytest.raises(TypeError, match="no ResNeXt backbone"):
        load_pretrained(torch.nn.Linear(2, 2), tmp_path / "any.pth")


def test_resnextplus_takes_every_backbone_tensor_and_seeds_the_mask_stem_from_the_ct_stem(weights_file):
    path, state = weights_file
    model = ResNextPlus(pretrained=path)
    backbone = model.encoder.backbone.state_dict()
    grey_stem = state["conv1.weight"].sum(dim=1, keepdim=True)
    assert len(backbone) == 318
    for key, value in backbone.items():
        torch.testing.assert_close(
            value, grey_stem if key == "conv1.weight" else state[key], rtol=0, atol=0, msg=key
        )
    torch.testing.assert_close(model.encoder.mask_conv.weight, grey_stem, rtol=0, atol=0)
    # a copy, not a shared tensor: the two stems train apart
    assert model.encoder.mask_conv.weight.data_ptr() != model.encoder.backbone.conv1.weight.data_ptr()


def test_resnextplus_from_scratch_keeps_a_random_mask_stem():
    model = ResNextPlus()
    assert not torch.equal(model.encoder.mask_conv.weight, model.encoder.backbone.conv1.weight)
