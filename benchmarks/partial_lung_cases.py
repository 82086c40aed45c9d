"""Partial-lung scans built from the real chest series, each with its reference lungs and inserted gas.

The real series (Lung-PET-CT-Dx A0001, 512 x 512 x 64, 0.84 x 0.84 x 5 mm, axial slices from the feet
up: RAS) is a whole-chest scan on which :class:`~transforms.LungMask` is excellent, so its undilated
lungs (``segment_lungs(..., dilation_mm=0)``) serve as the reference lung, restricted to what each case
keeps. The cases are the scans a chest-only design forgets:

- ``lung bases``: the series' lowest 16 slices alone (80 mm: the liver and stomach region, the diaphragm
  domes and the lower lobes), as in an abdominal scan that holds only the lung bases.
- ``lung bases, 0.1 l``: the lowest 10 slices alone (50 mm), which hold 0.1 l of lung in three pieces
  cut by the scan's top, as an abdominal CT that shows only the tips of the bases (fewer litres than the
  fixed minimum a whole-chest check expects).
- ``abdomen + 0.1 l of bases, gas``: those 10 slices above the abdomen slices and gas described next.
- ``abdomen + bases, gas``: the same bases above 12 abdomen slices (60 mm) with a gas-distended stomach
  (about 0.36 l, as after effervescent granules: as much air as either lung base) under the dome of one
  lung, clear of the scan's bottom, and bowel gas (a transverse colon, a bubble, a loop reaching the
  scan's bottom).
- ``chest + gas below``: the whole series above the same abdomen slices and gas.
- ``small field of view``: the whole series seen through a 220 mm wide window that cuts about 30 mm off
  the side of each lung (the depth from sternum to spine is kept).

:func:`abdomen_without_lung` gives the abdomen slices and gas alone: a scan without any lung.

The abdomen slices copy the series' lowest slice (body outline, spine, table, outside air) with the gas
inside its body replaced by soft tissue (45 HU plus the scanner's noise, 10 HU). The gas is -1000 HU plus
the same noise, each pocket is ringed by a 3 mm soft-tissue wall, and no gas lies within 10 mm of the
series' own air (lungs, bowel) or within 15 mm of the body's outline, so nothing joins it to a lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ABDOMEN_SLICES = 12
BASE_SLICES = 16
FEW_BASE_SLICES = 10
SOFT_TISSUE_HU = 45.0
NOISE_HU = 10.0
GAS_HU = -1000.0
WALL_MM = 3.0
GAS_CLEARANCE_MM = 10.0
BODY_MARGIN_MM = 15.0
FIELD_OF_VIEW_MM = 220.0
GAS_SLICES_ABOVE = 6


@dataclass(frozen=True)
class PartialLungCase:
    """A synthetic partial-lung scan.

    Attributes:
        name: short description.
        hu: the volume ``(H, W, D)`` in HU, axial slices from the feet up.
        lungs: the reference lungs (the full series' lungs where the case keeps them).
        gas: the inserted gas voxels (empty when none).
    """

    name: str
    hu: np.ndarray
    lungs: np.ndarray
    gas: np.ndarray


def _body(slice_hu: np.ndarray) -> np.ndarray:
    """The largest region above -500 HU of a slice, holes filled."""
    labels, _ = ndimage.label(slice_hu > -500)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == sizes.argmax())


def _grid_mm(shape: tuple[int, ...], spacing: np.ndarray) -> list[np.ndarray]:
    return np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")


def _abdomen_with_gas(
    hu: np.ndarray, lungs: np.ndarray, spacing: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``hu`` above :data:`ABDOMEN_SLICES` abdomen slices with stomach and bowel gas: HU, lungs, gas."""
    lowest = hu[:, :, 0]
    body = _body(lowest)
    abdomen_slice = np.where(body & (lowest < -500), SOFT_TISSUE_HU, lowest)
    abdomen = np.repeat(abdomen_slice[:, :, None], ABDOMEN_SLICES, axis=2)
    abdomen = abdomen + np.where(body[:, :, None], rng.normal(0.0, NOISE_HU, abdomen.shape), 0.0)
    volume = np.concatenate([abdomen, hu], axis=2).astype(np.float32)
    ref = np.concatenate([np.zeros(abdomen.shape, dtype=bool), lungs], axis=2)

    low = volume[:, :, : ABDOMEN_SLICES + GAS_SLICES_ABOVE]  # the gas lies here: a view, edited in place
    x, y, z = _grid_mm(low.shape, spacing)
    # Stomach: under the dome of the lung whose base lies lower (the larger footprint of the lowest slices).
    base = ndimage.label(lungs[:, :, : BASE_SLICES // 2].any(axis=2))[0]
    lowest_lung = np.bincount(base.ravel())[1:].argmax() + 1
    cx, cy = (np.argwhere(base == lowest_lung).mean(axis=0) * spacing[:2]).tolist()
    top_mm = (ABDOMEN_SLICES + 2) * spacing[2]
    stomach = ((x - cx) / 60.0) ** 2 + ((y - cy) / 50.0) ** 2 + ((z - (top_mm - 32.0)) / 32.0) ** 2 <= 1.0
    body_3d = np.repeat(body[:, :, None], low.shape[2], axis=2)
    colon = (np.abs(x - x[body_3d].mean()) <= 60.0) & (
        (y - (y[body_3d].min() + 70.0)) ** 2 + (z - 3.0 * spacing[2]) ** 2 <= 12.0**2
    )
    loop_at_bottom = (x - cx + 90.0) ** 2 + (y - cy) ** 2 + z**2 <= 18.0**2
    bubble = (x - cx + 40.0) ** 2 + (y - cy + 60.0) ** 2 + (z - 7.0 * spacing[2]) ** 2 <= 11.0**2

    own_air = ndimage.distance_transform_edt(~(low < -500) | ~body_3d, sampling=spacing)
    inner = ndimage.distance_transform_edt(body_3d, sampling=spacing) >= BODY_MARGIN_MM
    gas_low = (stomach | colon | loop_at_bottom | bubble) & inner & (own_air >= GAS_CLEARANCE_MM)
    wall = (ndimage.distance_transform_edt(~gas_low, sampling=spacing) <= WALL_MM) & ~gas_low
    low[wall] = SOFT_TISSUE_HU + rng.normal(0.0, NOISE_HU, np.count_nonzero(wall))
    low[gas_low] = GAS_HU + rng.normal(0.0, NOISE_HU, np.count_nonzero(gas_low))
    gas = np.zeros(volume.shape, dtype=bool)
    gas[:, :, : low.shape[2]] = gas_low
    return volume, ref, gas


def partial_lung_cases(
    hu: np.ndarray, lungs: np.ndarray, spacing: np.ndarray, seed: int = 0
) -> list[PartialLungCase]:
    """The partial-lung cases of the real series (see the module's docstring).

    Args:
        hu: the real chest series ``(H, W, D)`` in HU, axial slices from the feet up.
        lungs: its reference lungs, ``segment_lungs(hu, spacing, dilation_mm=0)``.
        spacing: voxel size in mm.
        seed: seed of the noise.
    """
    rng = np.random.default_rng(seed)
    no_gas = np.zeros(hu.shape, dtype=bool)
    bases = hu[:, :, :BASE_SLICES]
    bases_gas = _abdomen_with_gas(bases, lungs[:, :, :BASE_SLICES], spacing, rng)
    chest_gas = _abdomen_with_gas(hu, lungs, spacing, rng)
    centre = round(float(np.argwhere(lungs.any(axis=(1, 2))).mean()))
    half = round(float(FIELD_OF_VIEW_MM / spacing[0] / 2))
    window = (slice(centre - half, centre + half), slice(None))
    few = (slice(None), slice(None), slice(FEW_BASE_SLICES))
    few_gas = _abdomen_with_gas(hu[few], lungs[few], spacing, rng)
    return [
        PartialLungCase("lung bases", bases, lungs[:, :, :BASE_SLICES], no_gas[:, :, :BASE_SLICES]),
        PartialLungCase("abdomen + bases, gas", *bases_gas),
        PartialLungCase("chest + gas below", *chest_gas),
        PartialLungCase("small field of view", hu[window], lungs[window], no_gas[window]),
        PartialLungCase("lung bases, 0.1 l", hu[few], lungs[few], no_gas[few]),
        PartialLungCase("abdomen + 0.1 l of bases, gas", *few_gas),
    ]


def abdomen_without_lung(
    hu: np.ndarray, lungs: np.ndarray, spacing: np.ndarray, seed: int = 0
) -> PartialLungCase:
    """Abdomen slices with stomach and bowel gas as in ``abdomen + 0.1 l of bases, gas``, alone: no lung."""
    case_hu, _, gas = _abdomen_with_gas(
        hu[:, :, :FEW_BASE_SLICES], lungs[:, :, :FEW_BASE_SLICES], spacing, np.random.default_rng(seed)
    )
    abdomen = (slice(None), slice(None), slice(ABDOMEN_SLICES))
    return PartialLungCase(
        "abdomen, gas, no lung", case_hu[abdomen], np.zeros(gas[abdomen].shape, bool), gas[abdomen]
    )
