"""Synthetic chest CT phantoms in Hounsfield units, with the tissue label map they were drawn from.

Array axes follow the DICOM patient frame (LPS): axis 0 runs to the patient's left, axis 1 to the
back (posterior), axis 2 upwards (superior), so axial slices lie along the last axis. Shapes are
drawn with soft (anti-aliased) edges and composited back to front, like a painter: each layer
blends its HU into the volume by its coverage, and a voxel takes the tissue label of the last
layer that covers at least half of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage

__all__ = [
    "PHANTOM_FOV_MM",
    "PHANTOM_Z_FOV_MM",
    "TISSUE_HU_RANGES",
    "ChestPhantom",
    "Tissue",
    "add_scanner_noise",
    "make_chest_phantom",
    "phantom_spacing",
]

PHANTOM_FOV_MM = 380.0
"""In-plane field of view; the pixel spacing is this over the image size."""
PHANTOM_Z_FOV_MM = 300.0
"""Cranio-caudal extent covered by the slices (upper abdomen to above the lung apices)."""


class Tissue(IntEnum):
    """Labels of the phantom's tissue map."""

    AIR = 0
    TABLE = 1
    FAT = 2
    SOFT_TISSUE = 3
    HEART = 4
    LUNG = 5
    VESSEL = 6
    AIRWAY = 7
    BONE = 8


TISSUE_HU_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, -1000.0),
    Tissue.TABLE: (-950.0, 350.0),
    Tissue.FAT: (-120.0, -60.0),
    Tissue.SOFT_TISSUE: (0.0, 60.0),
    Tissue.HEART: (30.0, 60.0),
    Tissue.LUNG: (-900.0, -600.0),
    Tissue.VESSEL: (-450.0, 60.0),
    Tissue.AIRWAY: (-1000.0, -950.0),
    Tissue.BONE: (300.0, 1000.0),
}
"""Noise-free HU of the voxels made (to 99 %, :attr:`ChestPhantom.purity`) of each tissue; for vessels,
which are mostly thinner than a voxel, of the voxels made at least half of vessel."""

_AIR_HU = -1000.0
_LUNG_HU = -865.0
_FAT_HU = -95.0
_MUSCLE_HU = 45.0
_LIVER_HU = 55.0
_BLOOD_HU = 42.0
_CORTICAL_HU = 850.0
_CANCELLOUS_HU = 340.0
_DISC_HU = 50.0
_VESSEL_HU = 40.0
_DEPENDENT_DENSITY_HU = (60.0, 200.0)
"""Peak rise of the dependent (gravity) density along the posterior lung, strongest at the bases."""
_VESSEL_SCALES = ((0.3, 5.0, 90.0, 20.0), (0.16, 3.5, 140.0, 35.0), (0.09, 2.0, 250.0, 60.0))
"""Per scale of the vessel tree: angular correlation (radians), vessel radius at the hilum (mm),
e-folding distance of the radius (mm), distance from the hilum where the scale's vessels begin
(mm). Coarse scales give few thick central vessels, finer ones many thin peripheral branches."""
_VESSEL_DRIFT_MM = 120.0
"""Distance over which a vessel's direction drifts by about one angular correlation length."""
_VESSEL_GRID_SIGMA = 1.5


@dataclass(frozen=True)
class ChestPhantom:
    """A noise-free chest phantom.

    Attributes:
        hu: (H, W, D) float32 Hounsfield units.
        tissue: (H, W, D) uint8 :class:`Tissue` labels.
        lungs: (H, W, D) bool, the lung parenchyma with the vessels inside it.
        purity: (H, W, D) float32, the fraction of each voxel made of its labelled tissue
            (below 1 at partial-volume borders).
        spacing: voxel size in mm along the three axes.
    """

    hu: np.ndarray
    tissue: np.ndarray
    lungs: np.ndarray
    purity: np.ndarray
    spacing: tuple[float, float, float]


def phantom_spacing(size: int, slices: int) -> tuple[float, float, float]:
    """Voxel size (mm) of a phantom of ``size`` x ``size`` pixels and ``slices`` slices."""
    return (PHANTOM_FOV_MM / size, PHANTOM_FOV_MM / size, PHANTOM_Z_FOV_MM / slices)


class _Canvas:
    """Back-to-front compositing of soft-edged layers into HU and tissue label volumes."""

    def __init__(self, shape: tuple[int, int, int]):
        self.hu = np.full(shape, _AIR_HU, dtype=np.float32)
        self.tissue = np.full(shape, Tissue.AIR, dtype=np.uint8)
        self.purity = np.ones(shape, dtype=np.float32)  # fraction of the voxel made of its labelled tissue

    def paint(self, coverage: np.ndarray, hu: float | np.ndarray, tissue: Tissue) -> None:
        coverage = np.broadcast_to(coverage, self.hu.shape)
        self.hu += coverage * (np.asarray(hu, dtype=np.float32) - self.hu)
        labelled = coverage >= 0.5
        self.tissue[labelled] = tissue
        self.purity = np.where(labelled, coverage, self.purity * (1 - coverage))


class _Geometry:
    """Physical coordinates (mm, broadcastable) of the voxel centres and soft shape primitives."""

    def __init__(self, size: int, slices: int):
        self.spacing = phantom_spacing(size, slices)
        sx, sy, sz = self.spacing
        self.x = ((np.arange(size) - (size - 1) / 2) * sx).astype(np.float32)[:, None, None]
        self.y = ((np.arange(size) - (size - 1) / 2) * sy).astype(np.float32)[None, :, None]
        self.z = ((np.arange(slices) + 0.5) * sz).astype(np.float32)[None, None, :]
        self.pixel = sx

    def ellipse(self, cx, cy, ax, ay, exponent=2.0) -> np.ndarray:
        """Soft coverage of an (super-)ellipse; centre and semi-axes may vary along z."""
        ax = np.maximum(ax, 1e-3)
        ay = np.maximum(ay, 1e-3)
        r = (np.abs((self.x - cx) / ax) ** exponent + np.abs((self.y - cy) / ay) ** exponent) ** (
            1 / exponent
        )
        return self.soft(r, np.minimum(ax, ay))

    def soft(self, r: np.ndarray, radius) -> np.ndarray:
        """Coverage of ``r < 1`` with an edge one pixel wide, ``radius`` (mm) scaling ``r``."""
        return np.clip(0.5 + (1.0 - r) * radius / self.pixel, 0.0, 1.0).astype(np.float32)

    def slab(self, z_low, z_high) -> np.ndarray:
        """1 between two heights (mm), with edges one slice thick."""
        sz = self.spacing[2]
        low = np.clip(0.5 + (self.z - z_low) / sz, 0.0, 1.0)
        high = np.clip(0.5 + (z_high - self.z) / sz, 0.0, 1.0)
        return (low * high).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), [sigma_mm / s for s in spacing], mode="wrap"
    )
    return field / max(float(field.std()), 1e-6)


def make_chest_phantom(size: int, slices: int, rng: np.random.Generator) -> ChestPhantom:
    """Draw a random noise-free chest phantom.

    Anatomy, from the outside in: a curved scanner table, the body with a subcutaneous fat layer
    and chest-wall muscle, ribs (costal arcs that descend anteriorly), sternum, a thoracic
    vertebra with discs, spinal canal and posterior elements, the mediastinum (fat, heart,
    ascending and descending aorta, trachea and main bronchi), the liver and upper abdomen under
    the diaphragm domes, and two lungs (about -865 HU) whose cross-section shrinks towards the
    apices and, at the bases, gives way to the domes. The lungs carry smooth density variation,
    dependent (posterior) density strongest at the bases, and a branching vessel tree that thins
    and fades towards the periphery.

    Args:
        size: in-plane size in pixels (the field of view is :data:`PHANTOM_FOV_MM`).
        slices: number of axial slices (covering :data:`PHANTOM_Z_FOV_MM`).
        rng: source of the anatomical variation.

    Returns:
        The phantom, without scanner noise (see :func:`add_scanner_noise`).
    """
    if size < 16 or slices < 2:
        raise ValueError(f"a phantom needs size >= 16 and slices >= 2, got size={size}, slices={slices}")
    g = _Geometry(size, slices)
    shape = (size, size, slices)
    canvas = _Canvas(shape)
    u = rng.uniform

    # Body: a super-ellipse with a flatter back resting on the table.
    body_a, body_b, body_cy = u(150, 172), u(105, 125), u(-20, -5)
    back = body_cy + body_b
    body = np.where(
        g.y < body_cy,
        g.ellipse(0.0, body_cy, body_a, body_b, exponent=2.2),
        g.ellipse(0.0, body_cy, body_a, body_b, exponent=3.2),
    )
    _paint_table(canvas, g, back + u(2, 10))
    canvas.paint(body, _FAT_HU + 8 * _smooth_noise(rng, shape, 15, g.spacing).clip(-1.5, 1.5), Tissue.FAT)

    fat = u(8, 24)
    wall = u(10, 16)
    canvas.paint(
        g.ellipse(0.0, body_cy, body_a - fat, body_b - fat, exponent=2.4), _MUSCLE_HU, Tissue.SOFT_TISSUE
    )

    # Thoracic cavity, narrowing towards the thoracic inlet.
    z_apex = u(262, 285)
    rise = np.clip((g.z - 0.45 * z_apex) / (0.55 * z_apex), 0.0, 1.0)
    cav_a = (body_a - fat - wall - 10) * (1 - 0.22 * rise**2)
    cav_b = (body_b - fat - wall - 8) * (1 - 0.08 * rise**2)
    cav_cy = body_cy - 2
    cavity = g.ellipse(0.0, cav_cy, cav_a, cav_b, exponent=2.1)
    canvas.paint(cavity, _FAT_HU + 15, Tissue.FAT)

    # Diaphragm domes (the right one higher); below them liver and upper abdomen.
    dome_z = {-1: u(85, 110), 1: u(70, 95)}
    recess_z = {side: dome_z[side] - u(45, 65) for side in (-1, 1)}
    diaphragm = np.zeros((*shape[:2], 1), dtype=np.float32)
    for side in (-1, 1):
        rho2 = ((g.x - side * 0.45 * cav_a[..., :1]) / (0.62 * cav_a[..., :1])) ** 2 + (
            (g.y - cav_cy + 0.1 * cav_b[..., :1]) / (0.95 * cav_b[..., :1])
        ) ** 2
        dome = recess_z[side] + (dome_z[side] - recess_z[side]) * np.clip(1 - rho2, 0, 1)
        dome -= 25 * np.clip((g.y - cav_cy) / cav_b[..., :1], 0, 1)
        diaphragm = np.where(side * g.x > 0, dome, diaphragm)
    below_diaphragm = np.clip(0.5 + (diaphragm - g.z) / g.spacing[2], 0, 1).astype(np.float32)
    canvas.paint(cavity * below_diaphragm, _LIVER_HU - 12 * (g.x > 0), Tissue.SOFT_TISSUE)

    # Spine position (needed by the mediastinum, the lungs and the ribs).
    vert_r = u(15, 19)
    vert_y = cav_cy + cav_b[..., :1].min() - u(6, 14)

    # Mediastinum: heart, aorta, trachea; the lungs are excluded from all of it.
    heart_x, heart_z, heart_c = u(12, 30), dome_z[1] + u(18, 32), u(48, 62)
    heart_a, heart_b = u(52, 64), u(42, 52)
    heart_scale = np.sqrt(np.clip(1 - ((g.z - heart_z) / heart_c) ** 2, 0, 1))
    heart_y = cav_cy - cav_b + heart_b + u(2, 10)
    heart = g.ellipse(heart_x, heart_y, heart_a * heart_scale, heart_b * heart_scale)
    pericardium = g.ellipse(heart_x, heart_y, heart_a * heart_scale + 5, heart_b * heart_scale + 5)
    pericardium *= (heart_scale > 0).astype(np.float32)

    arch_z = z_apex - u(55, 75)
    desc_x, desc_y, desc_r = u(18, 28), vert_y - vert_r - u(4, 10), u(10, 13)
    asc_x, asc_y, asc_r = u(-12, -2), heart_y - heart_b * 0.2, u(12, 16)
    descending = g.ellipse(desc_x, desc_y, desc_r, desc_r) * g.slab(0, arch_z + 5)
    ascending = g.ellipse(asc_x, asc_y, asc_r, asc_r) * g.slab(heart_z, arch_z + 5)
    arch = _segment(g, (asc_x, asc_y), (desc_x, desc_y), asc_r) * g.slab(arch_z - 8, arch_z + 10)
    carina_z = arch_z - u(10, 20)
    trachea_y = vert_y - vert_r - 24
    trachea = g.ellipse(0.0, trachea_y, 9.5, 9.0) * g.slab(carina_z, 400)
    t = np.clip((carina_z - g.z) / 45.0, 0, 1)
    bronchi = sum(
        g.ellipse(side * (6 + 22 * t), trachea_y + 6 * t, 6.5 - 2 * t, 6.5 - 2 * t)
        * g.slab(carina_z - 45, carina_z)
        for side in (-1, 1)
    )
    med_half_width = 20 + 8 * rise
    midline = g.ellipse(3.0, cav_cy - 0.15 * cav_b, med_half_width, 0.95 * cav_b, exponent=2.5)
    spine_zone = g.ellipse(0.0, vert_y + 6, vert_r + 10, vert_r + 16)
    mediastinum = _union(
        pericardium, midline * g.slab(heart_z - heart_c, 400), spine_zone, descending, ascending, arch
    )

    # Lungs: cavity above the diaphragm, outside the mediastinum, shrinking towards the apices.
    apex_scale = np.sqrt(np.clip((z_apex - g.z) / (0.32 * z_apex), 0, 1))
    above_diaphragm = 1.0 - below_diaphragm
    lungs_cov = np.zeros(shape, dtype=np.float32)
    hila = []
    for side in (-1, 1):
        lx = side * 0.5 * cav_a
        lung = g.ellipse(lx, cav_cy + 5, 0.62 * cav_a * apex_scale + 1e-3, 1.02 * cav_b * apex_scale + 1e-3)
        lungs_cov = np.maximum(lungs_cov, lung * (side * g.x > 0))
        hila.append((side * 0.32 * float(cav_a.mean()), cav_cy + 5, 0.5 * (dome_z[side] + z_apex) - 20))
    lungs_cov *= cavity * above_diaphragm * (1 - mediastinum) * g.slab(0, z_apex)
    lungs = lungs_cov >= 0.5

    parenchyma = _LUNG_HU + 10 * _smooth_noise(rng, shape, 20, g.spacing).clip(-2, 2)
    parenchyma += _dependent_density(g, lungs, diaphragm, z_apex, u(*_DEPENDENT_DENSITY_HU), u(8, 18))
    canvas.paint(lungs_cov, parenchyma, Tissue.LUNG)

    vessels = _vessel_tree(g, rng, lungs, hila) * lungs_cov
    canvas.paint(vessels, _VESSEL_HU, Tissue.VESSEL)

    canvas.paint(pericardium * (1 - heart), _FAT_HU, Tissue.FAT)
    canvas.paint(heart, _BLOOD_HU, Tissue.HEART)
    for vessel in (descending, ascending, arch):
        canvas.paint(vessel, _BLOOD_HU + 5, Tissue.HEART)
    airway = np.maximum(trachea, bronchi)
    canvas.paint(
        np.maximum(
            g.ellipse(0.0, trachea_y, 12, 11.5) * g.slab(carina_z, 400),
            sum(
                g.ellipse(side * (6 + 22 * t), trachea_y + 6 * t, 8.5 - 2 * t, 8.5 - 2 * t)
                * g.slab(carina_z - 45, carina_z)
                for side in (-1, 1)
            ),
        ),
        _MUSCLE_HU,
        Tissue.SOFT_TISSUE,
    )
    canvas.paint(airway, _AIR_HU, Tissue.AIRWAY)

    _paint_spine(canvas, g, rng, vert_y, vert_r)
    _paint_ribs(canvas, g, rng, cav_cy, cav_a, cav_b, vert_y)
    sternum = g.ellipse(0.0, cav_cy - cav_b - 9, 15, 7) * g.slab(heart_z - heart_c * 0.6, z_apex - 15)
    canvas.paint(sternum, _CORTICAL_HU, Tissue.BONE)
    canvas.paint(g.ellipse(0.0, cav_cy - cav_b - 9, 11, 4) * (sternum >= 0.5), _CANCELLOUS_HU, Tissue.BONE)

    return ChestPhantom(
        hu=canvas.hu, tissue=canvas.tissue, lungs=lungs, purity=canvas.purity, spacing=g.spacing
    )


def _union(*coverages: np.ndarray) -> np.ndarray:
    """Soft union (voxel-wise maximum) of coverages that broadcast to one shape."""
    return functools.reduce(np.maximum, coverages)


def _segment(g: _Geometry, a: tuple[float, float], b: tuple[float, float], radius: float) -> np.ndarray:
    """Soft coverage of an in-plane capsule of ``radius`` around the segment a-b."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((g.x - ax) * dx + (g.y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    dist = np.hypot(g.x - ax - t * dx, g.y - ay - t * dy)
    return g.soft(dist / radius, radius)


def _paint_table(canvas: _Canvas, g: _Geometry, top: float) -> None:
    """A curved carbon-fibre table top (two dense shells around a foam core) below the patient."""
    surface = top - 30.0 * (g.x / (PHANTOM_FOV_MM / 2)) ** 2
    depth = g.y - surface
    width = g.ellipse(0.0, 0.0, 0.46 * PHANTOM_FOV_MM, 1e4, exponent=8.0)
    for low, high, hu in ((0.0, 30.0, -900.0), (0.0, 2.5, 250.0), (27.5, 30.0, 250.0)):
        shell = np.clip(0.5 + (depth - low) / g.pixel, 0, 1) * np.clip(0.5 + (high - depth) / g.pixel, 0, 1)
        canvas.paint((shell * width).astype(np.float32), hu, Tissue.TABLE)


def _paint_spine(
    canvas: _Canvas, g: _Geometry, rng: np.random.Generator, vert_y: float, vert_r: float
) -> None:
    """Vertebral bodies (cortical shell, cancellous core, discs), spinal canal and posterior arch."""
    period = rng.uniform(24, 30)
    phase = rng.uniform(0, period)
    disc = (np.mod(g.z + phase, period) < 5.5).astype(np.float32)
    canvas.paint(g.ellipse(0.0, vert_y, vert_r + 9, vert_r + 12), _MUSCLE_HU, Tissue.SOFT_TISSUE)
    # Disc and bone levels are painted apart: repainting a soft edge would leave a ghost of it.
    body = g.ellipse(0.0, vert_y, vert_r, vert_r * 0.9)
    canvas.paint(body * (1 - disc), _CORTICAL_HU, Tissue.BONE)
    core = g.ellipse(0.0, vert_y, vert_r - 2.5, vert_r * 0.9 - 2.5)
    canvas.paint(core * (1 - disc), _CANCELLOUS_HU, Tissue.BONE)
    canvas.paint(body * disc, _DISC_HU, Tissue.SOFT_TISSUE)
    canal_y = vert_y + vert_r * 0.9 + 8.5
    arch = _union(
        g.ellipse(0.0, canal_y, 13.5, 13.0),
        g.ellipse(0.0, canal_y + 24, 4.0, 14.0),
        g.ellipse(-20.0, canal_y - 2, 15.0, 5.0),
        g.ellipse(20.0, canal_y - 2, 15.0, 5.0),
    )
    canvas.paint(arch * (1 - disc), _CORTICAL_HU - 150, Tissue.BONE)
    canvas.paint(g.ellipse(0.0, canal_y, 8.0, 7.5), 10.0, Tissue.SOFT_TISSUE)


def _paint_ribs(
    canvas: _Canvas, g: _Geometry, rng: np.random.Generator, cy: float, cav_a, cav_b, vert_y: float
) -> None:
    """Rib cross-sections on a ring around the cavity; each rib descends from back to front."""
    pitch, drop, phase = rng.uniform(24, 30), rng.uniform(55, 80), rng.uniform(0, 1)
    inner = g.ellipse(0.0, cy, cav_a + 2, cav_b + 2, exponent=2.1)
    outer = g.ellipse(0.0, cy, cav_a + 12, cav_b + 12, exponent=2.1)
    ring = outer * (1 - inner)
    theta = np.arctan2(g.y - cy, g.x)
    frontness = 0.5 * (1 - np.sin(theta))
    rib_phase = (g.z + drop * frontness) / pitch + phase
    crossing = np.clip((np.cos(2 * np.pi * rib_phase) - 0.35) * 3.0, 0, 1)
    not_midline = np.clip((np.abs(g.x) - 22.0) / g.pixel, 0, 1)
    ribs = (ring * crossing * not_midline).astype(np.float32)
    canvas.paint(ribs, _CORTICAL_HU - 100, Tissue.BONE)
    marrow = g.ellipse(0.0, cy, cav_a + 9, cav_b + 9, exponent=2.1) * (
        1 - g.ellipse(0.0, cy, cav_a + 5, cav_b + 5, exponent=2.1)
    )
    canvas.paint(marrow * (ribs >= 0.99), _CANCELLOUS_HU, Tissue.BONE)
    del vert_y


def _dependent_density(
    g: _Geometry, lungs: np.ndarray, diaphragm: np.ndarray, z_apex: float, peak_hu: float, depth_mm: float
) -> np.ndarray:
    """Gravity-dependent density: rises towards the posterior lung surface, strongest at the bases."""
    posterior_edge = np.where(lungs, g.y, -np.inf).max(axis=1, keepdims=True)
    depth = np.where(np.isfinite(posterior_edge), posterior_edge - g.y, np.inf)
    base_weight = np.clip(1.0 - (g.z - diaphragm.max()) / (z_apex - diaphragm.max()), 0.25, 1.0)
    return (peak_hu * base_weight * np.exp(-np.maximum(depth, 0) / depth_mm)).astype(np.float32)


def _vessel_tree(g: _Geometry, rng: np.random.Generator, lungs: np.ndarray, hila) -> np.ndarray:
    """Coverage of pulmonary vessels radiating from the hila, thinning towards the periphery.

    A vessel lies where two independent smooth random fields both cross zero. The fields are
    read at each voxel's direction from its hilum (slowly drifting with the distance), so the
    zero curves run outwards from the hilum like the vascular tree, bending as they go. Finer
    scales add more and thinner vessels. A vessel thinner than a pixel is drawn one pixel wide
    with its contrast cut by the area ratio, as the partial-volume effect of a scanner does.
    """
    coverage = np.zeros(lungs.shape, dtype=np.float32)
    inside = np.nonzero(lungs)
    x, y, z = (np.broadcast_to(c, lungs.shape)[inside] for c in (g.x, g.y, g.z))
    for (hx, hy, hz), side in zip(hila, (-1, 1)):
        here = side * x > 0
        dx, dy, dz = x[here] - hx, y[here] - hy, z[here] - hz
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
        reach = 1.0 + dist / _VESSEL_DRIFT_MM
        direction = np.stack([dx, dy, dz]) / dist * reach
        tubes = np.zeros(dist.shape, dtype=np.float32)
        for angle, radius_mm, reach_mm, start_mm in _VESSEL_SCALES:
            cells = _VESSEL_GRID_SIGMA / angle  # grid cells per unit of direction
            extent = 1.0 + float(dist.max()) / _VESSEL_DRIFT_MM + 0.1
            n = int(np.ceil(2 * extent * cells)) + 1
            coords = (direction + extent) * cells
            # A unit-variance field smoothed at sigma changes by about 1 / (1.4 sigma) per grid cell.
            per_mm = cells / (dist * 1.4 * _VESSEL_GRID_SIGMA)
            # Capped: a tube wider than a fraction of the field's spread turns into a blob.
            width = np.minimum(radius_mm * np.exp(-dist / reach_mm) * per_mm, 0.3)
            drawn = np.maximum(width, 0.6 * g.pixel * per_mm)
            a, b = (
                ndimage.map_coordinates(
                    _smooth_noise(rng, (n, n, n), _VESSEL_GRID_SIGMA, (1, 1, 1)), coords, order=1
                )
                for _ in range(2)
            )
            tube = np.exp(-(a * a + b * b) / (2 * drawn * drawn)) * (width / drawn) ** 2
            tube *= np.clip((dist - start_mm) / 15.0, 0, 1)
            tubes = np.maximum(tubes, tube)
        values = np.zeros(x.shape, dtype=np.float32)
        values[here] = tubes
        coverage[inside] = np.maximum(coverage[inside], values)
    return coverage


def add_scanner_noise(hu: np.ndarray, sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Add slightly correlated Gaussian scanner noise of standard deviation ``sigma_hu``.

    Args:
        hu: (H, W, D) volume in HU.
        sigma_hu: noise standard deviation (10-20 HU is typical of a diagnostic chest CT).
        rng: noise source.

    Returns:
        A new float32 volume.
    """
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0.6, 0.6, 0.0))
    noise *= sigma_hu / max(float(noise.std()), 1e-6)
    return (hu + noise).astype(np.float32)
