"""Case discovery and safe case ids: folders of NIfTI, MetaImage and DICOM series, datalists."""

from __future__ import annotations

import json
import locale
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.cases import (
    RESERVED_NAMES,
    case_id_from_path,
    cases_from_datalist,
    dicom_series,
    discover_cases,
    load_cases,
    safe_case_id,
    unique_case_ids,
)

STUDY_UID = "1.2.826.0.1.3680043.2.1125.7.1"


def write_dicom_series(
    volume_hu: np.ndarray,
    spacing: tuple[float, float, float],
    folder: Path,
    series_uid: str,
    prefix: str = "slice",
    modality: str = "CT",
) -> Path:
    """Write ``volume_hu`` (x, y, z index order, HU) as a CT DICOM series: one int16 file per slice.

    Each slice carries the series and study UIDs, its position along z, the pixel spacing and
    an identity rescale, so ITK (and MONAI's ``ITKReader``) reads the series back as the volume.
    """
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    # GDCM's writer leaves the process in the C locale (ASCII), which later tests would inherit.
    with _locale_kept():
        for k in range(volume_hu.shape[2]):
            image = itk.image_from_array(np.ascontiguousarray(volume_hu[:, :, k].T.astype(np.int16)))
            image.SetSpacing([float(spacing[0]), float(spacing[1])])
            meta = image.GetMetaDataDictionary()
            tags = {
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{k + 1}",
                "0008|0021": "20200401",
                "0008|0060": modality,
                "0018|0050": f"{spacing[2]:.3f}",
                "0020|000d": STUDY_UID,
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{k * spacing[2]:.3f}",
                "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
                "0028|1052": "0",
                "0028|1053": "1",
            }
            for key, value in tags.items():
                meta[key] = value
            image_io = itk.GDCMImageIO.New()
            image_io.KeepOriginalUIDOn()
            writer = itk.ImageFileWriter[type(image)].New(
                Input=image, FileName=os.fspath(folder / f"{prefix}_{k:03d}.dcm"), ImageIO=image_io
            )
            writer.Update()
    return folder


@contextmanager
def _locale_kept() -> Iterator[None]:
    """Restore the process locale on leaving."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_writing_a_dicom_series_keeps_the_process_locale(tmp_path: Path) -> None:
    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(np.zeros((8, 8, 2), dtype=np.int16), (1.0, 1.0, 2.0), tmp_path, "1.2.3")
    assert locale.setlocale(locale.LC_ALL) == before


def _tiny_volume(slices: int = 3) -> np.ndarray:
    return np.full((8, 8, slices), -1000, dtype=np.int16)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scan_01", "scan_01"),
        ("../../etc/passwd", "etc_passwd"),
        ("/abs/path/volume", "abs_path_volume"),
        ("..", "case"),
        (".", "case"),
        ("", "case"),
        ("a\\b/c", "a_b_c"),
        (".hidden", "hidden"),
        ("a..b", "a.b"),
        ("Patient 7 (CT)", "Patient_7_CT"),
        ("Ünïcödé", "Unicode"),
        ("x\x00y", "x_y"),
    ],
)
def test_safe_case_id_cleans_names(name: str, expected: str) -> None:
    assert safe_case_id(name) == expected


@pytest.mark.parametrize(
    "name", ["../" * 40 + "x", "a" * 300, "/" + "b/" * 100, "..\\..\\windows", "\u00e9" * 99]
)
def test_safe_case_id_stays_inside_any_folder(name: str, tmp_path: Path) -> None:
    case_id = safe_case_id(name)
    assert 0 < len(case_id) <= 64
    assert os.sep not in case_id and "/" not in case_id and "\\" not in case_id
    assert ".." not in case_id and not case_id.startswith(".")
    assert (tmp_path / case_id).resolve().parent == tmp_path.resolve()


def test_long_names_stay_distinct() -> None:
    first, second = safe_case_id("a" * 100 + "1"), safe_case_id("a" * 100 + "2")
    assert first != second
    assert len(first) == len(second) == 64


def test_unique_case_ids_are_unique_ignoring_case_and_avoid_output_names() -> None:
    ids = unique_case_ids(["scan", "SCAN", "scan", "../scan", "predictions.csv", "errors.csv"])
    assert ids == ["scan", "SCAN_2", "scan_3", "scan_4", "predictions.csv_case", "errors.csv_case"]
    assert len({i.lower() for i in ids}) == len(ids)
    assert not {i.lower() for i in ids} & RESERVED_NAMES
    assert unique_case_ids(["scan"], taken={"scan"}) == ["scan_2"]


def test_case_id_from_path_strips_suffixes_and_joins_nested_parts(tmp_path: Path) -> None:
    assert case_id_from_path("/data/lung_01.nii.gz") == "lung_01"
    assert case_id_from_path("/data/lung_01.mhd") == "lung_01"
    assert case_id_from_path(tmp_path / "p1" / "ct", root=tmp_path) == "p1_ct"
    assert case_id_from_path("/elsewhere/ct", root=tmp_path) == "ct"


def test_discover_cases_finds_volumes_series_and_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "b.nii").write_bytes(b"")
    (tmp_path / "c.mhd").write_text("ObjectType = Image\n")
    (tmp_path / "c.raw").write_bytes(b"\0")
    (tmp_path / "slice.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "datalist.json").write_text("{}")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    write_dicom_series(
        _tiny_volume(), (1.0, 1.0, 2.0), tmp_path / "patient" / "ct", "1.2.826.0.1.3680043.2.1125.7.2"
    )
    not_dicom = tmp_path / "broken_series"
    not_dicom.mkdir()
    (not_dicom / "0001.dcm").write_bytes(b"garbage")

    cases = discover_cases(tmp_path)

    by_id = {case["case_id"]: case for case in cases}
    assert set(by_id) == {"a", "b", "c", "slice", "patient_ct", "broken_series"}
    assert by_id["patient_ct"]["image"] == os.fspath(tmp_path / "patient" / "ct")
    assert by_id["broken_series"]["image"] == os.fspath(not_dicom)  # kept so that its error is reported
    assert all("series_uid" not in case for case in cases)


def test_folder_with_several_series_gives_one_case_per_series(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    uids = ["1.2.826.0.1.3680043.2.1125.7.3", "1.2.826.0.1.3680043.2.1125.7.4"]
    write_dicom_series(_tiny_volume(3), (1.0, 1.0, 2.0), folder, uids[0], prefix="first")
    write_dicom_series(_tiny_volume(4), (1.0, 1.0, 2.0), folder, uids[1], prefix="second")

    series = dicom_series(folder)
    cases = discover_cases(tmp_path)

    assert len(series) == 2
    assert sorted(case["series_uid"] for case in cases) == sorted(series)
    assert all(case["image"] == os.fspath(folder) for case in cases)
    assert len({case["case_id"] for case in cases}) == 2
    assert all(case["case_id"].startswith("mixed_") for case in cases)


def test_discovering_a_series_folder_itself_gives_that_series(tmp_path: Path) -> None:
    write_dicom_series(_tiny_volume(), (1.0, 1.0, 2.0), tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7.5")
    assert discover_cases(tmp_path / "series") == [
        {"image": os.fspath(tmp_path / "series"), "case_id": "series"}
    ]


def test_cases_from_datalist_resolve_paths_and_sanitise_ids(tmp_path: Path) -> None:
    datalist = {
        "training": [{"image": "images/t.nii.gz", "label": 0}],
        "test": [
            {"image": "images/x.nii.gz", "label": 1, "slice_labels": [0, 1]},
            {"image": "/abs/y.nii.gz", "label": 0, "case_id": "../../escape"},
            {"image": "other/x.nii.gz", "label": 0},
        ],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))

    cases = cases_from_datalist(path, split="test")

    assert [c["case_id"] for c in cases] == ["x", "escape", "x_2"]
    assert cases[0]["image"] == os.fspath(tmp_path / "images" / "x.nii.gz")
    assert cases[1]["image"] == "/abs/y.nii.gz"
    assert cases[0]["slice_labels"] == [0, 1] and cases[0]["label"] == 1
    assert len(cases_from_datalist(path, split=None)) == 4
    with pytest.raises(KeyError, match="no split 'validation'"):
        cases_from_datalist(path, split="validation")


def test_load_cases_needs_a_source_with_volumes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give a folder"):
        load_cases()
    with pytest.raises(ValueError, match="no CT volumes found"):
        load_cases(dataset_dir=tmp_path)
    with pytest.raises(NotADirectoryError):
        load_cases(dataset_dir=tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"test": [{"label": 1}]}))
    with pytest.raises(ValueError, match="no 'image' path"):
        load_cases(datalist=bad)
