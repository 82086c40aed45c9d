"""Stochastic enhancement of CT slices (random-walk base layer + spray-based stochastic layer).

The enhancer of Mohammed et al., "Stochastic Capsule Endoscopy Image Enhancement" (J. Imaging
2018), as fixed by ``specs/stochastic_enhancement.md``. For every pixel ``x0`` it draws
``chains`` chains of ``points`` samples: a random walk inside radius ``r1`` and "sprays" farther
away. The walks give an edge-aware base layer ``B`` (a weighted mean of the intensities they
visit, with weights ``exp(-(|I - I(x0)| / alpha + TV / beta))`` where ``TV`` is the walk's total
variation of the Sobel gradient magnitude); the chains' ranges give a stochastic layer ``S`` (the
Beta(0.5, 0.5) cdf of the mean relative position of ``I(x0)`` between each chain's minimum and
maximum). The output is ``clip(B + k (gamma1 (I - B) + gamma2 (S - B)), 0, 1)``.

The sampling runs in numba kernels (``transforms._stochastic_kernels``; ``device="cuda"`` runs the
same per-pixel routine as a numba.cuda kernel). On a 2-core CPU a 256 x 256 slice at the default
5,000 samples per pixel takes about 2 CPU-seconds (about 1 s on both cores), some 21 times less
than a straightforward numba port of the reference loop; see ``benchmarks/bench_stochastic.py``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import NamedTuple

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage

from transforms import _stochastic_kernels as kernels
from transforms.validation import InvalidVolumeError, check_finite, check_volume, source_name

__all__ = [
    "PRESETS",
    "EnhancementLayers",
    "StochasticEnhance",
    "StochasticEnhanceD",
    "StochasticEnhanceDict",
    "StochasticEnhanced",
    "sobel_magnitude",
]

PRESETS = {"paper": {"alpha": 0.5, "beta": 0.3}}
"""Named parameter sets: ``"paper"`` uses the ResNext+ paper's sigma_I = 0.5 and sigma_g = 0.3 as
the normalisation constants ``alpha`` and ``beta`` (far more edge-aware than the default 10)."""
UNIT_RANGE_TOLERANCE = 1e-3
"""Input may exceed [0, 1] by this much (rounding of earlier steps); it is clipped. More is refused."""
LAYER_NAMES = ("base", "stochastic", "detail", "contrast")
"""The layers besides the enhanced image, in :class:`EnhancementLayers` and as dictionary key suffixes."""


class EnhancementLayers(NamedTuple):
    """Result of :class:`StochasticEnhance` with ``return_layers=True``; every field has the input's
    type, shape and meta data.

    Attributes:
        enhanced: ``clip(B + k (gamma1 D1 + gamma2 D2), 0, 1)``.
        base: the base layer ``B`` (weighted mean of the random walks' intensities).
        stochastic: the stochastic layer ``S`` (Beta(0.5, 0.5) cdf of the mean relative position).
        detail: ``D1 = I - B``.
        contrast: ``D2 = S - B``.
    """

    enhanced: NdarrayOrTensor
    base: NdarrayOrTensor
    stochastic: NdarrayOrTensor
    detail: NdarrayOrTensor
    contrast: NdarrayOrTensor


def sobel_magnitude(slices: np.ndarray) -> np.ndarray:
    """Gradient magnitude ``sqrt(gx^2 + gy^2)`` of each 2D slice of ``(slices, H, W)``.

    Unnormalised 3 x 3 Sobel derivatives with zero padding: a ramp of slope 1 per pixel gives 8.
    """
    out = np.empty(slices.shape, dtype=np.float32)
    for i, plane in enumerate(slices.astype(np.float64, copy=False)):
        gy = ndimage.sobel(plane, axis=0, mode="constant", cval=0.0)
        gx = ndimage.sobel(plane, axis=1, mode="constant", cval=0.0)
        out[i] = np.hypot(gx, gy)
    return out


class StochasticEnhance(Transform):
    """Stochastic enhancement of a channel-first CT slice ``(1, H, W)`` or volume ``(1, H, W, D)``.

    A volume is enhanced slice by slice along its last (axial) axis. Input must be in [0, 1]
    (window the HU first); the output is in [0, 1], with the input's type, device and meta data.

    The transform is deterministic: every pixel draws from its own counter-based random stream,
    keyed by ``(seed, slice, row, column)``, so a given seed always gives the same output,
    whatever the number of threads or the device. It is therefore not a ``Randomizable``: as
    deterministic preprocessing, MONAI's ``CacheDataset`` caches its (expensive) result, which
    it would not do for a random transform. Change ``seed`` for another sample.

    A constant image keeps ``B = I`` but gets ``S = 0.5`` (every chain's maximum equals its
    minimum, and the spec sets ``s = 0.5`` then), so it moves towards 0.5 by ``k * gamma2 * (0.5 - I)``;
    only ``I = 0.5`` or ``gamma2 = 0`` leave it unchanged.

    Args:
        chains: chains per pixel (the paper's n).
        points: points per chain (the paper's M): at most ``points // 2`` walk steps, sprays for the rest.
        r1: radius of the random walk, in pixels.
        r2: outer spray radius in pixels; ``None`` is the image diagonal ``hypot(H, W)``.
        alpha: normalisation of the intensity difference in the walk weights.
        beta: normalisation of the walk's total variation of the gradient magnitude (a ramp of
            slope 1 per pixel has gradient magnitude 8).
        gamma1: weight of the detail layer ``D1 = I - B``.
        gamma2: weight of the contrast layer ``D2 = S - B``.
        k: gain of the detail ``gamma1 D1 + gamma2 D2`` added to ``B``.
        preset: ``"paper"`` replaces ``alpha`` and ``beta`` by the paper's 0.5 and 0.3.
        seed: seed of the random streams (any int).
        return_layers: return an :class:`EnhancementLayers` (enhanced image, ``B``, ``S``, ``D1``,
            ``D2``) instead of the enhanced image alone.
        device: ``"cpu"`` (numba, all cores) or ``"cuda"`` (numba.cuda kernel, same random streams:
            results agree with the CPU's to rounding).

    Raises:
        ValueError: invalid parameters.
        InvalidVolumeError: input of the wrong shape, with NaN/infinite values or outside [0, 1],
            or too small for ``r1``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        chains: int = 20,
        points: int = 250,
        r1: float = 10,
        r2: float | None = None,
        alpha: float = 10.0,
        beta: float = 10.0,
        gamma1: float = 0.5,
        gamma2: float = 0.3,
        k: float = 2.5,
        preset: str | None = None,
        seed: int = 0,
        return_layers: bool = False,
        device: str = "cpu",
    ) -> None:
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}, expected one of {sorted(PRESETS)} or None")
            alpha, beta = PRESETS[preset]["alpha"], PRESETS[preset]["beta"]
        if int(chains) != chains or chains < 1 or int(points) != points or points < 1:
            raise ValueError(f"chains and points must be positive integers, got {chains} and {points}")
        if not r1 > 0 or (r2 is not None and not r2 > r1):
            raise ValueError(f"need 0 < r1 < r2, got r1={r1}, r2={r2}")
        if not alpha > 0 or not beta > 0:
            raise ValueError(f"alpha and beta must be positive, got alpha={alpha}, beta={beta}")
        if not all(math.isfinite(v) for v in (gamma1, gamma2, k)):
            raise ValueError(f"gamma1, gamma2 and k must be finite, got {gamma1}, {gamma2}, {k}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.chains = int(chains)
        self.points = int(points)
        self.r1 = float(r1)
        self.r2 = None if r2 is None else float(r2)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma1 = float(gamma1)
        self.gamma2 = float(gamma2)
        self.k = float(k)
        self.preset = preset
        self.seed = int(seed)
        self.return_layers = return_layers
        self.device = device

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None
    ) -> NdarrayOrTensor | EnhancementLayers:
        """Enhance ``img``.

        Args:
            img: ``(1, H, W)`` or ``(1, H, W, D)`` with values in [0, 1]; numpy, torch or MetaTensor.
            mask: optional region of the same shape (or without the channel axis): pixels where it
                is 0 are returned unchanged (``B = S = I`` there) and are not sampled at all, which
                saves their share of the time. Walks and sprays of pixels inside still sample the
                whole image.

        Returns:
            The enhanced image, or an :class:`EnhancementLayers` with ``return_layers=True``.
        """
        name = source_name(img)
        check_volume(img, name, allow_2d=True)
        check_finite(img, name)
        data = convert_data_type(img, np.ndarray, dtype=np.float32)[0]
        self._check_unit_range(data, name)
        stack = self._to_stack(np.clip(data, 0.0, 1.0))
        height, width = stack.shape[1:]
        half_diagonal = math.hypot(height, width) / 2.0
        r2 = 2.0 * half_diagonal if self.r2 is None else self.r2
        if not half_diagonal > self.r1:
            raise InvalidVolumeError(
                f"{name}: a {height} x {width} slice is too small for r1={self.r1:g}: its central pixels "
                f"could draw no spray point beyond r1 (need r1 < hypot(H, W) / 2 = {half_diagonal:g})"
            )
        region = self._mask_stack(mask, data.shape, stack.shape, name)

        base, stoch = self._layers(stack, region, r2)
        detail = stack - base
        contrast = stoch - base
        enhanced = np.clip(base + self.k * (self.gamma1 * detail + self.gamma2 * contrast), 0.0, 1.0)

        def back(layer: np.ndarray) -> NdarrayOrTensor:
            return convert_to_dst_type(self._from_stack(layer, data.shape), img, dtype=np.float32)[0]

        if not self.return_layers:
            return back(enhanced)
        return EnhancementLayers(back(enhanced), back(base), back(stoch), back(detail), back(contrast))

    def _layers(self, stack: np.ndarray, region: np.ndarray, r2: float) -> tuple[np.ndarray, np.ndarray]:
        """``B`` and ``S`` of a ``(slices, H, W)`` stack from the CPU or CUDA kernel."""
        grad = sobel_magnitude(stack)
        args = (
            stack,
            grad,
            region,
            kernels.seed_key(self.seed),
            0,
            self.chains,
            self.points,
            self.r1,
            float(r2),
            self.alpha,
            self.beta,
        )
        if self.device == "cuda":
            from transforms import _stochastic_cuda  # imported here: CPU-only machines never touch CUDA

            return _stochastic_cuda.enhance_layers(*args)
        return kernels.enhance(*args)

    @staticmethod
    def _check_unit_range(data: np.ndarray, name: str) -> None:
        low, high = float(data.min()), float(data.max())
        if low < -UNIT_RANGE_TOLERANCE or high > 1.0 + UNIT_RANGE_TOLERANCE:
            raise InvalidVolumeError(
                f"{name}: values range {low:g}..{high:g}, expected [0, 1] "
                "(window the CT to [0, 1] first, e.g. with ScaleIntensityRange(..., clip=True))"
            )

    @staticmethod
    def _to_stack(data: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """``(1, H, W)`` or ``(1, H, W, D)`` -> C-contiguous ``(D, H, W)`` (``D = 1`` for a slice)."""
        stack = data if data.ndim == 3 else np.moveaxis(data[0], -1, 0)
        return np.ascontiguousarray(stack, dtype=dtype)

    @staticmethod
    def _from_stack(stack: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`_to_stack` for an input of ``shape``."""
        return stack if len(shape) == 3 else np.moveaxis(stack, 0, -1)[None]

    def _mask_stack(
        self, mask: NdarrayOrTensor | None, shape: tuple[int, ...], stack_shape: tuple[int, ...], name: str
    ) -> np.ndarray:
        """The region to enhance as a uint8 ``(D, H, W)`` stack (all ones without a mask)."""
        if mask is None:
            return np.ones(stack_shape, dtype=np.uint8)
        region = convert_data_type(mask, np.ndarray)[0]
        if region.shape == shape[1:]:
            region = region[None]
        if region.shape != shape:
            raise InvalidVolumeError(
                f"{name}: mask shape {region.shape} does not match the image shape {shape}"
            )
        return self._to_stack(region != 0, dtype=np.uint8)


class StochasticEnhanced(MapTransform):
    """Dictionary-based wrapper of :class:`StochasticEnhance`.

    With ``return_layers=True`` the enhanced image replaces ``data[key]`` and the layers are
    stored as ``data[f"{key}_base"]``, ``_stochastic``, ``_detail`` and ``_contrast``.

    Args:
        keys: keys of the images to enhance.
        mask_key: key of a region mask (e.g. the dilated lung mask); pixels outside it are left
            as they are and cost no time. ``None`` enhances whole slices.
        allow_missing_keys: don't raise when a key is missing.
        chains, points, r1, r2, alpha, beta, gamma1, gamma2, k, preset, seed, return_layers,
            device: see :class:`StochasticEnhance`.
    """

    backend = StochasticEnhance.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: Hashable | None = None,
        allow_missing_keys: bool = False,
        chains: int = 20,
        points: int = 250,
        r1: float = 10,
        r2: float | None = None,
        alpha: float = 10.0,
        beta: float = 10.0,
        gamma1: float = 0.5,
        gamma2: float = 0.3,
        k: float = 2.5,
        preset: str | None = None,
        seed: int = 0,
        return_layers: bool = False,
        device: str = "cpu",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.enhancer = StochasticEnhance(
            chains=chains,
            points=points,
            r1=r1,
            r2=r2,
            alpha=alpha,
            beta=beta,
            gamma1=gamma1,
            gamma2=gamma2,
            k=k,
            preset=preset,
            seed=seed,
            return_layers=return_layers,
            device=device,
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise KeyError(f"mask_key {self.mask_key!r} is not in the data (keys: {list(d)})")
            mask = d[self.mask_key]
        for key in self.key_iterator(d):
            result = self.enhancer(d[key], mask=mask)
            if isinstance(result, EnhancementLayers):
                d[key] = result.enhanced
                for layer in LAYER_NAMES:
                    d[f"{key}_{layer}"] = getattr(result, layer)
            else:
                d[key] = result
        return d


StochasticEnhanceD = StochasticEnhanceDict = StochasticEnhanced
