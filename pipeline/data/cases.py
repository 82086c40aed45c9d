"""The cases of a batch inference run: discovered in a folder or read from a datalist, with safe ids.

A case is one CT volume: a NIfTI or MetaImage file, or one DICOM series. A folder of DICOM
files is one series; a folder holding several series gives one case per series, each read
through MONAI's ``ITKReader(series_name=...)`` with the series identifier stored under
``"series_uid"``. Every case carries a ``case_id`` that is safe as a single path component
(no separators, no ``..``, bounded length) and unique within the run, so outputs written to
``output_dir/<case_id>/`` never escape ``output_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.datalist import LESION_KEY

__all__ = [
    "IMAGE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "case_id_from_path",
    "cases_from_datalist",
    "dicom_series",
    "discover_cases",
    "load_cases",
    "safe_case_id",
    "unique_case_ids",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd")
"""File suffixes read as one volume each."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""2D image suffixes: taken as cases so that they are reported as errors, not silently skipped."""

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAX_CASE_ID_LENGTH = 64
RESERVED_NAMES = frozenset({"predictions.csv", "errors.csv", "report.md", "figures", "metrics.json"})
"""Names used by the run's own outputs in ``output_dir``; a case id never takes one of them."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_SERIES_RESTRICTION = "0008|0021"  # series date, as MONAI's ITKReader uses to tell series apart


def safe_case_id(name: str, max_length: int = MAX_CASE_ID_LENGTH) -> str:
    """Turn any name (file name, folder name, DICOM tag, datalist entry) into a safe path component.

    Characters other than ASCII letters, digits, ``.``, ``_`` and ``-`` become ``_``; runs of
    dots collapse to one; leading and trailing dots, dashes and underscores are dropped, so
    the result is never ``..``, hidden, absolute, or holding a separator. Names longer than
    ``max_length`` keep their start plus a short hash of the full name so they stay distinct.

    Args:
        name: the raw name.
        max_length: the longest id returned (at least 16).

    Returns:
        A non-empty id (``"case"`` when nothing usable is left).
    """
    if max_length < 16:
        raise ValueError(f"max_length must be at least 16, got {max_length}")
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    cleaned = _DOTS.sub(".", _UNSAFE.sub("_", ascii_name)).strip("._-") or "case"
    if len(cleaned) > max_length:
        digest = hashlib.sha1(str(name).encode("utf-8")).hexdigest()[:8]
        cleaned = cleaned[: max_length - 9].rstrip("._-") + "_" + digest
    return cleaned


def unique_case_ids(
    names: Iterable[str], reserved: Iterable[str] = RESERVED_NAMES, taken: Iterable[str] = ()
) -> list[str]:
    """Sanitise ``names`` with :func:`safe_case_id` and make them unique, case-insensitively.

    Args:
        names: the raw names.
        reserved: names of the run's own outputs; an id equal to one gets ``_case`` appended.
        taken: ids already in use; a repeat gets ``_2``, ``_3``, ... appended, in order.
    """
    reserved_ids = {name.lower() for name in reserved}
    taken = reserved_ids | {name.lower() for name in taken}
    ids = []
    for name in names:
        base = safe_case_id(name)
        if base.lower() in reserved_ids:
            base = safe_case_id(f"{base}_case")
        candidate, counter = base, 1
        while candidate.lower() in taken:
            counter += 1
            suffix = f"_{counter}"
            candidate = base[: MAX_CASE_ID_LENGTH - len(suffix)] + suffix
        taken.add(candidate.lower())
        ids.append(candidate)
    return ids


def _strip_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES + (".gz",):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_id_from_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """The raw (not yet sanitised) case name of a volume file or series folder.

    Args:
        path: the file or folder.
        root: when given and ``path`` lies below it, the relative path's parts are joined with
            ``_`` (``patient1/ct`` -> ``patient1_ct``) so nested series keep telling names.
    """
    path = Path(path)
    parts: Sequence[str] = (path.name,)
    if root is not None:
        try:
            relative = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            relative = None
        if relative is not None and relative.parts:
            parts = relative.parts
    return "_".join((*parts[:-1], _strip_suffix(parts[-1])))


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """The DICOM series identifiers in ``folder`` (not recursive), as MONAI's ``ITKReader`` names them.

    The identifiers come from ITK's ``GDCMSeriesFileNames`` with series details and the
    series date restriction, the same settings ``ITKReader`` uses, so each one can be passed
    as ``ITKReader(series_name=...)``.
    """
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction(_SERIES_RESTRICTION)
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(os.fspath(folder))
    return [str(uid) for uid in names.GetSeriesUIDs()]


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES)


def _visible(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def _scan(folder: Path, root: Path, found: list[dict[str, Any]]) -> None:
    entries = _visible(folder.iterdir())
    files = [p for p in entries if p.is_file()]
    for path in files:
        if _is_volume_file(path):
            found.append({"image": str(path), "_name": case_id_from_path(path, root)})
    if any(_looks_like_dicom(p) for p in files if not _is_volume_file(p)):
        series = dicom_series(folder)
        name = case_id_from_path(folder, root)
        if len(series) > 1:
            for uid in series:
                digest = hashlib.sha1(uid.encode("utf-8")).hexdigest()[:8]
                found.append({"image": str(folder), "series_uid": uid, "_name": f"{name}_{digest}"})
        else:  # one series, or DICOM-looking files ITK cannot read: the loader then reports why
            found.append({"image": str(folder), "_name": name})
    for sub in entries:
        if sub.is_dir():
            _scan(sub, root, found)


def discover_cases(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Find the cases below ``folder``: volume files and DICOM series folders, recursively.

    Files ending in one of :data:`VOLUME_SUFFIXES` are one case each (the ``.raw`` data file
    beside an ``.mhd`` header is not). 2D images (:data:`IMAGE_SUFFIXES`) are cases too, so
    the run reports them as errors instead of ignoring them. A sub-folder holding DICOM files
    (``.dcm``/``.ima`` or the ``DICM`` preamble) is one case per series. Other files
    (datalists, notes) are ignored. Hidden files and folders are skipped.

    Args:
        folder: the folder to search.

    Returns:
        Items ``{"image": path, "case_id": id}`` (plus ``"series_uid"`` for one series of a
        multi-series folder), sorted by path, ids unique and path-safe.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    found: list[dict[str, Any]] = []
    _scan(root, root, found)
    for item, case_id in zip(found, unique_case_ids(item.pop("_name") for item in found)):
        item["case_id"] = case_id
    return found


def cases_from_datalist(datalist: str | os.PathLike, split: str | None = "test") -> list[dict[str, Any]]:
    """Read cases from a decathlon-style datalist JSON.

    Relative ``image`` paths resolve against the datalist's folder. Each item keeps its other
    fields (``label``, ``slice_labels``, ``series_uid``, ...); its ``case_id`` comes from an
    existing ``case_id`` field or the image's name, sanitised and made unique either way.

    Args:
        datalist: the JSON file: a mapping of split names to item lists, or a plain list.
        split: which split to read; ``None`` reads every split in file order.

    Raises:
        KeyError: ``split`` is not in the datalist.
        ValueError: the file is not a datalist (items without ``image``).
    """
    path = Path(datalist)
    content = json.loads(path.read_text())
    if isinstance(content, list):
        items = content
    elif split is None:
        items = [item for value in content.values() if isinstance(value, list) for item in value]
    elif split in content:
        items = content[split]
    else:
        raise KeyError(f"{path}: no split {split!r} (splits: {', '.join(sorted(content))})")
    cases = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise ValueError(f"{path}: item {index} has no 'image' path: {item!r}")
        case = dict(item)
        for key in ("image", LESION_KEY):
            if isinstance(item.get(key), str):
                file = Path(item[key])
                case[key] = str(file if file.is_absolute() else path.parent / file)
        cases.append(case)
    names = [str(c.get("case_id") or case_id_from_path(c["image"])) for c in cases]
    for case, case_id in zip(cases, unique_case_ids(names)):
        case["case_id"] = case_id
    return cases


def load_cases(
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """The cases of a run: from ``datalist`` when given, else discovered in ``dataset_dir``.

    Raises:
        ValueError: neither is given, or no case was found.
    """
    if datalist:
        cases = cases_from_datalist(datalist, split=split)
        source = datalist
    elif dataset_dir:
        cases = discover_cases(dataset_dir)
        source = dataset_dir
    else:
        raise ValueError("give a folder of volumes (dataset_dir) or a datalist file")
    if not cases:
        raise ValueError(f"{source}: no CT volumes found (.nii, .nii.gz, .mhd files or DICOM series folders)")
    return cases
