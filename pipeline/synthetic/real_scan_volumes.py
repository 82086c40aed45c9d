"""Demo volumes made from a real chest CT: lesions inserted into its lungs.

Each volume is the scan resampled to the requested grid over its lung range, with a random
left-right flip, shift, crop, z-window and extra noise; a positive volume then gets lesions
(:mod:`pipeline.synthetic.lesions`) inside the scan's lungs. A positive volume and its lesion-free twin
(``with_lesions=False``) share augmentation and noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage, Orientation
from scipy import ndimage

from pipeline.synthetic.demo_volume import HU_RANGE, DemoVolume, to_int16, volume_streams
from pipeline.synthetic.lesions import LesionSettings, insert_lesions
from pipeline.synthetic.phantom import add_scanner_noise
from transforms.lung_mask import segment_lungs
from transforms.validation import InvalidVolumeError, check_hu

__all__ = ["BaseScan", "load_base_scan", "make_base_volume"]

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
        lesion_settings: lesion parameters (defaults: :class:`pipeline.synthetic.lesions.LesionSettings`).

    Returns:
        The volume with its lesion and lung masks (no tissue labels).
    """
    augment_rng, lesion_rng, noise_rng = volume_streams(seed, label, index)
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
        hu=to_int16(hu), affine=affine, lesions=lesions, lungs=lungs, tissue=None, label=int(label)
    )
