"""Input checks shared by the transforms: clear errors that name the file and the problem."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["InvalidVolumeError", "check_finite", "check_hu", "check_volume", "source_name"]

HU_AIR_EVIDENCE = -500.0
"""A CT volume in Hounsfield units holds air (about -1000 HU); data never below this is not HU."""


class InvalidVolumeError(ValueError):
    """An input volume that the pipeline refuses to process (not HU, 2D, empty, NaN, ...)."""


def source_name(img: Any, meta: Mapping | None = None) -> str:
    """The file an image came from, for error messages.

    Args:
        img: a MetaTensor (its ``filename_or_obj`` meta data is used) or any array.
        meta: optional meta data dictionary to look in when ``img`` carries none.

    Returns:
        The file name, or ``"<array>"`` when the image has no recorded source.
    """
    for candidate in (getattr(img, "meta", None), meta):
        if isinstance(candidate, Mapping):
            name = candidate.get("filename_or_obj")
            if isinstance(name, (list, tuple)) and name:
                name = name[0]
            if name:
                return os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    return "<array>"


def _as_numpy(img: Any) -> np.ndarray:
    if isinstance(img, MetaTensor):
        return img.as_tensor().detach().cpu().numpy()
    if isinstance(img, torch.Tensor):
        return img.detach().cpu().numpy()
    return np.asarray(img)


def check_volume(img: Any, name: str | None = None, allow_2d: bool = False) -> None:
    """Check that ``img`` is a channel-first volume ``(1, H, W, D)`` with content.

    Args:
        img: numpy array, torch tensor or MetaTensor.
        name: source name for the message; read from ``img``'s meta data when omitted.
        allow_2d: also accept a single slice ``(1, H, W)``.

    Raises:
        InvalidVolumeError: wrong number of dimensions, more than one channel, or no voxels.
    """
    name = name or source_name(img)
    shape = tuple(img.shape)
    allowed = (3, 4) if allow_2d else (4,)
    if len(shape) not in allowed:
        expected = "(1, H, W) or (1, H, W, D)" if allow_2d else "(1, H, W, D)"
        raise InvalidVolumeError(
            f"{name}: expected a channel-first image {expected} with axial slices last, got shape {shape}"
            + (" (a 2D image is not a CT volume)" if len(shape) == 3 and not allow_2d else "")
        )
    if shape[0] != 1:
        raise InvalidVolumeError(f"{name}: expected one channel, got {shape[0]} (shape {shape})")
    if 0 in shape:
        raise InvalidVolumeError(f"{name}: the image is empty (shape {shape})")


def check_finite(img: Any, name: str | None = None) -> None:
    """Raise :class:`InvalidVolumeError` when ``img`` holds NaN or infinite values."""
    data = _as_numpy(img)
    if not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise InvalidVolumeError(f"{name or source_name(img)}: {bad} voxels are NaN or infinite")


def check_hu(img: Any, name: str | None = None) -> None:
    """Raise :class:`InvalidVolumeError` unless ``img`` looks like CT in Hounsfield units.

    A chest CT holds air near -1000 HU; data with no value below -500 (for example a 0..255
    or 0..1 range) is not in HU.
    """
    data = _as_numpy(img)
    lowest = float(data.min()) if data.size else float("nan")
    if not lowest < HU_AIR_EVIDENCE:
        raise InvalidVolumeError(
            f"{source_name(img) if name is None else name}: values range {lowest:g}..{float(data.max()):g}, "
            f"none below {HU_AIR_EVIDENCE:g}: not CT in Hounsfield units "
            "(pass check_hu=False to skip this check)"
        )
