"""Sigmoid tone mapping of CT intensities, the simpler of the ResNext+ paper's two contrast enhancers.

The paper's curve is ``f(I) = 1 / (1 + exp(-a * I^(1/gamma)))`` with ``gamma = 1.5`` and ``a = 0.35``. On
input in [0, 1] its raw output spans only ``f(0) = 0.5`` to ``f(1) = 0.587``, so the output here is
rescaled to [0, 1]: ``(f(I) - f(0)) / (f(1) - f(0))``. With these constants the sigmoid is almost linear
over its short range and the curve is within 0.004 of ``I^(2/3)``: a gamma-like brightening of the dark
(lung) end of the window.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from transforms.validation import InvalidVolumeError, check_finite, check_hu, source_name

__all__ = ["LUNG_WINDOW_HU", "ToneMap", "ToneMapD", "ToneMapDict", "ToneMapd", "tone_curve"]

LUNG_WINDOW_HU = (-1350.0, 150.0)
"""The lung window (HU) mapped to [0, 1] before the curve."""
UNIT_RANGE_SLACK = 0.5
"""With ``window=None``, input beyond [0, 1] by more than this is refused (it is not in [0, 1] at all);
smaller excursions (interpolation overshoot) are clipped."""


def tone_curve(x: torch.Tensor, gamma: float = 1.5, a: float = 0.35) -> torch.Tensor:
    """The normalised tone curve on ``x`` in [0, 1]: ``(f(x) - f(0)) / (f(1) - f(0))``.

    Args:
        x: intensities in [0, 1].
        gamma: exponent ``1 / gamma`` applied before the sigmoid.
        a: slope of the sigmoid.

    Returns:
        Tensor of the same shape, in [0, 1], with ``0 -> 0`` and ``1 -> 1``.
    """
    low = 0.5  # f(0)
    high = 1.0 / (1.0 + np.exp(-a))  # f(1)
    # float32 rounding of the sigmoid can overshoot f(1) by an ulp: 1.0000001 at the top of the window
    return ((torch.sigmoid(a * x.pow(1.0 / gamma)) - low) / (high - low)).clamp(0.0, 1.0)


class ToneMap(Transform):
    """Window CT intensities to [0, 1] and apply the paper's sigmoid tone curve, rescaled to span [0, 1].

    ``I_out = (f(I) - f(0)) / (f(1) - f(0))`` with ``f(I) = 1 / (1 + exp(-a * I^(1/gamma)))`` and ``I`` the
    input windowed to [0, 1] (values outside the window are clipped). With the defaults the curve is within
    0.004 of ``I^(2/3)``.

    Args:
        window: ``(low, high)`` intensities mapped to 0 and 1, by default the lung window -1350..150 HU;
            ``None`` for input already in [0, 1].
        gamma: the curve's exponent is ``1 / gamma``.
        a: slope of the sigmoid.
        check_hu: with a window, refuse input that is not in Hounsfield units (nothing below -500 HU).
        dtype: output data type; floating input keeps its own when ``None``.

    Raises:
        InvalidVolumeError: NaN or infinite values, input not in HU (with a window) or far outside [0, 1]
            (without one).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        window: Sequence[float] | None = LUNG_WINDOW_HU,
        gamma: float = 1.5,
        a: float = 0.35,
        check_hu: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if window is not None and (len(window) != 2 or not window[0] < window[1]):
            raise ValueError(f"window must be (low, high) with low < high, got {window}")
        if gamma <= 0 or a <= 0:
            raise ValueError(f"gamma and a must be positive, got gamma={gamma}, a={a}")
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.gamma = gamma
        self.a = a
        self.check_hu = check_hu
        self.dtype = dtype

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Tone-map ``img`` (any shape); returns the same type and device, floating point."""
        name = source_name(img)
        check_finite(img, name)
        if self.window is not None and self.check_hu:
            check_hu(img, name)
        data = convert_to_tensor(img, track_meta=False)
        if not data.is_floating_point():
            data = data.float()
        if self.window is None:
            self._check_unit_range(data, name)
            unit = data.clamp(0.0, 1.0)
        else:
            low, high = self.window
            unit = ((data - low) / (high - low)).clamp(0.0, 1.0)
        out = tone_curve(unit, self.gamma, self.a)
        return convert_to_dst_type(out, img, dtype=self.dtype or out.dtype)[0]

    @staticmethod
    def _check_unit_range(data: torch.Tensor, name: str) -> None:
        low, high = float(data.min()), float(data.max())
        if low < -UNIT_RANGE_SLACK or high > 1.0 + UNIT_RANGE_SLACK:
            raise InvalidVolumeError(
                f"{name}: values range {low:g}..{high:g}, expected [0, 1] with window=None "
                "(give a window, e.g. the lung window (-1350, 150) for HU)"
            )


class ToneMapd(MapTransform):
    """Dictionary-based wrapper of :class:`ToneMap`.

    Args:
        keys: keys of the images to tone-map.
        window, gamma, a, check_hu, dtype: see :class:`ToneMap`.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = ToneMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        window: Sequence[float] | None = LUNG_WINDOW_HU,
        gamma: float = 1.5,
        a: float = 0.35,
        check_hu: bool = True,
        dtype: torch.dtype | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapper = ToneMap(window=window, gamma=gamma, a=a, check_hu=check_hu, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mapper(d[key])
        return d


ToneMapD = ToneMapDict = ToneMapd
