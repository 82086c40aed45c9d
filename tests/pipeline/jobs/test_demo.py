"""``python -m pipeline demo --quick`` end to end: data, training, evaluation, inference, report."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest
import torch

from pipeline.export.report import AttentionExample, Report
from pipeline.jobs.cli import main
from pipeline.jobs.demo import QUICK, _calibration, _heatmap_figures, _reading, make_demo_datalist, run_demo
from pipeline.synthetic.lesions import LesionSettings

METRICS = ("acc", "pre", "rec", "f1", "sen", "spe", "auc")


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def _in_unit_range(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or 0.0 <= float(value) <= 1.0


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "test ROC AUC" in capsys.readouterr().out

    datalist = json.loads((out / "data" / "datalist.json").read_text())
    test_ids = {item["case_id"] for item in datalist["test"]}
    assert (out / "models" / "model.pt").is_file()

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["volume"]["count"] == len(test_ids)
    assert metrics["slice"]["volumes"] == len(test_ids)
    for level in ("volume", "slice"):
        assert all(_in_unit_range(metrics[level][name]) for name in METRICS), metrics[level]
        assert sum(map(sum, metrics[level]["confusion_matrix"])) == metrics[level]["count"]
    test_slices = [label for item in datalist["test"] for label in item["slice_labels"]]
    assert metrics["slice"]["prevalence"] == pytest.approx(sum(test_slices) / len(test_slices))
    assert _in_unit_range(metrics["slice"]["trivial_f1"])
    localisation = metrics["localisation"]  # heatmaps against the lesion masks of the positives
    positives = [item for item in datalist["test"] if item["label"] == 1]
    assert localisation["volumes"] == len(positives)
    assert 0 < localisation["slices"] <= sum(sum(item["slice_labels"]) for item in positives)
    assert _in_unit_range(localisation["pointing_game"]) and _in_unit_range(localisation["pixel_auc"])
    assert 0.0 < localisation["pointing_game_chance"] < 1.0  # the lesions cover part of the lung
    assert metrics["heatmap"] == {"layer": "encoder.backbone.layer4", "method": "gradcam", "in_lung": True}

    predictions = _read(out / "inference" / "predictions.csv")
    assert {row["case_id"] for row in predictions} == test_ids
    assert _read(out / "inference" / "errors.csv") == []
    for row in predictions:
        assert 0.0 <= float(row["prob_covid"]) <= 1.0
        assert len(_read(out / "inference" / row["case_id"] / "slice_attention.csv")) == QUICK.slices

    report = (out / "report.md").read_text()
    for heading in (
        "## Metrics",
        "## ROC curves",
        "## Calibration of P(COVID-19) (test split)",
        "## Training curves",
        "## Slice attention of test volumes",
        "## Localisation",
    ):
        assert heading in report
    value = r"[0-9.na/-]+(?: \[[0-9.]+, [0-9.]+\])?"  # a metric and its bootstrap interval
    assert re.search(rf"\| ROC AUC \| {value} \| {value} \|", report)
    assert re.search(rf"\| F1, every slice of a called volume \| - \| {value} \|", report)
    assert re.search(rf"\| Slice prevalence, all volumes \| - \| {value} \|", report)
    assert "## Calibration" in report and "figures/reliability.png" in report
    assert re.search(r"[0-9.]+ for a pixel drawn at random within the lung", report)
    for level in ("volume", "slice"):
        assert "auc_ci" in metrics[level] and "acc_ci" in metrics[level]
    assert 0.0 <= metrics["volume"]["ece"] <= 1.0
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(images) >= 2 + 1  # ROC, training curves, at least one attention figure
    for image in images:
        assert matplotlib.image.imread(out / image).ndim == 3

    # every heatmap setting scored on the run's test split, against the same lesion slices
    assert main(["compare-heatmaps", str(out), "--splits", "test"]) == 0
    study = json.loads((out / "heatmap_study.json").read_text())["test"]
    assert len(study) == 3 * 3 * 2
    assert {row["slices"] for row in study.values()} == {localisation["slices"]}
    default = study["layer4 gradcam"]  # a second evaluation: float rounding may swap near-tied pixels
    assert default["pixel_auc"] == pytest.approx(localisation["pixel_auc"], abs=1e-3)
    for name, row in study.items():
        unmasked = study[name.removesuffix(" x lung")]  # the pixel AUC is measured within the lung,
        assert row["pixel_auc"] == pytest.approx(unmasked["pixel_auc"], abs=1e-6)  # so the mask can't move it


def test_demo_datalist_merges_real_and_phantom_volumes(tmp_path: Path, real_ct_dir: Path) -> None:
    settings = QUICK
    path, counts = make_demo_datalist(tmp_path, settings, real_ct_dir)
    datalist = json.loads(path.read_text())
    items = [item for split in datalist.values() for item in split]
    assert counts == {"real": 8, "phantom": 8}
    assert len(items) == 16 and len({item["case_id"] for item in items}) == 16
    assert all((tmp_path / item["image"]).is_file() for item in items)
    assert all((tmp_path / item["lesion"]).is_file() for item in items if item["label"] == 1)
    for split in ("training", "validation", "test"):
        sources = {item["case_id"].split("_")[0] for item in datalist[split]}
        labels = {item["label"] for item in datalist[split]}
        assert sources == {"real", "phantom"} and labels == {0, 1}


def test_demo_lesions_follow_the_settings(tmp_path: Path) -> None:
    half = LesionSettings(extent_quantiles=((0.0, 0.5), (1.0, 0.5)))  # every positive: half its slices
    path, _ = make_demo_datalist(tmp_path, replace(QUICK, lesions=half), None)

    splits = json.loads(path.read_text()).values()
    touched = sorted(sum(item["slice_labels"]) for items in splits for item in items if item["label"])
    assert len(touched) == QUICK.real_positive + QUICK.phantom_positive
    half_the_slices = QUICK.slices // 2
    assert touched[len(touched) // 2] == touched[-1] == half_the_slices
    assert touched[0] >= half_the_slices - 1  # one fewer where the lungs leave a lesion no room


def test_demo_without_the_real_ct_uses_phantoms_only(tmp_path: Path) -> None:
    path, counts = make_demo_datalist(tmp_path, QUICK, tmp_path / "missing")
    assert counts == {"phantom": 16}
    assert all(
        item["case_id"].startswith("phantom_")
        for items in json.loads(path.read_text()).values()
        for item in items
    )


def test_report_shows_heatmaps_of_the_called_slices_of_highest_attention(tmp_path: Path) -> None:
    case_dir = tmp_path / "inference" / "case"
    case_dir.mkdir(parents=True)
    for index in (2, 5, 7):  # the called slices: batch inference wrote their heatmaps
        (case_dir / f"heatmap_slice_{index}.png").write_bytes(b"")
    chosen = _heatmap_figures(case_dir, "5;3;2;7;1")
    assert chosen == [case_dir / "heatmap_slice_5.png", case_dir / "heatmap_slice_2.png"]
    assert _heatmap_figures(case_dir, "") == []

    example = AttentionExample("case", case_dir / "slice_attention.png", 0.9, 1, "5, 3, 2", heatmaps=chosen)
    text = Report(title="demo", summary={}, metrics={}, examples=[example]).render(tmp_path)
    assert "![case](inference/case/slice_attention.png)" in text
    assert (
        "![case heatmap_slice_5](inference/case/heatmap_slice_5.png) "
        "![case heatmap_slice_2](inference/case/heatmap_slice_2.png)"
    ) in text


def test_report_calibration_compares_the_stored_temperature_with_none(tmp_path: Path) -> None:
    import torch

    labels, probabilities = [0, 0, 1, 1], [0.3, 0.45, 0.55, 0.9]
    metrics = {"volume": {"ece": 0.25, "ece_ci": [0.1, 0.4]}}
    torch.save({"calibration.temperature": torch.tensor(2.0)}, tmp_path / "model.pt")

    notes = _calibration(
        tmp_path / "reliability.png", (labels, probabilities), metrics, tmp_path / "model.pt"
    )

    assert notes[0] == "## Calibration"
    assert "0.250 [0.100, 0.400]" in notes[1] and "T = 2.000 was fitted on the validation split" in notes[1]
    assert matplotlib.image.imread(tmp_path / "reliability.png").ndim == 3
    notes = _calibration(tmp_path / "other.png", (labels, probabilities), metrics, tmp_path / "absent.pt")
    assert "No temperature is stored (T = 1): temperature scaling is off" in notes[1]


def test_report_reads_a_chance_level_auc_as_not_learned() -> None:
    assert _reading(None) == [] and _reading(0.95) == []
    heading, paragraph = _reading(0.52)
    assert heading == "## Reading" and "0.520 is near chance" in paragraph
    assert "docs/results.md" in paragraph and "pretrained" in paragraph


@pytest.mark.slow
def test_demo_starts_from_a_local_imagenet_file(tmp_path: Path) -> None:
    from tests.networks.test_pretrained import torchvision_resnext50_32x4d_shapes

    generator = torch.Generator().manual_seed(7)
    weights = {
        key: torch.rand(shape, generator=generator) + 0.5
        if key.endswith("running_var")
        else torch.randint(0, 5, shape, generator=generator)
        if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator) * 0.05
        for key, shape in torchvision_resnext50_32x4d_shapes().items()
    }
    imagenet = tmp_path / "resnext50_32x4d.pth"
    torch.save(weights, imagenet)
    settings = replace(
        QUICK, real_positive=0, real_negative=0, phantom_positive=3, phantom_negative=3, size=32, slices=8,
        examples=1, pretrained=str(imagenet),
    )  # fmt: skip

    result = run_demo(tmp_path / "demo", settings, base_ct=None, progress=False)

    trained = torch.load(tmp_path / "demo" / "models" / "model.pt", weights_only=True)
    backbone = "encoder.backbone."
    # batch-norm estimates stay ImageNet's (frozen, as the paper did); weights moved a few Adam steps
    assert torch.equal(trained[backbone + "layer3.5.bn2.running_var"], weights["layer3.5.bn2.running_var"])
    for key in ("layer1.0.conv1.weight", "layer4.2.conv3.weight"):
        assert (trained[backbone + key] - weights[key]).abs().max() < 0.01
    stem = weights["conv1.weight"].sum(dim=1, keepdim=True)  # the RGB kernel summed for one channel
    assert (trained[backbone + "conv1.weight"] - stem).abs().max() < 0.01
    assert "from ImageNet weights (resnext50_32x4d.pth)" in result.report.read_text()

    with pytest.raises(FileNotFoundError, match=r"absent\.pth: no such file"):
        run_demo(tmp_path / "other", replace(settings, pretrained=str(tmp_path / "absent.pth")), base_ct=None)


def test_demo_fetch_without_network_says_so_and_goes_on_with_phantoms(tmp_path, monkeypatch, capsys):
    import pipeline.jobs.demo as demo
    import pipeline.synthetic.base_ct as base_ct

    monkeypatch.setattr(base_ct, "NBIA_IMAGE_URL", (tmp_path / "offline" / "{uid}.zip").as_uri())
    monkeypatch.setenv(base_ct.CACHE_ENV, str(tmp_path / "cache"))
    used = {}

    def run_demo(out, settings, base_ct, **kwargs):
        used["base_ct"] = base_ct
        return "result"

    monkeypatch.setattr(demo, "run_demo", run_demo)
    monkeypatch.setattr(demo, "summary_line", lambda result: f"summary of {result}")
    assert main(["demo", "--quick", "--fetch-base-ct", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("base CT not fetched: could not download file://")
    assert lines[0].endswith("; the demo goes on with phantoms only")
    assert lines[1:] == ["summary of result"]
    assert used["base_ct"] is None
