"""Decathlon-style data lists: load one split and check it before any training starts.

A data list is a JSON file ``{"training": [...], "validation": [...], "test": [...]}`` whose
items are ``{"image": path, "label": 0 | 1, "slice_labels": [0, 1, ...]}`` (``slice_labels``
optional: one 0/1 per axial slice, in the volume's slice order). ``image`` is a NIfTI or
MetaImage file or a DICOM series folder, relative to the data folder or absolute. An item may
name a voxel mask of its lesions (``"lesion"``: a file on the image's grid, non-zero in lesions),
which evaluation uses to measure how well the heatmaps point at the lesions.

:func:`load_datalist` reads a split and runs :func:`check_datalist`, which collects every
problem (missing files, unreadable headers, truncated files, DICOM series that are not CT,
labels outside {0, 1}, slice labels of the wrong length, ...) and raises one
:class:`DatalistError` that lists them all. Slice counts come from the image headers (nibabel,
ITK); :func:`check_image_file` reads voxel data only of floating-point NIfTI files (integer CT
cannot hold NaN) and of compressed files whose size field disagrees with their header.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LESION_KEY",
    "DatalistError",
    "axial_axis",
    "axial_slice_count",
    "check_datalist",
    "check_image_file",
    "class_balance_weights",
    "load_datalist",
]

logger = logging.getLogger(__name__)

LABELS = (0, 1)
LESION_KEY = "lesion"
"""Item key of the optional lesion mask (resolved like ``image``)."""
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SERIES_RESTRICTION = "0008|0021"  # series date: how MONAI's ITKReader tells series apart
DICOM_MODALITY_TAG = "0008|0060"
CT_MODALITY = "CT"
_READ_CHUNK = 1 << 22


class DatalistError(ValueError):
    """A data list that cannot be used; the message lists every problem found."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''} in the data list:\n{listing}")


def axial_axis(directions: np.ndarray) -> int:
    """Index of the voxel axis that runs most nearly head-feet, from 3 direction columns."""
    return int(np.argmax(np.abs(np.asarray(directions, dtype=float)[2, :3])))


def _nifti_slice_count(path: Path) -> int:
    import nibabel as nib

    image = nib.load(os.fspath(path))
    shape = image.header.get_data_shape()
    if len(shape) < 3:
        raise ValueError(f"a 2D image (shape {tuple(shape)}), not a CT volume")
    return int(shape[axial_axis(image.affine[:3, :3])])


def _itk_file_slice_count(path: Path) -> int:
    import itk

    image_io = itk.ImageIOFactory.CreateImageIO(os.fspath(path), itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise ValueError("not an image format ITK can read")
    image_io.SetFileName(os.fspath(path))
    image_io.ReadImageInformation()
    ndim = image_io.GetNumberOfDimensions()
    shape = [image_io.GetDimensions(axis) for axis in range(ndim)]
    if ndim < 3:
        raise ValueError(f"a 2D image (shape {tuple(shape)}), not a CT volume")
    directions = np.array([image_io.GetDirection(axis)[:3] for axis in range(3)]).T
    return int(shape[axial_axis(directions)])


def _dicom_series_files(folder: Path, series_uid: str | None) -> list[str]:
    """The files of the one DICOM series of ``folder`` (or of the series ``series_uid``)."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction(DICOM_SERIES_RESTRICTION)
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(os.fspath(folder))
    series = [str(uid) for uid in names.GetSeriesUIDs()]
    if not series:
        raise ValueError("a folder without a readable DICOM series")
    if series_uid is None:
        if len(series) > 1:
            raise ValueError(f"a folder with {len(series)} DICOM series: name one under 'series_uid'")
        series_uid = series[0]
    elif series_uid not in series:
        raise ValueError(f"no DICOM series {series_uid!r} in the folder")
    return [str(name) for name in names.GetFileNames(series_uid)]


def _dicom_slice_count(folder: Path, series_uid: str | None) -> int:
    return len(_dicom_series_files(folder, series_uid))


def _dicom_modality(file: str) -> str | None:
    """The Modality tag of one DICOM file, or ``None`` when it has none."""
    import itk

    image_io = itk.GDCMImageIO.New()
    image_io.SetFileName(file)
    image_io.ReadImageInformation()
    found, value = image_io.GetValueFromTag(DICOM_MODALITY_TAG, "")
    return (str(value).strip() or None) if found else None


def _check_compressed_size(path: Path, expected: int) -> None:
    """Raise ``ValueError`` when the gzip file ``path`` does not hold ``expected`` bytes, complete.

    The gzip trailer records the uncompressed size (modulo 2**32); when it matches the header's
    size nothing else is read. Otherwise (a truncated file's last bytes are arbitrary data, or
    a file of several gzip members) the whole stream is decompressed to find out.
    """
    with path.open("rb") as stream:
        stream.seek(-4, os.SEEK_END)
        (recorded,) = struct.unpack("<I", stream.read(4))
    if recorded == expected % (1 << 32):
        return
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_READ_CHUNK):
                size += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"truncated or corrupt compressed file ({error})") from None
    if size < expected:
        raise ValueError(
            f"truncated file: {size} bytes of image data and header, the header needs {expected}"
        )


def _check_nifti_file(path: Path) -> None:
    import nibabel as nib

    image = nib.load(os.fspath(path))
    header = image.header
    dtype = header.get_data_dtype()
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * dtype.itemsize
    if path.name.lower().endswith(".gz"):
        _check_compressed_size(path, expected)
    elif path.stat().st_size < expected:
        raise ValueError(f"truncated file: {path.stat().st_size} bytes, the header needs {expected}")
    if np.issubdtype(dtype, np.floating):  # ITK's NIfTI reader turns NaN into 0: look before it does
        data = np.asarray(image.dataobj)
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise ValueError(f"{bad} voxels are NaN or infinite")


def check_image_file(path: str | os.PathLike, series_uid: str | None = None) -> None:
    """Check what an image header cannot tell about a file: complete data, finite values, CT modality.

    - NIfTI (``.nii``, ``.nii.gz``): the file holds all the voxel data its header describes (a
      truncated ``.nii.gz`` otherwise loads with zeros in place of the missing voxels), and a
      floating-point file holds no NaN or infinite voxel (ITK's reader would turn them into 0).
    - DICOM series folder: the series' Modality tag, when present, is ``CT``.
    - Other formats pass.

    Args:
        path: the image file or DICOM series folder.
        series_uid: which series of a DICOM folder holding several.

    Raises:
        ValueError: naming the problem (the caller adds the file name).
    """
    path = Path(path)
    try:
        if path.is_dir():
            files = _dicom_series_files(path, series_uid)
            modality = _dicom_modality(files[0]) if files else None
            if modality is not None and modality.upper() != CT_MODALITY:
                raise ValueError(f"a DICOM series of modality {modality!r}, not CT")
        elif path.name.lower().endswith(NIFTI_SUFFIXES):
            _check_nifti_file(path)
    except ValueError:
        raise
    except Exception as error:  # nibabel and ITK raise many types for broken files
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"unreadable file ({message[:200]})") from error


def axial_slice_count(path: str | os.PathLike, series_uid: str | None = None) -> int:
    """Number of axial slices of a volume, read from its header only.

    Args:
        path: NIfTI or MetaImage (or other ITK-readable) file, or a DICOM series folder.
        series_uid: which series of a DICOM folder holding several.

    Returns:
        The size of the voxel axis closest to the head-feet direction.

    Raises:
        ValueError: the header cannot be read, or it is a 2D image.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return _dicom_slice_count(path, series_uid)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return _nifti_slice_count(path)
        return _itk_file_slice_count(path)
    except ValueError:
        raise
    except Exception as error:  # nibabel and ITK raise many types for broken files
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"unreadable header ({message[:200]})") from error


def _is_label(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in LABELS


def _check_item(
    item: Any, where: str, base_dir: Path, require_label: bool, read_headers: bool
) -> tuple[dict | None, list[str]]:
    """Check one item; return it with its image path resolved (or None) and its problems."""
    if not isinstance(item, Mapping):
        return None, [f"{where}: expected an object with 'image' and 'label', got {type(item).__name__}"]
    image = item.get("image")
    if not isinstance(image, str) or not image:
        return None, [f"{where}: no 'image' path"]
    path = Path(os.path.abspath(base_dir / image))
    where = f"{where} ({image})"
    problems = []

    label = item.get("label")
    if label is None:
        if require_label:
            problems.append(f"{where}: no 'label' (0 or 1)")
    elif not _is_label(label):
        problems.append(f"{where}: label {label!r} is not 0 or 1")

    slice_labels = item.get("slice_labels")
    if slice_labels is not None:
        if not isinstance(slice_labels, list) or not all(_is_label(v) for v in slice_labels):
            problems.append(f"{where}: slice_labels must be a list of 0 and 1")
            slice_labels = None
        elif label == 0 and any(slice_labels):
            problems.append(f"{where}: label 0 but {sum(slice_labels)} slice labels are 1")

    resolved = {**item, "image": os.fspath(path)}
    lesion = item.get(LESION_KEY)
    if lesion is not None:
        if not isinstance(lesion, str) or not lesion:
            problems.append(f"{where}: '{LESION_KEY}' must be the path of a lesion mask")
        elif not (lesion_path := Path(os.path.abspath(base_dir / lesion))).exists():
            problems.append(f"{where}: lesion mask not found: {lesion_path}")
        else:
            resolved[LESION_KEY] = os.fspath(lesion_path)
    if not path.exists():
        problems.append(f"{where}: file not found: {path}")
    elif read_headers:
        try:
            slices = axial_slice_count(path, item.get("series_uid"))
            check_image_file(path, item.get("series_uid"))
        except ValueError as error:
            problems.append(f"{where}: {error}")
        else:
            if slice_labels is not None and len(slice_labels) != slices:
                problems.append(f"{where}: {len(slice_labels)} slice labels for {slices} axial slices")
    return resolved, problems


def check_datalist(
    items: Any,
    base_dir: str | os.PathLike,
    split: str = "items",
    source: str = "data list",
    require_labels: bool = True,
    read_headers: bool = True,
) -> list[dict]:
    """Check the items of one split and resolve their image paths.

    Args:
        items: the split's list of items.
        base_dir: folder that relative image paths start from.
        split: split name, for the messages.
        source: the data list's name, for the messages.
        require_labels: every item needs a volume ``label``.
        read_headers: read each image header (catches unreadable files, 2D images and
            slice labels whose length differs from the slice count) and run
            :func:`check_image_file` (truncated NIfTI, NaN voxels, DICOM series not CT).

    Returns:
        The items with absolute image paths (other fields unchanged).

    Raises:
        DatalistError: listing every problem of every item.
    """
    if not isinstance(items, list):
        raise DatalistError(source, [f"'{split}' must be a list of items, got {type(items).__name__}"])
    if not items:
        raise DatalistError(source, [f"'{split}' has no items"])
    base = Path(base_dir)
    checked, problems = [], []
    for index, item in enumerate(items):
        resolved, found = _check_item(item, f"{split}[{index}]", base, require_labels, read_headers)
        problems.extend(found)
        if resolved is not None:
            checked.append(resolved)
    # one DICOM folder may hold several series, each an item of its own
    images = Counter((item["image"], item.get("series_uid")) for item in checked)
    problems.extend(
        f"{split}: {path}{f' (series {series})' if series else ''} is listed {n} times"
        for (path, series), n in images.items()
        if n > 1
    )
    if problems:
        raise DatalistError(source, problems)
    classes = Counter(item.get("label") for item in checked)
    if require_labels and len(classes) < 2:
        logger.warning("%s: every item of '%s' has label %s", source, split, next(iter(classes)))
    return checked


def load_datalist(
    datalist: str | os.PathLike,
    split: str = "training",
    base_dir: str | os.PathLike | None = None,
    require_labels: bool = True,
    read_headers: bool = True,
) -> list[dict]:
    """Read one split of a data list JSON file and check it (see :func:`check_datalist`).

    Args:
        datalist: the JSON file.
        split: ``"training"``, ``"validation"``, ``"test"`` or another key of the file.
        base_dir: folder that relative image paths start from; default: the file's folder.
        require_labels: every item needs a volume ``label``.
        read_headers: read each image header to check it and its slice count.

    Returns:
        The split's items with absolute image paths.

    Raises:
        DatalistError: the file is missing or not JSON, the split is absent, or items have
            problems (all of them listed).
    """
    path = Path(datalist)
    source = os.fspath(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatalistError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatalistError(source, [f"not a readable JSON file ({error})"]) from None
    if not isinstance(content, Mapping):
        raise DatalistError(source, [f"expected an object of splits, got {type(content).__name__}"])
    if split not in content:
        splits = ", ".join(map(str, content)) or "none"
        raise DatalistError(source, [f"no split '{split}' (splits: {splits})"])
    return check_datalist(
        content[split],
        path.parent if base_dir is None else base_dir,
        split=split,
        source=source,
        require_labels=require_labels,
        read_headers=read_headers,
    )


def class_balance_weights(items: Sequence[Mapping[str, Any]], label_key: str = "label") -> list[float]:
    """Sampling weights that make every class equally likely: ``1 / (count of the item's class)``.

    Used with ``WeightedRandomSampler`` so the few positive volumes are drawn as often as the
    many negative ones.
    """
    counts = Counter(item[label_key] for item in items)
    return [1.0 / counts[item[label_key]] for item in items]
