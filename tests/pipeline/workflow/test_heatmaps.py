"""Heatmaps of a volume: positive slices only, scaled to [0, 1], mapped back onto the loaded image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from networks import ResNextPlus
from pipeline.workflow.heatmaps import to_input_grid, volume_heatmap
from pipeline.workflow.preprocessing import HU_WINDOW, evaluation_transforms


def oblique_flipped_copy(source: Path, target: Path) -> nib.Nifti1Image:
    """``source``'s voxels with an affine rotated in-plane, flipped in x and z, and shifted."""
    image = nib.load(source)
    angle = 0.3
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, 1.0, -1.0]) @ image.affine[:3, :3]
    affine[:3, 3] = [12.5, -20.0, 31.0]
    copy = nib.Nifti1Image(np.asarray(image.dataobj), affine)
    nib.save(copy, target)
    return copy


def positive_test_case(dataset: Path) -> Path:
    """The image file of the first positive volume of a demo dataset's test split."""
    items = json.loads((dataset / "datalist.json").read_text())["test"]
    return dataset / next(item["image"] for item in items if item["label"] == 1)


def test_preprocessed_ct_mapped_back_lies_on_the_loaded_image(
    tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    original = oblique_flipped_copy(positive_test_case(tiny_demo_dataset), tmp_path / "oblique.nii.gz")
    item = Compose(evaluation_transforms(resize_size=48, spatial_size=40))(
        {"image": tmp_path / "oblique.nii.gz"}
    )
    image = item["image"]
    assert image.shape[1:] == (40, 40, 8)

    values, affine = to_input_grid(image[0], image.meta)  # the windowed CT itself as the "heatmap"
    assert values.shape == original.shape and values.dtype == np.float32
    np.testing.assert_allclose(affine, original.affine, atol=1e-4)
    low, high = HU_WINDOW
    expected = np.clip((np.asarray(original.dataobj, dtype=float) - low) / (high - low), 0, 1)
    seen = values > 0  # the crop's border was never seen by the network
    assert 0.5 < seen.mean() < 0.9

    def error(mapped: np.ndarray, mask: np.ndarray) -> float:
        return float(np.abs(mapped[mask] - expected[mask]).mean())

    assert error(values, seen) < 0.05  # what remains is the resize there and back
    # a map put back the wrong way round along any axis lies off the image
    for axis in range(3):
        assert error(np.flip(values, axis), np.flip(seen, axis)) > 1.5 * error(values, seen)


def test_missing_meta_data_is_refused() -> None:
    with pytest.raises(KeyError, match="original_affine"):
        to_input_grid(torch.zeros(4, 4, 2), {"affine": np.eye(4), "spatial_shape": (4, 4, 2)})


def test_volume_heatmap_maps_positive_slices_only() -> None:
    torch.manual_seed(0)
    network = ResNextPlus(lstm_hidden=8, fc_hidden=8).eval()
    image = torch.rand(2, 64, 64, 4)
    image[1] = 1.0

    heatmap = volume_heatmap(network, image, [0, 1, 0, 1], slice_chunk=1)
    assert heatmap.shape == (64, 64, 4) and heatmap.dtype == torch.float32
    assert heatmap.min() >= 0 and heatmap.max() <= 1
    assert heatmap[..., [0, 2]].abs().max() == 0
    assert heatmap.max() in (0.0, 1.0)  # scaled by the volume's peak (all 0 if Grad-CAM vanishes)
    assert torch.equal(volume_heatmap(network, image, [0, 0, 0, 0]), torch.zeros(64, 64, 4))
