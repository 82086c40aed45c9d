"""Lung mask of a chest CT volume in Hounsfield units, computed in physical units.

The recipe follows the preprocessing of Liao et al. (the DSB2017 winner) that the ResNext+ paper uses:
threshold at -600 HU, keep the air inside the body, take per-slice convex hulls and dilate to include
the lung wall. Every step works on the whole volume with scipy / scikit-image; the heavy ones run on
the bounding box of the lungs only.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type, ensure_tuple_rep
from scipy import ndimage
from skimage.morphology import convex_hull_image

from transforms.validation import InvalidVolumeError, check_finite, check_hu, check_volume, source_name

__all__ = [
    "LungMask",
    "LungMaskD",
    "LungMaskDict",
    "LungMaskd",
    "LungSegmentation",
    "NoLungFoundError",
    "find_lungs",
    "segment_lungs",
]

ON_FAILURE_OPTIONS = ("raise", "full")
LUNG_VOLUME_KEY = "lung_volume_l"
"""Meta data key of the lung volume (litres, undilated mask) on the mask a :class:`LungMask` returns."""
WARNING_KEY = "lung_mask_warning"
"""Meta data key of why a :class:`LungMask` with ``on_failure="full"`` returned an all-ones mask; an empty
string when the lungs were found (every mask has both keys, so that batches collate)."""

# In-plane 8-connectivity with no link between slices: labels every axial slice separately in one call.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = True
# Left/right lung separation: grid, erosion step and deepest erosion tried (the main bronchi are thinner).
_SEPARATION_GRID_MM = 2.0
_SEPARATION_STEP_MM = 2.0
_SEPARATION_MAX_DEPTH_MM = 16.0
# Air reaching the image border is kept as lung cut by the field of view when it is this large and at least
# this share of it lies inside the body's outline.
_MIN_CUT_LUNG_MM2 = 500.0
_MIN_INSIDE_OUTLINE = 0.5
_MIN_BODY_ON_SIDE_MM = 50.0
_OUTLINE_STEP = 4
# An air region with at least this share of its footprint under another one is gas below the diaphragm.
_MIN_UNDER_FRACTION = 0.5
# Air whose cross-section in the scan's bottom slice is at least this share of its largest is not lung tips.
_MAX_BOTTOM_SHARE = 0.25
# Air with a median below this is gas: lung parenchyma, air with its vessels and septa, lies around -850 HU
# (bases, with their dependent density, near -750) and above -950 HU in median even when emphysematous;
# stomach and bowel gas is air, -1000 HU.
_MAX_GAS_MEDIAN_HU = -960.0
# Craniocaudal extent of adult lungs: a scan that holds only their lowest part (an abdominal scan with the
# lung bases) is expected to hold that share of the plausible lung volume.
_LUNG_HEIGHT_MM = 250.0


class NoLungFoundError(InvalidVolumeError):
    """No air region inside the body that could be a lung (wrong scan, no chest, cropped body, ...)."""


@dataclass(frozen=True)
class LungSegmentation:
    """Result of :func:`find_lungs`.

    Attributes:
        mask: boolean lung mask ``(H, W, D)``, dilated by the requested radius.
        lung_volume_l: volume of the lungs before dilation, in litres.
        num_lungs: number of lungs told apart (1 when a single lung, or two that could not be separated).
    """

    mask: np.ndarray
    lung_volume_l: float
    num_lungs: int


def find_lungs(
    volume_hu: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    threshold_hu: float = -600.0,
    smooth_sigma_mm: float = 1.0,
    min_component_ml: float = 5.0,
    lung_volume_l: tuple[float, float] = (0.1, 12.0),
    max_lungs: int = 2,
    min_lung_fraction: float = 0.1,
    max_hull_ratio: float = 2.0,
    max_hull_depth_mm: float = 20.0,
    dilation_mm: float = 5.0,
    max_dilation_growth: float | None = 1.6,
    head_last: bool = True,
    name: str = "<array>",
) -> LungSegmentation:
    """Segment the lungs of a CT volume and measure their volume.

    Steps:
        1. Gaussian smoothing (``smooth_sigma_mm``, physical units) and threshold below ``threshold_hu``.
        2. Per axial slice, drop the air connected to the image border (outside the body, also when the
           airways reach the nose at the top of a long scan), but keep lung that a small field of view cuts
           through (air inside the outline of a body that itself runs along those sides of the image). In
           3D, drop regions below ``min_component_ml`` and above the largest plausible lung volume, regions
           of gas density (median below -960 HU: stomach and bowel gas, where lung parenchyma lies around
           -850 HU), regions that lie mostly under another one (gas under the domes of the lungs), and,
           when the others hold a plausible lung volume, the regions that reach the scan's bottom slice
           (bowel gas). Keep the largest region left and up to ``max_lungs - 1`` more whose volume is at
           least ``min_lung_fraction`` of it (smaller gas pockets, table cavities); in a scan that holds
           only the lung bases (regions cut wide open by its top slice, as in an abdominal CT), every such
           cut region too, since the diaphragm's domes split each base into pieces. Refuse air that is
           wide open at the scan's bottom but clear of its top (the scan bottom check). Fill enclosed
           cavities.
        3. Separate left and right lung where they touch only through thin parts (the airways, the junction
           lines in front of and behind the heart). Per lung, axial slice and connected piece, add the convex
           hull, unless it would be more than ``max_hull_ratio`` times the piece's area, and there only the
           regions that lie within ``max_hull_depth_mm`` of the piece: vessels and lesions at the lung's edge
           are filled in, the heart that a lung wraps around is not swallowed.
        4. Dilation by ``dilation_mm``: an exact ball in mm (an ellipsoid in voxels), from in-plane
           Euclidean distance transforms stacked across the slices. Where that would make the mask
           more than ``max_dilation_growth`` times the lungs (thin lungs: the bases at the top of an
           abdominal CT), the radius shrinks until it does not; a whole chest grows far less (about
           1.3 times at 5 mm) and keeps the full radius.

    Args:
        volume_hu: CT volume ``(H, W, D)`` in Hounsfield units, axial slices along the last axis.
        spacing_mm: voxel size along the three axes, in mm.
        threshold_hu: air/tissue threshold.
        smooth_sigma_mm: standard deviation of the Gaussian smoothing; 0 to skip it.
        min_component_ml: air regions smaller than this (ml) are never lungs.
        lung_volume_l: plausible range ``(min, max)`` of the lungs' total volume in litres. A region larger
            than ``max`` is not a lung; fewer than ``min`` litres of lung raises :class:`NoLungFoundError`,
            ``min`` scaled by the share of the lungs' height (25 cm) that a scan holding only the lung
            bases covers: the height from the lowest slice of those bases to the scan's top.
        max_lungs: number of separate regions to keep at most (two lungs; one when they connect).
        min_lung_fraction: a further region is kept only when it holds at least this fraction of the largest.
        max_hull_ratio: a slice piece whose convex hull is more than this many times its area keeps its shape.
        max_hull_depth_mm: a region the hull adds is dropped when part of it lies farther than this from
            the lung.
        dilation_mm: dilation radius; 0 returns the lungs themselves.
        max_dilation_growth: the most the dilation may grow the mask, as a multiple of the lungs'
            volume (``None``: no bound).
        head_last: the axial slices run from the feet (index 0) to the head, as in RAS orientation;
            ``False`` for head first.
        name: source of the volume, for error messages.

    Returns:
        The dilated mask, the volume of the lungs before dilation and the number of lungs told apart.

    Raises:
        NoLungFoundError: no plausible lung inside the body (lung volume check), or air that reaches the
            scan's bottom only (scan bottom check); the message names the check.
        InvalidVolumeError: wrong dimensions or spacing.
    """
    volume_hu = np.asarray(volume_hu)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if volume_hu.ndim != 3:
        raise InvalidVolumeError(f"{name}: expected a volume (H, W, D), got shape {volume_hu.shape}")
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise InvalidVolumeError(f"{name}: expected three positive voxel sizes in mm, got {spacing_mm}")
    min_l, max_l = lung_volume_l
    voxel_ml = float(np.prod(spacing)) / 1000.0

    air = _smooth(volume_hu, smooth_sigma_mm, spacing) < threshold_hu
    inside_air = _drop_border_air(air, spacing)
    lungs, volumes_l, bases_mm = _largest_regions(
        inside_air,
        volume_hu,
        voxel_ml,
        spacing[2],
        min_component_ml / 1000.0,
        max_l,
        max_lungs,
        min_lung_fraction,
        min_l,
        head_last,
    )
    found_l = float(sum(volumes_l))
    needed_l = _expected_minimum(min_l, bases_mm)
    if not volumes_l or found_l < needed_l:
        covers = "" if bases_mm is None else f" of a scan that holds their lowest {bases_mm:.0f} mm"
        raise NoLungFoundError(
            f"{name}: no lung found (lung volume check): the air inside the body (below {threshold_hu:g} "
            f"HU, gas of {_MAX_GAS_MEDIAN_HU:g} HU or less left out) holds {found_l:.3g} l in its largest "
            f"plausible region(s), less than the {needed_l:.3g} l expected of lungs{covers}"
        )
    _check_not_only_at_bottom(lungs, head_last, name)

    box = _bounding_box(lungs, margin=_dilation_margin(dilation_mm, spacing), shape=lungs.shape)
    lung_labels, num_lungs = _separate_lungs(
        ndimage.binary_fill_holes(lungs[box]), spacing, max_lungs, min_lung_fraction
    )
    lungs_box = _convex_hull_per_slice(lung_labels, num_lungs, max_hull_ratio, max_hull_depth_mm, spacing)
    lung_volume_l = float(np.count_nonzero(lungs_box)) * voxel_ml / 1000.0
    if dilation_mm > 0:
        lungs_box = _bounded_dilation(lungs_box, dilation_mm, spacing, max_dilation_growth)
    mask = np.zeros(volume_hu.shape, dtype=bool)
    mask[box] = lungs_box
    return LungSegmentation(mask=mask, lung_volume_l=lung_volume_l, num_lungs=num_lungs)


def segment_lungs(
    volume_hu: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    threshold_hu: float = -600.0,
    smooth_sigma_mm: float = 1.0,
    min_component_ml: float = 5.0,
    lung_volume_l: tuple[float, float] = (0.1, 12.0),
    max_lungs: int = 2,
    min_lung_fraction: float = 0.1,
    max_hull_ratio: float = 2.0,
    max_hull_depth_mm: float = 20.0,
    dilation_mm: float = 5.0,
    max_dilation_growth: float | None = 1.6,
    head_last: bool = True,
    name: str = "<array>",
) -> np.ndarray:
    """Boolean lung mask ``(H, W, D)`` of a CT volume in HU; :func:`find_lungs` explains steps and arguments.

    With ``dilation_mm=0`` the mask holds the lungs themselves (parenchyma, vessels and airways inside).

    Raises:
        NoLungFoundError: no plausible lung inside the body.
    """
    return find_lungs(
        volume_hu,
        spacing_mm,
        threshold_hu=threshold_hu,
        smooth_sigma_mm=smooth_sigma_mm,
        min_component_ml=min_component_ml,
        lung_volume_l=lung_volume_l,
        max_lungs=max_lungs,
        min_lung_fraction=min_lung_fraction,
        max_hull_ratio=max_hull_ratio,
        max_hull_depth_mm=max_hull_depth_mm,
        dilation_mm=dilation_mm,
        max_dilation_growth=max_dilation_growth,
        head_last=head_last,
        name=name,
    ).mask


def _smooth(volume: np.ndarray, sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    volume = volume.astype(np.float32, copy=False)
    # Along thick slices the kernel's neighbour weights are negligible (below 3e-4): skip that axis.
    sigma_voxels = np.where(sigma_mm / spacing < 0.25, 0.0, sigma_mm / spacing)
    if not sigma_voxels.any():
        return volume
    return ndimage.gaussian_filter(volume, sigma=sigma_voxels, truncate=3.0)


def _drop_border_air(air: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Air not connected, within its axial slice, to the in-plane border of the image, except lung cut by it.

    Air around the body reaches the border. So does a lung that a small field of view cuts through; such a
    piece of air is kept when the body (the slice's largest tissue region) runs 50 mm or more along
    every side of the image that the piece reaches, and at least half of the piece lies inside the body's
    convex hull. In a field of view that holds the whole body, only the table may touch a side at length.
    """
    labels, count = ndimage.label(air, structure=_IN_PLANE)
    sides = _sides_reached(labels, count)
    outside = sides.any(axis=0)
    outside[0] = True
    inside = ~outside[labels]
    min_run = _MIN_BODY_ON_SIDE_MM / np.array([spacing[1], spacing[1], spacing[0], spacing[0]])
    # Only slices where tissue runs along two sides of the image hold a body cut by the field of view.
    cut_slices = np.flatnonzero(_runs_along_sides(~air, min_run).sum(axis=0) >= 2)
    open_sides = outside & ~sides.all(axis=0)
    min_pixels = _MIN_CUT_LUNG_MM2 / float(np.prod(spacing[:2]))
    for z in cut_slices:
        areas = np.bincount(labels[:, :, z].ravel())
        pieces = np.flatnonzero(areas >= min_pixels)
        pieces = pieces[open_sides[pieces]]
        if pieces.size:
            inside[:, :, z] |= _cut_lung(labels[:, :, z], pieces, sides, ~air[:, :, z], min_run)
    return inside


def _cut_lung(
    labels: np.ndarray, pieces: np.ndarray, sides: np.ndarray, tissue: np.ndarray, min_run: np.ndarray
) -> np.ndarray:
    """The pieces of a slice (labels reaching the sides ``sides``) that are lung cut by the field of view."""
    kept = np.zeros(labels.shape, dtype=bool)
    regions, count = ndimage.label(tissue)
    if count == 0:
        return kept
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    body = regions == sizes.argmax()
    body_sides = _runs_along_sides(body, min_run)
    outline = None
    for index in pieces:
        if np.any(sides[:, index] & ~body_sides):
            continue
        outline = _convex_outline(body) if outline is None else outline
        piece = labels == index
        if np.count_nonzero(piece & outline) >= _MIN_INSIDE_OUTLINE * np.count_nonzero(piece):
            kept |= piece
    return kept


def _runs_along_sides(region: np.ndarray, min_run: np.ndarray) -> np.ndarray:
    """Whether ``region`` covers at least ``min_run`` pixels of each in-plane side (per slice in 3D)."""
    return np.array(
        [np.count_nonzero(edge, axis=0) >= run for edge, run in zip(_edges(region), min_run, strict=True)]
    )


def _sides_reached(labels: np.ndarray, count: int) -> np.ndarray:
    """``(4, count + 1)``: which labels reach each in-plane side of the image (first/last row, column)."""
    sides = np.zeros((4, count + 1), dtype=bool)
    for side, edge in enumerate(_edges(labels)):
        sides[side, edge] = True
    return sides


def _edges(image: np.ndarray) -> tuple[np.ndarray, ...]:
    """The in-plane sides of an image: first and last row, first and last column."""
    return image[0], image[-1], image[:, 0], image[:, -1]


def _convex_outline(region: np.ndarray) -> np.ndarray:
    """Convex hull of a slice region, computed on a grid of every 4th pixel."""
    hull = convex_hull_image(region[::_OUTLINE_STEP, ::_OUTLINE_STEP])
    full = np.repeat(np.repeat(hull, _OUTLINE_STEP, axis=0), _OUTLINE_STEP, axis=1)
    return full[: region.shape[0], : region.shape[1]]


def _largest_regions(
    air: np.ndarray,
    volume_hu: np.ndarray,
    voxel_ml: float,
    slice_mm: float,
    min_l: float,
    max_l: float,
    max_regions: int,
    min_fraction: float,
    min_lungs_l: float,
    head_last: bool,
) -> tuple[np.ndarray, list[float], float | None]:
    """The largest 3D air regions of plausible size that are neither gas nor air below the lungs.

    Returns their mask, their volumes (litres) and, when the scan holds only the lungs' lower part, the
    height of that part in mm (:func:`_bases_height_mm`; ``None`` otherwise). Of the regions of plausible
    size, those of gas density (median below -960 HU) are stomach or bowel gas, and so are those under
    another one (:func:`_under_another`); of the rest, those cut wide open by the scan's bottom slice
    (:func:`_cut_open_at_bottom`) are bowel gas when the others hold the lung volume expected of the scan
    (:func:`_expected_minimum` of ``min_lungs_l``).
    """
    labels, count = ndimage.label(air)
    volumes_l = np.bincount(labels.ravel()) * (voxel_ml / 1000.0)
    volumes_l[0] = 0.0
    candidates = [int(i) for i in np.argsort(volumes_l)[::-1] if min_l <= volumes_l[i] <= max_l]
    up = labels if head_last else labels[:, :, ::-1]
    boxes = ndimage.find_objects(up, max_label=max(candidates, default=0))
    candidates = [i for i in candidates if not _gas_density(volume_hu, labels, boxes, i, head_last)]
    bases_mm, cut_at_top = None, []
    if candidates:
        under = _under_another(up, boxes, count, candidates) if len(candidates) > 1 else set()
        candidates = [i for i in candidates if i not in under]
        at_bottom = _cut_open_at_bottom(up, boxes, candidates)
        cut_at_top = _cut_open_at_top(up, boxes, [i for i in candidates if i not in at_bottom])
        bases_mm = _bases_height_mm(boxes, cut_at_top, slice_mm, labels.shape[2])
        lungs_l = sum(volumes_l[i] for i in candidates if i not in at_bottom)
        if len(candidates) > 1 and lungs_l >= _expected_minimum(min_lungs_l, bases_mm):
            candidates = [i for i in candidates if i not in at_bottom]
    largest_l = volumes_l[candidates[0]] if candidates else 0.0
    kept = candidates[:1] + [i for i in candidates[1:max_regions] if volumes_l[i] >= min_fraction * largest_l]
    if bases_mm is not None:  # the domes cut each lung base into pieces: all of them are lung
        kept += [i for i in cut_at_top if i not in kept and volumes_l[i] >= min_fraction * largest_l]
    keep = np.zeros(volumes_l.shape, dtype=bool)
    keep[kept] = True
    return keep[labels], [float(volumes_l[i]) for i in kept], bases_mm


def _gas_density(volume_hu: np.ndarray, labels: np.ndarray, boxes: list, index: int, head_last: bool) -> bool:
    """Whether region ``index`` has the density of gas (median below -960 HU), not of lung parenchyma."""
    box = boxes[index - 1]
    if not head_last:  # ``boxes`` index the slices from the feet up
        depth = labels.shape[2]
        box = (*box[:2], slice(depth - box[2].stop, depth - box[2].start))
    return bool(np.median(volume_hu[box][labels[box] == index]) < _MAX_GAS_MEDIAN_HU)


def _cut_open_at_top(labels: np.ndarray, boxes: list, candidates: list[int]) -> list[int]:
    """The candidate regions cut wide open by the scan's top slice (index ``-1``), in the given order.

    The lungs of a scan that holds only their lower part (an abdominal CT showing the lung bases) are cut
    so, as :func:`_cut_open_at_bottom` tells gas cut by the bottom slice.
    """
    depth = labels.shape[2]
    cut = []
    for index in candidates:
        box = boxes[index - 1]
        if box[2].stop == depth and _wide_at_bottom(
            np.count_nonzero(labels[box] == index, axis=(0, 1))[::-1]
        ):
            cut.append(index)
    return cut


def _bases_height_mm(boxes: list, cut_at_top: list[int], slice_mm: float, depth: int) -> float | None:
    """Height in mm of the lung bases ``cut_at_top`` (lowest slice to the scan's top); ``None`` without."""
    if not cut_at_top:
        return None
    return (depth - min(boxes[index - 1][2].start for index in cut_at_top)) * slice_mm


def _expected_minimum(min_l: float, bases_mm: float | None) -> float:
    """Least lung volume expected of a scan: ``min_l``, scaled by the share of the lungs' height it holds."""
    return min_l if bases_mm is None else min_l * min(1.0, bases_mm / _LUNG_HEIGHT_MM)


def _wide_at_bottom(areas: np.ndarray) -> bool:
    """Whether a region with cross-sections ``areas`` (per slice, bottom first) is cut wide by the bottom."""
    return bool(areas[0] > 0 and areas[0] >= _MAX_BOTTOM_SHARE * areas.max())


def _cut_open_at_bottom(labels: np.ndarray, boxes: list, candidates: list[int]) -> set[int]:
    """The candidate regions whose cross-section in the bottom slice (index 0) is wide, not a lung's tip.

    A chest scan often stops inside one lung's base, which then reaches the bottom slice with a small
    share of its largest cross-section; gas cut by the scan's bottom is cut wide open. ``boxes``: the
    regions' bounding boxes (``ndimage.find_objects``).
    """
    wide = set()
    for index in candidates:
        box = boxes[index - 1]
        if box[2].start > 0:  # clear of the bottom slice
            continue
        if _wide_at_bottom(np.count_nonzero(labels[box] == index, axis=(0, 1))):
            wide.add(index)
    return wide


def _check_not_only_at_bottom(lungs: np.ndarray, head_last: bool, name: str) -> None:
    """Refuse air that is cut wide open by the scan's bottom slice but stays clear of its top slice.

    Lungs end in thin tips at the bottom of a chest scan and reach the top of an abdominal one; air with a
    wide cross-section at the bottom and none at the top is gas of the abdomen, or lungs of a scan that
    stops inside them: either way the mask cannot be trusted.
    """
    areas = np.count_nonzero(lungs, axis=(0, 1))
    areas = areas if head_last else areas[::-1]
    if areas[-1] == 0 and _wide_at_bottom(areas):
        raise NoLungFoundError(
            f"{name}: no lung found (scan bottom check): the air found reaches the scan's bottom slice with "
            f"{areas[0] / areas.max():.0%} of its largest cross-section and not its top slice: gas below the "
            "diaphragm, or a scan that stops inside the lungs; the lung mask cannot be trusted"
        )


def _under_another(labels: np.ndarray, boxes: list, count: int, candidates: list[int]) -> set[int]:
    """The candidate regions with most of their footprint under another candidate (slice index 0 = feet).

    A region lies under another in a column (x, y) when the other has voxels higher up in that column than
    the region's top. Gas in the stomach and bowel lies under the domes of the lungs; a lung lies under no
    other air region (the airways above it cover little of its footprint). ``boxes``: the regions'
    bounding boxes (``ndimage.find_objects``).
    """
    is_candidate = np.zeros(count + 1, dtype=bool)
    is_candidate[candidates] = True
    under = set()
    for index in candidates:
        column_labels = labels[boxes[index - 1][:2]]
        region = column_labels == index
        footprint = region.any(axis=2)
        depth = labels.shape[2]
        top = depth - 1 - np.argmax(region[:, :, ::-1], axis=2)
        other = is_candidate[column_labels] & ~region
        other_top = np.where(other.any(axis=2), depth - 1 - np.argmax(other[:, :, ::-1], axis=2), -1)
        covered = np.count_nonzero(footprint & (other_top > top))
        if covered >= _MIN_UNDER_FRACTION * np.count_nonzero(footprint):
            under.add(index)
    return under


def _dilation_margin(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    return np.ceil(max(radius_mm, 0.0) / spacing).astype(int) + 1


def _bounding_box(mask: np.ndarray, margin: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(
        slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margin, shape, strict=True)
    )


def _separate_lungs(
    lungs: np.ndarray, spacing: np.ndarray, max_lungs: int, min_fraction: float
) -> tuple[np.ndarray, int]:
    """Label the lungs; split a single region into left and right lung where it is joined only by thin parts.

    The lungs often form one region at -600 HU, joined by the airways and by the thin junction lines in
    front of and behind the heart. Eroding (through a distance transform, on a grid of about 2 mm) until
    two cores of comparable size appear separates them; every voxel then goes to the nearer core.
    """
    labels, count = ndimage.label(lungs)
    if count != 1 or max_lungs < 2:
        return labels, count
    factors = np.maximum(1, np.floor(_SEPARATION_GRID_MM / spacing)).astype(int)
    coarse = lungs[:: factors[0], :: factors[1], :: factors[2]]
    coarse_spacing = spacing * factors
    depth_mm = ndimage.distance_transform_edt(coarse, sampling=coarse_spacing)
    for depth in np.arange(_SEPARATION_STEP_MM, _SEPARATION_MAX_DEPTH_MM + 1e-6, _SEPARATION_STEP_MM):
        cores, count = ndimage.label(depth_mm > depth)
        if count == 0:
            break
        sizes = np.bincount(cores.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes)[::-1][:2]
        if count >= 2 and sizes[second] >= min_fraction * sizes[first]:
            seeds = np.where(cores == first, 1, np.where(cores == second, 2, 0)).astype(np.uint8)
            nearest = ndimage.distance_transform_edt(
                seeds == 0, sampling=coarse_spacing, return_distances=False, return_indices=True
            )
            sides = seeds[tuple(nearest)]
            for axis, factor in enumerate(factors):
                sides = np.repeat(sides, factor, axis=axis)
            sides = sides[: lungs.shape[0], : lungs.shape[1], : lungs.shape[2]]
            return np.where(lungs, sides, 0).astype(np.uint8), 2
    return labels, 1


def _convex_hull_per_slice(
    labels: np.ndarray, count: int, max_ratio: float, max_depth_mm: float, spacing: np.ndarray
) -> np.ndarray:
    """Each lung's in-slice pieces, completed by their convex hulls where the hull only closes shallow dents.

    A piece keeps its own shape when its hull is more than ``max_ratio`` times its area (the hull of a
    crescent around the liver dome). Otherwise each region the hull adds is kept only when none of it lies
    more than ``max_depth_mm`` from the piece: dents of vessels and of lesions at the lung's edge are filled,
    the deep concavity of a lung wrapped around the heart is not.
    """
    out = labels > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qhull on collinear pixels: such pieces keep their shape
        for lung in range(1, count + 1):
            pieces, _ = ndimage.label(labels == lung, structure=_IN_PLANE)
            for index, box in enumerate(ndimage.find_objects(pieces), start=1):
                piece = pieces[box][:, :, 0] == index
                if min(piece.shape) < 2:
                    continue
                # Hull of the pixel centres: a digital convex shape is its own hull.
                added = convex_hull_image(piece, offset_coordinates=False) & ~piece
                area = np.count_nonzero(piece)
                if not added.any() or np.count_nonzero(added) > (max_ratio - 1.0) * area:
                    continue
                out[box][:, :, 0] |= _shallow_regions(added, piece, max_depth_mm, spacing[:2])
    return out


def _shallow_regions(
    added: np.ndarray, piece: np.ndarray, max_depth_mm: float, spacing: np.ndarray
) -> np.ndarray:
    """The connected regions of ``added`` that lie entirely within ``max_depth_mm`` of ``piece``.

    Each region borders the piece (it lies inside the piece's convex hull), so no point of it is farther from
    the piece than the diagonal of its bounding box; only larger regions need a distance transform, and that
    only in a window around them.
    """
    regions, _ = ndimage.label(added, structure=np.ones((3, 3), dtype=bool))
    margin = np.ceil(max_depth_mm / spacing).astype(int) + 1
    keep = [False]
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        extent = np.array([s.stop - s.start for s in box]) * spacing
        if np.hypot(*extent) <= max_depth_mm:
            keep.append(True)
            continue
        window = tuple(
            slice(max(s.start - m, 0), min(s.stop + m, n))
            for s, m, n in zip(box, margin, piece.shape, strict=True)
        )
        depth_mm = ndimage.distance_transform_edt(~piece[window], sampling=spacing)
        keep.append(bool(depth_mm[regions[window] == index].max() <= max_depth_mm))
    return np.asarray(keep)[regions]


def _bounded_dilation(
    mask: np.ndarray, radius_mm: float, spacing: np.ndarray, max_growth: float | None, steps: int = 8
) -> np.ndarray:
    """``mask`` dilated by ``radius_mm``, or by the largest radius (bisected) within ``max_growth``."""
    dilated = _dilate(mask, radius_mm, spacing)
    limit = None if max_growth is None else max_growth * np.count_nonzero(mask)
    if limit is None or np.count_nonzero(dilated) <= limit:
        return dilated
    low, high, best = 0.0, radius_mm, mask
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = _dilate(mask, middle, spacing)
        if np.count_nonzero(candidate) <= limit:
            low, best = middle, candidate
        else:
            high = middle
    return best


def _dilate(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Voxels within ``radius_mm`` (Euclidean, in mm) of ``mask``; the caller leaves a margin around it.

    The ball is a stack of discs: slice offset ``k`` contributes the in-plane disc of radius
    ``sqrt(r^2 - (k * dz)^2)``. One in-plane distance transform per slice then replaces a 3D one, which is
    several times slower across thick slices.
    """
    in_plane_mm = np.full(mask.shape, np.inf, dtype=np.float32)
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        in_plane_mm[:, :, z] = ndimage.distance_transform_edt(~mask[:, :, z], sampling=spacing[:2])
    dilated = np.zeros_like(mask)
    reach = int(np.floor(radius_mm / spacing[2] + 1e-9))
    for offset in range(-reach, reach + 1):
        disc = in_plane_mm <= np.sqrt(max(radius_mm**2 - (offset * spacing[2]) ** 2, 0.0)) + 1e-4
        if offset > 0:
            dilated[:, :, offset:] |= disc[:, :, :-offset]
        elif offset < 0:
            dilated[:, :, :offset] |= disc[:, :, -offset:]
        else:
            dilated |= disc
    return dilated


def _head_last(img: NdarrayOrTensor) -> bool:
    """Whether the last axis runs towards the head: the affine's z component of that axis (RAS or LPS)."""
    if isinstance(img, MetaTensor):
        return bool(img.affine[2, 2] >= 0)
    return True


def _spacing_of(img: NdarrayOrTensor, name: str) -> np.ndarray:
    if isinstance(img, MetaTensor):
        return np.asarray(img.pixdim, dtype=np.float64)[:3]
    warnings.warn(
        f"{name}: no voxel spacing known (not a MetaTensor and no spacing_mm given); assuming 1 mm",
        stacklevel=3,
    )
    return np.ones(3)


class LungMask(Transform):
    """Lung mask of a channel-first CT volume ``(1, H, W, D)`` in Hounsfield units (axial slices last).

    Thresholds at ``threshold_hu`` (-600 HU, as in Liao et al. and the ResNext+ paper), keeps the air
    inside the body, fills holes, takes per-slice convex hulls and dilates by ``dilation_mm`` to include the
    lung wall; see :func:`find_lungs`. The voxel spacing comes from the MetaTensor's affine, or
    ``spacing_mm``; without either it is taken as 1 mm with a warning.

    The result is a uint8 mask ``(1, H, W, D)`` of the input's type and device. A MetaTensor mask carries a
    copy of the image's meta data (affine, source file) plus ``lung_volume_l``, the lung volume in litres
    before dilation, and ``lung_mask_warning`` (empty unless ``on_failure="full"`` had to step in).

    Args:
        threshold_hu: air/tissue threshold.
        smooth_sigma_mm: Gaussian smoothing before thresholding; 0 to skip it.
        min_component_ml: air regions smaller than this (ml) are never lungs.
        lung_volume_l: plausible range ``(min, max)`` of the total lung volume, litres.
        max_lungs: separate air regions kept at most.
        min_lung_fraction: a second region is kept when it holds at least this fraction of the largest.
        max_hull_ratio: a slice piece keeps its own shape when its convex hull is more than this times larger.
        max_hull_depth_mm: a region the convex hull adds is dropped when part of it lies farther than this
            from the lung (the heart).
        dilation_mm: dilation radius in mm; 0 for the lungs themselves.
        max_dilation_growth: the most the dilation may grow the mask, as a multiple of the lungs' volume
            (thin lung bases get a smaller radius; ``None``: no bound).
        spacing_mm: voxel size to use instead of the image's meta data.
        head_last: whether the axial slices run from the feet to the head; ``None`` reads it from the
            MetaTensor's affine (plain arrays: ``True``, as after ``Orientation("RAS")``).
        on_failure: ``"raise"`` raises :class:`NoLungFoundError` when no lung is found; ``"full"`` returns an
            all-ones mask, warns and records the reason under ``lung_mask_warning`` in the mask's meta data
            (``lung_volume_l`` is then NaN).
        check_hu: refuse input that is not in Hounsfield units (no value below -500, e.g. 0..255 or 0..1).

    Raises:
        InvalidVolumeError: input that is not a single-channel 3D volume, empty, NaN or not in HU.
        NoLungFoundError: no lung found and ``on_failure="raise"``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        threshold_hu: float = -600.0,
        smooth_sigma_mm: float = 1.0,
        min_component_ml: float = 5.0,
        lung_volume_l: tuple[float, float] = (0.1, 12.0),
        max_lungs: int = 2,
        min_lung_fraction: float = 0.1,
        max_hull_ratio: float = 2.0,
        max_hull_depth_mm: float = 20.0,
        dilation_mm: float = 5.0,
        max_dilation_growth: float | None = 1.6,
        spacing_mm: Sequence[float] | None = None,
        head_last: bool | None = None,
        on_failure: str = "raise",
        check_hu: bool = True,
    ) -> None:
        if on_failure not in ON_FAILURE_OPTIONS:
            raise ValueError(f"on_failure must be one of {ON_FAILURE_OPTIONS}, got {on_failure!r}")
        if len(lung_volume_l) != 2 or not 0 <= lung_volume_l[0] < lung_volume_l[1]:
            raise ValueError(f"lung_volume_l must be (min, max) litres, 0 <= min < max; got {lung_volume_l}")
        if max_lungs < 1:
            raise ValueError(f"max_lungs must be at least 1, got {max_lungs}")
        if dilation_mm < 0 or smooth_sigma_mm < 0:
            raise ValueError("dilation_mm and smooth_sigma_mm must not be negative")
        if max_dilation_growth is not None and max_dilation_growth < 1:
            raise ValueError(f"max_dilation_growth must be at least 1 or None, got {max_dilation_growth}")
        self.threshold_hu = threshold_hu
        self.smooth_sigma_mm = smooth_sigma_mm
        self.min_component_ml = min_component_ml
        self.lung_volume_l = tuple(lung_volume_l)
        self.max_lungs = max_lungs
        self.min_lung_fraction = min_lung_fraction
        self.max_hull_ratio = max_hull_ratio
        self.max_hull_depth_mm = max_hull_depth_mm
        self.dilation_mm = dilation_mm
        self.max_dilation_growth = max_dilation_growth
        self.spacing_mm = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
        self.head_last = head_last
        self.on_failure = on_failure
        self.check_hu = check_hu

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Return the uint8 lung mask ``(1, H, W, D)`` of ``img``, same type and device as ``img``."""
        name = source_name(img)
        check_volume(img, name)
        check_finite(img, name)
        if self.check_hu:
            check_hu(img, name)
        spacing = np.asarray(self.spacing_mm) if self.spacing_mm is not None else _spacing_of(img, name)
        volume = convert_data_type(img, np.ndarray)[0][0]
        info: dict[str, float | str]
        try:
            result = find_lungs(
                volume,
                spacing,
                threshold_hu=self.threshold_hu,
                smooth_sigma_mm=self.smooth_sigma_mm,
                min_component_ml=self.min_component_ml,
                lung_volume_l=self.lung_volume_l,
                max_lungs=self.max_lungs,
                min_lung_fraction=self.min_lung_fraction,
                max_hull_ratio=self.max_hull_ratio,
                max_hull_depth_mm=self.max_hull_depth_mm,
                dilation_mm=self.dilation_mm,
                max_dilation_growth=self.max_dilation_growth,
                head_last=self.head_last if self.head_last is not None else _head_last(img),
                name=name,
            )
            mask = result.mask
            info = {LUNG_VOLUME_KEY: result.lung_volume_l, WARNING_KEY: ""}
        except NoLungFoundError as error:
            if self.on_failure == "raise":
                raise
            warnings.warn(f"{error}; using an all-ones mask", stacklevel=2)
            mask = np.ones(volume.shape, dtype=bool)
            info = {LUNG_VOLUME_KEY: float("nan"), WARNING_KEY: f"{error}; using an all-ones mask"}
        out_dtype = torch.uint8 if isinstance(img, torch.Tensor) else np.uint8
        out = convert_to_dst_type(mask[None].view(np.uint8), img, dtype=out_dtype)[0]
        if isinstance(out, MetaTensor):
            out.meta.update(info)
        return out


class LungMaskd(MapTransform):
    """Dictionary-based wrapper of :class:`LungMask`: adds the lung mask of each image under its mask key.

    Args:
        keys: keys of the CT images (HU, channel-first, axial slices last).
        mask_key: key (or one key per image key) under which to store the uint8 mask ``(1, H, W, D)``.
        allow_missing_keys: don't raise when a key is missing.
        threshold_hu, smooth_sigma_mm, min_component_ml, lung_volume_l, max_lungs, min_lung_fraction,
            max_hull_ratio, max_hull_depth_mm, dilation_mm, max_dilation_growth, spacing_mm, head_last,
            on_failure, check_hu: see :class:`LungMask`.
    """

    backend = LungMask.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | Sequence[str] = "mask",
        allow_missing_keys: bool = False,
        threshold_hu: float = -600.0,
        smooth_sigma_mm: float = 1.0,
        min_component_ml: float = 5.0,
        lung_volume_l: tuple[float, float] = (0.1, 12.0),
        max_lungs: int = 2,
        min_lung_fraction: float = 0.1,
        max_hull_ratio: float = 2.0,
        max_hull_depth_mm: float = 20.0,
        dilation_mm: float = 5.0,
        max_dilation_growth: float | None = 1.6,
        spacing_mm: Sequence[float] | None = None,
        head_last: bool | None = None,
        on_failure: str = "raise",
        check_hu: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = ensure_tuple_rep(mask_key, len(self.keys))
        self.masker = LungMask(
            threshold_hu=threshold_hu,
            smooth_sigma_mm=smooth_sigma_mm,
            min_component_ml=min_component_ml,
            lung_volume_l=lung_volume_l,
            max_lungs=max_lungs,
            min_lung_fraction=min_lung_fraction,
            max_hull_ratio=max_hull_ratio,
            max_hull_depth_mm=max_hull_depth_mm,
            dilation_mm=dilation_mm,
            max_dilation_growth=max_dilation_growth,
            spacing_mm=spacing_mm,
            head_last=head_last,
            on_failure=on_failure,
            check_hu=check_hu,
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            d[mask_key] = self.masker(d[key])
        return d


LungMaskD = LungMaskDict = LungMaskd
