"""slice_grad_cam: equal to MONAI's GradCAM, chunked or not, and hottest inside a lesion it learned."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM, GradCAMpp
from torch import nn
from torch.nn import functional as F

from networks import ResNextPlus
from networks.grad_cam import CAM_METHODS, attention_and_pooled_grad_cam, class_activation_map, slice_grad_cam
from tests.networks.test_resnext_plus import build, volumes

SIZE, SLICES, RADIUS = 32, 4, 4


def _per_slice_upsampler(spatial_size):
    # MONAI's default upsampler interpolates over all of (H, W, S); the CNN's maps are per slice
    size = tuple(spatial_size[:2])
    return lambda maps: F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("chunk", [None, 3])
def test_equals_monai_grad_cam_on_the_whole_volume(chunk: int | None) -> None:
    model = build(seed=1, lstm_hidden=16, fc_hidden=16).eval()
    x = volumes(1, 4, size=64)
    reference = GradCAM(
        nn_module=model,
        target_layers="encoder.backbone.layer4",
        upsampler=_per_slice_upsampler,
        postprocessing=lambda maps: maps,
    )(x, class_idx=1)[:, 0]  # (S, H, W): the CNN's batch is the volume's slices

    maps = slice_grad_cam(model, x, [0, 1, 2, 3], chunk=chunk)
    assert maps.shape == (4, 64, 64)
    assert reference.abs().max() > 0
    torch.testing.assert_close(maps, reference.detach(), rtol=1e-4, atol=1e-9)
    subset = slice_grad_cam(model, x, [3, 1], chunk=chunk)
    torch.testing.assert_close(subset, maps[[3, 1]], rtol=1e-4, atol=1e-9)
    assert not model.training


def test_grad_cam_plus_plus_equals_monai_up_to_its_positive_factor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, 3, padding=1),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(6, 8, 3, padding=1, stride=2),
            act2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, 2),
        )
    ).eval()
    x = torch.rand(3, 1, 16, 16)
    reference = GradCAMpp(nn_module=model, target_layers="act2", postprocessing=lambda maps: maps)
    captured = []
    handle = model.act2.register_forward_hook(lambda _m, _i, output: captured.append(output))
    logits = model(x)
    handle.remove()
    (grads,) = torch.autograd.grad(logits[:, 1].sum(), captured[0])
    ours = class_activation_map(captured[0].detach(), grads, "gradcampp")
    assert ours.abs().max() > 0
    for item in range(3):  # MONAI broadcasts exp(score) correctly for one item at a time
        expected = reference.compute_map(x[item : item + 1], class_idx=1, layer_idx=-1)[0, 0]
        # MONAI scales the map by exp(score), a positive number
        torch.testing.assert_close(ours[item] / ours[item].max(), expected / expected.max())


def test_layer_cam_weights_each_cell_by_its_own_positive_gradient() -> None:
    activations = torch.tensor([[[[1.0, 2.0]], [[3.0, 1.0]]]])  # (1, 2 channels, 1, 2)
    grads = torch.tensor([[[[1.0, -1.0]], [[0.5, 2.0]]]])
    expected = torch.tensor([[[1.0 * 1 + 3.0 * 0.5, 0.0 + 1.0 * 2.0]]])
    torch.testing.assert_close(class_activation_map(activations, grads, "layercam"), expected)
    # Grad-CAM weights each channel by its mean gradient: 0 and 1.25
    torch.testing.assert_close(
        class_activation_map(activations, grads, "gradcam"), torch.tensor([[[3.75, 1.25]]])
    )
    with pytest.raises(ValueError, match="method"):
        class_activation_map(activations, grads, "cam")


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_from_the_inference_pass_equals_the_recomputed_maps(method: str) -> None:
    model = build(seed=3, lstm_hidden=16, fc_hidden=16).eval()
    x = volumes(1, 3, size=64)
    _, _, cams = attention_and_pooled_grad_cam(model, x, method=method)
    upsampled = F.interpolate(cams[0][:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    recomputed = slice_grad_cam(model, x, range(3), method=method, chunk=2)
    assert recomputed.abs().max() > 0
    torch.testing.assert_close(upsampled, recomputed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", [None, 3])
def test_pooled_layer_maps_from_the_inference_pass_equal_the_recomputed_ones(chunk: int | None) -> None:
    model = build(seed=2, lstm_hidden=16, fc_hidden=16, slice_chunk=chunk).eval()
    x = volumes(2, 5, size=64)

    logits, attention, cams = attention_and_pooled_grad_cam(model, x)

    assert cams.shape == (2, 5, 2, 2) and cams.dtype == torch.float32 and (cams >= 0).all()
    expected_logits, expected_attention = model.forward_with_attention(x)
    torch.testing.assert_close(logits, expected_logits.detach())
    torch.testing.assert_close(attention, expected_attention.detach())
    for index in range(2):
        recomputed = slice_grad_cam(model, x[index : index + 1], range(5))
        upsampled = F.interpolate(cams[index][:, None], size=(64, 64), mode="bilinear", align_corners=False)[
            :, 0
        ]
        assert recomputed.abs().max() > 0
        torch.testing.assert_close(upsampled, recomputed, rtol=1e-4, atol=1e-7)


def test_no_slices_and_bad_input() -> None:
    model = build(lstm_hidden=8, fc_hidden=8)
    assert slice_grad_cam(model, volumes(1, 2, size=32), []).shape == (0, 32, 32)
    with pytest.raises(ValueError, match="one volume"):
        slice_grad_cam(model, volumes(2, 2, size=32), [0])
    with pytest.raises(ValueError, match="chunk"):
        slice_grad_cam(model, volumes(1, 2, size=32), [0], chunk=0)


def _lesion_volume(rng: np.random.Generator, positive: bool) -> tuple[torch.Tensor, np.ndarray, int]:
    """``(2, H, W, S)`` CT in [0, 1] with lung mask, its lesion mask on the lesion slice, that slice."""
    ct = rng.uniform(0.1, 0.4, size=(SIZE, SIZE, SLICES))
    lesion = np.zeros((SIZE, SIZE), dtype=bool)
    index = int(rng.integers(SLICES))
    if positive:
        # away from the centre, so that a flipped map would point elsewhere
        angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(8, 11)
        cx, cy = SIZE / 2 + distance * math.cos(angle), SIZE / 2 + distance * math.sin(angle)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        lesion = (xx - cx) ** 2 + (yy - cy) ** 2 <= RADIUS**2
        ct[..., index][lesion] = 0.9
    volume = np.stack([ct, np.ones_like(ct)]).astype(np.float32)
    return torch.from_numpy(volume), lesion, index


def _local_evidence_model() -> ResNextPlus:
    """ResNext+'s slice head over a fixed one-layer CNN whose evidence is local by construction.

    Channel 0 of the CNN responds to voxels brighter than the background only; channels 1-7
    are random filters responding everywhere (distractors). The head learns which matter.
    """
    torch.manual_seed(0)
    model = ResNextPlus(lstm_hidden=8, fc_hidden=16)
    stem = nn.Conv2d(2, 8, 3, padding=1)
    with torch.no_grad():
        stem.weight[0] = 0.0
        stem.weight[0, 0, 1, 1] = 1.0
        stem.bias[0] = -0.6
    model.encoder = nn.Sequential(
        OrderedDict(stem=stem, stem_act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten())
    )
    model.encoder.requires_grad_(False)
    model.lstm = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
    return model


def _train_head(model: ResNextPlus, rng: np.random.Generator, steps: int = 80) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        labels = [bool(v) for v in rng.integers(0, 2, size=8)]
        batch = torch.stack([_lesion_volume(rng, positive)[0] for positive in labels])
        with torch.no_grad():
            features = model.encoder(batch.permute(0, 4, 1, 2, 3).reshape(-1, 2, SIZE, SIZE))
        logits, _ = model.classify_slice_features(features.reshape(len(labels), SLICES, -1))
        loss = F.cross_entropy(logits, torch.tensor(labels, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_hottest_point_of_a_positive_lies_in_its_lesion() -> None:
    model = _local_evidence_model()
    _train_head(model, np.random.default_rng(0))
    model.eval()

    rng = np.random.default_rng(1)
    hits, flipped_hits, chance, trials = 0, 0, 0.0, 12
    for _ in range(trials):
        volume, lesion, index = _lesion_volume(rng, positive=True)
        with torch.no_grad():
            assert torch.softmax(model(volume[None]), 1)[0, 1] > 0.5  # the head learned the task
        # frozen CNN weights: the maps still come (the input carries the gradient)
        cam = slice_grad_cam(model, volume[None], [index], target_layer="encoder.stem_act")[0].numpy()
        hottest = np.unravel_index(np.argmax(cam), cam.shape)
        hits += bool(lesion[hottest])
        flipped_hits += bool(lesion[tuple(SIZE - 1 - v for v in hottest)])
        chance += lesion.mean() / trials
    assert chance < 0.06
    assert hits >= 0.75 * trials  # chance would give about 1 in 16
    assert flipped_hits <= 1  # a spatially flipped map would miss
