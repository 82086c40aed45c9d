"""Data lists from CT collections on disk: a folder per class, a CSV manifest, or MosMedData.

:func:`make_datalist` turns a collection into ``OUT_DIR/datalist.json``, the decathlon-style
file the bundle reads (``training``/``validation``/``test`` lists of ``image``, ``label``,
``case_id``, ``patient`` and, where a lesion mask is given, ``slice_labels``), and
``OUT_DIR/errors.csv`` (``image``, ``reason``) listing every case that could not be used. One
unreadable case never stops the rest.

Layouts (:data:`LAYOUTS`):

- ``folders``: ``<root>/<class>/<case>``, a case being a NIfTI/MetaImage file or a DICOM series
  folder (found by :func:`pipeline.data.cases.discover_cases`). Classes named in ``positive``
  are 1; the others 0, or, when ``negative`` is given, those named there (other folders are
  reported). The patient is the case's first path part below its class folder, or what
  ``patient_regex`` finds in the case's path relative to ``root``.
- ``csv``: a manifest with columns ``image``, ``label`` and optionally ``mask``, ``patient`` and
  ``series_uid``; paths relative to the CSV's folder. Labels are 0/1, or names given in
  ``positive``/``negative``. Without a ``patient`` column every row is its own patient.
- ``mosmed``: MosMedData's ``studies/CT-0 .. CT-4/study_NNNN.nii.gz`` with optional
  ``masks/study_NNNN_mask.nii.gz``; CT-0 is negative, CT-1 .. CT-4 positive; each study is a
  patient.

A mask gives the case's slice labels (:func:`slice_labels_from_mask`). Cases are split into
training, validation and test by patient (no patient in two splits), each class on its own
(stratified), shuffled with the seed. A class with too few patients for every split fills
training first, then test, then validation, and a warning names each split left without a
class. With ``all_test`` every case goes to ``test``: a collection kept for external
validation of a trained model (``evaluate.json``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.atomic_files import atomic_write_csv, atomic_write_text
from pipeline.data.cases import case_id_from_path, discover_cases, unique_case_ids
from pipeline.data.datalist import axial_axis, axial_slice_count, check_image_file

__all__ = [
    "LAYOUTS",
    "CaseError",
    "CollectionCase",
    "CollectionError",
    "CollectionResult",
    "csv_collection",
    "folder_collection",
    "make_datalist",
    "mosmed_collection",
    "slice_labels_from_mask",
    "split_by_patient",
    "split_patients",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("folders", "csv", "mosmed")
SPLITS = ("training", "validation", "test")
DATALIST_FILE = "datalist.json"
ERRORS_FILE = "errors.csv"
ERROR_COLUMNS = ("image", "reason")
MOSMED_CATEGORIES = {f"CT-{grade}": int(grade > 0) for grade in range(5)}
"""MosMedData's severity folders: CT-0 has no COVID-19 findings, CT-1 .. CT-4 have them."""
_MOSMED_STUDY = re.compile(r"^(study_\d+)\.nii(\.gz)?$", re.IGNORECASE)
_MOSMED_MASK = re.compile(r"^(study_\d+)_mask\.nii(\.gz)?$", re.IGNORECASE)


class CollectionError(ValueError):
    """The collection as a whole cannot be read (missing folder, CSV without its columns, ...)."""


@dataclass(frozen=True)
class CollectionCase:
    """One CT volume of a collection.

    Attributes:
        image: the NIfTI/MetaImage file or DICOM series folder.
        label: 1 (COVID-19) or 0.
        patient: whom it belongs to; all of a patient's cases go to one split.
        name: a raw name for its ``case_id``.
        mask: its lesion mask, when there is one.
        series_uid: the series, for a DICOM folder holding several.
    """

    image: Path
    label: int
    patient: str
    name: str
    mask: Path | None = None
    series_uid: str | None = None


@dataclass(frozen=True)
class CaseError:
    """A case left out of the data list, and why."""

    image: str
    reason: str


@dataclass(frozen=True)
class CollectionResult:
    """What :func:`make_datalist` wrote.

    Attributes:
        datalist: ``OUT_DIR/datalist.json``.
        errors: ``OUT_DIR/errors.csv`` (always written; a header only when nothing failed).
        counts: cases per split.
        failed: number of cases in ``errors.csv``.
    """

    datalist: Path
    errors: Path
    counts: dict[str, int]
    failed: int


Found = tuple[list[CollectionCase], list[CaseError]]


def _names(values: Iterable[str]) -> set[str]:
    return {value.strip().lower() for value in values if value.strip()}


def _patient_from_regex(pattern: re.Pattern[str], relative: str) -> str | None:
    match = pattern.search(relative)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def folder_collection(
    root: str | os.PathLike,
    positive: Collection[str],
    negative: Collection[str] | None = None,
    patient_regex: str | None = None,
) -> Found:
    """The cases of a folder-per-class collection (``<root>/<class>/<case>``).

    Args:
        root: the collection's folder.
        positive: class folder names (any case) that are COVID-19 positive.
        negative: class folder names that are negative; ``None``: every other class folder.
        patient_regex: finds the patient in the case's path relative to ``root`` (posix
            separators; group 1 when the pattern has a group, else the whole match).

    Returns:
        The cases, and the errors (class folders of neither kind, paths the regex misses).

    Raises:
        CollectionError: ``root`` is not a folder, a ``positive``/``negative`` name is no
            class folder of it, or ``patient_regex`` does not compile.
    """
    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"{root}: not a folder")
    positive_names = _names(positive)
    negative_names = None if negative is None else _names(negative)
    if not positive_names:
        raise CollectionError("name the positive class folders (e.g. --positive covid,ncp)")
    folders = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted((positive_names | (negative_names or set())) - set(folders))
    if unknown:
        raise CollectionError(
            f"{root}: no class folder {', '.join(map(repr, unknown))} (class folders: "
            f"{', '.join(p.name for p in folders.values()) or 'none'})"
        )
    try:
        pattern = re.compile(patient_regex) if patient_regex else None
    except re.error as error:
        raise CollectionError(
            f"patient regex {patient_regex!r} is not a regular expression ({error})"
        ) from None
    cases, errors = [], []
    for key, folder in folders.items():
        if key in positive_names:
            label = 1
        elif negative_names is None or key in negative_names:
            label = 0
        else:
            errors.append(CaseError(os.fspath(folder), "class folder neither positive nor negative: skipped"))
            continue
        for found in discover_cases(folder):
            image = Path(found["image"])
            relative = image.relative_to(root).as_posix()
            if pattern is None:  # the case's first path part below the class folder
                parts = Path(relative).parts
                patient = case_id_from_path(folder / parts[1], folder) if len(parts) > 1 else folder.name
            else:
                patient = _patient_from_regex(pattern, relative)
                if patient is None:
                    errors.append(
                        CaseError(os.fspath(image), f"patient regex {patient_regex!r} does not match")
                    )
                    continue
            cases.append(
                CollectionCase(
                    image=image,
                    label=label,
                    patient=patient,
                    name=f"{folder.name}_{found['case_id']}",
                    series_uid=found.get("series_uid"),
                )
            )
    return cases, errors


def _csv_label(text: str, positive: set[str], negative: set[str]) -> int | None:
    value = text.strip().lower()
    if value in ("0", "1"):
        return int(value)
    if value in positive:
        return 1
    if value in negative:
        return 0
    return None


def csv_collection(
    manifest: str | os.PathLike, positive: Collection[str] = (), negative: Collection[str] = ()
) -> Found:
    """The cases of a CSV manifest (``image,label[,mask][,patient][,series_uid]``).

    Args:
        manifest: the CSV file; paths in it are relative to its folder (or absolute).
        positive: label texts meaning 1 besides ``1``.
        negative: label texts meaning 0 besides ``0``.

    Returns:
        The cases, and the rows that could not be used (no image, unknown label, missing
        file), each with its row number.

    Raises:
        CollectionError: the file is missing, not a CSV, or has no ``image`` or ``label`` column.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise CollectionError(f"{manifest}: CSV manifest not found")
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CollectionError(f"{manifest}: not a readable CSV file ({error})") from None
    columns = {name.strip().lower() for name in (rows[0].keys() if rows else ()) if name}
    missing = [column for column in ("image", "label") if column not in columns]
    if missing:
        raise CollectionError(
            f"{manifest}: no {' or '.join(missing)} column (columns: {', '.join(sorted(columns)) or 'none'}; "
            "expected image,label[,mask][,patient])"
        )
    positive_names, negative_names = _names(positive), _names(negative)
    accepted = "0, 1" + "".join(f", {name}" for name in sorted(positive_names | negative_names))
    cases, errors = [], []
    for number, raw in enumerate(rows, start=2):  # row 1 is the header
        row = {(key or "").strip().lower(): (value or "").strip() for key, value in raw.items()}
        where = f"{manifest.name} row {number}"
        if not row["image"]:
            errors.append(CaseError(where, "no image path"))
            continue
        image = manifest.parent / row["image"]
        label = _csv_label(row["label"], positive_names, negative_names)
        if label is None:
            errors.append(
                CaseError(os.fspath(image), f"{where}: unknown label {row['label']!r} (accepted: {accepted})")
            )
            continue
        mask = manifest.parent / row["mask"] if row.get("mask") else None
        cases.append(
            CollectionCase(
                image=image,
                label=label,
                patient=row.get("patient") or row["image"],
                name=case_id_from_path(image),
                mask=mask,
                series_uid=row.get("series_uid") or None,
            )
        )
    return cases, errors


def mosmed_collection(root: str | os.PathLike) -> Found:
    """The cases of MosMedData (``studies/CT-k/study_NNNN.nii.gz``, ``masks/study_NNNN_mask.nii.gz``).

    Returns:
        The studies (CT-0 negative, CT-1 .. CT-4 positive, each its own patient, masks
        attached), and the errors (files that are not ``study_NNNN.nii[.gz]``, masks without
        their study).

    Raises:
        CollectionError: ``root`` has no ``studies`` folder or no ``CT-0`` .. ``CT-4`` in it.
    """
    root = Path(root)
    studies = root / "studies"
    if not studies.is_dir():
        raise CollectionError(
            f"{root}: no 'studies' folder: not the MosMedData layout (studies/CT-0 .. CT-4)"
        )
    categories = [studies / name for name in MOSMED_CATEGORIES if (studies / name).is_dir()]
    if not categories:
        raise CollectionError(f"{studies}: none of the folders {', '.join(MOSMED_CATEGORIES)}")
    masks: dict[str, Path] = {}
    errors = []
    if (root / "masks").is_dir():
        for path in sorted((root / "masks").iterdir()):
            match = _MOSMED_MASK.match(path.name)
            if match:
                masks[match.group(1).lower()] = path
            elif not path.name.startswith("."):
                errors.append(
                    CaseError(os.fspath(path), "not a MosMedData mask name (study_NNNN_mask.nii.gz)")
                )
    cases = []
    for folder in categories:
        for path in sorted(folder.iterdir()):
            match = _MOSMED_STUDY.match(path.name)
            if path.name.startswith("."):
                continue
            if match is None:
                errors.append(CaseError(os.fspath(path), "not a MosMedData study name (study_NNNN.nii.gz)"))
                continue
            study = match.group(1)
            cases.append(
                CollectionCase(
                    image=path,
                    label=MOSMED_CATEGORIES[folder.name],
                    patient=study,
                    name=study,
                    mask=masks.pop(study.lower(), None),
                )
            )
    errors += [
        CaseError(os.fspath(path), f"mask of a study not found in {studies}") for path in masks.values()
    ]
    return cases, errors


def _load_oriented(path: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A volume's voxels and RAS affine, read as the bundle reads it (MONAI ``LoadImage``, ITK)."""
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    reader = ITKReader(series_name=series_uid) if series_uid else ITKReader()
    image = LoadImage(reader=reader, image_only=True)(os.fspath(path))
    return np.asarray(image), np.asarray(image.affine, dtype=np.float64)


def slice_labels_from_mask(
    image: str | os.PathLike, mask: str | os.PathLike, series_uid: str | None = None
) -> list[int]:
    """Slice labels of ``image`` from its lesion mask: 1 for each axial slice holding lesion voxels.

    The mask is brought to the image's voxel order (axes permuted and flipped by their
    orientations, both read with MONAI's ``LoadImage`` and ITK, as the bundle reads them), so
    a mask stored in another orientation labels the right slices. The labels follow the
    image's slice order on disk, as a data list's ``slice_labels`` do.

    Raises:
        ValueError: naming both files, when the mask has another shape than the image (after
            orientation) or is not 3D.
    """
    import nibabel as nib

    image_data, image_affine = _load_oriented(Path(image), series_uid)
    mask_data, mask_affine = _load_oriented(Path(mask))
    if mask_data.ndim != 3 or image_data.ndim != 3:
        raise ValueError(
            f"mask {mask} ({mask_data.ndim}D) and image {image} ({image_data.ndim}D) must both be 3D"
        )
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(mask_affine), nib.orientations.io_orientation(image_affine)
    )
    aligned = nib.orientations.apply_orientation(mask_data, transform)
    if aligned.shape != image_data.shape:
        raise ValueError(
            f"mask {mask} has shape {tuple(aligned.shape)} in the image's orientation, "
            f"image {image} has shape {tuple(image_data.shape)}"
        )
    axis = axial_axis(image_affine[:3, :3])
    other = tuple(a for a in range(3) if a != axis)
    return [int(v) for v in np.any(aligned > 0, axis=other)]


def _usable(case: CollectionCase) -> dict | CaseError:
    """The case's data list fields, or why it cannot be used."""
    if not case.image.exists():
        return CaseError(os.fspath(case.image), "file not found")
    try:
        slices = axial_slice_count(case.image, case.series_uid)
        check_image_file(case.image, case.series_uid)
    except ValueError as error:
        return CaseError(os.fspath(case.image), str(error))
    item: dict = {"label": case.label}
    if case.mask is not None:
        if not case.mask.exists():
            return CaseError(os.fspath(case.image), f"mask not found: {case.mask}")
        try:
            labels = slice_labels_from_mask(case.image, case.mask, case.series_uid)
        except ValueError as error:
            return CaseError(os.fspath(case.image), str(error))
        except Exception as error:  # ITK raises many types for broken files
            return CaseError(
                os.fspath(case.image), f"unreadable mask {case.mask} ({' '.join(str(error).split())[:200]})"
            )
        if len(labels) != slices:
            return CaseError(os.fspath(case.image), f"{len(labels)} mask slices for {slices} axial slices")
        if case.label == 0 and any(labels):
            return CaseError(
                os.fspath(case.image),
                f"label 0 but its mask {case.mask} marks lesions on {sum(labels)} slices",
            )
        item["slice_labels"] = labels
    return item


def _split_counts(count: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test patients of a class of ``count``.

    Each split with a positive fraction wants its share, and at least one patient; training
    (when the fractions leave it a share) at least one. When ``count`` is too small, the splits
    give way in turn: validation down to one patient, test down to one, validation to none,
    test to none.
    """
    wanted = {
        "validation": max(1, round(val_fraction * count)) if val_fraction > 0 else 0,
        "test": max(1, round(test_fraction * count)) if test_fraction > 0 else 0,
        "training": 1 if val_fraction + test_fraction < 1 else 0,
    }
    if wanted["training"] == 0:  # no share for training: validation takes what test leaves
        wanted["validation"] = count - min(wanted["test"], count)
    excess = sum(wanted.values()) - count
    for split, floor in (("validation", 1), ("test", 1), ("validation", 0), ("test", 0), ("training", 0)):
        cut = max(0, min(excess, wanted[split] - floor))
        wanted[split] -= cut
        excess -= cut
    return wanted["validation"], wanted["test"]


def split_patients(
    n_positive: int, n_negative: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, dict[int, list[int]]]:
    """Patient indices of each class for training, validation and test, as well as the counts allow.

    The cut is that of :func:`pipeline.synthetic.demo_data.split_volumes` whenever that one can fill
    every split (the same seed gives the same split); with fewer patients, training is filled
    first, then test, then validation.

    Raises:
        CollectionError: fractions below 0 or summing to more than 1.
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction <= 1):
        raise CollectionError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be at least 0 "
            "and sum to at most 1"
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    splits: dict[str, dict[int, list[int]]] = {split: {} for split in SPLITS}
    for label, count in ((1, n_positive), (0, n_negative)):
        n_val, n_test = _split_counts(count, val_fraction, test_fraction)
        order = rng.permutation(count)
        splits["validation"][label] = sorted(order[:n_val].tolist())
        splits["test"][label] = sorted(order[n_val : n_val + n_test].tolist())
        splits["training"][label] = sorted(order[n_val + n_test :].tolist())
    return splits


def split_by_patient(
    cases: list[CollectionCase],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    all_test: bool = False,
) -> dict[str, list[CollectionCase]]:
    """Training, validation and test cases; every patient's cases in one split, classes stratified.

    A patient counts as positive when any of its cases is. Each class's patients are shuffled
    with ``seed`` and cut by the fractions (:func:`split_patients`); a split left without a
    class is named in a warning. With ``all_test`` every case goes to ``test``.

    Raises:
        CollectionError: fractions below 0 or summing to more than 1.
    """
    if all_test:
        return {split: list(cases) if split == "test" else [] for split in SPLITS}
    patients: dict[str, int] = {}
    for case in cases:
        patients[case.patient] = max(patients.get(case.patient, 0), case.label)
    by_label = {label: sorted(p for p, v in patients.items() if v == label) for label in (1, 0)}
    splits = split_patients(len(by_label[1]), len(by_label[0]), val_fraction, test_fraction, seed)
    for split, indices in splits.items():
        missing = [name for label, name in ((1, "COVID-19"), (0, "negative")) if not indices[label]]
        if len(missing) == 2:
            logger.warning(
                "the %s split is empty: %d COVID-19 and %d negative patients are too few to fill "
                "it with val_fraction %s and test_fraction %s",
                split,
                len(by_label[1]),
                len(by_label[0]),
                val_fraction,
                test_fraction,
            )
        elif missing:
            logger.warning(
                "the %s split has no %s patient (%d %s patients in all)",
                split,
                missing[0],
                len(by_label[1] if missing[0] == "COVID-19" else by_label[0]),
                missing[0],
            )
    assigned = {
        patient: split
        for split, indices in splits.items()
        for label, chosen in indices.items()
        for patient in (by_label[label][i] for i in chosen)
    }
    return {split: [case for case in cases if assigned[case.patient] == split] for split in SPLITS}


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()
    except ValueError:  # another drive (Windows)
        return os.path.abspath(path)


def make_datalist(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str = "folders",
    positive: Collection[str] = (),
    negative: Collection[str] | None = None,
    patient_regex: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    all_test: bool = False,
) -> CollectionResult:
    """Write ``OUT_DIR/datalist.json`` and ``OUT_DIR/errors.csv`` for a collection on disk.

    Every case is checked as the bundle will read it (header, slice count, truncated or NaN
    NIfTI, non-CT DICOM); a mask is read for its slice labels. A case that fails goes to
    ``errors.csv`` with the reason; the others are split by patient and written. Both files are
    written atomically; ``errors.csv`` is written even when the split fails.

    Args:
        root: the collection's folder, or for ``layout="csv"`` the CSV file.
        out_dir: where to write; image paths in the data list are relative to it.
        layout: one of :data:`LAYOUTS`.
        positive: ``folders``: positive class folders; ``csv``: label texts meaning 1.
        negative: ``folders``: negative class folders (default: all others); ``csv``: label
            texts meaning 0.
        patient_regex: ``folders`` only: see :func:`folder_collection`.
        seed: seed of the split.
        val_fraction: share of each class's patients in validation.
        test_fraction: share of each class's patients in test.
        all_test: put every case in ``test`` (the fractions are ignored): a collection for
            evaluating a trained model.

    Returns:
        The files written and the counts.

    Raises:
        CollectionError: unknown layout, unreadable collection, no usable case, or fractions
            below 0 or summing to more than 1.
    """
    if layout == "folders":
        cases, errors = folder_collection(root, positive, negative, patient_regex)
    elif layout == "csv":
        cases, errors = csv_collection(root, positive, negative or ())
    elif layout == "mosmed":
        cases, errors = mosmed_collection(root)
    else:
        raise CollectionError(f"unknown layout {layout!r} (layouts: {', '.join(LAYOUTS)})")
    out_dir = Path(out_dir)
    usable, items = [], {}
    for case in cases:
        checked = _usable(case)
        if isinstance(checked, CaseError):
            errors.append(checked)
        else:
            usable.append(case)
            items[id(case)] = checked
    errors_file = atomic_write_csv(
        out_dir / ERRORS_FILE, ERROR_COLUMNS, [(e.image, e.reason) for e in errors]
    )
    for error in errors:
        logger.warning("%s: %s", error.image, error.reason)
    if not usable:
        raise CollectionError(f"{root}: no usable case ({len(errors)} in {errors_file})")
    splits = split_by_patient(usable, val_fraction, test_fraction, seed, all_test)
    case_ids = dict(zip(map(id, usable), unique_case_ids(case.name for case in usable)))
    datalist = {
        split: [
            {
                "image": _relative(case.image, out_dir),
                **({"series_uid": case.series_uid} if case.series_uid else {}),
                **items[id(case)],
                "case_id": case_ids[id(case)],
                "patient": case.patient,
            }
            for case in members
        ]
        for split, members in splits.items()
    }
    path = atomic_write_text(out_dir / DATALIST_FILE, json.dumps(datalist, indent=1) + "\n")
    return CollectionResult(
        datalist=path,
        errors=errors_file,
        counts={split: len(members) for split, members in splits.items()},
        failed=len(errors),
    )
