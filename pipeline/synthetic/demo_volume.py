"""One demo volume and what every source of demo volumes shares: HU range, random streams.

Every volume draws from its own random streams, derived from ``(seed, label, index)``: a volume
does not depend on how many others are made or in which order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synthetic.lesions import slice_labels

__all__ = ["HU_RANGE", "DemoVolume", "to_int16", "volume_streams"]

HU_RANGE = (-1024, 3071)
"""HU stored in the int16 volumes (the usual 12-bit CT range)."""


@dataclass(frozen=True)
class DemoVolume:
    """One generated volume.

    Attributes:
        hu: (H, W, D) int16 Hounsfield units, axial slices last.
        affine: 4 x 4 voxel-to-world matrix in RAS, as MONAI and NIfTI use it.
        lesions: (H, W, D) bool lesion voxels (all False for a negative).
        lungs: (H, W, D) bool lung mask the lesions were confined to.
        tissue: (H, W, D) uint8 :class:`pipeline.synthetic.phantom.Tissue` labels (phantoms only).
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


def volume_streams(seed: int, label: int, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for one volume's anatomy (or augmentation), lesions and noise."""
    sequence = np.random.SeedSequence(seed, spawn_key=(int(label), int(index)))
    return tuple(np.random.default_rng(child) for child in sequence.spawn(3))


def to_int16(hu: np.ndarray) -> np.ndarray:
    """HU rounded and clipped to :data:`HU_RANGE`, as int16."""
    return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
