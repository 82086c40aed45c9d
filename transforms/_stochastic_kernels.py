"""Numba kernels of the stochastic enhancer (``specs/stochastic_enhancement.md``).

For every pixel ``x0`` of a slice, ``chains`` chains of ``points`` points are drawn: a random walk
over the 8 neighbours while the walk stays within ``r1`` of ``x0`` (at most ``points // 2``
steps), then "spray" points at radius ``r1 + (r2 - r1) U`` and angle ``2 pi U'`` around ``x0``,
drawn again when they round to a pixel outside the image. The chains give the base layer ``B``
(a weighted mean of the walks' intensities) and the stochastic layer ``S`` (the Beta(0.5, 0.5)
cdf of the mean relative position of ``I(x0)`` between each chain's minimum and maximum).

How it is made fast without changing the sampled distribution:

- Counter-based random numbers: SplitMix64 streams keyed by (seed, slice, row, column): one
  per chain for its walk, and one per pixel for the sprays, which the chains take in turn
  (spray points are independent and identically distributed, so which chain gets which does
  not matter; sharing the stream lets a vectorised block's leftover serve the next chain).
  Each pixel owns its streams, so results do not depend on the number of threads, the order
  of work or the device. One 64-bit draw gives a whole spray proposal or 21 walk steps.
- Walks from pixels at least ``ceil(r1)`` inside the image (85 % of a 256 x 256 slice at
  ``r1 = 10``) never stand on the border: each step is two table look-ups and two additions
  (:func:`walk_tables`), with no coordinates, border checks or distances, about 2.5 times
  faster than the general walk, which the pixels near the border keep.
- Chains are not stored: a walk keeps its points' intensities and running total variation
  (at most ``points // 2 + 1``), the sprays only the running minimum and maximum and whether
  one of them landed within ``r1``.
- Sprays are proposed only where they can be accepted. The spray density is uniform in
  ``(r, theta)``; in each of ``SECTORS`` equal angular sectors, radii beyond the farthest
  image point seen from ``x0`` inside that sector are always rejected. Proposing uniformly in
  ``(r, theta)`` over the union of ``[r1, reach_s) x sector_s`` and rejecting points outside
  the image leaves the accepted points' distribution exactly as it was, while about 86 % of
  the proposals are accepted instead of 43 % (256 x 256 slice, mean over pixels, with ``r2``
  already capped at each pixel's farthest corner).
- Directions come from an octant-reduced Taylor polynomial (double precision) instead of
  ``sin``/``cos``; distances are squared integers instead of ``hypot``; a rejected proposal
  reads the centre pixel instead of branching, so the CPU never speculates loads outside the
  image (a mispredicted out-of-image load cost more than the whole proposal).
- Proposals are generated in blocks by a loop without branches or table look-ups, which LLVM
  turns into AVX-512/AVX2 code, and handed out in order, so every chain gets exactly the
  points of the one-at-a-time loop. A proposal's sector is found with 32-bit integers (twice
  as many per vector register as 64-bit ones) as a running minimum of differences.
- Walk weights are computed after the walk in one vectorised pass with :func:`exp_neg` (``exp``
  as arithmetic: the library ``exp`` is a scalar call).

``th`` follows the spec literally: it counts every chain point closer than ``r1`` to ``x0``,
and walk points with index below ``th`` are weighted. All walk points but the last lie within
``r1``; the last one (the first at or beyond ``r1``) is therefore weighted when the walk
stopped inside ``r1`` at the step limit, or when a spray point rounded to a pixel within
``r1`` (which happens in roughly a third of the chains).

:func:`pixel_layers_sequential` is the same algorithm written one sample at a time: the CUDA
kernel (``transforms._stochastic_cuda``) runs it, and the tests check :func:`pixel_layers`
against it.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit, prange

__all__ = [
    "SECTORS",
    "enhance",
    "enhance_layers",
    "enhance_layers_serial",
    "exp_neg",
    "pixel_key",
    "pixel_layers_sequential",
    "seed_key",
    "trace_chains",
    "unit_direction",
]

SECTORS = 16
"""Angular sectors of the spray proposal (a power of two)."""

_SECTOR_BITS = SECTORS.bit_length() - 1
_SECTOR_SHIFT = np.uint64(32 - _SECTOR_BITS)
_IN_SECTOR_SHIFT = np.uint64(_SECTOR_BITS)
_SECTOR_BITS_U = np.uint64(_SECTOR_BITS)
_SECTOR_MASK = np.uint64(SECTORS - 1)
_SECTOR_MASK32 = np.uint32(SECTORS - 1)
_RADIUS_BITS = 32 - _SECTOR_BITS
"""Bits of a spray proposal's position on the radius spans: with the sector, one 32-bit word."""
_RADIUS_SHIFT = np.uint64(64 - _RADIUS_BITS)
_BLOCK = 512
"""Spray proposals generated per vectorised block (a multiple of 16: whole vector iterations)."""
_CHUNK = 16
"""Proposals per chunk of a block whose acceptances are counted together."""

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_CHAIN_STRIDE = np.uint64(0xD1B54A32D192ED03)
_SLICE_STRIDE = np.uint64(0xAEF17502108EF2D9)
_SPRAY_SALT = np.uint64(0x5851F42D4C957F2D)
_LOW32 = np.uint64(0xFFFFFFFF)
_LOW3 = np.uint64(7)
_OCTANT_MASK = np.uint64((1 << 29) - 1)
_OCTANT_SIZE = np.uint64(1 << 29)
_U1 = np.uint64(1)
_U3 = np.uint64(3)
_U27 = np.uint64(27)
_U29 = np.uint64(29)
_U30 = np.uint64(30)
_U31 = np.uint64(31)
_U32 = np.uint64(32)

_RADIANS_PER_TURN_UNIT = 2.0 * math.pi * 2.0**-32
_WEIGHT_FLOOR = 1e-9
_EXPONENT_CUTOFF = -math.log(_WEIGHT_FLOOR)
_REACH_MARGIN = 2.0**-10
"""Pixels added to every sector's reach: covers rounding and the radius steps."""
_RADIUS_STEPS = 2.0**_RADIUS_BITS
_FAR = 1e300

# Neighbour k (0..7) of the walk: offsets + 1 packed as 4-bit fields, read with shifts.
_NEIGHBOUR_DX1 = sum((dx + 1) << (4 * k) for k, dx in enumerate((1, 1, 0, -1, -1, -1, 0, 1)))
_NEIGHBOUR_DY1 = sum((dy + 1) << (4 * k) for k, dy in enumerate((0, 1, 1, 1, 0, -1, -1, -1)))
_WALK_BITS = 63

# Floating-point flags that let LLVM fuse multiply-adds and vectorise, but never reorder sums:
# the vectorised blocks and the one-at-a-time routine must round the same way.
_FAST = {"contract", "nnan", "ninf", "nsz"}


def seed_key(seed: int) -> np.uint64:
    """The 64-bit key of a user seed (any Python int; negative ones wrap around)."""
    return np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------------------------- random numbers


@njit(cache=True)
def mix64(z):
    """SplitMix64's finaliser: a bijective 64-bit hash."""
    z = (z ^ (z >> _U30)) * _MIX1
    z = (z ^ (z >> _U27)) * _MIX2
    return z ^ (z >> _U31)


@njit(cache=True)
def pixel_key(key, slice_index, row, col):
    """Key of one pixel's streams, from the seed key and the pixel's (slice, row, column)."""
    k = mix64(np.uint64(key) + np.uint64(slice_index + 1) * _SLICE_STRIDE)
    return mix64(k ^ ((np.uint64(row) << _U32) | np.uint64(col)))


@njit(cache=True)
def chain_state(pkey, chain):
    """Starting state of chain ``chain``'s SplitMix64 stream."""
    return mix64(np.uint64(pkey) + np.uint64(chain + 1) * _CHAIN_STRIDE)


@njit(cache=True)
def spray_state(pkey):
    """Starting state of the pixel's spray stream, which its chains consume one after another."""
    return mix64(np.uint64(pkey) ^ _SPRAY_SALT)


@njit(cache=True)
def next_draw(state):
    """Advance a SplitMix64 state; return ``(state, 64 random bits)``."""
    state = state + GOLDEN
    return state, mix64(state)


# ----------------------------------------------------------------------------- arithmetic


@njit(cache=True, fastmath=_FAST)
def unit_direction(turn):
    """``(cos, sin)`` of the angle ``2 pi turn / 2**32`` for an integer ``0 <= turn < 2**32``.

    Octant reduction (exact, in integers) and Taylor polynomials on ``[0, pi/4]`` of degrees 11
    and 12, whose truncation errors are below ``1e-11``: a spray point 1,000 pixels away moves
    by less than ``1e-8`` pixels, so the pixel it rounds to changes for fewer than one point in
    ten million. No tables, so loops over it vectorise.
    """
    octant = turn >> _U29
    odd = (octant & _U1) == _U1
    part = turn & _OCTANT_MASK
    part = _OCTANT_SIZE - part if odd else part
    phi = np.float64(part) * _RADIANS_PER_TURN_UNIT
    p2 = phi * phi
    sin_poly = 1.0 / 39916800.0  # 1/11!
    sin_poly = 1.0 / 362880.0 - p2 * sin_poly
    sin_poly = 1.0 / 5040.0 - p2 * sin_poly
    sin_poly = 1.0 / 120.0 - p2 * sin_poly
    sin_poly = 1.0 / 6.0 - p2 * sin_poly
    sin_phi = phi * (1.0 - p2 * sin_poly)
    cos_poly = 1.0 / 479001600.0  # 1/12!
    cos_poly = 1.0 / 3628800.0 - p2 * cos_poly
    cos_poly = 1.0 / 40320.0 - p2 * cos_poly
    cos_poly = 1.0 / 720.0 - p2 * cos_poly
    cos_poly = 1.0 / 24.0 - p2 * cos_poly
    cos_poly = 0.5 - p2 * cos_poly
    cos_phi = 1.0 - p2 * cos_poly
    # Octant 2q + 1 is the mirror image of octant 2q + 2 about the diagonal. Then rotate by
    # quadrant q: (c, s) -> (-s, c) -> (-c, -s) -> (s, -c). Selects only, no branches.
    quadrant = octant >> _U1
    swap = odd != ((quadrant & _U1) == _U1)
    a = sin_phi if swap else cos_phi
    b = cos_phi if swap else sin_phi
    a = -a if (quadrant == 1) | (quadrant == 2) else a
    b = -b if quadrant >= 2 else b
    return a, b


@njit(cache=True, fastmath=_FAST)
def exp_neg(x):
    """``exp(-x)`` for ``0 <= x <= 21`` as ``(exp(-x / 32)) ** 32``, relative error below 1e-13.

    Pure arithmetic (a degree-16 Taylor polynomial and five squarings), so that the weight
    loop vectorises; ``math.exp`` is a scalar library call.
    """
    t = x * (1.0 / 32.0)
    e = 1.0 / 20922789888000.0
    e = 1.0 / 1307674368000.0 - t * e
    e = 1.0 / 87178291200.0 - t * e
    e = 1.0 / 6227020800.0 - t * e
    e = 1.0 / 479001600.0 - t * e
    e = 1.0 / 39916800.0 - t * e
    e = 1.0 / 3628800.0 - t * e
    e = 1.0 / 362880.0 - t * e
    e = 1.0 / 40320.0 - t * e
    e = 1.0 / 5040.0 - t * e
    e = 1.0 / 720.0 - t * e
    e = 1.0 / 120.0 - t * e
    e = 1.0 / 24.0 - t * e
    e = 1.0 / 6.0 - t * e
    e = 0.5 - t * e
    e = 1.0 - t * e
    e = 1.0 - t * e
    e = e * e
    e = e * e
    e = e * e
    e = e * e
    return e * e


# ----------------------------------------------------------------------------- sampling


@njit(cache=True, inline="always")
def _neighbour(k):
    """``(dy, dx)`` of the walk's neighbour ``k`` (0..7)."""
    return ((_NEIGHBOUR_DY1 >> (4 * k)) & 15) - 1, ((_NEIGHBOUR_DX1 >> (4 * k)) & 15) - 1


@njit(cache=True, inline="always")
def _next_neighbour(state, bits, nbits):
    """The next 3 bits of a walk's buffered draw (a fresh draw when fewer are left): which of the
    8 neighbours an interior step goes to.

    Returns:
        ``(k, state, bits, nbits)``.
    """
    if nbits < 3:
        state, bits = next_draw(state)
        nbits = _WALK_BITS
    return np.int64(bits & _LOW3), state, bits >> _U3, nbits - 3


@njit(cache=True, inline="always")  # the hot path of every walk: keep it in the caller's loop
def walk_step(y, x, height, width, state, bits, nbits):
    """One walk step to a uniformly chosen neighbour inside the image.

    Away from the border all 8 neighbours are allowed and 3 bits of a buffered draw choose one;
    on the border :func:`_border_step` chooses among the allowed ones.

    Returns:
        ``(y, x, state, bits, nbits)`` after the step.
    """
    if 0 < y < height - 1 and 0 < x < width - 1:
        k, state, bits, nbits = _next_neighbour(state, bits, nbits)
        dy, dx = _neighbour(k)
        return y + dy, x + dx, state, bits, nbits
    y, x, state = _border_step(y, x, height, width, state)
    return y, x, state, bits, nbits


@njit(cache=True)
def _border_step(y, x, height, width, state):
    """A walk step from a border pixel: the allowed neighbours are counted and the top 32 bits
    of a fresh draw choose one by multiply-shift (bias below 1e-9; a 1 x 1 image: stay).

    Returns:
        ``(y, x, state)`` after the step.
    """
    count = 0
    for k in range(8):
        dy, dx = _neighbour(k)
        ny, nx = y + dy, x + dx
        if 0 <= ny < height and 0 <= nx < width:
            count += 1
    if count == 0:
        return y, x, state
    state, draw = next_draw(state)
    pick = np.int64(((draw >> _U32) * np.uint64(count)) >> _U32)
    for k in range(8):
        dy, dx = _neighbour(k)
        ny, nx = y + dy, x + dx
        if 0 <= ny < height and 0 <= nx < width:
            if pick == 0:
                return ny, nx, state
            pick -= 1
    return y, x, state


@njit(cache=True)
def walk_tables(height, width, r1):
    """Look-up tables of the walk for pixels whose walks cannot reach the image border.

    A walk steps only from points closer than ``r1`` to ``x0``, so when ``x0`` lies at least
    ``margin = ceil(r1)`` pixels inside the image it never stands on the border, every step has
    all 8 neighbours to choose from, and a step is two additions: to the point's flat index in
    the image and to its cell in a ``(2 margin + 1)**2`` grid of offsets from ``x0``, whose entry
    says whether the point is closer than ``r1`` (no coordinates, multiplications or
    distances). Indices are unsigned, so that a step back is an addition that wraps around.

    Returns:
        ``(margin, image_steps, cell_steps, within_r1, center_cell)``: where no pixel is that far
        inside, ``margin`` exceeds the image and the tables are not used.
    """
    margin = np.int64(math.ceil(abs(r1)))
    side = 2 * margin + 1
    if side > min(height, width):
        margin = np.int64(max(height, width))
        side = 1
    image_steps = np.empty(8, dtype=np.uint64)
    cell_steps = np.empty(8, dtype=np.uint64)
    for k in range(8):
        dy, dx = _neighbour(k)
        image_steps[k] = np.uint64(dy * width + dx)
        cell_steps[k] = np.uint64(dy * side + dx)
    within_r1 = np.empty(side * side, dtype=np.uint8)
    half = side // 2
    for cell in range(side * side):
        dy = cell // side - half
        dx = cell % side - half
        within_r1[cell] = np.uint8(dy * dy + dx * dx < r1 * r1)
    return margin, image_steps, cell_steps, within_r1, np.uint64(half * side + half)


@njit(cache=True, fastmath=_FAST, inline="always")
def _walk_interior(img, grad, center_index, grad_center, state, max_steps, tables, values, tvs):
    """The walk of one chain from an interior pixel (see :func:`walk_tables`): :func:`walk_step`'s
    steps from the same random bits, with table look-ups instead of coordinates.

    Fills ``values[1:]`` and ``tvs[1:]`` with the walk points' intensities and running total
    variation.

    Returns:
        ``(steps, last_within_r1)``: the steps taken, and whether the last point is closer than
        ``r1``.
    """
    _, image_steps, cell_steps, within_r1, cell = tables
    p = np.uint64(center_index)
    bits = np.uint64(0)
    nbits = 0
    tv = 0.0
    grad_prev = grad_center
    steps = 0
    while within_r1[cell] != 0 and steps < max_steps:
        k, state, bits, nbits = _next_neighbour(state, bits, nbits)
        p += image_steps[k]
        cell += cell_steps[k]
        steps += 1
        g = np.float64(grad[p])
        tv += abs(g - grad_prev)
        grad_prev = g
        values[steps] = np.float64(img[p])
        tvs[steps] = tv
    return steps, within_r1[cell] != 0


@njit(cache=True, fastmath=_FAST, inline="always")
def _walk_near_border(
    img, grad, height, width, row, col, grad_center, state, max_steps, r1_squared, values, tvs
):
    """:func:`_walk_interior` for any pixel: coordinates, border checks and distances."""
    bits = np.uint64(0)
    nbits = 0
    y = row
    x = col
    tv = 0.0
    grad_prev = grad_center
    steps = 0
    dist2 = 0
    while dist2 < r1_squared and steps < max_steps:
        y, x, state, bits, nbits = walk_step(y, x, height, width, state, bits, nbits)
        steps += 1
        p = y * width + x
        g = np.float64(grad[p])
        tv += abs(g - grad_prev)
        grad_prev = g
        values[steps] = np.float64(img[p])
        tvs[steps] = tv
        dist2 = (y - row) * (y - row) + (x - col) * (x - col)
    return steps, dist2 < r1_squared


@njit(cache=True)
def _exit_distance(left, right, top, bottom, c, s):
    """Distance from the origin along ``(c, s)`` to the edge of ``[left, right] x [top, bottom]``."""
    tx = right / c if c > 0.0 else (left / c if c < 0.0 else _FAR)
    ty = bottom / s if s > 0.0 else (top / s if s < 0.0 else _FAR)
    return tx if tx < ty else ty


@njit(cache=True, fastmath=_FAST)
def spray_sectors(row, col, height, width, r1, r2, reach, thresholds):
    """The spray proposal around ``(row, col)``: radius spans per angular sector.

    A spray point is accepted when its unrounded position lies in the box
    ``[-0.5, width - 0.5) x [-0.5, height - 0.5)``. Within sector ``s`` no accepted point is
    farther than the box's farthest point inside the sector (a vertex of box and sector: a
    corner, or where an edge of the sector leaves the box), so radii ``[r1, min(r2, reach_s))``
    cover every accepted point. The spans ``min(r2, reach_s) - r1`` are laid end to end on a
    ``2**28``-step integer line with step ``scale`` (below ``5e-5`` pixels up to 1024 x 1024
    images, ``2e-4`` at 4096 x 4096): a uniform 28-bit integer ``u`` falls in one span and
    means radius ``r1 + (u - start of the span) * scale`` in that sector. Span ends are rounded
    to whole steps, which the margin added to every reach (``1e-3`` pixels) absorbs.
    ``thresholds[s]`` is the end of span ``s`` shifted left by ``log2(SECTORS)`` bits, with
    ``s + 1`` in the low bits: the last threshold at or below ``u`` (probed with all low bits
    set) gives both the sector of ``u`` and the start of its span, found as the smallest
    unsigned difference ``probe - threshold`` (one subtraction and one minimum per sector).

    Args:
        reach: float64 scratch array of ``SECTORS`` entries.
        thresholds: uint32 array of ``SECTORS`` entries; receives the sector thresholds.

    Returns:
        ``scale``, the radius step of one integer unit.
    """
    left = -0.5 - col
    right = width - 0.5 - col
    top = -0.5 - row
    bottom = height - 0.5 - row
    for s in range(SECTORS):
        c, sn = unit_direction(np.uint64(s) << _SECTOR_SHIFT)
        reach[s] = _exit_distance(left, right, top, bottom, c, sn)
    first_edge = reach[0]
    for s in range(SECTORS - 1):
        reach[s] = reach[s] if reach[s] > reach[s + 1] else reach[s + 1]
    last = SECTORS - 1
    reach[last] = reach[last] if reach[last] > first_edge else first_edge
    for corner in range(4):
        cx = left if corner & 1 else right
        cy = top if corner & 2 else bottom
        angle = math.atan2(cy, cx)
        if angle < 0.0:
            angle += 2.0 * math.pi
        s = np.int64(angle * (SECTORS / (2.0 * math.pi)))
        s = s if s < SECTORS - 1 else SECTORS - 1
        distance = math.sqrt(cx * cx + cy * cy)
        reach[s] = reach[s] if reach[s] > distance else distance
    total = 0.0
    for s in range(SECTORS):
        far = reach[s] + _REACH_MARGIN
        far = far if far < r2 else r2
        reach[s] = far - r1 if far > r1 else 0.0
        total += reach[s]
    scale = total / _RADIUS_STEPS
    cumulative = 0.0
    for s in range(SECTORS):
        cumulative += reach[s]
        boundary = math.ceil(cumulative / scale)
        boundary = boundary if boundary < _RADIUS_STEPS else _RADIUS_STEPS
        index = s + 1 if s + 1 < SECTORS else SECTORS - 1  # the last sector's is never read
        thresholds[s] = np.uint32((np.uint64(boundary) << _SECTOR_BITS_U) | np.uint64(index))
    return scale


@njit(cache=True, inline="always")
def _floor(x):
    """``floor(x)`` as a float: one vectorisable rounding instruction on the CPU (the CUDA kernel
    substitutes its own, see ``transforms._stochastic_cuda``)."""
    return np.floor(x)


@njit(cache=True, fastmath=_FAST, inline="always")  # inlined at numba level so block loops vectorise
def spray_candidate(row, col, r1, thresholds, scale, draw):
    """The pixel a spray proposal rounds to (possibly outside the image), from one 64-bit draw.

    Bits 36..63 pick a point uniformly on the sectors' radius spans (:func:`spray_sectors`);
    the low 32 bits, less their lowest ``log2(SECTORS)``, the angle inside the sector. Returns
    ``(y, x)`` as integral floats: integer arithmetic on them is exact, and cheaper in vector
    registers than 64-bit integer multiplication.
    """
    u = draw >> _RADIUS_SHIFT
    probe = np.uint32((u << _SECTOR_BITS_U) | _SECTOR_MASK)
    # probe - (last threshold at or below probe): the smallest of the differences, since those
    # of larger thresholds wrap around to huge unsigned numbers (no compare-and-select needed).
    offset = probe
    for s in range(SECTORS - 1):
        difference = np.uint32(probe - thresholds[s])  # 32-bit lanes: twice as many per vector
        offset = difference if difference < offset else offset
    sector = np.uint64(_SECTOR_MASK32 - (offset & _SECTOR_MASK32))
    radius = r1 + np.float64(offset >> _SECTOR_BITS_U) * scale
    turn = (sector << _SECTOR_SHIFT) | ((draw & _LOW32) >> _IN_SECTOR_SHIFT)
    c, s = unit_direction(turn)
    return _floor(row + radius * s + 0.5), _floor(col + radius * c + 0.5)


@njit(cache=True, fastmath=_FAST)
def pixel_layers_sequential(
    img, grad, height, width, row, col, pkey, chains, points, r1, r2, alpha, beta, reach, thresholds
):
    """``(B, S)`` at one pixel, one sample at a time (the CUDA kernel's per-pixel routine).

    Args:
        img, grad: flat (row-major) float32 slice and its gradient magnitude.
        height, width: the slice's shape.
        row, col: the pixel.
        pkey: the pixel's stream key (:func:`pixel_key`).
        chains, points, r1, r2, alpha, beta: the enhancer's parameters.
        reach, thresholds: scratch arrays of ``SECTORS`` float64 and uint32 entries.
    """
    center = np.float64(img[row * width + col])
    scale = spray_sectors(row, col, height, width, r1, r2, reach, thresholds)
    r1_squared = r1 * r1
    inv_alpha = 1.0 / alpha
    inv_beta = 1.0 / beta
    sum_w = 0.0
    sum_wi = 0.0
    sum_s = 0.0
    spray = spray_state(pkey)
    for chain in range(chains):
        state = chain_state(pkey, chain)
        bits = np.uint64(0)
        nbits = 0
        y = row
        x = col
        lo = center
        hi = center
        sum_w += 1.0  # x0: distance 0 < r1, exponent 0
        sum_wi += center
        tv = 0.0
        grad_prev = np.float64(grad[row * width + col])
        last_w = 0.0
        last_wi = 0.0
        steps = 0
        dist2 = 0
        while dist2 < r1_squared and steps < points // 2:
            y, x, state, bits, nbits = walk_step(y, x, height, width, state, bits, nbits)
            steps += 1
            p = y * width + x
            value = np.float64(img[p])
            lo = value if value < lo else lo
            hi = value if value > hi else hi
            dist2 = (y - row) * (y - row) + (x - col) * (x - col)
            g = np.float64(grad[p])
            tv += abs(g - grad_prev)
            grad_prev = g
            exponent = abs(value - center) * inv_alpha + tv * inv_beta
            w = math.exp(-exponent) if exponent <= _EXPONENT_CUTOFF + 1.0 else 0.0
            if w < _WEIGHT_FLOOR:
                w = 0.0
            if dist2 < r1_squared:
                sum_w += w
                sum_wi += w * value
            else:
                last_w = w
                last_wi = w * value
        needed = points - 1 - steps
        sprayed_within_r1 = False
        while needed > 0:
            spray, draw = next_draw(spray)
            fy, fx = spray_candidate(row, col, r1, thresholds, scale, draw)
            if 0.0 <= fy < height and 0.0 <= fx < width:
                sy = np.int64(fy)
                sx = np.int64(fx)
                needed -= 1
                value = np.float64(img[sy * width + sx])
                lo = value if value < lo else lo
                hi = value if value > hi else hi
                if (sy - row) * (sy - row) + (sx - col) * (sx - col) < r1_squared:
                    sprayed_within_r1 = True
        if sprayed_within_r1:
            sum_w += last_w
            sum_wi += last_wi
        sum_s += 0.5 if hi <= lo else (center - lo) / (hi - lo)
    return sum_wi / sum_w, 2.0 / math.pi * math.asin(math.sqrt(sum_s / chains))


@njit(cache=True, fastmath=_FAST)
def _spray_block(state, count, row, col, height, width, r1_squared, r1, thresholds, scale, cand, near):
    """Spray proposals ``1..count`` after ``state``, evaluated in one vectorised loop.

    Fills ``cand[i]`` with the proposal's flat pixel index (the centre pixel's if rejected: it
    cannot change a chain's min or max) and ``near[i]`` with 0 (rejected), 1 (accepted) or 2
    (accepted and within ``r1``).
    """
    center_index = row * width + col
    counter = state
    for i in range(count):
        counter += GOLDEN  # draw i + 1 of the stream: an induction variable, not a multiply
        draw = mix64(counter)
        y, x = spray_candidate(row, col, r1, thresholds, scale, draw)
        inside = (y >= 0.0) & (y < height) & (x >= 0.0) & (x < width)
        within = inside & ((y - row) * (y - row) + (x - col) * (x - col) < r1_squared)
        cand[i] = np.int32(y * width + x) if inside else np.int32(center_index)
        near[i] = np.int8(inside) + np.int8(within)


@njit(cache=True)
def _chunk_counts(near, count, chunk_accepted, chunk_within):
    """Accepted proposals and those within ``r1`` per chunk of ``_CHUNK`` (vectorised sums), so
    that :func:`_take` can skip through a block chunk by chunk."""
    for k in range(count // _CHUNK):
        accepted = 0
        within = 0
        for j in range(k * _CHUNK, (k + 1) * _CHUNK):
            accepted += np.int64(near[j] > 0)
            within += np.int64(near[j] == 2)
        chunk_accepted[k] = accepted
        chunk_within[k] = within


@njit(cache=True)
def _take(near, chunk_accepted, chunk_within, start, stop, needed):
    """Proposals from ``start`` on, up to the ``needed``-th accepted one or ``stop``.

    Whole chunks that do not go past the ``needed``-th accepted proposal are taken at once (a
    rejected proposal taken at the end of a chain is a rejected proposal: no matter).

    Returns:
        ``(end, taken, within)``: one past the last proposal used, the accepted ones among them
        and how many of those lie within ``r1``.
    """
    taken = 0
    within = 0
    end = start
    while end < stop and taken < needed and end % _CHUNK != 0:
        taken += np.int64(near[end] > 0)
        within += np.int64(near[end] == 2)
        end += 1
    while end + _CHUNK <= stop and taken + chunk_accepted[end // _CHUNK] <= needed:
        taken += chunk_accepted[end // _CHUNK]
        within += chunk_within[end // _CHUNK]
        end += _CHUNK
    while end < stop and taken < needed:
        taken += np.int64(near[end] > 0)
        within += np.int64(near[end] == 2)
        end += 1
    return end, taken, within


@njit(cache=True, fastmath=_FAST)
def _segment_range(img, cand, start, stop, lo, hi):
    """Min and max of ``lo``, ``hi`` and the intensities at ``cand[start:stop]``, with four
    independent min/max chains so that their latencies overlap."""
    lo0 = lo1 = lo2 = lo3 = lo
    hi0 = hi1 = hi2 = hi3 = hi
    i = start
    while i + 4 <= stop:
        v0 = np.float64(img[cand[i]])
        v1 = np.float64(img[cand[i + 1]])
        v2 = np.float64(img[cand[i + 2]])
        v3 = np.float64(img[cand[i + 3]])
        lo0 = min(lo0, v0)
        lo1 = min(lo1, v1)
        lo2 = min(lo2, v2)
        lo3 = min(lo3, v3)
        hi0 = max(hi0, v0)
        hi1 = max(hi1, v1)
        hi2 = max(hi2, v2)
        hi3 = max(hi3, v3)
        i += 4
    while i < stop:
        v0 = np.float64(img[cand[i]])
        lo0 = min(lo0, v0)
        hi0 = max(hi0, v0)
        i += 1
    return min(min(lo0, lo1), min(lo2, lo3)), max(max(hi0, hi1), max(hi2, hi3))


@njit(cache=True, fastmath=_FAST, inline="always")
def _walk_weight(value, tv, center, inv_alpha, inv_beta):
    """``w = exp(-(|I(p) - I(x0)| / alpha + TV / beta))``, 0 where below ``1e-9``."""
    exponent = min(abs(value - center) * inv_alpha + tv * inv_beta, _EXPONENT_CUTOFF + 1.0)
    w = exp_neg(exponent)
    return w if w >= _WEIGHT_FLOOR else 0.0


@njit(cache=True, fastmath=_FAST | {"reassoc"})  # vectorised reductions: summation order may differ
def _walk_sums(values, tvs, n_walk, n_weighted, center, inv_alpha, inv_beta):
    """Over a walk's points: ``(min I, max I)`` of all ``n_walk`` and ``(sum w, sum w I)`` of the
    first ``n_weighted``.

    The arrays are padded after ``n_weighted`` to a multiple of 8 entries with points of weight
    0 (huge total variation), so that the sums run in whole vector iterations.
    """
    lo = center
    hi = center
    for j in range(n_walk):
        lo = min(lo, values[j])
        hi = max(hi, values[j])
    padded = (n_weighted + 7) & ~7
    for j in range(n_weighted, padded):
        values[j] = center
        tvs[j] = _FAR
    sum_w = 0.0
    sum_wi = 0.0
    for j in range(padded):
        w = _walk_weight(values[j], tvs[j], center, inv_alpha, inv_beta)
        sum_w += w
        sum_wi += w * values[j]
    return lo, hi, sum_w, sum_wi


@njit(cache=True, fastmath=_FAST)
def pixel_layers(
    img, grad, height, width, row, col, pkey, chains, points, r1, r2, alpha, beta, tables, scratch
):
    """``(B, S)`` at one pixel: :func:`pixel_layers_sequential`'s samples and formulas, faster.

    Args:
        tables: the tuple from :func:`walk_tables` for this image size and ``r1``.
        scratch: the tuple from :func:`_scratch` (reused across pixels of one thread).
    """
    reach, thresholds, values, tvs, cand, near, chunk_accepted, chunk_within = scratch
    center_index = row * width + col
    center = np.float64(img[center_index])
    grad_center = np.float64(grad[center_index])
    margin = tables[0]
    interior = (margin <= row < height - margin) and (margin <= col < width - margin)
    scale = spray_sectors(row, col, height, width, r1, r2, reach, thresholds)
    r1_squared = r1 * r1
    inv_alpha = 1.0 / alpha
    inv_beta = 1.0 / beta
    sum_w = 0.0
    sum_wi = 0.0
    sum_s = 0.0
    spray = spray_state(pkey)
    buffered = 0  # proposals in the block buffer, and the first one not yet used
    cursor = 0
    for chain in range(chains):
        state = chain_state(pkey, chain)
        values[0] = center
        tvs[0] = 0.0
        if interior:
            steps, last_inside = _walk_interior(
                img, grad, center_index, grad_center, state, points // 2, tables, values, tvs
            )
        else:
            steps, last_inside = _walk_near_border(
                img, grad, height, width, row, col, grad_center, state, points // 2, r1_squared, values, tvs
            )
        # Walk points 0..steps-1 lie within r1; the last one, `steps`, only if last_inside. If
        # not, its weight counts only when a spray lands within r1 (taken before the padding).
        last_w = 0.0 if last_inside else _walk_weight(values[steps], tvs[steps], center, inv_alpha, inv_beta)
        last_wi = last_w * values[steps]
        n_sure = steps + 1 if last_inside else steps
        lo, hi, w_sum, wi_sum = _walk_sums(values, tvs, steps + 1, n_sure, center, inv_alpha, inv_beta)
        sum_w += w_sum
        sum_wi += wi_sum
        # Sprays: the next `needed` accepted proposals of the pixel's spray stream, generated
        # in vectorised blocks; a block's leftover goes to the next chain.
        needed = points - 1 - steps
        sprayed_within_r1 = False
        while needed > 0:
            if cursor == buffered:
                buffered = _BLOCK if chain < chains - 1 else min(_BLOCK, (needed * 5 // 4 + 8 + 15) & ~15)
                _spray_block(
                    spray, buffered, row, col, height, width, r1_squared, r1, thresholds, scale, cand, near
                )
                _chunk_counts(near, buffered, chunk_accepted, chunk_within)
                spray = spray + np.uint64(buffered) * GOLDEN
                cursor = 0
            end, taken, within = _take(near, chunk_accepted, chunk_within, cursor, buffered, needed)
            lo, hi = _segment_range(img, cand, cursor, end, lo, hi)
            sprayed_within_r1 |= within > 0
            needed -= taken
            cursor = end
        if sprayed_within_r1:
            sum_w += last_w
            sum_wi += last_wi
        sum_s += 0.5 if hi <= lo else (center - lo) / (hi - lo)
    return sum_wi / sum_w, 2.0 / math.pi * math.asin(math.sqrt(sum_s / chains))


@njit(cache=True)
def _scratch(points):
    """Per-thread scratch arrays of :func:`pixel_layers`."""
    walk_len = points // 2 + 1 + 7  # + padding of _walk_sums
    return (
        np.empty(SECTORS, dtype=np.float64),
        np.empty(SECTORS, dtype=np.uint32),
        np.empty(walk_len, dtype=np.float64),
        np.empty(walk_len, dtype=np.float64),
        np.empty(_BLOCK, dtype=np.int32),
        np.empty(_BLOCK, dtype=np.int8),
        np.empty(_BLOCK // _CHUNK, dtype=np.int64),
        np.empty(_BLOCK // _CHUNK, dtype=np.int64),
    )


# ----------------------------------------------------------------------------- entry points


@njit(cache=True)
def _enhance_line(flat_img, flat_grad, mask, base, stoch, line, key, slice_offset, params, tables):
    """``B`` and ``S`` of row ``line`` of the stack's rows, slice after slice (the unit of work of
    the entry points)."""
    chains, points, r1, r2, alpha, beta = params
    height, width = base.shape[1], base.shape[2]
    s = line // height
    row = line - s * height
    scratch = _scratch(points)
    for col in range(width):
        if mask[s, row, col] == 0:
            base[s, row, col] = flat_img[s, row * width + col]
            stoch[s, row, col] = flat_img[s, row * width + col]
            continue
        pkey = pixel_key(key, s + slice_offset, row, col)
        b, st = pixel_layers(
            flat_img[s],
            flat_grad[s],
            height,
            width,
            row,
            col,
            pkey,
            chains,
            points,
            r1,
            r2,
            alpha,
            beta,
            tables,
            scratch,
        )
        base[s, row, col] = b
        stoch[s, row, col] = st


@njit(cache=True)
def _line_buffers(img, grad):
    """Image and gradient flattened per slice, and the ``B`` and ``S`` arrays to fill."""
    n_slices, height, width = img.shape
    flat = (n_slices, height * width)
    return img.reshape(flat), grad.reshape(flat), np.empty_like(img), np.empty_like(img)


@njit(parallel=True, cache=True)
def enhance_layers(img, grad, mask, key, slice_offset, chains, points, r1, r2, alpha, beta):
    """``B`` and ``S`` of a stack of slices, in parallel over all rows of all slices.

    Args:
        img: C-contiguous float32 array ``(slices, H, W)``, values in [0, 1].
        grad: float32 Sobel gradient magnitude of each slice, same shape and layout.
        mask: uint8 array of the same shape; pixels where it is 0 are not sampled and get
            ``B = S = I``.
        key: uint64 seed key (:func:`seed_key`).
        slice_offset: index of ``img[0]`` in the volume (part of each pixel's stream key).
        chains, points, r1, r2, alpha, beta: the enhancer's parameters (``r2`` a number).

    Returns:
        ``(B, S)``: float32 arrays of the input's shape.
    """
    n_slices, height = img.shape[0], img.shape[1]
    flat_img, flat_grad, base, stoch = _line_buffers(img, grad)
    params = (chains, points, r1, r2, alpha, beta)
    tables = walk_tables(height, img.shape[2], r1)
    for line in prange(n_slices * height):
        _enhance_line(flat_img, flat_grad, mask, base, stoch, line, key, slice_offset, params, tables)
    return base, stoch


@njit(cache=True)
def enhance_layers_serial(img, grad, mask, key, slice_offset, chains, points, r1, r2, alpha, beta):
    """:func:`enhance_layers` on the calling thread alone: the same output, no thread pool.

    For processes forked after the parallel kernel ran (data loader workers): the OpenMP
    runtime behind numba's threads does not survive a fork.
    """
    n_slices, height = img.shape[0], img.shape[1]
    flat_img, flat_grad, base, stoch = _line_buffers(img, grad)
    params = (chains, points, r1, r2, alpha, beta)
    tables = walk_tables(height, img.shape[2], r1)
    for line in range(n_slices * height):
        _enhance_line(flat_img, flat_grad, mask, base, stoch, line, key, slice_offset, params, tables)
    return base, stoch


_PARALLEL_PID: list[int] = []
"""The process whose numba thread pool the parallel kernel started (at most one entry)."""


def enhance(img, grad, mask, key, slice_offset, chains, points, r1, r2, alpha, beta):
    """:func:`enhance_layers`, or :func:`enhance_layers_serial` in a process forked after it ran.

    Same arguments and result as :func:`enhance_layers`.
    """
    args = (img, grad, mask, key, slice_offset, chains, points, r1, r2, alpha, beta)
    if not _PARALLEL_PID:
        _PARALLEL_PID.append(os.getpid())
    if _PARALLEL_PID[0] != os.getpid():
        return enhance_layers_serial(*args)
    return enhance_layers(*args)


@njit(cache=True, fastmath=_FAST)
def trace_chains(height, width, row, col, key, slice_index, chains, points, r1, r2):
    """All chains of one pixel, drawn exactly as :func:`enhance_layers` draws them.

    Returns:
        ``(ys, xs, n_walk)``: int64 arrays ``(chains, points)`` of the chain points' coordinates
        (point 0 is ``(row, col)``, then the walk, then the sprays) and ``(chains,)`` with the
        number of walk points of each chain, ``(row, col)`` included.
    """
    ys = np.empty((chains, points), dtype=np.int64)
    xs = np.empty((chains, points), dtype=np.int64)
    n_walk = np.empty(chains, dtype=np.int64)
    reach = np.empty(SECTORS, dtype=np.float64)
    thresholds = np.empty(SECTORS, dtype=np.uint32)
    scale = spray_sectors(row, col, height, width, r1, r2, reach, thresholds)
    pkey = pixel_key(key, slice_index, row, col)
    spray = spray_state(pkey)
    r1_squared = r1 * r1
    for chain in range(chains):
        state = chain_state(pkey, chain)
        bits = np.uint64(0)
        nbits = 0
        y = row
        x = col
        ys[chain, 0] = y
        xs[chain, 0] = x
        steps = 0
        dist2 = 0
        while dist2 < r1_squared and steps < points // 2:
            y, x, state, bits, nbits = walk_step(y, x, height, width, state, bits, nbits)
            steps += 1
            ys[chain, steps] = y
            xs[chain, steps] = x
            dist2 = (y - row) * (y - row) + (x - col) * (x - col)
        n_walk[chain] = steps + 1
        j = steps + 1
        while j < points:
            spray, draw = next_draw(spray)
            sy, sx = spray_candidate(row, col, r1, thresholds, scale, draw)
            if 0.0 <= sy < height and 0.0 <= sx < width:
                ys[chain, j] = np.int64(sy)
                xs[chain, j] = np.int64(sx)
                j += 1
    return ys, xs, n_walk
