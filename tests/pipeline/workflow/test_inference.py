"""Batch inference through the bundle's inference.json: mixed folders, bad inputs, DICOM series."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImaged

from pipeline.data.datalist import LESION_KEY
from pipeline.jobs.demo import run_bundle
from pipeline.workflow.inference import (
    ERROR_KEY,
    FailSafeDataset,
    describe_failure,
    is_failed,
)
from pipeline.workflow.preprocessing_transforms import SeriesLoadImaged
from tests.conftest import BUNDLE_DIR, REPO_ROOT, with_absolute_paths
from tests.pipeline.data.test_cases import write_dicom_series
from transforms.validation import InvalidVolumeError

INFERENCE_JSON = BUNDLE_DIR / "configs" / "inference.json"
SMALL = {"resize_size": 64, "spatial_size": 64, "num_workers": 0, "progress": False}
"""Overrides that keep the network input at the tiny volumes' own 64 x 64."""


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained network's weights in the bundle's checkpoint layout ``{"model": state_dict}``."""
    from networks import ResNextPlus

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    torch.save({"model": ResNextPlus().state_dict()}, path)
    return path


def _test_items(dataset: Path) -> list[dict[str, Any]]:
    return json.loads((dataset / "datalist.json").read_text())["test"]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, tiny_demo_dataset: Path) -> Path:
    """Two NIfTI volumes, one DICOM series folder and three bad inputs side by side."""
    folder = tmp_path_factory.mktemp("mixed")
    positive, negative = (tiny_demo_dataset / item["image"] for item in _test_items(tiny_demo_dataset))
    shutil.copy(positive, folder / "positive.nii.gz")
    shutil.copy(negative, folder / "negative.nii.gz")
    image = nib.load(negative)
    write_dicom_series(
        np.asarray(image.dataobj),
        image.header.get_zooms(),
        folder / "dicom_ct",
        "1.2.826.0.1.3680043.2.1125.8.1",
    )
    (folder / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(2048))
    itk.imwrite(itk.image_from_array(np.full((32, 32), 100, dtype=np.uint8)), os.fspath(folder / "scout.png"))
    not_hu = np.asarray(image.dataobj).astype(np.float32)
    not_hu = (not_hu - not_hu.min()) / (not_hu.max() - not_hu.min()) * 255
    nib.save(nib.Nifti1Image(not_hu.astype(np.uint8), image.affine), folder / "screenshot.nii.gz")
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def _run_inference(overrides: Mapping[str, Any]) -> None:
    run_bundle([INFERENCE_JSON], {**SMALL, **overrides})


@pytest.mark.slow
def test_command_line_run_over_a_mixed_folder(mixed_folder: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.fspath(INFERENCE_JSON)]
    command += ["--dataset_dir", os.fspath(mixed_folder), "--ckpt_path", os.fspath(checkpoint)]
    command += ["--output_dir", os.fspath(out)]
    for key, value in SMALL.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    predictions = {row["case_id"]: row for row in _read(out / "predictions.csv")}
    assert set(predictions) == {"positive", "negative", "dicom_ct"}
    for case_id, row in predictions.items():
        assert 0.0 <= float(row["prob_covid"]) <= 1.0
        assert row["pred"] == str(int(float(row["prob_covid"]) >= 0.5))
        assert row["n_slices"] == "8"
        attention = _read(out / case_id / "slice_attention.csv")
        assert len(attention) == 8
        assert sorted(int(r["slice_index"]) for r in attention) == list(range(8))
        assert sum(float(r["attention"]) for r in attention) == pytest.approx(1.0, abs=1e-4)
        assert len(row["top_slices"].split(";")) == 5
        assert (out / case_id / "slice_attention.png").stat().st_size > 10_000
    assert predictions["dicom_ct"]["image"] == os.fspath(mixed_folder / "dicom_ct")
    # the DICOM series holds the negative volume's voxels: the same input, the same score
    assert float(predictions["dicom_ct"]["prob_covid"]) == pytest.approx(
        float(predictions["negative"]["prob_covid"]), abs=1e-4
    )

    errors = {Path(row["image"]).name: row["error"] for row in _read(out / "errors.csv")}
    assert set(errors) == {"corrupt.nii.gz", "scout.png", "screenshot.nii.gz"}
    assert "2D" in errors["scout.png"]
    assert "Hounsfield" in errors["screenshot.nii.gz"]
    assert errors["corrupt.nii.gz"].startswith("unreadable file")
    assert not (out / "corrupt").exists()


def test_datalist_split_with_labels_and_reoriented_slices(
    tiny_demo_dataset: Path, checkpoint: Path, tmp_path: Path
) -> None:
    # a copy of a test volume stored head-first: slice k on disk is slice 7 - k of the original
    item = _test_items(tiny_demo_dataset)[0]
    image = nib.load(tiny_demo_dataset / item["image"])
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = image.shape[2] - 1
    flipped = nib.Nifti1Image(np.asarray(image.dataobj)[:, :, ::-1].copy(), image.affine @ flip)
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    datalist = {
        "test": [
            with_absolute_paths(item, tiny_demo_dataset),
            {
                **{key: value for key, value in item.items() if key != LESION_KEY},  # not on the flipped grid
                "image": os.fspath(tmp_path / "flipped.nii.gz"),
                "slice_labels": item["slice_labels"][::-1],
            },
        ]
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))

    _run_inference(
        {
            "datalist": os.fspath(tmp_path / "datalist.json"),
            "ckpt_path": os.fspath(checkpoint),
            "output_dir": os.fspath(tmp_path / "out"),
            "save_figures": False,
        }
    )

    rows = _read(tmp_path / "out" / "predictions.csv")
    assert [row["case_id"] for row in rows] == [Path(item["image"]).name.split(".")[0], "flipped"]
    assert [row["label"] for row in rows] == ["1", "1"]
    assert rows[0]["prob_covid"] == pytest.approx(rows[1]["prob_covid"], abs=1e-5)
    original = _read(tmp_path / "out" / rows[0]["case_id"] / "slice_attention.csv")
    reoriented = _read(tmp_path / "out" / "flipped" / "slice_attention.csv")
    assert [int(r["slice_index"]) for r in original] == list(range(8))
    assert [int(r["slice_index"]) for r in reoriented] == list(range(7, -1, -1))
    # same slice of the anatomy, same weight and label, whatever its index on disk
    by_anatomy = {7 - int(r["slice_index"]): r for r in reoriented}
    for row in original:
        twin = by_anatomy[int(row["slice_index"])]
        assert float(twin["attention"]) == pytest.approx(float(row["attention"]), abs=1e-5)
        assert twin["slice_label"] == row["slice_label"]
    assert [r["slice_label"] for r in original] == [str(v) for v in item["slice_labels"]]


def test_folder_with_two_series_scores_each(
    tiny_demo_dataset: Path, checkpoint: Path, tmp_path: Path
) -> None:
    positive, negative = (
        nib.load(tiny_demo_dataset / item["image"]) for item in _test_items(tiny_demo_dataset)
    )
    folder = tmp_path / "data" / "study"
    spacing = positive.header.get_zooms()
    write_dicom_series(np.asarray(positive.dataobj), spacing, folder, "1.2.826.0.1.3680043.2.1125.8.2", "a")
    write_dicom_series(
        np.asarray(negative.dataobj)[:, :, 1:7], spacing, folder, "1.2.826.0.1.3680043.2.1125.8.3", "b"
    )

    _run_inference(
        {
            "dataset_dir": os.fspath(tmp_path / "data"),
            "ckpt_path": os.fspath(checkpoint),
            "output_dir": os.fspath(tmp_path / "out"),
            "save_figures": False,
        }
    )

    rows = _read(tmp_path / "out" / "predictions.csv")
    assert _read(tmp_path / "out" / "errors.csv") == []
    assert sorted(row["n_slices"] for row in rows) == ["6", "8"]
    assert all(row["case_id"].startswith("study_") for row in rows)


def test_failsafe_dataset_turns_failures_into_markers() -> None:
    def refuse_odd(item: dict) -> dict:
        if item["value"] % 2:
            raise InvalidVolumeError(f"{item['image']}: odd value")
        return {**item, "value": item["value"] * 10}

    data = [{"image": f"/data/{i}.nii", "case_id": str(i), "value": i} for i in range(3)]
    dataset = FailSafeDataset(data, Compose([refuse_odd]))

    assert dataset[0]["value"] == 0 and dataset[2]["value"] == 20
    assert dataset[1] == {
        "image": "/data/1.nii",
        "case_id": "1",
        ERROR_KEY: "InvalidVolumeError: /data/1.nii: odd value",
    }
    assert is_failed(dataset[1]) and not is_failed(dataset[0])
    assert is_failed({"image": ["x"], ERROR_KEY: ["y"]}) and is_failed([dataset[1]]) and not is_failed([])


def test_describe_failure_reports_the_innermost_cause() -> None:
    try:
        try:
            raise InvalidVolumeError("scan.nii: values are not HU")
        except InvalidVolumeError as inner:
            raise RuntimeError("applying transform <LungMaskd>") from inner
    except RuntimeError as outer:
        assert describe_failure(outer) == "InvalidVolumeError: scan.nii: values are not HU"
    itk_style = RuntimeError(
        "/src/ITK/Modules/IO/itkImageFileReader.hxx:135:\nITK ERROR: Could not create IO object"
    )
    assert describe_failure(itk_style) == "RuntimeError: ITK ERROR: Could not create IO object"
    assert len(describe_failure(ValueError("x" * 5000))) <= 400


def test_series_loader_reads_the_named_series(tmp_path: Path) -> None:
    volume = np.full((8, 8, 3), -1000, dtype=np.int16)
    write_dicom_series(volume, (1.0, 1.0, 2.0), tmp_path, "1.2.826.0.1.3680043.2.1125.8.4", "a")
    write_dicom_series(volume[:, :, :2] + 5, (1.0, 1.0, 2.0), tmp_path, "1.2.826.0.1.3680043.2.1125.8.5", "b")
    from pipeline.data.cases import discover_cases

    loader = SeriesLoadImaged(LoadImaged(keys="image", reader="ITKReader", image_only=True))
    shapes = {}
    for case in discover_cases(tmp_path):
        image = Compose([loader])(case)["image"]
        shapes[int(image.shape[-1])] = float(image.max())
    assert shapes == {3: -1000.0, 2: -995.0}


@pytest.mark.slow
def test_real_dicom_series(real_ct_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    _run_inference(
        {
            "dataset_dir": os.fspath(real_ct_dir),
            "ckpt_path": os.fspath(checkpoint),
            "output_dir": os.fspath(tmp_path),
        }
    )
    elapsed = time.perf_counter() - start
    (row,) = _read(tmp_path / "predictions.csv")
    assert row["n_slices"] == "64" and row["image"] == os.fspath(real_ct_dir)
    attention = _read(tmp_path / row["case_id"] / "slice_attention.csv")
    assert sorted(int(r["slice_index"]) for r in attention) == list(range(64))
    assert _read(tmp_path / "errors.csv") == []
    print(f"real series (512 x 512 x 64, lung mask at full resolution, network at 64 x 64): {elapsed:.1f} s")
