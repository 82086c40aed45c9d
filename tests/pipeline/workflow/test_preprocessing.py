"""Preprocessing chains: the shared deterministic part, slice order, caching, training randomness."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PersistentDataset, list_data_collate
from monai.transforms import CastToTyped, Compose, ScaleIntensityRanged

from networks import ResNextPlus
from pipeline.data.datalist import load_datalist
from pipeline.workflow.preprocessing import (
    cache_subdir,
    deterministic_transforms,
    evaluation_transforms,
    network_input_transforms,
    positive_augmentation,
    training_transforms,
)
from pipeline.workflow.preprocessing_transforms import (
    ApplyToClassd,
    CacheableMeta,
    CacheableMetad,
    OriginalSliceIndices,
    OriginalSliceIndicesd,
)
from transforms import InvalidVolumeError, StochasticEnhanced, ToneMapd

SIZES = {"resize_size": 36, "spatial_size": 32}


@pytest.fixture(scope="module")
def cases(tiny_demo_dataset: Path) -> dict[int, dict]:
    """One positive and one negative item of the tiny demo data (64 x 64 x 8, HU)."""
    items = load_datalist(tiny_demo_dataset / "datalist.json", "test")
    return {item["label"]: item for item in items}


@pytest.fixture(scope="module")
def preprocessed(cases: dict[int, dict]) -> dict[int, dict]:
    """The deterministic chain's output for each case."""
    chain = Compose(deterministic_transforms(**SIZES))
    return {label: chain(item) for label, item in cases.items()}


def test_evaluation_chain_makes_the_network_input(cases: dict[int, dict]) -> None:
    item = cases[1]

    data = Compose(evaluation_transforms(**SIZES))(item)

    image = data["image"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float16  # compact, as cached
    assert image.shape == (2, 32, 32, 8)
    assert float(image[0].min()) >= 0.0 and float(image[0].max()) <= 1.0
    assert set(torch.unique(image[1]).tolist()) == {0.0, 1.0}  # lung mask found and binary
    assert "mask" not in data
    assert image.meta["filename_or_obj"] == item["image"]
    assert data["slice_indices"].tolist() == list(range(8))
    assert data["slice_labels"].tolist() == item["slice_labels"]
    assert data["label"] == 1


def test_without_the_mask_the_input_has_one_channel(preprocessed: dict[int, dict]) -> None:
    data = Compose(network_input_transforms(use_mask=False))(dict(preprocessed[0]))

    assert data["image"].shape == (1, 32, 32, 8) and "mask" not in data


def _flipped_copy(item: dict, folder: Path) -> dict:
    """The same scan stored with its slices in reverse order (and slice labels to match)."""
    scan = nib.load(item["image"])
    depth = scan.shape[2]
    flip = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, depth - 1], [0, 0, 0, 1]], dtype=float)
    path = folder / "flipped.nii.gz"
    data = np.asarray(scan.dataobj)[:, :, ::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), scan.affine @ flip), str(path))
    return {**item, "image": str(path), "slice_labels": item["slice_labels"][::-1]}


def test_reoriented_slices_keep_their_original_indices_and_labels(
    cases: dict[int, dict], tmp_path: Path
) -> None:
    item = cases[1]
    flipped = _flipped_copy(item, tmp_path)
    chain = Compose(evaluation_transforms(**SIZES))

    original, reoriented = chain(item), chain(flipped)

    assert reoriented["slice_indices"].tolist() == list(range(7, -1, -1))  # file slice of each network slice
    assert torch.allclose(reoriented["image"], original["image"])  # same anatomy, same order
    assert torch.equal(reoriented["slice_labels"], original["slice_labels"])


@pytest.mark.parametrize("kind", [np.zeros, torch.zeros])
def test_original_slice_indices_without_meta_data(kind) -> None:
    assert OriginalSliceIndices()(kind((1, 4, 4, 5))).tolist() == [0, 1, 2, 3, 4]


def test_slice_label_count_must_match_the_slices() -> None:
    image = MetaTensor(torch.zeros(1, 4, 4, 5), meta={"filename_or_obj": "scan.nii.gz"})

    with pytest.raises(InvalidVolumeError, match=r"scan.nii.gz: 3 slice labels for 5 axial slices"):
        OriginalSliceIndicesd()({"image": image, "slice_labels": [0, 1, 0]})


def test_cacheable_meta_loads_as_weights_only(preprocessed: dict[int, dict]) -> None:
    data = {key: preprocessed[1][key] for key in ("image", "mask", "slice_indices", "slice_labels")}
    data["image"].meta["numpy_value"] = np.arange(3)  # numpy in meta data: refused by weights_only
    buffer = io.BytesIO()
    torch.save(CacheableMetad(keys=["image", "mask"])(data), buffer)
    buffer.seek(0)

    loaded = torch.load(buffer, weights_only=True)

    assert isinstance(loaded["image"], MetaTensor) and torch.equal(loaded["image"], data["image"])
    assert loaded["image"].meta["filename_or_obj"] == data["image"].meta["filename_or_obj"]
    assert torch.equal(loaded["image"].meta["numpy_value"], torch.arange(3))
    array = np.ones((1, 2, 2, 2))
    assert CacheableMeta()(array) is array


def test_persistent_cache_is_reused_and_keyed_by_settings(cases: dict[int, dict], tmp_path: Path) -> None:
    folder = cache_subdir(tmp_path, enhancement="none", **SIZES)
    dataset = PersistentDataset(
        [cases[0]], Compose(evaluation_transforms(**SIZES)), cache_dir=folder, track_meta=True
    )

    first, second = dataset[0], dataset[0]

    assert len(list(Path(folder).glob("*.pt"))) == 1
    assert torch.equal(first["image"], second["image"])
    assert second["image"].meta["filename_or_obj"] == cases[0]["image"]
    assert cache_subdir(tmp_path, enhancement="none", **SIZES) == folder
    assert cache_subdir(tmp_path, enhancement="tone", **SIZES) != folder
    assert cache_subdir(tmp_path, enhancement="none", resize_size=40, spatial_size=32) != folder
    assert cache_subdir(None, enhancement="none") is None
    assert cache_subdir(False, enhancement="none") is None
    assert cache_subdir("null", enhancement="none") is None


def _train_chain(seed: int, prob: float = 1.0) -> Compose:
    chain = Compose(training_transforms(num_slices=4, augment_prob=prob) + network_input_transforms())
    chain.set_random_state(seed)
    return chain


def test_training_samples_slices_and_augments_positives_only(preprocessed: dict[int, dict]) -> None:
    for label, data in preprocessed.items():
        out = _train_chain(seed=3)(dict(data))
        again = _train_chain(seed=3)(dict(data))

        indices = torch.as_tensor(out["slice_indices"])
        assert out["image"].shape == (2, 32, 32, 4)
        assert torch.equal(out["image"], again["image"])  # same seed, same draw
        assert indices.tolist() == sorted(indices.tolist())  # axial order kept
        assert torch.equal(torch.as_tensor(out["slice_labels"]), data["slice_labels"][indices])
        unaugmented = data["image"][..., indices]
        assert torch.equal(out["image"][0], unaugmented[0]) == (label == 0)


def test_augmented_positive_and_negative_volumes_stack_into_one_batch(preprocessed: dict[int, dict]) -> None:
    items = [_train_chain(seed=3)(dict(data)) for data in preprocessed.values()]
    assert all(item["image"].affine.shape == (4, 4) for item in items)  # the 3D affine is kept

    batch = list_data_collate(items)

    assert batch["image"].shape == (2, 2, 32, 32, 4)
    assert batch["label"].tolist() == list(preprocessed)


def test_augmentation_draws_once_for_all_slices() -> None:
    slice_ = torch.rand(1, 32, 32, 1)
    mask = (torch.rand(1, 32, 32, 1) > 0.5).to(torch.uint8)
    data = {"image": MetaTensor(slice_.repeat(1, 1, 1, 6)), "mask": mask.repeat(1, 1, 1, 6)}
    chain = Compose(positive_augmentation(prob=1.0))
    chain.set_random_state(0)

    out = chain(data)

    assert out["image"].shape == (1, 32, 32, 6) and out["mask"].shape == (1, 32, 32, 6)
    assert not torch.allclose(out["image"][..., 0], slice_[..., 0])  # changed...
    for k in range(1, 6):  # ...identically in every slice
        assert torch.allclose(out["image"][..., k], out["image"][..., 0], atol=0.1)
        assert torch.equal(out["mask"][..., k], out["mask"][..., 0])
    assert set(torch.unique(out["mask"]).tolist()) <= {0, 1}


@pytest.mark.parametrize("label", [1, torch.tensor(1), np.array([1]), 0, None])
def test_apply_to_class_applies_only_to_chosen_classes(label) -> None:
    wrapper = ApplyToClassd([lambda d: {**d, "touched": True}], classes=(1,))
    data = {"image": torch.zeros(1)} if label is None else {"image": torch.zeros(1), "label": label}

    out = wrapper(data)

    assert out.get("touched", False) == (label is not None and int(np.asarray(label).reshape(-1)[0]) == 1)


def test_apply_to_class_passes_random_states_on() -> None:
    def chain(seed: int) -> ApplyToClassd:
        wrapper = ApplyToClassd(positive_augmentation(prob=1.0))
        return wrapper.set_random_state(seed)

    data = {"image": MetaTensor(torch.rand(1, 16, 16, 3)), "mask": torch.ones(1, 16, 16, 3), "label": 1}

    assert torch.equal(chain(5)(dict(data))["image"], chain(5)(dict(data))["image"])
    assert not torch.equal(chain(5)(dict(data))["image"], chain(6)(dict(data))["image"])


def test_tone_mapping_replaces_the_plain_window(
    cases: dict[int, dict], preprocessed: dict[int, dict]
) -> None:
    toned = Compose(deterministic_transforms(enhancement="tone", **SIZES))(cases[1])

    assert any(isinstance(t, ToneMapd) for t in deterministic_transforms(enhancement="tone"))
    assert toned["image"].shape == preprocessed[1]["image"].shape
    assert float(toned["image"].min()) >= 0.0 and float(toned["image"].max()) <= 1.0
    assert not torch.allclose(toned["image"], preprocessed[1]["image"])


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="enhancement must be one of"):
        deterministic_transforms(enhancement="sharpen")
    with pytest.raises(ValueError, match="spatial_size <= resize_size"):
        deterministic_transforms(resize_size=200, spatial_size=224)


def test_stochastic_enhancement_is_cacheable(cases: dict[int, dict], preprocessed: dict[int, dict]) -> None:
    chain = Compose(deterministic_transforms(enhancement="stochastic", seed=7, **SIZES))
    kinds = [type(t) for t in chain.transforms]

    first, second = chain(cases[1]), chain(cases[1])

    assert kinds.index(StochasticEnhanced) == kinds.index(ScaleIntensityRanged) + 1  # on the [0, 1] window
    assert torch.equal(first["image"], second["image"])  # same seed, same result: safe to cache
    assert first["image"].shape == preprocessed[1]["image"].shape
    assert float(first["image"].min()) >= 0.0 and float(first["image"].max()) <= 1.0
    assert not torch.allclose(first["image"], preprocessed[1]["image"])


def test_cached_volumes_are_stored_compactly_within_float16_rounding(cases: dict[int, dict]) -> None:
    chain = deterministic_transforms(**SIZES)
    assert isinstance(chain[-1], CastToTyped)  # the compact storage is the chain's last step
    float32_reference = Compose(chain[:-1])(dict(cases[1]))

    compact = Compose(chain)(dict(cases[1]))
    network_input = Compose(evaluation_transforms(**SIZES))(dict(cases[1]))

    assert compact["image"].dtype == torch.float16 and compact["mask"].dtype == torch.uint8
    assert isinstance(compact["image"], MetaTensor) and compact["image"].meta["filename_or_obj"]
    reference = float32_reference["image"].float()
    assert float((compact["image"].float() - reference).abs().max()) <= 2**-12  # float16 in [0, 1]
    assert torch.equal(compact["mask"].float(), float32_reference["mask"].float())
    assert network_input["image"].dtype == torch.float16
    assert torch.equal(network_input["image"][0].float(), compact["image"][0].float())

    torch.manual_seed(0)
    network = ResNextPlus(lstm_hidden=8, fc_hidden=8).eval()
    full_input = torch.cat([reference, float32_reference["mask"].float()])[None]
    with torch.no_grad():
        expected = network(full_input).softmax(1)
        actual = network(network_input["image"].as_tensor()[None]).softmax(1)
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=0)


def test_training_expands_the_sampled_slices_to_float32(preprocessed: dict[int, dict]) -> None:
    item = {**preprocessed[1], "label": 1}
    chain = Compose(training_transforms(num_slices=4, augment_prob=1.0) + network_input_transforms())
    chain.set_random_state(seed=0)

    data = chain(item)

    assert data["image"].dtype == torch.float32 and data["image"].shape == (2, 32, 32, 4)


def test_lesion_mask_comes_onto_the_network_grid_with_the_image(
    cases: dict[int, dict], tmp_path: Path
) -> None:
    item = cases[1]
    lesion = np.asarray(nib.load(item["lesion"]).dataobj) > 0
    chain = Compose(evaluation_transforms(lesion_key="lesion", **SIZES))

    data = chain(item)
    flipped = _flipped_copy(item, tmp_path)
    flipped_lesion = tmp_path / "flipped_lesion.nii.gz"
    scan = nib.load(item["lesion"])
    flip = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, scan.shape[2] - 1], [0, 0, 0, 1]], dtype=float)
    nib.save(
        nib.Nifti1Image(np.asarray(scan.dataobj)[:, :, ::-1].copy(), scan.affine @ flip), str(flipped_lesion)
    )
    reoriented = chain({**flipped, "lesion": str(flipped_lesion)})

    mask = data["lesion"]
    assert mask.shape == (1, 32, 32, 8) and mask.dtype == torch.uint8
    assert set(torch.unique(mask).tolist()) <= {0, 1} and mask.sum() > 0
    # the slices that hold lesion voxels are those of the slice labels, in the network's order
    assert mask[0].any(dim=0).any(dim=0).int().tolist() == [
        int(any(lesion[..., k].ravel())) for k in range(8)
    ]
    assert torch.equal(reoriented["lesion"], mask)  # follows the reorientation of its image
    assert "lesion" not in Compose(evaluation_transforms(lesion_key="lesion", **SIZES))(dict(cases[0]))


def test_lesion_mask_off_its_image_grid_is_refused(cases: dict[int, dict], tmp_path: Path) -> None:
    item = cases[1]
    scan = nib.load(item["lesion"])
    cropped = tmp_path / "cropped_lesion.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[:-4].copy(), scan.affine), str(cropped))
    chain = Compose(evaluation_transforms(lesion_key="lesion", **SIZES))

    with pytest.raises(RuntimeError) as raised:  # Compose wraps the transform's error
        chain({**item, "lesion": str(cropped)})
    message = str(raised.value.__cause__)
    assert "cropped_lesion.nii.gz: the lesion mask is not on the grid of its image" in message
    assert "(60, 64, 8) against (64, 64, 8)" in message


def test_training_drops_the_lesion_mask(preprocessed: dict[int, dict]) -> None:
    item = {**preprocessed[1], "lesion": "lesions/positive_000.nii.gz"}
    data = Compose(training_transforms(num_slices=4, augment=False))(item)
    assert "lesion" not in data
