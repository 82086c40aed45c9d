"""Fixtures of the reliability battery: a folder of bad and unusual inputs, a small checkpoint.

Every input is derived from one tiny demo volume (64 x 64 x 8, HU, 5.9 x 5.9 x 37.5 mm), so
the whole battery stays cheap; the 2,000-slice volume repeats its slices at 32 x 32 pixels.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.pipeline.data.test_cases import write_dicom_series

SMALL_NETWORK = {"lstm_hidden": 8, "fc_hidden": 16}
"""Network settings of the battery's checkpoints (the ResNeXt-50 backbone is always full size)."""
LONG_SLICES = 2000


@dataclass(frozen=True)
class BadInput:
    """One input of the battery and what the pipeline must do with it.

    Attributes:
        name: file or folder name in the battery folder.
        problem: fragment of the error message naming the problem; ``None`` when the input is
            handled (scored like any volume).
        slices: axial slices of a handled input.
    """

    name: str
    problem: str | None
    slices: int = 8


BAD_INPUTS = (
    BadInput("empty.nii.gz", "unreadable"),
    BadInput("truncated.nii.gz", "truncated"),
    BadInput("corrupt.nii.gz", "unreadable"),
    BadInput("scout.png", "2D image"),
    BadInput("single_slice_2d.nii.gz", "2D image"),
    BadInput("range_0_255.nii.gz", "not CT in Hounsfield units"),
    BadInput("range_0_1.nii.gz", "not CT in Hounsfield units"),
    BadInput("nan.nii.gz", "NaN or infinite"),
    BadInput("inf.nii.gz", "NaN or infinite"),
    BadInput("nan.mha", "NaN or infinite"),
    BadInput("no_lungs.nii.gz", "no lung found"),
    BadInput("mr_series", "modality 'MR', not CT"),
)
"""Inputs refused with a clear error naming the file."""

HANDLED_INPUTS = (
    BadInput("one_slice.nii.gz", None, slices=1),
    BadInput("non_square.nii.gz", None),
    BadInput("anisotropic.nii.gz", None),
    BadInput(f"thin_{LONG_SLICES}_slices.nii.gz", None, slices=LONG_SLICES),
)
"""Unusual inputs that are scored like any volume."""


def demo_volume(dataset: Path, index: int = 1) -> nib.Nifti1Image:
    """Test volume ``index`` of the tiny demo data set (0: positive, 1: negative)."""
    items = json.loads((dataset / "datalist.json").read_text())["test"]
    return nib.load(dataset / items[index]["image"])


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), os.fspath(path))


def write_battery(folder: Path, image: nib.Nifti1Image) -> Path:
    """Write every input of :data:`BAD_INPUTS` and :data:`HANDLED_INPUTS` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(image.dataobj).astype(np.int16)
    affine = image.affine
    spacing = tuple(float(v) for v in image.header.get_zooms())
    raw = gzip.compress(image.to_bytes(), mtime=0)

    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    itk.imwrite(itk.image_from_array(np.full((32, 32), 100, dtype=np.uint8)), os.fspath(folder / "scout.png"))
    _nifti(folder / "single_slice_2d.nii.gz", hu[:, :, 3], affine)
    unit = (hu - hu.min()) / float(hu.max() - hu.min())
    _nifti(folder / "range_0_255.nii.gz", (unit * 255).astype(np.uint8), affine)
    _nifti(folder / "range_0_1.nii.gz", unit.astype(np.float32), affine)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = hu.astype(np.float32)
        bad[10, 20, 4] = value
        _nifti(folder / f"{name}.nii.gz", bad, affine)
    nan = hu.astype(np.float32)
    nan[10, 20, 4] = np.nan
    nan_image = itk.image_from_array(np.ascontiguousarray(nan.T))
    nan_image.SetSpacing(spacing)
    itk.imwrite(nan_image, os.fspath(folder / "nan.mha"))
    body = np.full(hu.shape, -1000, dtype=np.int16)  # a solid body in air: no air inside it
    x, y = np.mgrid[: hu.shape[0], : hu.shape[1]]
    body[((x - 32) / 26) ** 2 + ((y - 32) / 20) ** 2 < 1] = 40
    _nifti(folder / "no_lungs.nii.gz", body, affine)
    write_dicom_series(hu, spacing, folder / "mr_series", "1.2.826.0.1.3680043.2.1125.9.1", modality="MR")

    _nifti(folder / "one_slice.nii.gz", hu[:, :, 3:4], affine)
    _nifti(folder / "non_square.nii.gz", hu[:, 8:56], affine)
    anisotropic = affine.copy()
    anisotropic[:3, :3] = affine[:3, :3] @ np.diag([1.0, 0.5, 1.0])  # 5.9 x 3.0 x 37.5 mm voxels
    _nifti(folder / "anisotropic.nii.gz", hu, anisotropic)
    long = np.repeat(hu[::2, ::2], LONG_SLICES // hu.shape[2], axis=2)  # 32 x 32 x 2000
    thin = affine @ np.diag([2.0, 2.0, hu.shape[2] / LONG_SLICES, 1.0])  # 0.15 mm slices
    _nifti(folder / f"thin_{LONG_SLICES}_slices.nii.gz", long, thin)
    return folder


@pytest.fixture(scope="session")
def battery(tmp_path_factory: pytest.TempPathFactory, tiny_demo_dataset: Path) -> Path:
    """Folder holding every input of the battery (tests must not modify it)."""
    return write_battery(tmp_path_factory.mktemp("battery"), demo_volume(tiny_demo_dataset))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of an untrained small ResNext+ (:data:`SMALL_NETWORK`) as ``{"model": state_dict}``."""
    from networks import ResNextPlus

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_checkpoint") / "model.pt"
    torch.save({"model": ResNextPlus(**SMALL_NETWORK).state_dict()}, path)
    return path
