"""NIfTI files written atomically and byte-for-byte reproducibly."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data.atomic_files import atomic_write_bytes

__all__ = ["write_nifti"]


def write_nifti(
    path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None
) -> Path:
    """Write ``volume`` as a NIfTI file with ``affine``, atomically.

    Both the qform and the sform hold ``affine`` (RAS, as NIfTI defines it) with units of mm,
    so that nibabel and ITK read the same geometry. A ``.gz`` name is gzip-compressed without a
    time stamp or file name in the stream: the same arguments give the same bytes.

    Args:
        path: target file (``.nii`` or ``.nii.gz``).
        volume: the voxel array.
        affine: 4 x 4 voxel-to-RAS matrix.
        dtype: the stored data type (``volume``'s own by default).

    Returns:
        The path written.

    Raises:
        ValueError: a file name that does not end in ``.nii`` or ``.nii.gz``.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: expected a .nii or .nii.gz file name")
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(volume, dtype=dtype), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    return atomic_write_bytes(path, data)
