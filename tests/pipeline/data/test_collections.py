"""Data lists from collections on disk: folders per class, CSV manifests, MosMedData."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.collections import CollectionError, make_datalist, slice_labels_from_mask
from pipeline.data.datalist import load_datalist
from pipeline.data.nifti_files import write_nifti
from pipeline.jobs.cli import main
from tests.pipeline.data.test_cases import write_dicom_series

SHAPE = (12, 12, 6)
AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
SPLITS = ("training", "validation", "test")


def _volume(path: Path, seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> Path:
    hu = np.random.default_rng(seed).integers(-1000, 200, size=shape).astype(np.int16)
    return write_nifti(path, hu, AFFINE)


def _mask(path: Path, slices: list[int], shape: tuple[int, int, int] = SHAPE, affine=AFFINE) -> Path:
    data = np.zeros(shape, dtype=np.int16)
    for k in slices:
        data[4:7, 5:8, k] = 1
    return write_nifti(path, data, affine)


def _broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a NIfTI file at all")
    return path


def _read_errors(out: Path) -> dict[str, str]:
    with (out / "errors.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return {Path(row["image"]).name: row["reason"] for row in rows}


def _check_splits(datalist_path: Path) -> dict[str, list[dict]]:
    """Every split loads as the bundle loads it, holds both classes, and no patient is in two."""
    datalist = json.loads(datalist_path.read_text())
    assert set(datalist) == set(SPLITS)
    patients = {split: {item["patient"] for item in datalist[split]} for split in SPLITS}
    assert not patients["training"] & patients["validation"]
    assert not patients["training"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    for split in SPLITS:
        items = load_datalist(datalist_path, split)  # headers read, slice label counts checked
        assert {item["label"] for item in items} == {0, 1}, split
    return datalist


def _by_case(datalist: dict[str, list[dict]]) -> dict[str, dict]:
    return {item["case_id"]: item for items in datalist.values() for item in items}


def test_folders_layout_with_nifti_and_dicom_cases(tmp_path: Path) -> None:
    root = tmp_path / "collection"
    for index, name in enumerate(("c1", "c2")):
        _volume(root / "covid" / f"{name}.nii.gz", seed=index)
    volume = np.full((8, 8, 4), -900, dtype=np.int16)
    write_dicom_series(
        volume, (0.7, 0.7, 5.0), root / "covid" / "c3" / "series", "1.2.826.0.1.3680043.2.1125.9.1"
    )
    _volume(root / "NCP" / "n1.nii.gz", seed=3)
    for index in range(4):
        _volume(root / "normal" / f"h{index}.nii.gz", seed=10 + index)
    _broken(root / "covid" / "broken.nii.gz")

    out = tmp_path / "out"
    result = make_datalist(root, out, "folders", positive=["covid", "ncp"], seed=1)

    datalist = _check_splits(result.datalist)
    cases = _by_case(datalist)
    assert {case: item["label"] for case, item in cases.items()} == {
        "covid_c1": 1,
        "covid_c2": 1,
        "covid_c3_series": 1,
        "NCP_n1": 1,
        **{f"normal_h{i}": 0 for i in range(4)},
    }
    assert cases["covid_c3_series"]["patient"] == "c3"
    assert (out / cases["covid_c3_series"]["image"]).resolve() == (root / "covid" / "c3" / "series").resolve()
    assert all("slice_labels" not in item for item in cases.values())  # no masks in this layout
    assert result.counts == {"training": 4, "validation": 2, "test": 2}
    errors = _read_errors(out)
    assert list(errors) == ["broken.nii.gz"] and result.failed == 1
    assert "unreadable" in errors["broken.nii.gz"]


def test_folders_layout_keeps_a_patients_scans_in_one_split(tmp_path: Path) -> None:
    root = tmp_path / "collection"
    for index, name in enumerate(("pat1_a", "pat1_b", "pat2_a", "pat3_a")):
        _volume(root / "covid" / f"{name}.nii.gz", seed=index)
    for index, name in enumerate(("pat4_a", "pat5_a", "pat6_a")):
        _volume(root / "normal" / f"{name}.nii.gz", seed=10 + index)
    _volume(root / "normal" / "anonymous.nii.gz", seed=20)

    for seed in range(6):
        out = tmp_path / f"out{seed}"
        result = make_datalist(
            root, out, "folders", positive=["covid"], patient_regex=r"(pat\d+)_", seed=seed
        )
        datalist = _check_splits(result.datalist)
        homes = {split for split in SPLITS for item in datalist[split] if item["patient"] == "pat1"}
        assert len(homes) == 1 and sum(len(v) for v in datalist.values()) == 7
        assert "does not match" in _read_errors(out)["anonymous.nii.gz"]


def test_folders_layout_bad_roots_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match=r"missing: not a folder"):
        make_datalist(tmp_path / "missing", tmp_path / "out", "folders", positive=["covid"])
    (tmp_path / "root" / "normal").mkdir(parents=True)
    with pytest.raises(CollectionError, match=r"no class folder 'covid' \(class folders: normal\)"):
        make_datalist(tmp_path / "root", tmp_path / "out", "folders", positive=["covid"])
    with pytest.raises(CollectionError, match=r"patient regex '\(pat' is not a regular expression"):
        make_datalist(
            tmp_path / "root", tmp_path / "out", "folders", positive=["normal"], patient_regex="(pat"
        )


def test_csv_layout_with_masks_unknown_labels_and_wrong_mask_shapes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = [("image", "label", "mask", "patient")]
    for index in range(4):
        _volume(data / f"pos{index}.nii.gz", seed=index)
        mask = f"pos{index}_mask.nii.gz" if index < 3 else ""
        if mask:
            _mask(data / mask, slices=[1, 2 + index])
        rows.append((f"pos{index}.nii.gz", "covid" if index % 2 else "1", mask, f"P{index}"))
    for index in range(3):
        _volume(data / f"neg{index}.nii.gz", seed=10 + index)
        rows.append((f"neg{index}.nii.gz", "0", "", f"N{index}"))
    _volume(data / "maybe.nii.gz", seed=30)
    rows.append(("maybe.nii.gz", "maybe", "", "M"))
    _volume(data / "odd.nii.gz", seed=31)
    _mask(data / "odd_mask.nii.gz", slices=[1], shape=(12, 12, 5))
    rows.append(("odd.nii.gz", "1", "odd_mask.nii.gz", "O"))
    rows.append(("absent.nii.gz", "1", "", "A"))
    manifest = tmp_path / "data" / "manifest.csv"
    with manifest.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)

    out = tmp_path / "out"
    result = make_datalist(manifest, out, "csv", positive=["covid"], seed=0)

    cases = _by_case(_check_splits(result.datalist))
    assert sorted(cases) == sorted([f"pos{i}" for i in range(4)] + [f"neg{i}" for i in range(3)])
    for index in range(3):
        expected = [0] * SHAPE[2]
        expected[1] = expected[2 + index] = 1
        assert cases[f"pos{index}"]["slice_labels"] == expected
        assert cases[f"pos{index}"]["label"] == 1 and cases[f"pos{index}"]["patient"] == f"P{index}"
    assert "slice_labels" not in cases["pos3"]
    errors = _read_errors(out)
    assert set(errors) == {"maybe.nii.gz", "odd.nii.gz", "absent.nii.gz"}
    assert "unknown label 'maybe' (accepted: 0, 1, covid)" in errors["maybe.nii.gz"]
    assert "odd_mask.nii.gz has shape (12, 12, 5)" in errors["odd.nii.gz"]
    assert "odd.nii.gz has shape (12, 12, 6)" in errors["odd.nii.gz"]
    assert errors["absent.nii.gz"] == "file not found"


def test_csv_without_a_label_column_is_a_clear_error(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,class\na.nii.gz,1\n")
    with pytest.raises(CollectionError, match=r"manifest.csv: no label column \(columns: class, image"):
        make_datalist(manifest, tmp_path / "out", "csv")


def test_a_mask_in_another_orientation_labels_the_images_slices(tmp_path: Path) -> None:
    image = _volume(tmp_path / "image.nii.gz")
    depth = SHAPE[2]
    flipped = AFFINE.copy()
    flipped[2, 2], flipped[2, 3] = -AFFINE[2, 2], AFFINE[2, 2] * (depth - 1)  # stored head first
    mask = _mask(tmp_path / "mask.nii.gz", slices=[depth - 1 - 1, depth - 1 - 2], affine=flipped)
    # on disk the mask marks its slices 3 and 4, which lie where the image's slices 2 and 1 do
    assert slice_labels_from_mask(image, mask) == [0, 1, 1, 0, 0, 0]


def test_mosmed_layout(tmp_path: Path) -> None:
    root = tmp_path / "MosMedData"
    studies = {"CT-0": range(1, 4), "CT-1": range(4, 6), "CT-3": range(6, 7)}
    for category, numbers in studies.items():
        for number in numbers:
            _volume(root / "studies" / category / f"study_{number:04d}.nii.gz", seed=number)
    _mask(root / "masks" / "study_0004_mask.nii.gz", slices=[3])
    _mask(root / "masks" / "study_0099_mask.nii.gz", slices=[3])
    (root / "studies" / "CT-1" / "notes.txt").write_text("not a study")

    out = tmp_path / "out"
    result = make_datalist(root, out, "mosmed", seed=2)

    cases = _by_case(_check_splits(result.datalist))
    assert {case: item["label"] for case, item in cases.items()} == {
        "study_0001": 0,
        "study_0002": 0,
        "study_0003": 0,
        "study_0004": 1,
        "study_0005": 1,
        "study_0006": 1,
    }
    assert cases["study_0004"]["slice_labels"] == [0, 0, 0, 1, 0, 0]
    assert all(item["patient"] == case for case, item in cases.items())
    errors = _read_errors(out)
    assert "not a MosMedData study name" in errors["notes.txt"]
    assert "mask of a study not found" in errors["study_0099_mask.nii.gz"]
    with pytest.raises(CollectionError, match="no 'studies' folder"):
        make_datalist(tmp_path, out, "mosmed")


def test_too_few_patients_split_as_well_as_they_can_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "collection"
    for index in range(3):
        _volume(root / "covid" / f"c{index}.nii.gz", seed=index)
    for index in range(2):
        _volume(root / "normal" / f"h{index}.nii.gz", seed=10 + index)

    with caplog.at_level("WARNING", logger="pipeline.data.collections"):
        result = make_datalist(root, tmp_path / "out", "folders", positive=["covid"])

    # two negatives fill training and test; validation, the split that gives way first, has none
    datalist = json.loads(result.datalist.read_text())
    labels = {split: sorted(item["label"] for item in datalist[split]) for split in SPLITS}
    assert labels == {"training": [0, 1], "validation": [1], "test": [0, 1]}
    assert "the validation split has no negative patient (2 negative patients in all)" in caplog.text


def test_zero_fractions_leave_empty_splits_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "collection"
    _volume(root / "covid" / "c0.nii.gz", seed=0)
    _volume(root / "normal" / "h0.nii.gz", seed=1)

    with caplog.at_level("WARNING", logger="pipeline.data.collections"):
        result = make_datalist(
            root, tmp_path / "out", "folders", positive=["covid"], val_fraction=0, test_fraction=0
        )

    assert result.counts == {"training": 2, "validation": 0, "test": 0}
    assert "the validation split is empty" in caplog.text and "the test split is empty" in caplog.text
    with pytest.raises(CollectionError, match="must be at least 0 and sum to at most 1"):
        make_datalist(
            root, tmp_path / "out", "folders", positive=["covid"], val_fraction=0.6, test_fraction=0.6
        )


def _two_case_collection(root: Path, tiny_demo_dataset: Path) -> Path:
    """One COVID-19 and one negative volume of the tiny demo data, as class folders."""
    items = json.loads((tiny_demo_dataset / "datalist.json").read_text())["test"]
    for label, folder in ((1, "covid"), (0, "normal")):
        image = next(item["image"] for item in items if item["label"] == label)
        target = root / folder / Path(image).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tiny_demo_dataset / image).read_bytes())
    return root


def test_all_test_puts_every_case_in_test(
    tmp_path: Path, tiny_demo_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _two_case_collection(tmp_path / "collection", tiny_demo_dataset)
    out = tmp_path / "out"
    args = ["make-datalist", str(root), str(out), "--layout", "folders", "--positive", "covid", "--all-test"]

    assert main(args) == 0

    assert "training 0, validation 0, test 2" in capsys.readouterr().out
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["training"] == [] and datalist["validation"] == []
    assert sorted(item["label"] for item in load_datalist(out / "datalist.json", "test")) == [0, 1]


@pytest.mark.slow
def test_evaluate_scores_an_all_test_datalist_with_intervals(tmp_path: Path, tiny_demo_dataset: Path) -> None:
    """External validation: make-datalist --all-test, then evaluate.json writes metrics with intervals."""
    import torch

    from networks import ResNextPlus
    from pipeline.jobs.demo import BUNDLE_DIR, run_bundle

    root = _two_case_collection(tmp_path / "collection", tiny_demo_dataset)
    assert main(["make-datalist", str(root), str(tmp_path / "lists"), "--layout", "folders",
                 "--positive", "covid", "--all-test"]) == 0  # fmt: skip
    torch.manual_seed(0)
    torch.save(ResNextPlus(lstm_hidden=8, fc_hidden=16).state_dict(), tmp_path / "model.pt")
    configs = BUNDLE_DIR / "configs"
    run_bundle(
        [configs / "train.json", configs / "evaluate.json"],
        {
            "bundle_root": str(BUNDLE_DIR),
            "dataset_dir": str(tmp_path / "lists"),
            "ckpt_dir": str(tmp_path),
            "output_dir": str(tmp_path / "eval"),
            "cache_dir": "none",
            "num_workers": 0,
            "resize_size": 36,
            "spatial_size": 32,
            "lstm_hidden": 8,
            "fc_hidden": 16,
        },
    )

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["volume"]["count"] == 2
    assert metrics["ci_level"] == 0.95 and metrics["ci_resamples"] == 2000
    volume = metrics["volume"]
    # one volume per class: every resample is the data itself, so each interval is the point
    for name in ("acc", "sen", "spe", "f1", "auc"):
        if volume[name] is not None:
            assert volume[f"{name}_ci"] == [pytest.approx(volume[name])] * 2, name
    assert 0.0 <= volume["ece"] <= 1.0 and volume["auc"] in (0.0, 1.0)
    # class folders without lesion masks: no slice labels, so no slice metrics to bound
    assert metrics["slice"]["count"] == 0 and "auc_ci" not in metrics["slice"]


def test_make_datalist_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "collection"
    for label, name in ((1, "covid"), (0, "normal")):
        for index in range(3):
            _volume(root / name / f"{name}{index}.nii.gz", seed=10 * label + index)
    out = tmp_path / "out"
    assert main(["make-datalist", str(root), str(out), "--layout", "folders", "--positive", "covid"]) == 0
    assert "training 2, validation 2, test 2; 0 cases could not be used" in capsys.readouterr().out
    assert (out / "datalist.json").is_file() and (out / "errors.csv").read_text() == "image,reason\n"
    with pytest.raises(SystemExit, match=r"make-datalist: .*absent: not a folder"):
        main(
            [
                "make-datalist",
                str(tmp_path / "absent"),
                str(out),
                "--layout",
                "folders",
                "--positive",
                "covid",
            ]
        )


@pytest.mark.slow
def test_the_bundle_trains_on_a_made_datalist(tmp_path: Path, tiny_demo_dataset: Path) -> None:
    """make-datalist, then train.json on its output: the extra fields (case_id, patient) pass through."""
    import shutil

    import torch

    from pipeline.jobs.demo import BUNDLE_DIR, run_bundle

    root = tmp_path / "collection"
    for item in (
        item
        for items in json.loads((tiny_demo_dataset / "datalist.json").read_text()).values()
        for item in items
    ):
        target = root / ("covid" if item["label"] else "normal") / Path(item["image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_demo_dataset / item["image"], target)
    out = tmp_path / "lists"
    result = make_datalist(root, out, "folders", positive=["covid"], val_fraction=0.25, test_fraction=0.25)
    assert result.failed == 0 and result.counts == {"training": 4, "validation": 2, "test": 2}

    overrides = {
        "bundle_root": str(BUNDLE_DIR),
        "dataset_dir": str(out),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "cache_dir": "none",
        "epochs": 1,
        "num_workers": 0,
        "progress_bar": False,
        "num_slices": 4,
        "resize_size": 36,
        "spatial_size": 32,
        "lstm_hidden": 8,
        "fc_hidden": 16,
    }
    run_bundle([BUNDLE_DIR / "configs" / "train.json"], overrides)
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["lr_scheduler"]["last_epoch"] == 4  # one step per training volume
