"""The bundle trains and validates at its own sizes (resize 256, crop 224) on real-size volumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import pytest
import torch

from pipeline.jobs.paper_scale import PAPER_SIZE, run_paper_scale_epoch, write_paper_scale_data

SLICES = 8
"""Slices per volume here; the benchmark uses all 64 of the real series and samples 50."""


@pytest.mark.slow
def test_one_epoch_at_the_bundle_defaults_on_real_size_volumes(real_ct_dir: Path, tmp_path: Path) -> None:
    datalist = write_paper_scale_data(tmp_path / "data", real_ct_dir, slices=SLICES)
    items = json.loads(datalist.read_text())
    assert [item["label"] for item in items["training"]] == [1, 0] and len(items["validation"]) == 1
    for item in items["training"]:
        assert nib.load(tmp_path / "data" / item["image"]).shape == (PAPER_SIZE, PAPER_SIZE, SLICES)
    assert any(items["training"][0]["slice_labels"]) and not any(items["training"][1]["slice_labels"])

    # bundle defaults (resize 256, crop 224, batch 1) except fewer sampled slices, to stay quick
    result = run_paper_scale_epoch(tmp_path / "run", datalist, {"num_slices": 4})

    assert result["train_volumes"] == 2
    assert 0 < result["data_s"] < result["train_s"] < result["total_s"]
    assert result["seconds_per_volume"] == pytest.approx(result["train_s"] / 2)
    checkpoint = torch.load(tmp_path / "run" / "models" / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["lr_scheduler"]["last_epoch"] == 2  # one optimiser step per training volume
    assert all(
        torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point()
    )
    assert math.isfinite(result["validation_s"]) and result["validation_s"] > 0
