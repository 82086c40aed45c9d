"""Straightforward numba port of the reference enhancer's sampling loop: the speed baseline.

It follows ``specs/stochastic_enhancement.md`` step by step the way the published MATLAB + C
reference does: for every pixel and chain it stores the chain's points, draws every random
number with ``np.random.random()``, places spray points with ``cos``/``sin`` (radii capped at
the pixel's farthest image corner, which the spec allows), measures distances with ``hypot``
and evaluates ``exp`` for every weighted point. Its random streams come from numba's
per-thread generators, so it is not reproducible across thread counts; it exists to be timed
against :mod:`transforms._stochastic_kernels`, which samples the same distribution.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_NEIGHBOUR_DY = np.array([0, 1, 1, 1, 0, -1, -1, -1], dtype=np.int64)
_NEIGHBOUR_DX = np.array([1, 1, 0, -1, -1, -1, 0, 1], dtype=np.int64)
_WEIGHT_FLOOR = 1e-9


@njit(cache=True)
def _sample_chain(height, width, row, col, points, r1, r2, ys, xs):
    """Fill ``ys``/``xs`` with one chain (a random walk, then sprays); return the walk's length."""
    ys[0] = row
    xs[0] = col
    last = 0
    steps = 0
    cand_y = np.empty(8, dtype=np.int64)
    cand_x = np.empty(8, dtype=np.int64)
    while math.hypot(ys[last] - row, xs[last] - col) < r1 and steps < points // 2:
        count = 0
        for nb in range(8):
            ny = ys[last] + _NEIGHBOUR_DY[nb]
            nx = xs[last] + _NEIGHBOUR_DX[nb]
            if 0 <= ny < height and 0 <= nx < width:
                cand_y[count] = ny
                cand_x[count] = nx
                count += 1
        k = math.floor(count * np.random.random())
        if count == 0:
            ys[last + 1] = ys[last]
            xs[last + 1] = xs[last]
        else:
            ys[last + 1] = cand_y[k]
            xs[last + 1] = cand_x[k]
        last += 1
        steps += 1
    # Radii beyond the farthest corner are always rejected: capping them keeps the distribution.
    r_max = min(r2, math.hypot(max(row + 0.5, height - 0.5 - row), max(col + 0.5, width - 0.5 - col)))
    for j in range(last + 1, points):
        while True:
            radius = r1 + (r_max - r1) * np.random.random()
            angle = 2.0 * math.pi * np.random.random()
            y = math.floor(row + radius * math.sin(angle) + 0.5)
            x = math.floor(col + radius * math.cos(angle) + 0.5)
            if 0 <= y < height and 0 <= x < width:
                ys[j] = y
                xs[j] = x
                break
    return last + 1


@njit(parallel=True, cache=True)
def baseline_layers(img, grad, chains, points, r1, r2, alpha, beta):
    """Base layer ``B`` and stochastic layer ``S`` of one slice, computed the straightforward way."""
    height, width = img.shape
    base = np.empty((height, width), dtype=np.float64)
    stoch = np.empty((height, width), dtype=np.float64)
    for row in prange(height):
        ys = np.empty(points, dtype=np.int64)
        xs = np.empty(points, dtype=np.int64)
        dist = np.empty(points, dtype=np.float64)
        for col in range(width):
            center = img[row, col]
            sum_w = 0.0
            sum_wi = 0.0
            sum_s = 0.0
            for _ in range(chains):
                n_walk = _sample_chain(height, width, row, col, points, r1, r2, ys, xs)
                th = 0
                for j in range(points):
                    dist[j] = math.hypot(ys[j] - row, xs[j] - col)
                    if dist[j] < r1:
                        th += 1
                tv = 0.0
                lo = center
                hi = center
                for j in range(points):
                    value = img[ys[j], xs[j]]
                    lo = min(lo, value)
                    hi = max(hi, value)
                    # Weighted: walk points among the first ``th`` (spray points get no weight).
                    if 0 < j < min(th, n_walk):
                        tv += abs(grad[ys[j], xs[j]] - grad[ys[j - 1], xs[j - 1]])
                    if j < min(th, n_walk):
                        w = math.exp(-(abs(value - center) / alpha + tv / beta))
                        if w < _WEIGHT_FLOOR:
                            w = 0.0
                        sum_w += w
                        sum_wi += w * value
                sum_s += 0.5 if hi == lo else (center - lo) / (hi - lo)
            base[row, col] = sum_wi / sum_w
            stoch[row, col] = 2.0 / math.pi * math.asin(math.sqrt(sum_s / chains))
    return base, stoch
