"""Demo data: chest CT volumes with and without COVID-19-like lesions, exact slice labels, a datalist.

Two sources of volumes:

* synthetic chest phantoms (:mod:`pipeline.phantom`) with scanner noise;
* a real CT scan (``base_ct``): each volume is the scan resampled to the requested grid over
  its lung range, with random left-right flip, shift, crop, z-window and extra noise.

Positive volumes get lesions (:mod:`pipeline.lesions`) inside the lungs; ``slice_labels[k]`` is 1
exactly when slice ``k`` holds a lesion voxel. Volumes are NIfTI files in HU (int16) whose
affine MONAI's ``LoadImage(reader="ITKReader")`` reads back unchanged: axes run to the
patient's left, back and head (LPS), axial slices last.

Every volume draws from its own random streams, derived from ``(seed, label, index)``: a volume
does not depend on how many others are made or in which order. A positive volume and its
lesion-free twin (``with_lesions=False``) share anatomy, augmentation and noise.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage, Orientation
from scipy import ndimage

from pipeline.checkpoint_io import atomic_write_bytes
from pipeline.lesions import LesionSettings, insert_lesions, slice_labels
from pipeline.phantom import PHANTOM_Z_FOV_MM, add_scanner_noise, make_chest_phantom, phantom_spacing
from transforms.lung_mask import segment_lungs
from transforms.validation import InvalidVolumeError, check_hu

__all__ = [
    "DATALIST_NAME",
    "BaseScan",
    "DemoVolume",
    "load_base_scan",
    "make_base_volume",
    "make_demo_data",
    "make_phantom_volume",
    "split_volumes",
    "write_nifti",
]

DATALIST_NAME = "datalist.json"
IMAGES_DIR = "images"
HU_RANGE = (-1024, 3071)
"""HU stored in the int16 volumes (the usual 12-bit CT range)."""
SCANNER_NOISE_HU = (10.0, 20.0)
"""Standard deviation of a phantom's scanner noise."""
BASE_EXTRA_NOISE_HU = (0.0, 12.0)
"""Standard deviation of the noise added on top of the real scan's own."""
BASE_SHIFT_FRACTION = 0.04
"""Largest in-plane shift of the real scan, as a fraction of the image size."""
BASE_CROP_FRACTION = 0.08
"""Largest in-plane crop of the real scan's field of view (the rest is resampled to ``size``)."""
BASE_Z_JITTER_MM = 10.0
"""Largest change of either end of the real scan's lung range before resampling to ``slices``."""
LUNG_SLICE_FRACTION = 0.05
"""A slice of the real scan belongs to the lung range when its lung area is this fraction of the largest."""
SEGMENTATION_PIXEL_MM = 1.6
"""The real scan's lungs are segmented on a grid of about this pixel size (block averages)."""


@dataclass(frozen=True)
class DemoVolume:
    """One generated volume.

    Attributes:
        hu: (H, W, D) int16 Hounsfield units, axial slices last.
        affine: 4 x 4 voxel-to-world matrix in RAS, as MONAI and NIfTI use it.
        lesions: (H, W, D) bool lesion voxels (all False for a negative).
        lungs: (H, W, D) bool lung mask the lesions were confined to.
        tissue: (H, W, D) uint8 :class:`pipeline.phantom.Tissue` labels (phantoms only).
        label: 1 for a volume made with lesions, else 0.
    """

    hu: np.ndarray
    affine: np.ndarray
    lesions: np.ndarray
    lungs: np.ndarray
    tissue: np.ndarray | None
    label: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def slice_labels(self) -> list[int]:
        """1 for each axial slice holding a lesion voxel, else 0."""
        return slice_labels(self.lesions)


def _streams(seed: int, label: int, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for one volume's anatomy (or augmentation), lesions and noise."""
    sequence = np.random.SeedSequence(seed, spawn_key=(int(label), int(index)))
    return tuple(np.random.default_rng(child) for child in sequence.spawn(3))


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)


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
        size: in-plane size in pixels (field of view :data:`pipeline.phantom.PHANTOM_FOV_MM`).
        slices: number of axial slices.
        seed: seed of the whole data set.
        with_lesions: ``False`` gives a positive's lesion-free twin (same anatomy and noise).
        lesion_settings: lesion parameters (defaults: :class:`pipeline.lesions.LesionSettings`).

    Returns:
        The volume, its lesion and lung masks and its tissue labels.
    """
    anatomy_rng, lesion_rng, noise_rng = _streams(seed, label, index)
    phantom = make_chest_phantom(size, slices, anatomy_rng)
    hu, lesions = phantom.hu, np.zeros(phantom.hu.shape, dtype=bool)
    if label and with_lesions:
        inserted = insert_lesions(phantom.hu, phantom.lungs, phantom.spacing, lesion_rng, lesion_settings)
        hu, lesions = inserted.hu, inserted.mask
    hu = add_scanner_noise(hu, noise_rng.uniform(*SCANNER_NOISE_HU), noise_rng)
    return DemoVolume(
        hu=_to_int16(hu),
        affine=_lps_affine(phantom.spacing, hu.shape),
        lesions=lesions,
        lungs=phantom.lungs,
        tissue=phantom.tissue,
        label=int(label),
    )


@dataclass(frozen=True)
class BaseScan:
    """A real CT scan prepared for resampling to ``size`` x ``size`` x ``slices`` volumes.

    Attributes:
        hu: (H, W, D) float32 HU, LPS-ordered, low-pass filtered for the target grid.
        lungs: (H, W, D) float32 lung mask (0..1) of the scan, filtered alike.
        affine: RAS affine of ``hu``.
        lung_range: first and last slice (inclusive) of the lung range.
        size: in-plane size of the volumes to make.
        slices: number of slices of the volumes to make.
        source: where the scan was read from.
    """

    hu: np.ndarray
    lungs: np.ndarray
    affine: np.ndarray
    lung_range: tuple[int, int]
    size: int
    slices: int
    source: str

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size of the scan in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def load_base_scan(path: str | os.PathLike, size: int = 128, slices: int = 32) -> BaseScan:
    """Read a chest CT (NIfTI file or DICOM series folder, in HU) and segment its lungs.

    The scan is read with MONAI's ``LoadImage(reader="ITKReader")`` and reoriented to LPS. Its
    lungs come from :func:`transforms.lung_mask.segment_lungs` (undilated), run on in-plane
    block averages of about :data:`SEGMENTATION_PIXEL_MM`. Image and mask are then low-pass
    filtered for the ``size`` x ``size`` x ``slices`` grid of the volumes made from them.

    Args:
        path: the scan.
        size: in-plane size of the volumes to make.
        slices: number of slices of the volumes to make.

    Returns:
        The prepared scan.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidVolumeError: the scan is not a CT volume in HU.
        NoLungFoundError: no lungs were found in it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"base CT not found: {path}")
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(os.fspath(path))
    image = Orientation(axcodes="LPS", labels=None)(image)
    name = os.fspath(path)
    if image.ndim != 4 or min(image.shape[1:]) < 2:
        raise InvalidVolumeError(f"{name}: expected a 3D CT volume, got shape {tuple(image.shape[1:])}")
    check_hu(image, name)
    hu = np.clip(image[0].numpy().astype(np.float32), *HU_RANGE)
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)

    lungs = _segment_lungs_coarse(hu, spacing, name).astype(np.float32)
    area = lungs.sum(axis=(0, 1))
    in_range = np.flatnonzero(area >= LUNG_SLICE_FRACTION * area.max())
    lung_range = (int(in_range[0]), int(in_range[-1]))

    # Anti-aliasing for the target grid: in-plane block averages first (cheap), then a Gaussian
    # for the rest of the reduction.
    block = max(1, min(hu.shape[0], hu.shape[1]) // size // 2)
    hu, lungs, affine = (*(_block_average(v, block) for v in (hu, lungs)), _block_affine(affine, block))
    steps = (hu.shape[0] / size, hu.shape[1] / size, (lung_range[1] - lung_range[0] + 1) / slices)
    sigma = [0.4 * step if step > 1 else 0.0 for step in steps]
    return BaseScan(
        hu=ndimage.gaussian_filter(hu, sigma),
        lungs=ndimage.gaussian_filter(lungs, sigma),
        affine=affine,
        lung_range=lung_range,
        size=int(size),
        slices=int(slices),
        source=name,
    )


def _block_average(volume: np.ndarray, block: int) -> np.ndarray:
    """Means of ``block`` x ``block`` in-plane pixel blocks (the remainder rows are dropped)."""
    if block == 1:
        return volume
    h, w = volume.shape[0] // block, volume.shape[1] // block
    return volume[: h * block, : w * block].reshape(h, block, w, block, -1).mean(axis=(1, 3))


def _block_affine(affine: np.ndarray, block: int) -> np.ndarray:
    """Affine of :func:`_block_average`'s output: block ``i`` centres on ``block * i + (block - 1) / 2``."""
    scale = np.eye(4)
    scale[0, 0] = scale[1, 1] = block
    scale[0, 3] = scale[1, 3] = (block - 1) / 2
    return affine @ scale


def _segment_lungs_coarse(hu: np.ndarray, spacing: np.ndarray, name: str) -> np.ndarray:
    """Lung mask of the full scan, segmented on in-plane block averages."""
    factor = max(1, round(SEGMENTATION_PIXEL_MM / float(min(spacing[:2]))))
    mask = segment_lungs(
        _block_average(hu, factor),
        (spacing[0] * factor, spacing[1] * factor, spacing[2]),
        dilation_mm=0.0,
        name=name,
    )
    full = np.zeros(hu.shape, dtype=bool)
    full[: mask.shape[0] * factor, : mask.shape[1] * factor] = mask.repeat(factor, axis=0).repeat(
        factor, axis=1
    )
    return full


def make_base_volume(
    base: BaseScan,
    label: int,
    index: int,
    *,
    seed: int = 0,
    with_lesions: bool = True,
    lesion_settings: LesionSettings | None = None,
) -> DemoVolume:
    """Make volume number ``index`` of class ``label`` from a real scan.

    The scan's lung range, with each end moved by up to :data:`BASE_Z_JITTER_MM`, is resampled to
    ``base.slices`` slices; in plane, a square window cropped by up to :data:`BASE_CROP_FRACTION`
    is resampled to ``base.size`` pixels (the field of view stays about the scan's). The content
    is then flipped left-right (half of the volumes), shifted by up to :data:`BASE_SHIFT_FRACTION`
    of the size, given extra noise, and, for a positive, lesions inside the scan's lungs. The
    affine is that of the resampled grid; flip and shift move the patient, not the grid.

    Args:
        base: the prepared scan (:func:`load_base_scan`).
        label: 1 for a positive (with lesions), 0 for a negative.
        index: number of the volume within its class.
        seed: seed of the whole data set.
        with_lesions: ``False`` gives a positive's lesion-free twin.
        lesion_settings: lesion parameters (defaults: :class:`pipeline.lesions.LesionSettings`).

    Returns:
        The volume with its lesion and lung masks (no tissue labels).
    """
    augment_rng, lesion_rng, noise_rng = _streams(seed, label, index)
    size, slices = base.size, base.slices
    shape = base.hu.shape
    spacing = base.spacing

    # z window in continuous index units (slice k covers k - 0.5 .. k + 0.5).
    jitter = BASE_Z_JITTER_MM / spacing[2]
    z_low = max(base.lung_range[0] - 0.5 + augment_rng.uniform(-jitter, jitter), -0.5)
    z_high = min(base.lung_range[1] + 0.5 + augment_rng.uniform(-jitter, jitter), shape[2] - 0.5)
    crop = augment_rng.uniform(0, BASE_CROP_FRACTION)
    steps = np.array([shape[0] * (1 - crop) / size, shape[1] * (1 - crop) / size, (z_high - z_low) / slices])
    starts = np.array(
        [
            -0.5 + augment_rng.uniform(0, crop) * shape[0],
            -0.5 + augment_rng.uniform(0, crop) * shape[1],
            z_low,
        ]
    )
    flip = bool(augment_rng.random() < 0.5)
    shift = augment_rng.uniform(-BASE_SHIFT_FRACTION, BASE_SHIFT_FRACTION, size=2) * size

    # Where each output voxel samples the scan: the grid, then the patient flipped and shifted.
    i = np.arange(size, dtype=np.float64)
    source_i = (size - 1 - i) if flip else i
    axes = [
        starts[0] + (source_i - shift[0] + 0.5) * steps[0],
        starts[1] + (i - shift[1] + 0.5) * steps[1],
        starts[2] + (np.arange(slices) + 0.5) * steps[2],
    ]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    hu = ndimage.map_coordinates(base.hu, coords, order=1, mode="constant", cval=HU_RANGE[0])
    lungs = ndimage.map_coordinates(base.lungs, coords, order=1, mode="constant", cval=0.0) >= 0.5

    grid = np.eye(4)
    grid[:3, :3] = np.diag(steps)
    grid[:3, 3] = starts + 0.5 * steps
    affine = base.affine @ grid
    out_spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))

    lesions = np.zeros(hu.shape, dtype=bool)
    if label and with_lesions:
        inserted = insert_lesions(hu, lungs, out_spacing, lesion_rng, lesion_settings)
        hu, lesions = inserted.hu, inserted.mask
    extra = noise_rng.uniform(*BASE_EXTRA_NOISE_HU)
    hu = add_scanner_noise(hu, extra, noise_rng) if extra > 0 else hu
    return DemoVolume(
        hu=_to_int16(hu), affine=affine, lesions=lesions, lungs=lungs, tissue=None, label=int(label)
    )


def write_nifti(path: str | os.PathLike, hu: np.ndarray, affine: np.ndarray) -> Path:
    """Write an int16 HU volume as ``.nii.gz``, atomically and byte-for-byte reproducibly.

    Both the qform and the sform hold ``affine`` (RAS, as NIfTI defines it) with units of mm,
    so that nibabel and ITK read the same geometry. The gzip stream carries no time stamp or
    file name.

    Args:
        path: target file, ending in ``.nii.gz``.
        hu: (H, W, D) int16 volume.
        affine: 4 x 4 voxel-to-RAS matrix.

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"{path}: expected a .nii.gz file name")
    image = nib.Nifti1Image(np.asarray(hu, dtype=np.int16), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
    return path


def split_volumes(
    n_positive: int, n_negative: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, dict[int, list[int]]]:
    """Assign volume indices of each class to the training, validation and test splits.

    Each class is split on its own (shuffled with ``seed``), so every split holds both classes.

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
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    splits: dict[str, dict[int, list[int]]] = {"training": {}, "validation": {}, "test": {}}
    for label, count, name in ((1, n_positive, "positive"), (0, n_negative, "negative")):
        n_val = max(1, round(val_fraction * count))
        n_test = max(1, round(test_fraction * count))
        n_train = count - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"{count} {name} volumes cannot fill the training, validation and test splits "
                f"({n_val} validation and {n_test} test volumes leave {n_train} for training): "
                f"make at least {n_val + n_test + 1}"
            )
        order = rng.permutation(count)
        splits["validation"][label] = sorted(order[:n_val].tolist())
        splits["test"][label] = sorted(order[n_val : n_val + n_test].tolist())
        splits["training"][label] = sorted(order[n_val + n_test :].tolist())
    return splits


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
) -> Path:
    """Write demo chest CT volumes, a decathlon-style ``datalist.json`` and a ``README.txt``.

    Volumes go to ``out_dir/images/{positive,negative}_NNN.nii.gz``. The datalist holds the
    splits ``training``, ``validation`` and ``test``, each item ``{"image": relative path,
    "label": 0 | 1, "slice_labels": [0 | 1 per axial slice]}``; every split holds both classes.
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
        lesion_settings: lesion parameters (defaults: :class:`pipeline.lesions.LesionSettings`).

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

    items: dict[tuple[int, int], dict] = {}
    for label, count in ((1, n_positive), (0, n_negative)):
        for index in range(count):
            if base is None:
                volume = make_phantom_volume(
                    label, index, size=size, slices=slices, seed=seed, lesion_settings=lesion_settings
                )
            else:
                volume = make_base_volume(base, label, index, seed=seed, lesion_settings=lesion_settings)
            name = _image_name(label, index)
            write_nifti(out_dir / name, volume.hu, volume.affine)
            items[label, index] = {"image": name, "label": label, "slice_labels": volume.slice_labels}

    datalist = {
        split: [items[label, index] for label in (1, 0) for index in by_label[label]]
        for split, by_label in splits.items()
    }
    datalist_path = out_dir / DATALIST_NAME
    atomic_write_bytes(datalist_path, _datalist_json(datalist).encode())
    readme = _readme(datalist, size, slices, seed, base, lesion_settings or LesionSettings())
    atomic_write_bytes(out_dir / "README.txt", readme.encode())
    return datalist_path


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
        f"{settings.diameter_mm[0]:g}-{settings.diameter_mm[1]:g} mm across, in "
        f"{settings.slice_fraction[0]:.0%}-{settings.slice_fraction[1]:.0%} of the slices.",
        f"A lesion voxel is a lung voxel that a lesion raises by at least {settings.min_rise_hu:g} HU;",
        "slice_labels[k] in datalist.json is 1 exactly when slice k holds lesion voxels.",
        "Negative volumes have no lesions.",
        "",
    ]
    return "\n".join(lines)
