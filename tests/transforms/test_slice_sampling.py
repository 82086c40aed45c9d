"""RandSliceSample / RandSliceSampled: the same random axial slices of every key, in order, reproducibly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from transforms import (
    InvalidVolumeError,
    RandSliceSample,
    RandSliceSampleD,
    RandSliceSampled,
    RandSliceSampleDict,
)

DEPTH = 40


def numbered_slices(depth: int = DEPTH, kind: str = "numpy", offset: float = 0.0):
    """A ``(1, 4, 3, depth)`` volume whose slice ``k`` holds the value ``k + offset``."""
    volume = np.broadcast_to(np.arange(depth, dtype=np.float32) + offset, (1, 4, 3, depth)).copy()
    if kind == "torch":
        return torch.from_numpy(volume)
    if kind == "metatensor":
        affine = torch.diag(torch.tensor([0.8, 0.8, 5.0, 1.0], dtype=torch.float64))
        return MetaTensor(torch.from_numpy(volume), affine=affine, meta={"filename_or_obj": "ct.nii.gz"})
    return volume


def slice_values(img) -> np.ndarray:
    return np.asarray(img)[0, 0, 0].astype(int)


@pytest.mark.parametrize("kind", ["numpy", "torch", "metatensor"])
def test_same_sorted_slices_for_every_key_and_labels(kind):
    labels = np.arange(DEPTH) % 2
    data = {
        "image": numbered_slices(kind=kind),
        "mask": numbered_slices(kind=kind, offset=1000.0),
        "slice_labels": labels,
    }
    out = RandSliceSampled(num_slices=10).set_random_state(seed=3)(data)
    indices = out["slice_indices"]
    assert indices.dtype == np.int64 and indices.shape == (10,)
    assert np.all(np.diff(indices) > 0) and indices.min() >= 0 and indices.max() < DEPTH
    assert type(out["image"]) is type(data["image"]) and tuple(out["image"].shape) == (1, 4, 3, 10)
    np.testing.assert_array_equal(slice_values(out["image"]), indices)
    np.testing.assert_array_equal(slice_values(out["mask"]), indices + 1000)
    np.testing.assert_array_equal(out["slice_labels"], labels[indices])
    assert tuple(data["image"].shape) == (1, 4, 3, DEPTH)  # the input is left alone
    if kind == "metatensor":
        torch.testing.assert_close(out["image"].affine, data["image"].affine)
        assert out["image"].meta["filename_or_obj"] == "ct.nii.gz"


@pytest.mark.parametrize(
    "labels",
    [list(range(DEPTH)), np.arange(DEPTH), torch.arange(DEPTH), np.eye(DEPTH)],
    ids=["list", "numpy", "tensor", "per-slice-vectors"],
)
def test_slice_label_types(labels):
    out = RandSliceSampled(keys="image", num_slices=5).set_random_state(0)(
        {"image": numbered_slices(), "slice_labels": labels}
    )
    subset = out["slice_labels"]
    assert isinstance(subset, torch.Tensor if isinstance(labels, torch.Tensor) else np.ndarray)
    expected = np.asarray(labels)[out["slice_indices"]]
    np.testing.assert_array_equal(np.asarray(subset), expected)


def test_short_volume_passes_through():
    data = {"image": numbered_slices(depth=8), "slice_labels": [0, 1, 1, 0, 0, 0, 1, 0]}
    out = RandSliceSampled(keys="image", num_slices=50)(data)
    assert out["image"] is data["image"]
    np.testing.assert_array_equal(out["slice_indices"], np.arange(8))
    np.testing.assert_array_equal(out["slice_labels"], data["slice_labels"])


def test_seeds_reproduce():
    def draw(seed):
        return RandSliceSampled(keys="image", num_slices=10).set_random_state(seed)(
            {"image": numbered_slices()}
        )["slice_indices"]

    np.testing.assert_array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))
    pipeline = Compose([RandSliceSampled(keys="image", num_slices=10)])
    first = [
        pipeline.set_random_state(seed=5)({"image": numbered_slices()})["slice_indices"] for _ in range(2)
    ]
    np.testing.assert_array_equal(*first)
    successive = [pipeline({"image": numbered_slices()})["slice_indices"] for _ in range(2)]
    assert not np.array_equal(*successive)  # fresh draws per call


def test_every_slice_is_drawn_uniformly():
    sampler = RandSliceSampled(keys="image", num_slices=10).set_random_state(1)
    counts = np.zeros(DEPTH)
    for _ in range(400):
        counts[sampler({"image": numbered_slices()})["slice_indices"]] += 1
    assert counts.min() > 0
    np.testing.assert_allclose(counts / 400, 10 / DEPTH, atol=0.1)


def test_array_transform_reuses_its_draw():
    sampler = RandSliceSample(num_slices=6).set_random_state(2)
    image = sampler(numbered_slices(kind="torch"))
    mask = sampler(numbered_slices(kind="torch", offset=1000.0), randomize=False)
    np.testing.assert_array_equal(slice_values(image), sampler.indices)
    np.testing.assert_array_equal(slice_values(mask), sampler.indices + 1000)
    with pytest.raises(RuntimeError, match="randomize"):
        RandSliceSample(num_slices=6)(numbered_slices(), randomize=False)


def test_missing_keys_and_custom_key_names():
    data = {"image": numbered_slices(), "labels": np.arange(DEPTH)}
    out = RandSliceSampleD(
        keys=("image", "mask"),
        num_slices=4,
        slice_labels_key="labels",
        slice_indices_key="chosen",
        allow_missing_keys=True,
    )(data)
    np.testing.assert_array_equal(out["labels"], out["chosen"])
    assert "mask" not in out and "slice_indices" not in out
    with pytest.raises(KeyError):
        RandSliceSampleDict(keys=("image", "mask"))(data)
    assert RandSliceSampled(keys="mask", allow_missing_keys=True)(data) == data


def test_mismatched_inputs_are_refused():
    image = MetaTensor(torch.from_numpy(numbered_slices()), meta={"filename_or_obj": "ct.nii.gz"})
    with pytest.raises(InvalidVolumeError, match=r"ct\.nii\.gz: .*different numbers of axial slices"):
        RandSliceSampled(num_slices=4)({"image": image, "mask": numbered_slices(depth=DEPTH - 1)})
    with pytest.raises(InvalidVolumeError, match=r"ct\.nii\.gz: \(39,\) slice labels for a volume of 40"):
        RandSliceSampled(keys="image", num_slices=4)({"image": image, "slice_labels": np.zeros(DEPTH - 1)})
    with pytest.raises(ValueError, match="num_slices"):
        RandSliceSampled(num_slices=0)


def test_batches_collate():
    sampler = RandSliceSampled(keys="image", num_slices=6).set_random_state(0)
    samples = [
        sampler({"image": numbered_slices(kind="metatensor"), "slice_labels": np.arange(DEPTH)})
        for _ in range(3)
    ]
    batch = list_data_collate(samples)
    assert batch["image"].shape == (3, 1, 4, 3, 6)
    assert batch["slice_indices"].shape == (3, 6)
    torch.testing.assert_close(batch["slice_labels"], batch["slice_indices"])


def test_compose_on_nifti(tmp_path):
    volume = numbered_slices()[0]
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 5.0, 1.0])), path)
    pipeline = Compose(
        [
            LoadImaged(keys="image", reader="ITKReader", image_only=True),
            EnsureChannelFirstd(keys="image"),
            RandSliceSampled(keys="image", num_slices=8),
        ]
    ).set_random_state(seed=11)
    out = pipeline({"image": str(path), "slice_labels": list(range(DEPTH))})
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (1, 4, 3, 8)
    assert out["image"].meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(slice_values(out["image"]), out["slice_indices"])
    np.testing.assert_array_equal(out["slice_labels"], out["slice_indices"])


@pytest.mark.slow
def test_compose_on_real_series(real_ct_dir):
    load = Compose(
        [LoadImaged(keys="image", reader="ITKReader", image_only=True), EnsureChannelFirstd(keys="image")]
    )
    loaded = load({"image": str(real_ct_dir)})
    out = RandSliceSampled(keys="image", num_slices=16).set_random_state(seed=0)(loaded)
    assert out["image"].shape == (1, 512, 512, 16)
    torch.testing.assert_close(out["image"], loaded["image"][..., torch.as_tensor(out["slice_indices"])])
    torch.testing.assert_close(out["image"].affine, loaded["image"].affine)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stays_on_gpu():
    data = {"image": numbered_slices(kind="metatensor").cuda(), "slice_labels": torch.arange(DEPTH).cuda()}
    out = RandSliceSampled(keys="image", num_slices=5).set_random_state(0)(data)
    assert out["image"].device == data["image"].device and out["slice_labels"].device == data["image"].device
    np.testing.assert_array_equal(slice_values(out["image"].cpu()), out["slice_indices"])
