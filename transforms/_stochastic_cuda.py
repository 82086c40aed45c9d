"""numba.cuda kernel of the stochastic enhancer: one GPU thread per pixel.

Each thread runs :func:`transforms._stochastic_kernels.pixel_layers_sequential`, compiled for the
GPU from the same Python source as the CPU's functions and with the same counter-based random
streams, so CPU and GPU draw the same samples; their results differ only where floating-point
rounding differs (a spray point exactly on a pixel boundary, the last bits of ``exp``).

Only :class:`transforms.stochastic_enhance.StochasticEnhance` with ``device="cuda"`` imports
this module, so CPU-only machines never load or initialise CUDA.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import cuda, float64, uint32

from transforms import _stochastic_kernels as kernels

__all__ = ["enhance_layers"]

THREADS_PER_BLOCK = 128

# The per-pixel routine and everything it calls, callees first.
_DEVICE_CHAIN = (
    "mix64",
    "next_draw",
    "chain_state",
    "spray_state",
    "pixel_key",
    "unit_direction",
    "_neighbour",
    "_next_neighbour",
    "_border_step",
    "walk_step",
    "_exit_distance",
    "spray_sectors",
    "spray_candidate",
    "pixel_layers_sequential",
)


def _floor(x: float) -> float:
    """``floor(x)`` as a float (numba's CUDA target lacks ``np.floor`` on scalars)."""
    return np.float64(math.floor(x))


def _device_functions() -> dict[str, object]:
    """CUDA device versions of the CPU kernels' functions, built from their Python source.

    Each function is recompiled with ``cuda.jit(device=True)`` and sees the device versions of
    its callees instead of the CPU dispatchers (the CPU's fast-math and caching options do not
    carry over: the GPU computes with IEEE division and square root).
    """
    device: dict[str, object] = {"_floor": cuda.jit(device=True)(_floor)}
    for name in _DEVICE_CHAIN:
        source = getattr(kernels, name).py_func
        namespace = dict(source.__globals__)
        namespace.update(device)
        function = types.FunctionType(source.__code__, namespace, source.__name__, source.__defaults__)
        device[name] = cuda.jit(device=True)(function)
    return device


_DEVICE = _device_functions()
_pixel_key = _DEVICE["pixel_key"]
_pixel_layers = _DEVICE["pixel_layers_sequential"]
_SECTORS = kernels.SECTORS


@cuda.jit
def _enhance_kernel(
    img, grad, mask, key, slice_offset, height, width, chains, points, r1, r2, alpha, beta, base, stoch
):
    index = cuda.grid(1)
    size = height * width
    if index >= img.shape[0] * size:
        return
    s = index // size
    p = index - s * size
    if mask[s, p] == 0:
        base[s, p] = img[s, p]
        stoch[s, p] = img[s, p]
        return
    row = p // width
    col = p - row * width
    reach = cuda.local.array(_SECTORS, float64)
    thresholds = cuda.local.array(_SECTORS, uint32)
    pkey = _pixel_key(key, s + slice_offset, row, col)
    b, st = _pixel_layers(
        img[s], grad[s], height, width, row, col, pkey, chains, points, r1, r2, alpha, beta, reach, thresholds
    )
    base[s, p] = b
    stoch[s, p] = st


def enhance_layers(
    img: np.ndarray,
    grad: np.ndarray,
    mask: np.ndarray,
    key: np.uint64,
    slice_offset: int,
    chains: int,
    points: int,
    r1: float,
    r2: float,
    alpha: float,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GPU version of :func:`transforms._stochastic_kernels.enhance_layers` (same arguments).

    Raises:
        RuntimeError: no CUDA GPU is available.
    """
    if not cuda.is_available():
        raise RuntimeError("device='cuda' needs a CUDA GPU and driver; none is available (use device='cpu')")
    n_slices, height, width = img.shape
    flat = (n_slices, height * width)
    d_img = cuda.to_device(np.ascontiguousarray(img, dtype=np.float32).reshape(flat))
    d_grad = cuda.to_device(np.ascontiguousarray(grad, dtype=np.float32).reshape(flat))
    d_mask = cuda.to_device(np.ascontiguousarray(mask, dtype=np.uint8).reshape(flat))
    d_base = cuda.device_array(flat, dtype=np.float32)
    d_stoch = cuda.device_array(flat, dtype=np.float32)
    blocks = (n_slices * height * width + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    _enhance_kernel[blocks, THREADS_PER_BLOCK](
        d_img,
        d_grad,
        d_mask,
        np.uint64(key),
        np.int64(slice_offset),
        np.int64(height),
        np.int64(width),
        np.int64(chains),
        np.int64(points),
        np.float64(r1),
        np.float64(r2),
        np.float64(alpha),
        np.float64(beta),
        d_base,
        d_stoch,
    )
    cuda.synchronize()
    shape = (n_slices, height, width)
    return d_base.copy_to_host().reshape(shape), d_stoch.copy_to_host().reshape(shape)
