"""Batch inference across processes and restarts: 2 Gloo processes score as one, a killed run resumes.

Every run scores the same folder: the tiny demo data set's 8 volumes and one corrupt file, at
16 x 16 pixels, with one thread per process (``torchrun``'s default), so one process and two
compute the same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.cases import discover_cases
from pipeline.jobs.demo import run_bundle
from pipeline.workflow.case_records import RECORD_FILE, record_path
from tests.conftest import BUNDLE_DIR, REPO_ROOT
from tests.reliability.conftest import SMALL_NETWORK

CONFIGS = BUNDLE_DIR / "configs"
INFERENCE = CONFIGS / "inference.json"
MULTI = CONFIGS / "multi_gpu_inference.json"
SMALL = {
    "resize_size": 16,
    "spatial_size": 16,
    "num_workers": 0,
    "progress": False,
    "save_figures": False,
    "save_heatmaps": False,
    **SMALL_NETWORK,
}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
N_VOLUMES = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_demo_dataset: Path) -> Path:
    """The 8 demo volumes and a corrupt file (an ``errors.csv`` row), in one folder."""
    folder = tmp_path_factory.mktemp("batch")
    for image in sorted((tiny_demo_dataset / "images").glob("*.nii.gz")):
        shutil.copy(image, folder / image.name)
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    return folder


def _command(folder: Path, checkpoint: Path, out: Path, processes: int = 1, **overrides: Any) -> list[str]:
    if processes == 1:
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.fspath(INFERENCE)]
    else:
        torchrun = ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        configs = f"['{INFERENCE}','{MULTI}']"
        command = [sys.executable, "-m", *torchrun, "-m", "monai.bundle", "run", "--config_file", configs]
    settings = {**SMALL, "dataset_dir": folder, "ckpt_path": checkpoint, "output_dir": out, **overrides}
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    return command


def _run(command: list[str]) -> str:
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=400
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def _outputs(out: Path) -> dict[str, str]:
    """Both tables and every case's attention CSV, by path relative to ``out``."""
    files = [out / "predictions.csv", out / "errors.csv", *sorted(out.glob("*/slice_attention.csv"))]
    return {os.fspath(path.relative_to(out)): path.read_text() for path in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, folder: Path, small_checkpoint: Path) -> Path:
    """Output folder of one uninterrupted single-process run over :func:`folder`."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _run(_command(folder, small_checkpoint, out))
    return out


@pytest.mark.slow
def test_two_gloo_processes_score_as_one(
    folder: Path, small_checkpoint: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    _run(_command(folder, small_checkpoint, out, processes=2))

    outputs = _outputs(out)
    assert outputs == _outputs(reference)  # case for case: the same rows, in the same order
    assert len(outputs["predictions.csv"].splitlines()) == 1 + N_VOLUMES
    assert "corrupt.nii.gz" in outputs["errors.csv"]


@pytest.mark.slow
def test_a_killed_batch_resumes_and_scores_every_case_once(
    folder: Path, small_checkpoint: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(
        _command(folder, small_checkpoint, out),
        cwd=REPO_ROOT,
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(out.glob(f"*/{RECORD_FILE}")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {path.parent.name: path.stat() for path in out.glob(f"*/{RECORD_FILE}")}
    assert 0 < len(done) < N_VOLUMES, "the run was not stopped mid-batch"

    log = _run(_command(folder, small_checkpoint, out))

    assert f"{len(done)} of {N_VOLUMES + 1} cases already scored" in log
    for case_id, before in done.items():  # not scored again: the record is the same file
        after = (out / case_id / RECORD_FILE).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(list(out.glob(f"*/{RECORD_FILE}"))) == N_VOLUMES
    assert _outputs(out) == _outputs(reference)  # each case once, as an uninterrupted run


def test_a_rerun_skips_recorded_cases_unless_overwrite(
    tiny_demo_dataset: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for image in sorted((tiny_demo_dataset / "images").glob("*.nii.gz"))[:2]:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "out"
    settings = {**SMALL, "dataset_dir": os.fspath(folder), "ckpt_path": os.fspath(small_checkpoint)}
    run_bundle([INFERENCE], {**settings, "output_dir": os.fspath(out)})
    cases = discover_cases(folder)
    stats = {case["case_id"]: record_path(out, case["case_id"]).stat() for case in cases}
    moved = record_path(out, cases[1]["case_id"])
    record = json.loads(moved.read_text())
    record["source"]["image"] = "/elsewhere/another.nii.gz"  # the folder's content changed
    moved.write_text(json.dumps(record))
    rows = (out / "predictions.csv").read_text()

    run_bundle([INFERENCE], {**settings, "output_dir": os.fspath(out)})

    kept = record_path(out, cases[0]["case_id"]).stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (
        stats[cases[0]["case_id"]].st_ino,
        stats[cases[0]["case_id"]].st_mtime_ns,
    )
    assert json.loads(moved.read_text())["source"]["image"] == cases[1]["image"]  # scored again
    assert (out / "predictions.csv").read_text() == rows

    run_bundle([INFERENCE], {**settings, "output_dir": os.fspath(out), "overwrite": True})

    assert record_path(out, cases[0]["case_id"]).stat().st_ino != kept.st_ino  # scored again
    assert (out / "predictions.csv").read_text() == rows
