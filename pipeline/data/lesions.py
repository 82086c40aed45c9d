"""COVID-19-like lesions (ground-glass opacities, some with consolidation) inserted into CT lungs.

A *lesion voxel* is a voxel inside the lung mask whose HU a lesion raises by at least
:attr:`LesionSettings.min_rise_hu`. Smaller rises are dropped, so the volume changes exactly at the
lesion voxels and a slice's label (any lesion voxel in it) matches what the image shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["LesionSettings", "Lesions", "insert_lesions", "slice_labels"]


@dataclass(frozen=True)
class LesionSettings:
    """Size, density and placement of the synthetic lesions (ranges are sampled uniformly).

    The defaults give moderate, multifocal, mostly bilateral pneumonia: about 10 % to 30 % of
    the lung volume involved (1 % to 2 % with a single small lesion per volume, which left
    the volume label almost invisible at the demo's 64 x 64 pixels).

    Attributes:
        diameter_mm: in-plane diameter of one lesion.
        z_extent_ratio: cranio-caudal extent over in-plane diameter.
        ground_glass_hu: HU of a ground-glass opacity's core.
        texture_hu: standard deviation of the mottled texture inside a lesion.
        consolidation_probability: chance that a lesion has a consolidated core.
        consolidation_hu: HU of a consolidated core.
        consolidation_radius: radius of the consolidated core as a fraction of the lesion's.
        edge_fraction: outer fraction of the radius over which a lesion fades into the lung.
        irregularity: relative amplitude of the smooth random deformation of a lesion's outline.
        pleural_depth_mm: distance of a lesion's centre from the lung surface (peripheral lesions).
        bilateral_probability: chance that a volume's lesions are spread over both lungs.
        slice_fraction: fraction of the slices that carry lesion voxels in a positive volume.
        lesion_count: least number of lesions of a positive volume (COVID-19 pneumonia is
            usually multifocal); more are added until the drawn slice fraction is reached.
        min_rise_hu: a voxel is a lesion voxel when the lesion raises it by at least this much.
        min_slice_area_mm2: a lesion's cross-section smaller than this on a slice (its tapering
            tip) is dropped, so that no slice is labelled for a speck.
        min_slices: a lesion must show on at least this many adjacent slices, or it is discarded.
        max_attempts: lesions tried before giving up on reaching the drawn slice fraction.
    """

    diameter_mm: tuple[float, float] = (50.0, 110.0)
    z_extent_ratio: tuple[float, float] = (0.8, 1.4)
    ground_glass_hu: tuple[float, float] = (-550.0, -300.0)
    texture_hu: float = 35.0
    consolidation_probability: float = 0.4
    consolidation_hu: tuple[float, float] = (-80.0, 40.0)
    consolidation_radius: tuple[float, float] = (0.3, 0.55)
    edge_fraction: float = 0.35
    irregularity: float = 0.25
    pleural_depth_mm: tuple[float, float] = (2.0, 15.0)
    bilateral_probability: float = 0.7
    slice_fraction: tuple[float, float] = (0.25, 0.75)
    lesion_count: tuple[int, int] = (4, 10)
    min_rise_hu: float = 60.0
    min_slice_area_mm2: float = 80.0
    min_slices: int = 2
    max_attempts: int = 60


@dataclass(frozen=True)
class Lesions:
    """The result of :func:`insert_lesions`.

    Attributes:
        hu: the volume with the lesions (float32, same shape as the input).
        mask: bool lesion voxels.
        count: number of lesions inserted.
    """

    hu: np.ndarray
    mask: np.ndarray
    count: int


def slice_labels(lesion_mask: np.ndarray) -> list[int]:
    """1 for each axial slice (last axis) that holds a lesion voxel, else 0."""
    return [int(v) for v in np.asarray(lesion_mask).any(axis=(0, 1))]


def insert_lesions(
    hu: np.ndarray,
    lungs: np.ndarray,
    spacing_mm: Sequence[float],
    rng: np.random.Generator,
    settings: LesionSettings | None = None,
) -> Lesions:
    """Insert peripheral ground-glass lesions into the lungs of a CT volume.

    Lesions are added one at a time, each centred just under the pleura (lateral, anterior or
    posterior lung surface, not the mediastinal side), until the drawn fraction of slices
    carries lesion voxels; a lesion that would push the fraction past its upper bound is
    discarded. A lesion blends towards its target HU by a soft profile and only ever raises a
    voxel, so vessels and denser structures inside it stay visible.

    Args:
        hu: (H, W, D) volume in HU, axial slices last.
        lungs: (H, W, D) bool lung mask; lesion voxels stay inside it.
        spacing_mm: voxel size along the three axes.
        rng: source of the lesions' placement, shape and density.
        settings: lesion parameters (defaults: :class:`LesionSettings`).

    Returns:
        The volume with lesions, the lesion voxel mask and the lesion count.

    Raises:
        ValueError: the shapes differ, or the lungs are too small to place lesions covering
            the lower bound of ``settings.slice_fraction``.
    """
    settings = settings or LesionSettings()
    hu = np.asarray(hu, dtype=np.float32)
    lungs = np.asarray(lungs, dtype=bool)
    if hu.shape != lungs.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and lungs {lungs.shape} must be two volumes of one shape (H, W, D)")
    spacing = tuple(float(s) for s in spacing_mm)
    n_slices = hu.shape[2]
    low, high = settings.slice_fraction
    target = rng.uniform(low, high)
    most = int(np.floor(high * n_slices + 1e-9))
    least_count = int(rng.integers(settings.lesion_count[0], settings.lesion_count[1] + 1))

    sides = _peripheral_candidates(lungs, spacing, settings.pleural_depth_mm)
    if not any(len(c) for c in sides):
        raise ValueError("no lung voxels near the pleura to place lesions in")
    background = ndimage.gaussian_filter(hu, (1.0, 1.0, 0.0))
    bilateral = rng.random() < settings.bilateral_probability
    side = int(rng.integers(2)) if len(sides[0]) and len(sides[1]) else int(len(sides[1]) > 0)

    rise = np.zeros_like(hu)
    covered = np.zeros(n_slices, dtype=bool)
    count = 0
    for _ in range(settings.max_attempts):
        if covered.sum() >= target * n_slices and count >= least_count:
            break
        candidates = sides[side] if len(sides[side]) else sides[1 - side]
        centre = np.unravel_index(candidates[rng.integers(len(candidates))], hu.shape)
        box, lesion_rise = _draw_lesion(background[...], lungs, centre, spacing, rng, settings)
        labelled = (lesion_rise >= settings.min_rise_hu).any(axis=(0, 1))
        if labelled.sum() < min(settings.min_slices, n_slices):
            continue
        new_covered = covered.copy()
        new_covered[box[2]] |= labelled
        if new_covered.sum() > most:
            continue
        covered = new_covered
        np.maximum(rise[box], lesion_rise, out=rise[box])
        count += 1
        if bilateral:
            side = 1 - side
    if covered.sum() < low * n_slices or count == 0:
        raise ValueError(
            f"could place lesions in only {int(covered.sum())} of {n_slices} slices after "
            f"{settings.max_attempts} attempts (at least {low:.0%} wanted): the lungs are too small"
        )
    min_slices = min(settings.min_slices, n_slices)
    min_voxels = min_slices * settings.min_slice_area_mm2 / (spacing[0] * spacing[1])
    mask = _drop_small_pieces(lungs & (rise >= settings.min_rise_hu), min_slices, min_voxels)
    return Lesions(hu=np.where(mask, hu + rise, hu).astype(np.float32), mask=mask, count=count)


def _drop_small_pieces(mask: np.ndarray, min_slices: int, min_voxels: float) -> np.ndarray:
    """``mask`` without the connected pieces on fewer than ``min_slices`` slices or of fewer voxels.

    Where lesions overlap and vessels or the lung boundary cut them, specks can be left over;
    dropping them keeps every lesion voxel part of a lesion seen on several slices.
    """
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    keep = np.zeros(count + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        keep[index] = box[2].stop - box[2].start >= min_slices and sizes[index] >= min_voxels
    return keep[components]


def _peripheral_candidates(
    lungs: np.ndarray, spacing: tuple[float, ...], depth_mm: tuple[float, float]
) -> list[np.ndarray]:
    """Flat indices of subpleural lung voxels, away from the mediastinum, per lung (right, left)."""
    if not lungs.any():
        return [np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)]
    depth = ndimage.distance_transform_edt(lungs, sampling=spacing)
    near_pleura = lungs & (depth >= depth_mm[0]) & (depth <= depth_mm[1])
    i, j, _ = np.nonzero(lungs)
    midline = 0.5 * (i.min() + i.max())
    half_width = max(0.5 * (i.max() - i.min()), 1.0)
    ii = np.arange(lungs.shape[0])[:, None, None]
    jj = np.arange(lungs.shape[1])[None, :, None]
    lateral = np.abs(ii - midline) / half_width
    front, back = np.percentile(j, 15), np.percentile(j, 80)
    peripheral = (lateral >= 0.45) | (jj <= front) | (jj >= back)
    candidates = near_pleura & peripheral
    return [np.flatnonzero(candidates & (ii < midline)), np.flatnonzero(candidates & (ii >= midline))]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _draw_lesion(
    background: np.ndarray,
    lungs: np.ndarray,
    centre: tuple[int, ...],
    spacing: tuple[float, ...],
    rng: np.random.Generator,
    settings: LesionSettings,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """One lesion's HU rise inside its bounding box (rises below the threshold already dropped)."""
    diameter = rng.uniform(*settings.diameter_mm)
    semi = np.array(
        [
            0.5 * diameter * rng.uniform(0.75, 1.25),
            0.5 * diameter * rng.uniform(0.75, 1.25),
            # At least about one slice either side of the centre, so a lesion spans several slices.
            max(0.5 * diameter * rng.uniform(*settings.z_extent_ratio), 1.1 * spacing[2]),
        ]
    )
    angle = rng.uniform(0, np.pi)
    reach = semi * (1 + 2 * settings.irregularity)
    box = tuple(
        slice(max(c - int(np.ceil(r / s)), 0), min(c + int(np.ceil(r / s)) + 1, n))
        for c, r, s, n in zip(centre, reach, spacing, lungs.shape)
    )
    coords = np.meshgrid(
        *[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre, spacing)], indexing="ij"
    )
    u = coords[0] * np.cos(angle) + coords[1] * np.sin(angle)
    v = -coords[0] * np.sin(angle) + coords[1] * np.cos(angle)
    radius = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (coords[2] / semi[2]) ** 2)
    shape = radius.shape
    sigma = [max(0.35 * float(semi.min()) / s, 0.5) for s in spacing]
    radius *= 1 + settings.irregularity * _unit_noise(rng, shape, sigma)

    level = rng.uniform(*settings.ground_glass_hu)
    texture = settings.texture_hu * _unit_noise(rng, shape, [max(3.0 / s, 0.5) for s in spacing])
    target = level + texture
    if rng.random() < settings.consolidation_probability:
        core_radius = rng.uniform(*settings.consolidation_radius)
        core = _smoothstep((core_radius - radius) / (settings.edge_fraction * core_radius))
        target = target + core * (rng.uniform(*settings.consolidation_hu) - target)
    weight = _smoothstep((1.0 - radius) / settings.edge_fraction)
    rise = weight * np.maximum(target - background[box], 0.0) * lungs[box]
    rise[rise < settings.min_rise_hu] = 0.0
    area = np.count_nonzero(rise, axis=(0, 1)) * spacing[0] * spacing[1]
    rise[..., area < settings.min_slice_area_mm2] = 0.0
    return box, rise.astype(np.float32)


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)
