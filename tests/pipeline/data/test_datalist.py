"""Data list loading and checking: every problem reported at once, slice counts from headers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest

from pipeline.data.datalist import (
    DatalistError,
    axial_slice_count,
    check_datalist,
    class_balance_weights,
    load_datalist,
)


def _nifti(path: Path, shape=(8, 8, 5), affine=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, -1000, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), str(path))
    return path.name


def _write_datalist(folder: Path, splits: dict) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps(splits))
    return path


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        _nifti(tmp_path / "images" / name)
    return tmp_path


def test_load_datalist_resolves_paths_and_keeps_fields(volumes: Path) -> None:
    items = [
        {"image": "images/a.nii.gz", "label": 1, "slice_labels": [0, 1, 1, 0, 0], "case_id": "A"},
        {"image": str(volumes / "images" / "b.nii.gz"), "label": 0},
    ]
    path = _write_datalist(volumes, {"training": items, "validation": items[:1]})

    loaded = load_datalist(path, "training")

    assert [Path(item["image"]) for item in loaded] == [
        volumes / "images" / "a.nii.gz",
        volumes / "images" / "b.nii.gz",
    ]
    assert all(Path(item["image"]).is_absolute() for item in loaded)
    assert loaded[0]["slice_labels"] == [0, 1, 1, 0, 0] and loaded[0]["case_id"] == "A"
    assert load_datalist(path, "validation", base_dir=volumes)[0]["label"] == 1


def test_lesion_masks_resolve_like_images_and_missing_ones_are_reported(volumes: Path) -> None:
    items = [
        {"image": "images/a.nii.gz", "label": 1, "lesion": "images/b.nii.gz"},
        {"image": "images/b.nii.gz", "label": 1, "lesion": "lesions/missing.nii.gz"},
    ]
    path = _write_datalist(volumes, {"training": items[:1], "validation": items})

    assert load_datalist(path, "training")[0]["lesion"] == os.fspath(volumes / "images" / "b.nii.gz")
    with pytest.raises(DatalistError, match=r"validation\[1\] \(images/b.nii.gz\): lesion mask not found"):
        load_datalist(path, "validation")


def test_every_problem_is_reported_at_once(volumes: Path) -> None:
    items = [
        {"image": "images/a.nii.gz", "label": 1, "slice_labels": [0, 1, 0]},  # 3 labels, 5 slices
        {"image": "images/missing.nii.gz", "label": 0},
        {"image": "images/b.nii.gz", "label": 2},
        {"image": "images/c.nii.gz", "label": "1"},
        {"image": "images/c.nii.gz", "label": True},
        {"image": "images/a.nii.gz", "label": 0, "slice_labels": [0, 0, 1, 0, 0]},
        {"label": 1},
        "images/b.nii.gz",
        {"image": "images/b.nii.gz", "label": 1, "slice_labels": [0, 2, 0, 0, 0]},
        {"image": "images/b.nii.gz"},
    ]
    path = _write_datalist(volumes, {"training": items})

    with pytest.raises(DatalistError) as raised:
        load_datalist(path, "training")

    problems = raised.value.problems
    text = str(raised.value)
    assert "3 slice labels for 5 axial slices" in text and "training[0] (images/a.nii.gz)" in text
    assert "file not found" in text and "missing.nii.gz" in text
    assert "label 2 is not 0 or 1" in text
    assert "label '1' is not 0 or 1" in text and "label True is not 0 or 1" in text
    assert "label 0 but 1 slice labels are 1" in text
    assert "training[6]: no 'image' path" in text
    assert "training[7]: expected an object" in text
    assert "slice_labels must be a list of 0 and 1" in text
    assert "training[9] (images/b.nii.gz): no 'label'" in text
    assert "is listed" in text  # duplicated images
    assert len(problems) == 13  # 10 bad items, 3 images listed twice or more
    assert text.startswith(f"{path}: 13 problems")


def test_labels_are_optional_when_not_required(volumes: Path) -> None:
    checked = check_datalist([{"image": "images/a.nii.gz"}], volumes, require_labels=False)

    assert checked == [{"image": str(volumes / "images" / "a.nii.gz")}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("{not json", "not a readable JSON file"),
        ("[]", "expected an object of splits"),
        ('{"training": []}', "'training' has no items"),
        ('{"training": {}}', "'training' must be a list"),
        ('{"test": [{"image": "x"}]}', "no split 'training' (splits: test)"),
    ],
)
def test_unusable_files_and_splits(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "datalist.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(DatalistError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_datalist(path, "training")


def test_unreadable_and_two_dimensional_images_are_reported(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"definitely not a nifti file")
    _nifti(tmp_path / "flat.nii.gz", shape=(8, 8))
    items = [{"image": "broken.nii.gz", "label": 0}, {"image": "flat.nii.gz", "label": 1}]

    with pytest.raises(DatalistError) as raised:
        check_datalist(items, tmp_path, split="test")

    assert len(raised.value.problems) == 2
    assert "test[0] (broken.nii.gz): unreadable header" in raised.value.problems[0]
    assert "test[1] (flat.nii.gz): a 2D image" in raised.value.problems[1]


def test_header_checks_can_be_skipped(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"not read")

    checked = check_datalist([{"image": "broken.nii.gz", "label": 0}], tmp_path, read_headers=False)

    assert checked[0]["image"] == str(tmp_path / "broken.nii.gz")


def test_axial_slice_count_follows_the_head_feet_axis(tmp_path: Path) -> None:
    # voxel axis 0 runs head-feet: 7 axial slices of 9 x 6 pixels
    permuted = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    _nifti(tmp_path / "permuted.nii", shape=(7, 6, 9), affine=permuted)
    _nifti(tmp_path / "plain.nii.gz", shape=(9, 6, 7))
    image = itk.image_from_array(np.zeros((11, 6, 9), dtype=np.int16))  # ITK order: z, y, x
    itk.imwrite(image, str(tmp_path / "volume.mhd"))

    assert axial_slice_count(tmp_path / "permuted.nii") == 7
    assert axial_slice_count(tmp_path / "plain.nii.gz") == 7
    assert axial_slice_count(tmp_path / "volume.mhd") == 11


def test_axial_slice_count_of_a_dicom_series(real_ct_dir: Path) -> None:
    assert axial_slice_count(real_ct_dir) == 64


def test_class_balance_weights_give_each_class_the_same_total() -> None:
    items = [{"label": 1}] + [{"label": 0}] * 3

    weights = class_balance_weights(items)

    assert weights == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert sum(w for w, item in zip(weights, items) if item["label"] == 1) == pytest.approx(1.0)
