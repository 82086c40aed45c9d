"""Bad and unusual input volumes through the transforms, the preprocessing chain and the data list check.

Each bad input is refused with an error that names its file and its problem (never scored as
garbage); each unusual but valid one (1 slice, non-square slices, anisotropic voxels, 2,000
slices of 0.15 mm) comes out as a network input; batch inference scores it
(``test_batch_inference.py``, which also runs the 2,000 slices through the network in chunks).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import Compose

from pipeline.data.cases import dicom_series
from pipeline.data.datalist import DatalistError, check_datalist
from pipeline.workflow.preprocessing import evaluation_transforms
from tests.conftest import BUNDLE_DIR, with_absolute_paths
from tests.pipeline.data.test_cases import write_dicom_series
from tests.reliability.conftest import BAD_INPUTS, HANDLED_INPUTS, demo_volume
from transforms import LungMask, NoLungFoundError, ToneMap
from transforms.validation import InvalidVolumeError

SIZES = {"resize_size": 16, "spatial_size": 16}
KINDS = ("numpy", "torch", "metatensor")
TRAIN = BUNDLE_DIR / "configs" / "train.json"


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _preprocess(path: Path) -> dict:
    return Compose(evaluation_transforms(**SIZES))({"image": str(path)})


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.name)
def test_preprocessing_refuses_bad_input_naming_file_and_problem(battery: Path, bad) -> None:
    with pytest.raises(Exception) as caught:
        _preprocess(battery / bad.name)

    message = str(_innermost(caught.value))
    assert bad.name in message
    expected = "suitable reader" if bad.problem == "unreadable" else re.escape(bad.problem)
    assert re.search(expected, message), message


@pytest.mark.parametrize("handled", HANDLED_INPUTS, ids=lambda handled: handled.name)
def test_preprocessing_handles_unusual_but_valid_volumes(battery: Path, handled) -> None:
    item = _preprocess(battery / handled.name)

    image = item["image"]
    assert tuple(image.shape) == (2, 16, 16, handled.slices)  # CT and lung mask, every slice
    assert torch.isfinite(image).all() and 0.0 <= float(image[0].min()) <= float(image[0].max()) <= 1.0
    assert float(image[1].sum()) > 0  # the lungs were found
    assert item["slice_indices"].tolist() == list(range(handled.slices))


def _as(kind: str, array: np.ndarray, name: str = "scan.nii.gz"):
    if kind == "numpy":
        return array
    if kind == "torch":
        return torch.as_tensor(array)
    return MetaTensor(torch.as_tensor(array), meta={"filename_or_obj": name})


@pytest.fixture(scope="module")
def hu(tiny_demo_dataset: Path) -> np.ndarray:
    """The negative demo volume, channel first ``(1, 64, 64, 8)``, float32 HU."""
    return np.asarray(demo_volume(tiny_demo_dataset).dataobj, dtype=np.float32)[None]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda v: np.where(np.arange(v.size).reshape(v.shape) == 100, np.nan, v), "NaN or infinite"),
        (lambda v: np.where(np.arange(v.size).reshape(v.shape) == 100, np.inf, v), "NaN or infinite"),
        (lambda v: (v - v.min()) / (v.max() - v.min()) * 255, "not CT in Hounsfield units"),
        (lambda v: (v - v.min()) / (v.max() - v.min()), "not CT in Hounsfield units"),
        (lambda v: v[..., 0], "2D image is not a CT volume"),
        (lambda v: v[..., :0], "empty"),
    ],
    ids=["nan", "inf", "0..255", "0..1", "2d", "no-slices"],
)
def test_lung_mask_refuses_bad_volumes(hu: np.ndarray, kind: str, change, problem: str) -> None:
    volume = _as(kind, change(hu).astype(np.float32))

    with pytest.raises(InvalidVolumeError, match=re.escape(problem)) as caught:
        LungMask(spacing_mm=(5.9, 5.9, 37.5))(volume)

    assert ("scan.nii.gz" if kind == "metatensor" else "<array>") in str(caught.value)


@pytest.mark.parametrize("kind", KINDS)
def test_tone_map_refuses_non_hu_and_non_finite_values(hu: np.ndarray, kind: str) -> None:
    with pytest.raises(InvalidVolumeError, match="not CT in Hounsfield units"):
        ToneMap()(_as(kind, (hu - hu.min()) / (hu.max() - hu.min()) * 255))
    broken = hu.copy()
    broken[0, 1, 2, 3] = np.nan
    with pytest.raises(InvalidVolumeError, match="1 voxels are NaN or infinite"):
        ToneMap()(_as(kind, broken))


@pytest.mark.parametrize("kind", KINDS)
def test_mask_with_no_lungs_raises_or_falls_back_to_ones(kind: str) -> None:
    body = np.full((1, 64, 64, 8), -1000.0, dtype=np.float32)
    x, y = np.mgrid[:64, :64]
    body[0][((x - 32) / 26) ** 2 + ((y - 32) / 20) ** 2 < 1] = 40.0

    with pytest.raises(NoLungFoundError, match="no lung found"):
        LungMask(spacing_mm=(5.9, 5.9, 37.5))(_as(kind, body))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = LungMask(spacing_mm=(5.9, 5.9, 37.5), on_failure="full")(_as(kind, body))
    assert any("no lung found" in str(w.message) for w in caught)
    assert type(mask) is type(_as(kind, body)) and int(mask.sum()) == body.size


def test_data_list_reports_every_problem_before_training(battery: Path, tiny_demo_dataset: Path) -> None:
    hu = np.asarray(demo_volume(tiny_demo_dataset).dataobj)
    spacing = (5.9375, 5.9375, 37.5)
    two_series = battery.parent / f"{battery.name}_two_series"
    write_dicom_series(hu, spacing, two_series, "1.2.826.0.1.3680043.2.1125.9.2", "a")
    write_dicom_series(hu[:, :, 1:7], spacing, two_series, "1.2.826.0.1.3680043.2.1125.9.3", "b")
    good = json.loads((tiny_demo_dataset / "datalist.json").read_text())["training"][0]
    header_problems = {  # what a header (or the file check) shows; not HU, no lungs: only at loading
        "empty.nii.gz": "unreadable header",
        "truncated.nii.gz": "truncated",
        "corrupt.nii.gz": "unreadable header",
        "scout.png": "a 2D image",
        "single_slice_2d.nii.gz": "a 2D image",
        "nan.nii.gz": "NaN or infinite",
        "inf.nii.gz": "NaN or infinite",
        "mr_series": "modality 'MR', not CT",
    }
    items = [{"image": str(battery / name), "label": 0} for name in header_problems]
    items += [
        {"image": str(battery / "missing.nii.gz"), "label": 0},
        {**with_absolute_paths(good, tiny_demo_dataset), "label": 2},
        {"image": str(battery / "one_slice.nii.gz"), "label": True},
        {"image": str(battery / "non_square.nii.gz"), "label": 1, "slice_labels": [0, 1, 1]},
        {"image": str(battery / "anisotropic.nii.gz"), "label": 0, "slice_labels": [0, 2] + [0] * 6},
        {"image": str(two_series), "label": 0},
    ]

    with pytest.raises(DatalistError) as caught:
        check_datalist(items, battery, split="training", source="datalist.json")

    problems = caught.value.problems
    assert len(problems) == len(items)  # all of them, not the first only
    for (name, problem), found in zip(header_problems.items(), problems):
        assert name in found and problem in found, found
    assert "missing.nii.gz" in problems[8] and "file not found" in problems[8]
    assert "label 2 is not 0 or 1" in problems[9]
    assert "label True is not 0 or 1" in problems[10]
    assert "3 slice labels for 8 axial slices" in problems[11]
    assert "slice_labels must be a list of 0 and 1" in problems[12]
    assert "2 DICOM series: name one under 'series_uid'" in problems[13]


def test_each_series_of_a_dicom_folder_is_read_as_named(battery: Path, tiny_demo_dataset: Path) -> None:
    hu = np.asarray(demo_volume(tiny_demo_dataset).dataobj)
    folder = battery.parent / f"{battery.name}_named_series"
    write_dicom_series(hu, (5.9375, 5.9375, 37.5), folder, "1.2.826.0.1.3680043.2.1125.9.4", "a")
    write_dicom_series(hu[:, :, 1:7], (5.9375, 5.9375, 37.5), folder, "1.2.826.0.1.3680043.2.1125.9.5", "b")
    uids = sorted(dicom_series(folder))
    items = [{"image": str(folder), "label": 0, "series_uid": uid} for uid in uids]

    checked = check_datalist(items, battery, require_labels=False)

    chain = Compose(evaluation_transforms(**SIZES))
    assert [chain(item)["image"].shape[-1] for item in checked] == [8, 6]


@pytest.mark.slow
def test_training_stops_at_the_first_volume_that_is_not_hu(
    battery: Path, tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    demo_splits = json.loads((tiny_demo_dataset / "datalist.json").read_text())
    splits = {
        split: [with_absolute_paths(item, tiny_demo_dataset) for item in items]
        for split, items in demo_splits.items()
    }
    splits["training"] = [{"image": str(battery / "range_0_255.nii.gz"), "label": 0}]  # header is fine
    (tmp_path / "datalist.json").write_text(json.dumps(splits))
    workflow = ConfigWorkflow(
        config_file=str(TRAIN),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(tmp_path),
        datalist=str(tmp_path / "datalist.json"),
        epochs=1,
        num_workers=0,
        progress_bar=False,
        cache_dir=False,
        resize_size=36,
        spatial_size=32,
        lstm_hidden=8,
        fc_hidden=16,
    )
    workflow.initialize()

    with pytest.raises(Exception) as caught:
        workflow.run()
    workflow.finalize()

    message = str(_innermost(caught.value))
    assert "range_0_255.nii.gz" in message and "not CT in Hounsfield units" in message
    assert not list((tmp_path / "models").iterdir())  # stopped before any checkpoint
