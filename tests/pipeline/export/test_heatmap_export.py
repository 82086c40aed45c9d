"""Batch inference writes heatmaps aligned with the input image, for the positive slices only."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data.nifti_files import write_nifti
from pipeline.export.heatmap_export import HEATMAP_NIFTI
from pipeline.jobs.demo import run_bundle
from tests.conftest import BUNDLE_DIR
from tests.pipeline.workflow.test_heatmaps import oblique_flipped_copy, positive_test_case
from tests.reliability import conftest as reliability

small_checkpoint = reliability.small_checkpoint  # the fixture, shared

OVERRIDES = {
    **reliability.SMALL_NETWORK,
    "resize_size": 48,
    "spatial_size": 40,
    "num_workers": 0,
    "progress": False,
    "save_figures": False,
    # every volume predicted positive, its slices called by the paper's tau: the barely trained
    # network's slices get maps
    "threshold": 0.0,
    "slice_threshold": 0.0,
    "slice_tau": 1.0,
}


def _slice_predictions(case_dir: Path) -> dict[int, int]:
    with (case_dir / "slice_attention.csv").open(newline="") as stream:
        return {int(row["slice_index"]): int(row["slice_pred"]) for row in csv.DictReader(stream)}


def test_batch_inference_writes_heatmaps_on_the_input_grid(
    tiny_demo_dataset: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    source = positive_test_case(tiny_demo_dataset)
    original = oblique_flipped_copy(source, tmp_path / "data" / "oblique.nii.gz")
    overrides = {
        **OVERRIDES,
        "dataset_dir": os.fspath(tmp_path / "data"),
        "ckpt_path": os.fspath(small_checkpoint),
    }

    stale = tmp_path / "on" / "oblique" / "heatmap_slice_99.png"  # from an earlier run into the folder
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")

    run_bundle([BUNDLE_DIR / "configs" / "inference.json"], {**overrides, "output_dir": tmp_path / "on"})

    case_dir = tmp_path / "on" / "oblique"
    heatmap = nib.load(case_dir / HEATMAP_NIFTI)
    assert heatmap.shape == original.shape
    np.testing.assert_allclose(heatmap.affine, original.affine, atol=1e-4)
    values = np.asarray(heatmap.dataobj)
    assert values.dtype == np.float32 and values.min() >= 0 and 0 < values.max() <= 1
    predictions = _slice_predictions(case_dir)
    positive = {index for index, pred in predictions.items() if pred}
    assert positive and len(positive) < len(predictions)
    # slices stored head first (z flipped on disk): each map lands on its own slice of the file
    hot = {index for index in range(values.shape[2]) if values[..., index].max() > 0}
    assert hot == positive
    pngs = {path.name for path in case_dir.glob("heatmap_slice_*.png")}
    assert pngs == {f"heatmap_slice_{index}.png" for index in positive}

    run_bundle(
        [BUNDLE_DIR / "configs" / "inference.json"],
        {**overrides, "output_dir": tmp_path / "off", "save_heatmaps": False},
    )
    assert (tmp_path / "off" / "oblique" / "slice_attention.csv").exists()
    assert not list((tmp_path / "off").rglob("heatmap*"))


def test_write_nifti_keeps_the_affine(tmp_path: Path) -> None:
    affine = np.array([[0, -0.7, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=float)
    volume = np.random.default_rng(0).random((5, 6, 3))
    write_nifti(tmp_path / "map.nii.gz", volume, affine)
    image = nib.load(tmp_path / "map.nii.gz")
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    np.testing.assert_allclose(np.asarray(image.dataobj), volume.astype(np.float32))
    assert [path.name for path in tmp_path.iterdir()] == ["map.nii.gz"]  # no temporary file left
