"""The stage profile of the bundle (benchmarks/bench_profile.py, bench_gpu.py) on a small real-CT volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jobs import profile as p
from tests.conftest import REPO_ROOT

SMALL = {"resize_size": 40, "spatial_size": 32, "lstm_hidden": 8, "fc_hidden": 16}


@pytest.fixture(scope="module")
def item(real_ct_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.jobs.paper_scale import write_paper_scale_data

    folder = tmp_path_factory.mktemp("profile")
    datalist = write_paper_scale_data(folder, real_ct_dir, slices=8, size=64)
    first = json.loads(datalist.read_text())["training"][0]
    return {**first, "image": os.fspath(folder / first["image"])}


def test_training_profile_times_every_stage_and_the_compact_cache(item: dict) -> None:
    results = p.profile_training(item, {**SMALL, "num_slices": 4}, repeats=1, bf16=True)

    bundle = results["bundle"]
    assert set(p.TRAINING_STAGES) <= set(bundle.wall)
    assert all(bundle.seconds(name) > 0 for name in (p.LUNG_MASK, p.FORWARD, p.BACKWARD, p.OPTIMISER))
    assert bundle.facts["network_input"] == [1, 2, 32, 32, 4]
    # float16 CT + uint8 mask against two float32 channels: 3 bytes a voxel against 8
    compact, before = bundle.facts["cache_bytes_per_slice"], results["before"].facts["cache_bytes_per_slice"]
    assert compact < 0.5 * before
    assert results["network"].seconds("network forward + backward") > 0
    assert results["bf16"].seconds(p.FORWARD) > 0
    rows = p.summarise(bundle, p.TRAINING_STAGES)
    assert [row[0] for row in rows] == list(p.TRAINING_STAGES)
    assert sum(row[3] for row in rows) == pytest.approx(1.0)


def test_inference_profile_writes_heatmaps_from_the_scoring_pass(item: dict) -> None:
    results = p.profile_inference(item, SMALL, repeats=1)

    bundle = results["bundle"]
    assert set(p.INFERENCE_STAGES) <= set(bundle.wall)
    assert bundle.facts["network_input"] == [1, 2, 32, 32, 8]
    assert results["before"].seconds(p.HEATMAP_FILES) > 0


@pytest.mark.slow
def test_gpu_benchmark_runs_on_a_cpu(real_ct_dir: Path, tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.json"
    command = [
        sys.executable,
        os.fspath(REPO_ROOT / "benchmarks" / "bench_gpu.py"),
        *("--device", "cpu", "--base-ct", os.fspath(real_ct_dir), "--size", "64", "--slices", "6"),
        *("--resize-size", "40", "--spatial-size", "32", "--num-slices", "4", "--long-slices", "6"),
        *("--volumes", "2", "--num-workers", "0", "--repeats", "1", "--enhancer-size", "32"),
        *("--json", os.fspath(numbers)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "bottleneck: the" in result.stdout and "seconds per inference volume" in result.stdout
    measured = json.loads(numbers.read_text())
    assert set(measured) == {"training", "cached_epoch", "inference", "enhancer"}
    assert measured["cached_epoch"]["loader_volumes_per_s"] > 0
