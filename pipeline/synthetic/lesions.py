"""COVID-19-like lesions (ground-glass opacities, some with consolidation) inserted into CT lungs.

A *lesion voxel* is a voxel inside the lung mask whose HU a lesion raises by at least
:attr:`LesionSettings.min_rise_hu`. Smaller rises are dropped, so the volume changes exactly at the
lesion voxels and a slice's label (any lesion voxel in it) matches what the image shows.

How many slices a positive volume's lesions touch follows real COVID-19 CT: across the 50
expert-masked studies of MosMedData (CT-1, mild disease, 33 to 53 slices of 8 mm) lesions touch
a median 40 % of the slices, a quarter of the studies 25 % or fewer, the least one slice of 49
(2 %), the most 80 %. :data:`EXTENT_QUANTILES` holds these figures; :func:`draw_extent` draws a
volume's share from them and turns it into a number of slices (at least one), so the same
distribution holds at 8, 16 or 64 slices, within the rounding to whole slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["EXTENT_QUANTILES", "LesionSettings", "Lesions", "draw_extent", "insert_lesions", "slice_labels"]

EXTENT_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.0, 0.02),
    (0.25, 0.25),
    (0.5, 0.40),
    (0.75, 0.55),
    (1.0, 0.80),
)
"""``(quantile, share of slices touched by lesions)`` of MosMedData CT-1's positive studies.

Least, lower quartile, median and most are measured; the upper quartile (0.55) is not, and is
placed midway between the median and the most. The share is drawn by inverse-CDF sampling,
linear between these points."""


@dataclass(frozen=True)
class LesionSettings:
    """Size, density and placement of the synthetic lesions (ranges are sampled uniformly).

    A positive volume first draws the number of slices its lesions touch
    (:func:`draw_extent`). Lesions are then laid out cranio-caudally, each on a run of adjacent
    slices ``length_mm`` long, until the runs cover that many slices; a few more lesions may
    share slices already covered (bilateral or multifocal disease at one level). Volumes with
    fewer diseased slices get smaller lesions: the upper end of ``diameter_mm`` shrinks with
    the share of slices touched, down to 40 % of its range for a single slice.

    Attributes:
        extent_quantiles: quantiles of the share of slices touched, see :data:`EXTENT_QUANTILES`.
        length_mm: cranio-caudal length of one lesion (rounded to whole slices, at least one).
        diameter_mm: in-plane diameter of one lesion.
        extra_lesions: lesions added on slices already covered by others.
        ground_glass_hu: HU of a ground-glass opacity's core.
        texture_hu: standard deviation of the mottled texture inside a lesion.
        consolidation_probability: chance that a lesion has a consolidated core.
        consolidation_hu: HU of a consolidated core.
        consolidation_radius: radius of the consolidated core as a fraction of the lesion's.
        edge_fraction: outer fraction of the radius over which a lesion fades into the lung.
        irregularity: relative amplitude of the smooth random deformation of a lesion's outline.
        pleural_depth_mm: distance of a lesion's centre from the lung surface (peripheral lesions).
        bilateral_probability: chance that a volume's lesions are spread over both lungs.
        basal_weight: how much more often a lesion lies at the lung bases than at the apices
            (linear in between), as COVID-19 opacities favour the lower lobes.
        posterior_weight: how much more often a lesion's centre lies at the back of the lung
            than at the front (linear in between), as COVID-19 opacities favour the dependent lung.
        min_rise_hu: a voxel is a lesion voxel when the lesion raises it by at least this much.
        min_slice_area_mm2: a lesion's cross-section smaller than this on a slice (its tapering
            tip) is dropped, so that no slice is labelled for a speck.
        attempts: placements tried per lesion until it shows on every slice of its run.
    """

    extent_quantiles: tuple[tuple[float, float], ...] = EXTENT_QUANTILES
    length_mm: tuple[float, float] = (20.0, 80.0)
    diameter_mm: tuple[float, float] = (40.0, 110.0)
    extra_lesions: tuple[int, int] = (0, 3)
    ground_glass_hu: tuple[float, float] = (-550.0, -300.0)
    texture_hu: float = 35.0
    consolidation_probability: float = 0.4
    consolidation_hu: tuple[float, float] = (-80.0, 40.0)
    consolidation_radius: tuple[float, float] = (0.3, 0.55)
    edge_fraction: float = 0.35
    irregularity: float = 0.25
    pleural_depth_mm: tuple[float, float] = (2.0, 15.0)
    bilateral_probability: float = 0.7
    basal_weight: float = 3.0
    posterior_weight: float = 3.0
    min_rise_hu: float = 60.0
    min_slice_area_mm2: float = 80.0
    attempts: int = 6


@dataclass(frozen=True)
class Lesions:
    """The result of :func:`insert_lesions`.

    Attributes:
        hu: the volume with the lesions (float32, same shape as the input).
        mask: bool lesion voxels.
        count: number of lesions inserted.
        target_slices: number of slices the lesions were drawn to touch (:func:`draw_extent`);
            the mask touches at most this many, fewer where the lungs left no room.
    """

    hu: np.ndarray
    mask: np.ndarray
    count: int
    target_slices: int


def slice_labels(lesion_mask: np.ndarray) -> list[int]:
    """1 for each axial slice (last axis) that holds a lesion voxel, else 0."""
    return [int(v) for v in np.asarray(lesion_mask).any(axis=(0, 1))]


def draw_extent(
    n_slices: int,
    rng: np.random.Generator,
    quantiles: Sequence[tuple[float, float]] = EXTENT_QUANTILES,
) -> int:
    """Number of slices a positive volume's lesions touch: a share drawn from ``quantiles``.

    The share is the inverse CDF of ``quantiles`` at a uniform draw; the count is the share
    of ``n_slices`` rounded, at least one slice.

    Args:
        n_slices: slices of the volume.
        rng: source of the draw.
        quantiles: ``(quantile, share)`` pairs, both increasing, from quantile 0 to 1.

    Returns:
        A count from 1 to ``n_slices``.
    """
    levels, shares = (np.asarray(v, dtype=float) for v in zip(*quantiles))
    if levels[0] != 0.0 or levels[-1] != 1.0 or np.any(np.diff(levels) <= 0) or np.any(np.diff(shares) < 0):
        raise ValueError(f"extent quantiles must rise from quantile 0 to 1, got {tuple(quantiles)}")
    share = float(np.interp(rng.random(), levels, shares))
    return int(np.clip(round(share * n_slices), 1, n_slices))


def insert_lesions(
    hu: np.ndarray,
    lungs: np.ndarray,
    spacing_mm: Sequence[float],
    rng: np.random.Generator,
    settings: LesionSettings | None = None,
) -> Lesions:
    """Insert peripheral ground-glass lesions into the lungs of a CT volume.

    The number of slices to touch comes from :func:`draw_extent`. Each lesion gets a run of
    adjacent free slices (runs lower in the lungs are likelier, see
    :attr:`LesionSettings.basal_weight`) and a centre just under the pleura (lateral, anterior
    or posterior lung surface, not the mediastinal side; posterior likelier) on the run's middle
    slice; it is cut to its run, so the lesions touch exactly the drawn number of slices unless
    the lungs leave no room for a run or a lesion's cross-section stays too small on some of
    its slices. A lesion blends towards its target HU by a soft profile and only ever raises a
    voxel, so vessels and denser structures inside it stay visible.

    Args:
        hu: (H, W, D) volume in HU, axial slices last, axes towards the patient's left, back
            and head (LPS).
        lungs: (H, W, D) bool lung mask; lesion voxels stay inside it.
        spacing_mm: voxel size along the three axes.
        rng: source of the lesions' extent, placement, shape and density.
        settings: lesion parameters (defaults: :class:`LesionSettings`).

    Returns:
        The volume with lesions, the lesion voxel mask, the lesion count and the drawn extent.

    Raises:
        ValueError: the shapes differ, or the lungs leave no room for a single lesion.
    """
    settings = settings or LesionSettings()
    hu = np.asarray(hu, dtype=np.float32)
    lungs = np.asarray(lungs, dtype=bool)
    if hu.shape != lungs.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and lungs {lungs.shape} must be two volumes of one shape (H, W, D)")
    spacing = tuple(float(s) for s in spacing_mm)
    n_slices = hu.shape[2]
    target = draw_extent(n_slices, rng, settings.extent_quantiles)

    sides = _peripheral_candidates(lungs, spacing, settings.pleural_depth_mm)
    if not any(c.any() for c in sides):
        raise ValueError("no lung voxels near the pleura to place lesions in")
    room = np.logical_or(*sides).sum(axis=(0, 1)).astype(float)
    runs = _lesion_runs(room, target, spacing[2], rng, settings)
    runs += _extra_runs(runs, rng, settings)
    background = ndimage.gaussian_filter(hu, (1.0, 1.0, 0.0))
    posterior = _posterior_weights(lungs, settings.posterior_weight)
    bilateral = rng.random() < settings.bilateral_probability
    side = int(rng.integers(2)) if sides[0].any() and sides[1].any() else int(sides[1].any())
    severity = min(target / n_slices / settings.extent_quantiles[-1][1], 1.0)
    low, high = settings.diameter_mm
    diameters = (low, low + (high - low) * (0.4 + 0.6 * severity))

    rise = np.zeros_like(hu)
    count = 0
    for first, last in runs:
        best = None
        for _ in range(settings.attempts):
            centre = _lesion_centre(sides, side, first, last, posterior, rng)
            if centre is None:
                break
            box, lesion_rise = _draw_lesion(
                background, lungs, centre, (first, last), diameters, spacing, rng, settings
            )
            shown = int((lesion_rise > 0).any(axis=(0, 1)).sum())
            if best is None or shown > best[0]:
                best = (shown, box, lesion_rise)
            if shown == last - first + 1:
                break
        if best is not None and best[0] > 0:
            np.maximum(rise[best[1]], best[2], out=rise[best[1]])
            count += 1
            if bilateral:
                side = 1 - side
    min_voxels = settings.min_slice_area_mm2 / (spacing[0] * spacing[1])
    mask = _drop_small_pieces(lungs & (rise >= settings.min_rise_hu), 1, min_voxels)
    if count == 0 or not mask.any():
        raise ValueError(
            f"could place no lesion of at least {settings.min_slice_area_mm2:g} mm2 a slice in "
            f"{n_slices} slices: the lungs are too small"
        )
    return Lesions(
        hu=np.where(mask, hu + rise, hu).astype(np.float32), mask=mask, count=count, target_slices=target
    )


def _lesion_runs(
    room: np.ndarray, target: int, slice_mm: float, rng: np.random.Generator, settings: LesionSettings
) -> list[tuple[int, int]]:
    """Disjoint runs ``(first, last)`` of slices with room for lesions, ``target`` slices in all.

    Each run is one lesion's cranio-caudal length; a run that does not fit any gap left is
    shortened. A run is placed with a weight proportional to the room on its slices
    (``room[k]``: subpleural lung voxels of slice ``k``) times a factor rising linearly from 1
    at the lung apex to :attr:`LesionSettings.basal_weight` at its base.
    """
    slices = np.flatnonzero(room > 0)
    if slices.size == 0:
        return []
    bottom, top = int(slices[0]), int(slices[-1])
    height = np.arange(room.size, dtype=float)
    apex_to_base = np.clip((top - height) / max(top - bottom, 1), 0.0, 1.0)
    weight = room * (1.0 + (settings.basal_weight - 1.0) * apex_to_base)
    free = room > 0
    runs: list[tuple[int, int]] = []
    left = min(int(target), int(free.sum()))
    while left > 0:
        length = min(max(1, round(rng.uniform(*settings.length_mm) / slice_mm)), left)
        while length > 0:
            window = np.convolve(free.astype(int), np.ones(length, dtype=int), mode="valid") == length
            starts = np.flatnonzero(window)
            if starts.size:
                break
            length -= 1
        if length == 0:
            break
        scores = np.array([weight[s : s + length].sum() for s in starts])
        start = int(starts[rng.choice(starts.size, p=scores / scores.sum())])
        runs.append((start, start + length - 1))
        free[start : start + length] = False
        left -= length
    return runs


def _extra_runs(
    runs: Sequence[tuple[int, int]], rng: np.random.Generator, settings: LesionSettings
) -> list[tuple[int, int]]:
    """Runs of extra lesions, each inside one of ``runs`` (no new slices touched)."""
    extra = []
    if not runs:
        return extra
    for _ in range(int(rng.integers(settings.extra_lesions[0], settings.extra_lesions[1] + 1))):
        first, last = runs[int(rng.integers(len(runs)))]
        a, b = sorted(int(v) for v in rng.integers(first, last + 1, size=2))
        extra.append((a, b))
    return extra


def _posterior_weights(lungs: np.ndarray, posterior_weight: float) -> np.ndarray:
    """Weight per row of the front-back axis: 1 at the lungs' front, ``posterior_weight`` at their back."""
    rows = np.flatnonzero(lungs.any(axis=(0, 2)))
    j = np.arange(lungs.shape[1], dtype=float)
    if rows.size == 0:
        return np.ones_like(j)
    depth = np.clip((j - rows[0]) / max(rows[-1] - rows[0], 1), 0.0, 1.0)
    return 1.0 + (posterior_weight - 1.0) * depth


def _lesion_centre(
    sides: Sequence[np.ndarray],
    side: int,
    first: int,
    last: int,
    posterior: np.ndarray,
    rng: np.random.Generator,
) -> tuple[float, float, float] | None:
    """A subpleural centre ``(i, j, z)`` for a lesion on slices ``first..last``, on ``side`` if it has room.

    ``z`` is the run's middle (between two slices for an even run); ``i, j`` is a candidate
    voxel of the middle slice (or the nearest slice of the run with candidates), drawn with
    :func:`_posterior_weights`.
    """
    middle = 0.5 * (first + last)
    order = sorted(range(first, last + 1), key=lambda k: abs(k - middle))
    for candidates in (sides[side], sides[1 - side]):
        for k in order:
            i, j = np.nonzero(candidates[:, :, k])
            if i.size:
                weights = posterior[j]
                pick = int(rng.choice(i.size, p=weights / weights.sum()))
                return float(i[pick]), float(j[pick]), middle
    return None


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
    """Masks of subpleural lung voxels, away from the mediastinum, per lung (right, left)."""
    if not lungs.any():
        return [np.zeros(lungs.shape, dtype=bool), np.zeros(lungs.shape, dtype=bool)]
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
    return [candidates & (ii < midline), candidates & (ii >= midline)]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _draw_lesion(
    background: np.ndarray,
    lungs: np.ndarray,
    centre: tuple[float, float, float],
    run: tuple[int, int],
    diameter_mm: tuple[float, float],
    spacing: tuple[float, ...],
    rng: np.random.Generator,
    settings: LesionSettings,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """One lesion's HU rise inside its bounding box, cut to the slices of ``run``.

    Rises below the threshold and cross-sections below the least area are already dropped.
    The cranio-caudal semi-axis spans the run, so the lesion fills its slices and fades out
    at the run's ends.
    """
    first, last = run
    diameter = rng.uniform(*diameter_mm)
    semi = np.array(
        [
            0.5 * diameter * rng.uniform(0.75, 1.25),
            0.5 * diameter * rng.uniform(0.75, 1.25),
            0.5 * (last - first + 1) * spacing[2] * rng.uniform(1.05, 1.3),
        ]
    )
    angle = rng.uniform(0, np.pi)
    reach = semi[:2] * (1 + 2 * settings.irregularity)
    in_plane = (
        slice(max(int(np.floor(c - r / s)), 0), min(int(np.ceil(c + r / s)) + 1, n))
        for c, r, s, n in zip(centre[:2], reach, spacing, lungs.shape)
    )
    box = (*in_plane, slice(first, last + 1))
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
