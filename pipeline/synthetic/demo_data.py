"""Demo data: chest CT volumes with and without COVID-19-like lesions, exact slice labels, a datalist.

Two sources of volumes:

* synthetic chest phantoms (:mod:`pipeline.synthetic.phantom`) with scanner noise;
* a real CT scan (``base_ct``, :mod:`pipeline.synthetic.real_scan_volumes`): each volume is the scan
  resampled to the requested grid over its lung range, with random left-right flip, shift,
  crop, z-window and extra noise.

Positive volumes get lesions (:mod:`pipeline.synthetic.lesions`) inside the lungs; ``slice_labels[k]`` is 1
exactly when slice ``k`` holds a lesion voxel. Volumes are NIfTI files in HU (int16) whose
affine MONAI's ``LoadImage(reader="ITKReader")`` reads back unchanged: axes run to the
patient's left, back and head (LPS), axial slices last.

Every volume draws from its own random streams, derived from ``(seed, label, index)``: a volume
does not depend on how many others are made or in which order. A positive volume and its
lesion-free twin (``with_lesions=False``) share anatomy, augmentation and noise.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.data.atomic_files import atomic_write_bytes
from pipeline.data.collections import split_patients
from pipeline.data.datalist import LESION_KEY
from pipeline.data.nifti_files import write_nifti
from pipeline.synthetic.demo_volume import DemoVolume, to_int16, volume_streams
from pipeline.synthetic.lesions import LesionSettings, insert_lesions
from pipeline.synthetic.phantom import (
    PHANTOM_Z_FOV_MM,
    add_scanner_noise,
    make_chest_phantom,
    phantom_spacing,
)
from pipeline.synthetic.real_scan_volumes import BaseScan, load_base_scan, make_base_volume

__all__ = [
    "DATALIST_NAME",
    "BaseScan",
    "DemoVolume",
    "load_base_scan",
    "make_base_volume",
    "make_demo_data",
    "make_phantom_volume",
    "split_volumes",
]

DATALIST_NAME = "datalist.json"
IMAGES_DIR = "images"
LESIONS_DIR = "lesions"
SCANNER_NOISE_HU = (10.0, 20.0)
"""Standard deviation of a phantom's scanner noise."""


def _lps_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS affine of an LPS-ordered grid centred on the origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.asarray(shape, dtype=float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def make_phantom_volume(
    label: int,
    index: int,
    *,
    size: int = 128,
    slices: int = 32,
    seed: int = 0,
    with_lesions: bool = True,
    lesion_settings: LesionSettings | None = None,
) -> DemoVolume:
    """Make the synthetic volume number ``index`` of class ``label``.

    Args:
        label: 1 for a positive (with lesions), 0 for a negative.
        index: number of the volume within its class.
        size: in-plane size in pixels (field of view :data:`pipeline.synthetic.phantom.PHANTOM_FOV_MM`).
        slices: number of axial slices.
        seed: seed of the whole data set.
        with_lesions: ``False`` gives a positive's lesion-free twin (same anatomy and noise).
        lesion_settings: lesion parameters (defaults: :class:`pipeline.synthetic.lesions.LesionSettings`).

    Returns:
        The volume, its lesion and lung masks and its tissue labels.
    """
    anatomy_rng, lesion_rng, noise_rng = volume_streams(seed, label, index)
    phantom = make_chest_phantom(size, slices, anatomy_rng)
    hu, lesions = phantom.hu, np.zeros(phantom.hu.shape, dtype=bool)
    if label and with_lesions:
        inserted = insert_lesions(phantom.hu, phantom.lungs, phantom.spacing, lesion_rng, lesion_settings)
        hu, lesions = inserted.hu, inserted.mask
    hu = add_scanner_noise(hu, noise_rng.uniform(*SCANNER_NOISE_HU), noise_rng)
    return DemoVolume(
        hu=to_int16(hu),
        affine=_lps_affine(phantom.spacing, hu.shape),
        lesions=lesions,
        lungs=phantom.lungs,
        tissue=phantom.tissue,
        label=int(label),
    )


def split_volumes(
    n_positive: int,
    n_negative: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    unit: str = "volumes",
) -> dict[str, dict[int, list[int]]]:
    """Assign volume indices of each class to the training, validation and test splits.

    Each class is split on its own (shuffled with ``seed``), so every split holds both classes.
    ``unit`` names what is split in the error message (``"patients"`` for a collection).

    Returns:
        ``{split: {label: [indices]}}`` for the splits ``training``, ``validation`` and ``test``.

    Raises:
        ValueError: fractions outside (0, 1) or summing to 1 or more, or a class with too few
            volumes for one in each split.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must lie in (0, 1) "
            "and sum to less than 1"
        )
    for count, name in ((n_positive, "positive"), (n_negative, "negative")):
        n_val = max(1, round(val_fraction * count))
        n_test = max(1, round(test_fraction * count))
        n_train = count - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"{count} {name} {unit} cannot fill the training, validation and test splits "
                f"({n_val} validation and {n_test} test {unit} leave {n_train} for training): "
                f"make at least {n_val + n_test + 1}"
            )
    return split_patients(n_positive, n_negative, val_fraction, test_fraction, seed)


def _image_name(label: int, index: int) -> str:
    return f"{IMAGES_DIR}/{'positive' if label else 'negative'}_{index:03d}.nii.gz"


def make_demo_data(
    out_dir: str | os.PathLike,
    n_positive: int = 8,
    n_negative: int = 16,
    size: int = 128,
    slices: int = 32,
    seed: int = 0,
    base_ct: str | os.PathLike | BaseScan | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    lesion_settings: LesionSettings | None = None,
    workers: int = 1,
) -> Path:
    """Write demo chest CT volumes, a decathlon-style ``datalist.json`` and a ``README.txt``.

    Volumes go to ``out_dir/images/{positive,negative}_NNN.nii.gz``, the lesion masks of the
    positives (uint8, 1 in lesion voxels, on the volume's grid) to
    ``out_dir/lesions/positive_NNN.nii.gz``. The datalist holds the splits ``training``,
    ``validation`` and ``test``, each item ``{"image": relative path, "label": 0 | 1,
    "slice_labels": [0 | 1 per axial slice]}``, positives with ``"lesion": relative path`` too
    (evaluation only: training never reads it); every split holds both classes.
    Every file is written atomically; the same arguments give the same bytes.

    Args:
        out_dir: output folder (created when missing).
        n_positive: number of volumes with lesions.
        n_negative: number of volumes without.
        size: in-plane size in pixels.
        slices: number of axial slices.
        seed: seed of the whole data set.
        base_ct: a real chest CT (NIfTI file or DICOM series folder, in HU) to build the volumes
            from instead of synthetic phantoms, or one already prepared by :func:`load_base_scan`
            for this ``size`` and ``slices``.
        val_fraction: fraction of each class in the validation split.
        test_fraction: fraction of each class in the test split.
        lesion_settings: lesion parameters (defaults: :class:`pipeline.synthetic.lesions.LesionSettings`).
        workers: processes making the volumes (the bytes written do not depend on it).

    Returns:
        The path of ``datalist.json``.

    Raises:
        ValueError: too few volumes for both classes in every split, or a size too small.
    """
    if size < 16 or slices < 8:
        raise ValueError(f"size must be at least 16 and slices at least 8, got size={size}, slices={slices}")
    splits = split_volumes(n_positive, n_negative, val_fraction, test_fraction, seed)
    out_dir = Path(out_dir)
    if isinstance(base_ct, BaseScan):
        if (base_ct.size, base_ct.slices) != (size, slices):
            raise ValueError(
                f"the base scan was prepared for {base_ct.size} x {base_ct.size} x {base_ct.slices}, "
                f"not {size} x {size} x {slices}"
            )
        base = base_ct
    else:
        base = load_base_scan(base_ct, size, slices) if base_ct is not None else None

    jobs = [(label, index) for label, count in ((1, n_positive), (0, n_negative)) for index in range(count)]
    write = functools.partial(
        _write_volume,
        out_dir,
        base=base,
        size=size,
        slices=slices,
        seed=seed,
        lesion_settings=lesion_settings,
    )
    if workers > 1 and len(jobs) > 1:
        # every volume has its own random streams, so the order of making them changes no byte
        with ProcessPoolExecutor(max_workers=workers) as pool:
            made = list(pool.map(write, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        made = [write(job) for job in jobs]
    items = dict(zip(jobs, made))

    datalist = {
        split: [items[label, index] for label in (1, 0) for index in by_label[label]]
        for split, by_label in splits.items()
    }
    datalist_path = out_dir / DATALIST_NAME
    atomic_write_bytes(datalist_path, _datalist_json(datalist).encode())
    readme = _readme(datalist, size, slices, seed, base, lesion_settings or LesionSettings())
    atomic_write_bytes(out_dir / "README.txt", readme.encode())
    return datalist_path


def _write_volume(
    out_dir: Path,
    job: tuple[int, int],
    base: BaseScan | None,
    size: int,
    slices: int,
    seed: int,
    lesion_settings: LesionSettings | None,
) -> dict:
    """Make and write volume ``index`` of class ``label`` (``job``); returns its datalist item."""
    label, index = job
    if base is None:
        volume = make_phantom_volume(
            label, index, size=size, slices=slices, seed=seed, lesion_settings=lesion_settings
        )
    else:
        volume = make_base_volume(base, label, index, seed=seed, lesion_settings=lesion_settings)
    name = _image_name(label, index)
    write_nifti(out_dir / name, volume.hu, volume.affine)
    item = {"image": name, "label": label, "slice_labels": volume.slice_labels}
    if label:
        lesion_name = name.replace(IMAGES_DIR, LESIONS_DIR, 1)
        write_nifti(out_dir / lesion_name, volume.lesions, volume.affine, dtype=np.uint8)
        item[LESION_KEY] = lesion_name
    return item


def _datalist_json(datalist: dict[str, list[dict]]) -> str:
    """JSON text of a datalist with one line per item."""
    splits = [
        f"  {json.dumps(split)}: [\n" + ",\n".join(f"    {json.dumps(item)}" for item in items) + "\n  ]"
        for split, items in datalist.items()
    ]
    return "{\n" + ",\n".join(splits) + "\n}\n"


def _readme(
    datalist: dict, size: int, slices: int, seed: int, base: BaseScan | None, settings: LesionSettings
) -> str:
    counts = {
        split: (sum(item["label"] for item in items), sum(1 - item["label"] for item in items))
        for split, items in datalist.items()
    }
    if base is None:
        sx, _, sz = phantom_spacing(size, slices)
        source = (
            "synthetic chest CT phantoms (body, fat, muscle, ribs, spine, table, mediastinum and heart,\n"
            "lungs with vessels and dependent density), with scanner noise of "
            f"{SCANNER_NOISE_HU[0]:g}-{SCANNER_NOISE_HU[1]:g} HU;\n"
            f"voxel size {sx:.3g} x {sx:.3g} x {sz:.3g} mm "
            f"({PHANTOM_Z_FOV_MM:g} mm from upper abdomen to lung apices)"
        )
    else:
        source = (
            f"the real chest CT {Path(base.source).name}, resampled over its lung range (slices "
            f"{base.lung_range[0]}-{base.lung_range[1]}),\nwith random left-right flip, shift, crop, "
            "z-window and extra noise per volume; voxel size varies slightly per volume"
        )
    lines = [
        "Demo chest CT data for COVID-19 detection with slice attention.",
        "",
        "Made by: python -m pipeline make-demo-data",
        f"Seed: {seed}",
        f"Volumes: {size} x {size} pixels, {slices} axial slices (last axis), "
        "NIfTI int16 in Hounsfield units,",
        "axes towards the patient's left, back and head (LPS).",
        f"Source: {source}.",
        "",
        "Splits (positive / negative):",
        *(f"  {split}: {pos} / {neg}" for split, (pos, neg) in counts.items()),
        "",
        "Positive volumes carry COVID-19-like lesions: peripheral ground-glass opacities "
        f"({settings.ground_glass_hu[0]:g} to {settings.ground_glass_hu[1]:g} HU at the core, soft edges),",
        f"{settings.consolidation_probability:.0%} of them with a consolidated core "
        f"({settings.consolidation_hu[0]:g} to {settings.consolidation_hu[1]:g} HU), "
        f"{settings.diameter_mm[0]:g}-{settings.diameter_mm[1]:g} mm across (smaller in volumes with "
        f"fewer diseased slices), {settings.length_mm[0]:g}-{settings.length_mm[1]:g} mm long,",
        "more often in the lower and posterior lung. The share of slices a positive volume's lesions",
        "touch is drawn to match the expert-masked mild COVID-19 CT of MosMedData (CT-1): "
        + ", ".join(f"{share:.0%} at quantile {level:g}" for level, share in settings.extent_quantiles)
        + ",",
        "rounded to whole slices, at least one.",
        f"A lesion voxel is a lung voxel that a lesion raises by at least {settings.min_rise_hu:g} HU;",
        "slice_labels[k] in datalist.json is 1 exactly when slice k holds lesion voxels;",
        "lesions/positive_NNN.nii.gz holds each positive volume's lesion voxels (1) on its grid.",
        "Negative volumes have no lesions.",
        "",
    ]
    return "\n".join(lines)
