"""A slow, plain reference of ``specs/stochastic_enhancement.md`` for tiny images.

Written to be read against the spec line by line: chains are stored as lists of points, random
numbers come from ``numpy.random.Generator``, spray points use ``cos``/``sin`` and the global
``R2`` with rejection, distances use ``hypot``, weights ``exp``. No speed tricks; its random
streams differ from the kernels', so only distributions can be compared.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

NEIGHBOURS = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]


def gradient_magnitude(img: np.ndarray) -> np.ndarray:
    """Unnormalised 3 x 3 Sobel magnitude with zero padding."""
    gy = ndimage.sobel(img.astype(np.float64), axis=0, mode="constant", cval=0.0)
    gx = ndimage.sobel(img.astype(np.float64), axis=1, mode="constant", cval=0.0)
    return np.hypot(gx, gy)


def sample_chain(
    shape: tuple[int, int], row: int, col: int, points: int, r1: float, r2: float, rng: np.random.Generator
) -> tuple[list[tuple[int, int]], int]:
    """One chain around ``(row, col)``: a random walk, then sprays.

    Returns:
        The ``points`` chain points ``(y, x)`` and how many of them belong to the walk (point 0,
        ``(row, col)``, included).
    """
    height, width = shape
    chain = [(row, col)]
    steps = 0
    while math.hypot(chain[-1][0] - row, chain[-1][1] - col) < r1 and steps < points // 2:
        y, x = chain[-1]
        allowed = [(y + dy, x + dx) for dy, dx in NEIGHBOURS if 0 <= y + dy < height and 0 <= x + dx < width]
        chain.append(allowed[rng.integers(len(allowed))] if allowed else (y, x))
        steps += 1
    n_walk = len(chain)
    while len(chain) < points:
        radius = r1 + (r2 - r1) * rng.random()
        theta = 2.0 * math.pi * rng.random()
        y = math.floor(row + radius * math.sin(theta) + 0.5)
        x = math.floor(col + radius * math.cos(theta) + 0.5)
        if 0 <= y < height and 0 <= x < width:
            chain.append((y, x))
    return chain, n_walk


def spray_points(
    shape: tuple[int, int], row: int, col: int, r1: float, r2: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` accepted spray points ``(y, x)`` around ``(row, col)``: the spray step of
    :func:`sample_chain`, vectorised over many draws."""
    height, width = shape
    accepted = []
    total = 0
    while total < n:
        radius = r1 + (r2 - r1) * rng.random(4 * n)
        theta = 2.0 * np.pi * rng.random(4 * n)
        y = np.floor(row + radius * np.sin(theta) + 0.5)
        x = np.floor(col + radius * np.cos(theta) + 0.5)
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        accepted.append(np.stack([y[inside], x[inside]], axis=1))
        total += int(inside.sum())
    return np.concatenate(accepted)[:n].astype(np.int64)


def chain_terms(
    img: np.ndarray,
    grad: np.ndarray,
    row: int,
    col: int,
    chain: list[tuple[int, int]],
    n_walk: int,
    r1: float,
    alpha: float,
    beta: float,
) -> tuple[float, float, float]:
    """The spec's per-chain quantities.

    Returns:
        ``(sum_j w_j, sum_j w_j I(p_j), s)`` for this chain.
    """
    center = float(img[row, col])
    th = sum(1 for y, x in chain if math.hypot(y - row, x - col) < r1)
    sum_w = 0.0
    sum_wi = 0.0
    tv = 0.0
    for j in range(min(th, n_walk)):  # walk points with index below th; spray points get no weight
        y, x = chain[j]
        if j > 0:
            py, px = chain[j - 1]
            tv += abs(float(grad[y, x]) - float(grad[py, px]))
        w = math.exp(-(abs(float(img[y, x]) - center) / alpha + tv / beta))
        if w < 1e-9:
            w = 0.0
        sum_w += w
        sum_wi += w * float(img[y, x])
    values = [float(img[y, x]) for y, x in chain]
    low, high = min(values), max(values)
    s = 0.5 if high == low else (center - low) / (high - low)
    return sum_w, sum_wi, s


def pixel_layers(
    img: np.ndarray,
    grad: np.ndarray,
    row: int,
    col: int,
    chains: list[tuple[list[tuple[int, int]], int]],
    r1: float,
    alpha: float,
    beta: float,
) -> tuple[float, float]:
    """``(B, S)`` at ``(row, col)`` from its chains (each as returned by :func:`sample_chain`)."""
    terms = [chain_terms(img, grad, row, col, chain, n_walk, r1, alpha, beta) for chain, n_walk in chains]
    base = sum(t[1] for t in terms) / sum(t[0] for t in terms)
    stochastic = 2.0 / math.pi * math.asin(math.sqrt(sum(t[2] for t in terms) / len(terms)))
    return base, stochastic


def enhance_layers(
    img: np.ndarray,
    chains: int,
    points: int,
    r1: float,
    r2: float,
    alpha: float,
    beta: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``B`` and ``S`` of a 2D image."""
    grad = gradient_magnitude(img)
    base = np.empty(img.shape)
    stochastic = np.empty(img.shape)
    for row in range(img.shape[0]):
        for col in range(img.shape[1]):
            sampled = [sample_chain(img.shape, row, col, points, r1, r2, rng) for _ in range(chains)]
            base[row, col], stochastic[row, col] = pixel_layers(img, grad, row, col, sampled, r1, alpha, beta)
    return base, stochastic


def enhance(
    img: np.ndarray, base: np.ndarray, stochastic: np.ndarray, gamma1: float, gamma2: float, k: float
):
    """``clip(B + k (gamma1 (I - B) + gamma2 (S - B)), 0, 1)``."""
    return np.clip(base + k * (gamma1 * (img - base) + gamma2 * (stochastic - base)), 0.0, 1.0)
