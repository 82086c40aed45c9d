"""Batch inference (``inference.json``) over the bad-input battery, hostile names, an unwritable output.

A case that cannot be processed becomes a row of ``errors.csv`` and the batch goes on; case
ids from file names and data list entries never lead outside ``output_dir``; an output folder
that cannot be written stops the run before any case, as it does for training and evaluation.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from monai.bundle import ConfigWorkflow

from pipeline.jobs.demo import run_bundle
from tests.conftest import BUNDLE_DIR, REPO_ROOT
from tests.reliability.conftest import BAD_INPUTS, HANDLED_INPUTS, LONG_SLICES, SMALL_NETWORK

CONFIGS = BUNDLE_DIR / "configs"
INFERENCE = CONFIGS / "inference.json"
SMALL = {"resize_size": 16, "spatial_size": 16, "num_workers": 0, "progress": False, "save_figures": False}
MAX_CASE_ID_LENGTH = 64


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _command(**overrides: Any) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.fspath(INFERENCE)]
    for key, value in {**SMALL, **SMALL_NETWORK, **overrides}.items():
        command += [f"--{key}", str(value)]
    return command


def _infer(**overrides: Any) -> None:
    """Run ``inference.json`` in this process (the command line's workflow, without its start-up)."""
    run_bundle([INFERENCE], {**SMALL, **SMALL_NETWORK, **overrides})


@pytest.mark.slow
def test_bad_cases_land_in_errors_csv_and_the_batch_goes_on(
    battery: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    _infer(
        dataset_dir=os.fspath(battery),
        ckpt_path=os.fspath(small_checkpoint),
        output_dir=os.fspath(out),
        slice_chunk=LONG_SLICES // 4,  # the CNN sees the 2,000 slices in 4 chunks (each call costs)
    )

    errors = {Path(row["image"]).name: row["error"] for row in _read(out / "errors.csv")}
    assert set(errors) == {bad.name for bad in BAD_INPUTS}
    for bad in BAD_INPUTS:
        assert bad.problem in errors[bad.name], (bad.name, errors[bad.name])
    predictions = {Path(row["image"]).name: row for row in _read(out / "predictions.csv")}
    assert set(predictions) == {handled.name for handled in HANDLED_INPUTS}  # scored despite the rest
    for handled in HANDLED_INPUTS:
        row = predictions[handled.name]
        assert int(row["n_slices"]) == handled.slices and 0.0 <= float(row["prob_covid"]) <= 1.0
        assert len(_read(out / row["case_id"] / "slice_attention.csv")) == handled.slices
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        row["case_id"] for row in predictions.values()
    )  # nothing written for the failed cases


HOSTILE_CASE_IDS = ("../../escaped", "/tmp/absolute_escape", "nested/dir\\" + "x" * 300, "predictions.csv")
HOSTILE_FILE_NAMES = ("....nii.gz", "-rf (copy) $HOME " + "é" * 80 + ".nii.gz")


def test_case_ids_never_escape_the_output_folder(
    tiny_demo_dataset: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    source = (
        tiny_demo_dataset / json.loads((tiny_demo_dataset / "datalist.json").read_text())["test"][1]["image"]
    )
    images = tmp_path / "images"
    images.mkdir()
    items = []
    for index, case_id in enumerate(HOSTILE_CASE_IDS):
        shutil.copy(source, images / f"volume_{index}.nii.gz")
        items.append({"image": f"images/volume_{index}.nii.gz", "case_id": case_id})
    for name in HOSTILE_FILE_NAMES:
        shutil.copy(source, images / name)
        items.append({"image": f"images/{name}"})
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}))
    out = tmp_path / "run" / "out"
    before = set(tmp_path.rglob("*"))

    _infer(
        datalist=os.fspath(tmp_path / "datalist.json"), ckpt_path=os.fspath(small_checkpoint), output_dir=out
    )

    created = set(tmp_path.rglob("*")) - before
    assert all(path.resolve().is_relative_to(out.resolve()) for path in created - {out, out.parent})
    assert not (Path("/tmp") / "absolute_escape").exists() and not (tmp_path / "escaped").exists()
    rows = _read(out / "predictions.csv")
    assert _read(out / "errors.csv") == [] and len(rows) == len(items)
    case_ids = [row["case_id"] for row in rows]
    assert len(set(case_ids)) == len(case_ids)
    for case_id in case_ids:
        assert 0 < len(case_id) <= MAX_CASE_ID_LENGTH and not case_id.startswith(".")
        assert "/" not in case_id and "\\" not in case_id and case_id not in {".", "..", "predictions.csv"}
        assert (out / case_id / "slice_attention.csv").is_file()


@pytest.mark.slow
def test_unwritable_output_folder_stops_inference_before_any_case(
    tiny_demo_dataset: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should go")
    out = blocker / "out"  # not creatable, even for root (chmod would not stop root)

    result = subprocess.run(
        _command(dataset_dir=tiny_demo_dataset / "images", ckpt_path=small_checkpoint, output_dir=out),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode != 0
    assert os.fspath(out) in result.stderr and "Not a directory" in result.stderr
    assert "predictions.csv" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    "configs", [["train.json"], ["train.json", "evaluate.json"]], ids=["train", "evaluate"]
)
def test_unwritable_output_folder_stops_training_and_evaluation_at_once(
    configs: list[str], tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    workflow = ConfigWorkflow(
        config_file=[os.fspath(CONFIGS / name) for name in configs],
        logging_file=False,
        workflow_type=None,
        bundle_root=os.fspath(tmp_path / "bundle"),
        dataset_dir=os.fspath(tiny_demo_dataset),
        output_dir=os.fspath(blocker / "eval"),
    )

    with pytest.raises(Exception) as caught:
        workflow.initialize()

    error = caught.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, PermissionError)
    assert f"output_dir='{blocker / 'eval'}'" in str(error) and "Not a directory" in str(error)
