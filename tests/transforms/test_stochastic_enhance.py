"""Tests of the stochastic enhancer: the spec's formulas, its sampling distribution (against a plain
reference), properties of the layers, and MONAI behaviour (types, meta data, dictionaries, Compose)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ScaleIntensityRanged
from numba import cuda
from scipy import stats

from tests.transforms import stochastic_reference as reference
from transforms import (
    EnhancementLayers,
    InvalidVolumeError,
    StochasticEnhance,
    StochasticEnhanceD,
    StochasticEnhanced,
    StochasticEnhanceDict,
)
from transforms import _stochastic_kernels as kernels
from transforms.stochastic_enhance import sobel_magnitude

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = {"chains": 6, "points": 60}
"""Few samples: fast, and enough to test behaviour on tiny images."""


def phantom(size: int = 24, seed: int = 0) -> np.ndarray:
    """A smooth ramp with a bright disc and mild noise, in [0, 1], shape ``(size, size)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = 0.2 + 0.4 * xx / size + 0.3 * ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 5) ** 2)
    return np.clip(img + rng.normal(0.0, 0.03, img.shape), 0.0, 1.0).astype(np.float32)


def kernel_layers(
    img: np.ndarray, chains: int, points: int, r1: float, r2: float, alpha: float, beta: float, seed=0
):
    """``(B, S)`` of a 2D float32 image from the CPU kernel."""
    stack = np.ascontiguousarray(img[None], dtype=np.float32)
    mask = np.ones(stack.shape, dtype=np.uint8)
    base, stoch = kernels.enhance_layers(
        stack, sobel_magnitude(stack), mask, kernels.seed_key(seed), 0, chains, points, r1, r2, alpha, beta
    )
    return base[0], stoch[0]


# ----------------------------------------------------------------------------- the spec's computation


@pytest.mark.parametrize(
    ("alpha", "beta", "points"), [(10.0, 10.0, 60), (0.5, 0.3, 60), (0.02, 0.05, 37), (10.0, 10.0, 3)]
)
def test_vectorised_kernel_equals_one_sample_at_a_time(alpha, beta, points):
    """The fast CPU kernel gives the per-pixel routine's results (which the CUDA kernel runs)."""
    img = phantom()
    r2 = math.hypot(*img.shape)
    base, stoch = kernel_layers(img, 6, points, 10.0, r2, alpha, beta, seed=3)
    flat, grad = img.ravel(), sobel_magnitude(img[None])[0].ravel()
    reach, thresholds = np.empty(kernels.SECTORS), np.empty(kernels.SECTORS, dtype=np.uint32)
    for row, col in [(0, 0), (0, 23), (23, 0), (23, 23), (1, 1), (12, 12), (5, 17), (22, 3)]:
        pkey = np.uint64(kernels.pixel_key(kernels.seed_key(3), 0, row, col))
        expected = kernels.pixel_layers_sequential(
            flat, grad, 24, 24, row, col, pkey, 6, points, 10.0, r2, alpha, beta, reach, thresholds
        )
        np.testing.assert_allclose((base[row, col], stoch[row, col]), expected, atol=2e-6)


@pytest.mark.parametrize("r1", [4.5, 5.0])
def test_table_walk_of_interior_pixels_equals_the_coordinate_walk(r1):
    """Every pixel of a non-square image, inside the walk-table margin and on it, gets the
    per-pixel routine's results (integer and fractional ``r1``: margins 5 and 5)."""
    img = phantom(32)[:, :27].copy()
    height, width = img.shape
    r2 = math.hypot(height, width)
    base, stoch = kernel_layers(img, 4, 40, r1, r2, 0.5, 0.3, seed=9)
    flat, grad = img.ravel(), sobel_magnitude(img[None])[0].ravel()
    reach, thresholds = np.empty(kernels.SECTORS), np.empty(kernels.SECTORS, dtype=np.uint32)
    margin = kernels.walk_tables(height, width, r1)[0]
    assert margin == 5
    for row in range(height):
        for col in range(width):
            pkey = np.uint64(kernels.pixel_key(kernels.seed_key(9), 0, row, col))
            expected = kernels.pixel_layers_sequential(
                flat, grad, height, width, row, col, pkey, 4, 40, r1, r2, 0.5, 0.3, reach, thresholds
            )
            np.testing.assert_allclose((base[row, col], stoch[row, col]), expected, atol=2e-6)


@pytest.mark.parametrize(("alpha", "beta"), [(10.0, 10.0), (0.5, 0.3)])
def test_kernel_applies_spec_formulas_to_its_own_chains(alpha, beta):
    """``B`` and ``S`` equal the spec's formulas (plain reference) evaluated on the kernel's chains,
    including ``th`` counting spray points that round to within ``r1``."""
    img = phantom()
    r1, r2, chains, points = 10.0, math.hypot(24, 24), 6, 60
    base, stoch = kernel_layers(img, chains, points, r1, r2, alpha, beta, seed=11)
    grad = reference.gradient_magnitude(img)
    spray_within_r1 = 0
    for row, col in [(0, 0), (3, 20), (12, 12), (23, 11)]:
        ys, xs, n_walk = kernels.trace_chains(
            24, 24, row, col, kernels.seed_key(11), 0, chains, points, r1, r2
        )
        traced = []
        for chain in range(chains):
            points_yx = list(zip(ys[chain].tolist(), xs[chain].tolist()))
            walk = int(n_walk[chain])
            traced.append((points_yx, walk))
            spray_within_r1 += any(math.hypot(y - row, x - col) < r1 for y, x in points_yx[walk:])
        expected = reference.pixel_layers(img, grad, row, col, traced, r1, alpha, beta)
        np.testing.assert_allclose((base[row, col], stoch[row, col]), expected, atol=1e-5)
    assert spray_within_r1 > 0, "the case th > walk points was not exercised"


# ----------------------------------------------------------------------------- same distribution


# Each distribution test below makes several comparisons; a p-value threshold of 5e-4 keeps the
# family-wise false-alarm rate near 1 % while a real bias of a percent or more fails clearly.
P_MIN = 5e-4


@pytest.mark.parametrize(("row", "col"), [(12, 12), (0, 0), (0, 13)])
def test_walks_follow_the_reference_distribution(row, col):
    """Walk lengths and end points of the kernel's walks match the plain reference's."""
    shape, r1, r2, points, n = (24, 24), 6.0, math.hypot(24, 24), 30, 1500
    rng = np.random.default_rng(row * 100 + col)
    ys, xs, n_walk = kernels.trace_chains(*shape, row, col, kernels.seed_key(5), 0, n, points, r1, r2)
    last = (np.arange(n), n_walk - 1)
    ours = np.stack([n_walk, ys[last], xs[last]], axis=1)
    theirs = []
    for _ in range(n):
        ref_chain, ref_walk = reference.sample_chain(shape, row, col, points, r1, r2, rng)
        theirs.append((ref_walk, *ref_chain[ref_walk - 1]))
    theirs = np.array(theirs)
    for column in range(3):
        assert stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue > P_MIN


@pytest.mark.parametrize(("row", "col"), [(12, 12), (0, 0), (0, 13)])
def test_spray_points_follow_the_reference_distribution(row, col):
    """The sector-capped spray proposal accepts exactly the reference's distribution of points
    (global r2, cos/sin, rejection): offsets compared cell by cell, and the share that rounds to
    within r1 (those extend th)."""
    shape, r1, r2, points, chains = (24, 24), 6.0, math.hypot(24, 24), 250, 1200
    ys, xs, n_walk = kernels.trace_chains(*shape, row, col, kernels.seed_key(8), 0, chains, points, r1, r2)
    ours = np.concatenate([np.stack([y[w:], x[w:]], axis=1) for y, x, w in zip(ys, xs, n_walk)])
    theirs = reference.spray_points(shape, row, col, r1, r2, len(ours), np.random.default_rng(row + col))
    cells = np.zeros((2, shape[0] * shape[1]))
    np.add.at(cells[0], ours[:, 0] * shape[1] + ours[:, 1], 1)
    np.add.at(cells[1], theirs[:, 0] * shape[1] + theirs[:, 1], 1)
    cells = cells[:, cells.sum(axis=0) >= 20]
    assert stats.chi2_contingency(cells).pvalue > P_MIN
    within = [np.hypot(p[:, 0] - row, p[:, 1] - col) < r1 for p in (ours, theirs)]
    table = np.array([[w.sum(), (~w).sum()] for w in within])
    assert table[:, 0].min() > 100
    assert stats.chi2_contingency(table).pvalue > P_MIN


def test_layers_have_the_reference_distribution():
    """Means and spreads over seeds of ``B`` and ``S`` agree with the plain reference."""
    img = phantom(12, seed=1)
    chains, points, r1, r2, alpha, beta, seeds = 6, 30, 4.0, math.hypot(12, 12), 0.5, 0.3, 6
    ours = np.array([kernel_layers(img, chains, points, r1, r2, alpha, beta, seed=s) for s in range(seeds)])
    rng = np.random.default_rng(2024)
    theirs = np.array(
        [reference.enhance_layers(img, chains, points, r1, r2, alpha, beta, rng) for _ in range(seeds)]
    )
    for layer in (0, 1):  # B, S
        a, b = ours[:, layer], theirs[:, layer]
        pooled_sd = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / 2).mean()
        mean_gap = np.abs(a.mean(axis=0) - b.mean(axis=0)).mean()
        assert mean_gap < 0.6 * pooled_sd  # 0.56 sd expected by chance for 6 seeds; a bias adds to it
        assert abs(a.mean() - b.mean()) < 4 * pooled_sd / math.sqrt(seeds * img.size)
        assert 0.7 < a.std(axis=0, ddof=1).mean() / b.std(axis=0, ddof=1).mean() < 1.4


# ----------------------------------------------------------------------------- properties


def test_constant_image_keeps_its_base_and_gets_half_stochastic_layer():
    """B = I and, since every chain has max == min, S = 0.5: I_enh = I + k gamma2 (0.5 - I)."""
    img = np.full((1, 24, 24), 0.3, dtype=np.float32)
    layers = StochasticEnhance(**SMALL, return_layers=True)(img)
    np.testing.assert_allclose(layers.base, 0.3, atol=1e-6)
    np.testing.assert_allclose(layers.stochastic, 0.5, atol=1e-6)
    np.testing.assert_allclose(layers.detail, 0.0, atol=1e-6)
    np.testing.assert_allclose(layers.enhanced, 0.3 + 2.5 * 0.3 * (0.5 - 0.3), atol=1e-6)
    half = np.full((1, 24, 24), 0.5, dtype=np.float32)
    np.testing.assert_allclose(StochasticEnhance(**SMALL)(half), half, atol=1e-6)
    np.testing.assert_allclose(StochasticEnhance(**SMALL, gamma2=0.0)(img), img, atol=1e-6)


def test_output_and_layers_stay_in_range():
    img = np.random.default_rng(0).random((1, 24, 24)).astype(np.float32)
    layers = StochasticEnhance(**SMALL, k=10.0, return_layers=True)(img)
    assert layers.enhanced.min() >= 0.0 and layers.enhanced.max() <= 1.0
    assert img.min() - 1e-6 <= layers.base.min() and layers.base.max() <= img.max() + 1e-6
    assert layers.stochastic.min() >= 0.0 and layers.stochastic.max() <= 1.0
    np.testing.assert_allclose(layers.detail, img - layers.base, atol=1e-6)
    np.testing.assert_allclose(layers.contrast, layers.stochastic - layers.base, atol=1e-6)
    expected = np.clip(layers.base + 10.0 * (0.5 * layers.detail + 0.3 * layers.contrast), 0, 1)
    np.testing.assert_allclose(layers.enhanced, expected, atol=1e-6)


def test_small_alpha_beta_keep_a_strong_edge_large_ones_blur_it():
    img = np.full((1, 24, 24), 0.2, dtype=np.float32)
    img[..., 12:] = 0.8
    near_edge = (0, slice(6, 18), 10)  # two pixels left of the edge
    sharp = StochasticEnhance(**SMALL, preset="paper", return_layers=True)(img).base
    blurred = StochasticEnhance(**SMALL, alpha=10.0, beta=10.0, return_layers=True)(img).base
    np.testing.assert_allclose(sharp[near_edge], 0.2, atol=0.005)
    assert blurred[near_edge].mean() > 0.25
    far_from_edge = (0, slice(6, 18), 1)  # r1 = 10 reaches the edge only rarely
    assert blurred[far_from_edge].mean() < blurred[near_edge].mean()


@pytest.mark.parametrize(("shape", "r1"), [((24, 24), 10.0), ((3, 40), 4.0)])
def test_walk_never_leaves_the_image(shape, r1):
    height, width = shape
    r2, points = math.hypot(height, width), 60
    corners_and_edges = [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1), (0, width // 2)]
    for row, col in corners_and_edges:
        traced = kernels.trace_chains(height, width, row, col, kernels.seed_key(7), 0, 100, points, r1, r2)
        for ys, xs, n_walk in zip(*traced):
            assert ((ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)).all()
            walk_y, walk_x = ys[:n_walk], xs[:n_walk]
            steps = np.maximum(np.abs(np.diff(walk_y)), np.abs(np.diff(walk_x)))
            assert (steps == 1).all()  # 8-neighbour steps, never standing still
            dist = np.hypot(walk_y - row, walk_x - col)
            assert n_walk - 1 <= points // 2 and (dist[:-1] < r1).all()
            assert dist[-1] >= r1 or n_walk - 1 == points // 2
            assert (np.hypot(ys[n_walk:] - row, xs[n_walk:] - col) > r1 - math.sqrt(0.5)).all()


def test_seed_reproduces_and_changes_the_output():
    img = phantom()[None]
    first = StochasticEnhance(**SMALL, seed=42)(img)
    np.testing.assert_array_equal(first, StochasticEnhance(**SMALL, seed=42)(img))
    assert np.abs(first - StochasticEnhance(**SMALL, seed=43)(img)).max() > 1e-3


def test_one_and_two_threads_give_identical_output():
    volume = np.stack([phantom(seed=0), phantom(seed=1)], axis=-1)[None]
    enhance = StochasticEnhance(**SMALL, seed=5)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = enhance(volume)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        double = enhance(volume)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(single, double)


def test_serial_kernel_gives_the_parallel_output():
    stack = np.ascontiguousarray(np.stack([phantom(seed=0), phantom(seed=1)]))
    args = (stack, sobel_magnitude(stack), np.ones(stack.shape, np.uint8), kernels.seed_key(3), 0)
    args += (SMALL["chains"], SMALL["points"], 10.0, 40.0, 10.0, 10.0)
    for parallel, serial in zip(kernels.enhance_layers(*args), kernels.enhance_layers_serial(*args)):
        np.testing.assert_array_equal(parallel, serial)


FORKED_WORKERS = """
import numpy as np, torch
from monai.data import DataLoader, Dataset
from transforms import StochasticEnhanced
enhance = StochasticEnhanced(keys="image", chains=4, points=40)
items = [{"image": np.random.default_rng(i).random((1, 24, 24, 2), dtype=np.float32)} for i in range(4)]
expected = [enhance(dict(item))["image"] for item in items]  # the parent starts numba's threads
loaded = [batch["image"][0] for batch in DataLoader(Dataset(items, enhance), num_workers=2)]
assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(expected, loaded))
print("identical")
"""


def test_data_loader_workers_forked_after_the_parent_enhanced_give_the_same_output():
    # numba's OpenMP thread pool does not survive fork(): forked workers use the serial kernel.
    result = subprocess.run(
        [sys.executable, "-c", FORKED_WORKERS], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical" in result.stdout


def test_paper_preset_sets_alpha_and_beta():
    enhancer = StochasticEnhance(preset="paper", alpha=3.0)
    assert (enhancer.alpha, enhancer.beta) == (0.5, 0.3)
    assert (enhancer.chains, enhancer.points) == (20, 250)


def test_sobel_scale_follows_the_spec():
    ramp = np.tile(np.arange(16, dtype=np.float32) / 16, (16, 1))[None]  # slope 1/16 per pixel
    np.testing.assert_allclose(sobel_magnitude(ramp)[0, 1:-1, 1:-1], 8 / 16, atol=1e-6)


def test_arithmetic_helpers_are_double_precision():
    x = np.linspace(0.0, 21.8, 20001)
    assert max(abs(kernels.exp_neg(v) / math.exp(-v) - 1.0) for v in x) < 1e-13
    turns = [*np.random.default_rng(0).integers(0, 2**32, 5000).tolist(), 0, 2**29, 2**30, 2**31, 2**32 - 1]
    for turn in turns:
        c, s = kernels.unit_direction(np.uint64(turn))
        angle = 2.0 * math.pi * turn / 2**32
        assert abs(c - math.cos(angle)) < 1e-11 and abs(s - math.sin(angle)) < 1e-11


# ----------------------------------------------------------------------------- MONAI behaviour


def test_numpy_torch_and_metatensor_in_same_type_out():
    img = phantom()[None]
    out_np = StochasticEnhance(**SMALL)(img)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == img.shape
    out_torch = StochasticEnhance(**SMALL)(torch.from_numpy(img))
    assert type(out_torch) is torch.Tensor
    np.testing.assert_allclose(out_torch.numpy(), out_np)
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))
    meta_img = MetaTensor(torch.from_numpy(img), affine=affine, meta={"filename_or_obj": "case7.nii.gz"})
    layers = StochasticEnhance(**SMALL, return_layers=True)(meta_img)
    assert isinstance(layers, EnhancementLayers)
    for layer in layers:
        assert isinstance(layer, MetaTensor)
        assert torch.equal(layer.affine, affine) and layer.meta["filename_or_obj"] == "case7.nii.gz"
    np.testing.assert_allclose(layers.enhanced.numpy(), out_np)


def test_volume_is_enhanced_slice_by_slice_with_independent_streams():
    plane = phantom()
    volume = np.stack([plane, plane], axis=-1)[None]  # (1, H, W, 2), both slices equal
    out = StochasticEnhance(**SMALL)(volume)
    assert out.shape == volume.shape
    np.testing.assert_array_equal(out[..., 0], StochasticEnhance(**SMALL)(plane[None]))
    assert np.abs(out[..., 0] - out[..., 1]).max() > 1e-3  # slice index is part of the stream key


def test_dictionary_version_with_and_without_mask():
    plane = phantom()
    image = MetaTensor(torch.from_numpy(np.stack([plane, plane[::-1]], axis=-1)[None]))
    yy, xx = np.mgrid[:24, :24]
    disc = ((yy - 12) ** 2 + (xx - 12) ** 2 < 36).astype(np.uint8)
    mask = np.stack([disc, disc], axis=-1)[None]
    whole = StochasticEnhanced(keys="image", **SMALL)({"image": image})["image"]
    masked = StochasticEnhanced(keys="image", mask_key="mask", **SMALL)({"image": image, "mask": mask})[
        "image"
    ]
    inside = mask.astype(bool)
    np.testing.assert_array_equal(masked.numpy()[~inside], image.numpy()[~inside])
    np.testing.assert_array_equal(masked.numpy()[inside], whole.numpy()[inside])
    assert isinstance(masked, MetaTensor)
    assert StochasticEnhanceD is StochasticEnhanceDict is StochasticEnhanced


def test_dictionary_version_stores_layers_and_skips_missing_keys():
    data = {"image": phantom()[None]}
    out = StochasticEnhanced(keys=["image", "other"], allow_missing_keys=True, return_layers=True, **SMALL)(
        data
    )
    assert set(out) == {"image", "image_base", "image_stochastic", "image_detail", "image_contrast"}
    np.testing.assert_allclose(out["image_detail"], data["image"] - out["image_base"], atol=1e-6)
    with pytest.raises(KeyError, match="mask_key"):
        StochasticEnhanced(keys="image", mask_key="lungs", **SMALL)(data)


def test_inside_compose_after_windowing():
    hu = np.stack([phantom(seed=2), phantom(seed=3)], axis=-1)[None] * 1400.0 - 1000.0
    lungs = np.zeros_like(hu, dtype=np.uint8)
    lungs[:, 4:20, 4:20] = 1
    data = {"image": MetaTensor(torch.from_numpy(hu.astype(np.float32))), "lungs": lungs}
    pipeline = Compose(
        [
            ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True),
            StochasticEnhanced(keys="image", mask_key="lungs", preset="paper", **SMALL),
        ]
    )
    out = pipeline(data)["image"]
    assert isinstance(out, MetaTensor) and out.shape == hu.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    windowed = (hu - -1000.0) / 1400.0
    np.testing.assert_allclose(out.numpy()[lungs == 0], windowed[lungs == 0], atol=1e-6)
    assert np.abs(out.numpy()[lungs == 1] - windowed[lungs == 1]).max() > 1e-3


# ----------------------------------------------------------------------------- input checks


def test_bad_input_is_refused_with_a_clear_error():
    enhance = StochasticEnhance(**SMALL)
    named = MetaTensor(torch.full((1, 24, 24), 3.0), meta={"filename_or_obj": "scan_hu.nii.gz"})
    with pytest.raises(InvalidVolumeError, match=r"scan_hu\.nii\.gz.*expected \[0, 1\]"):
        enhance(named)
    with pytest.raises(InvalidVolumeError, match="NaN or infinite"):
        enhance(np.full((1, 24, 24), np.nan, dtype=np.float32))
    with pytest.raises(InvalidVolumeError, match="channel-first"):
        enhance(np.zeros((24, 24), dtype=np.float32))
    with pytest.raises(InvalidVolumeError, match="one channel"):
        enhance(np.zeros((2, 24, 24), dtype=np.float32))
    with pytest.raises(InvalidVolumeError, match="too small for r1"):
        enhance(np.zeros((1, 8, 8), dtype=np.float32))
    with pytest.raises(InvalidVolumeError, match="mask shape"):
        enhance(np.zeros((1, 24, 24), dtype=np.float32), mask=np.ones((1, 24, 23)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r1": 0},
        {"r1": 5, "r2": 5},
        {"alpha": 0},
        {"beta": -1},
        {"chains": 0},
        {"points": 2.5},
        {"preset": "x"},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        StochasticEnhance(**kwargs)
    with pytest.raises(ValueError, match="device"):
        StochasticEnhance(device="tpu")


@pytest.mark.slow  # a fresh interpreter imports torch and MONAI: about 10 s
def test_importing_and_cpu_use_never_load_cuda():
    code = (
        "import sys, numpy as np, transforms;"
        "transforms.StochasticEnhance(chains=2, points=20)(np.full((1, 24, 24), 0.5, np.float32));"
        "assert 'transforms._stochastic_cuda' not in sys.modules, 'cuda module imported';"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- CUDA

_SIMULATED_CUDA_VS_CPU = """
import numpy as np
from numba import config
from tests.transforms.test_stochastic_enhance import phantom
from transforms import _stochastic_cuda, _stochastic_kernels as kernels
from transforms.stochastic_enhance import sobel_magnitude
assert config.ENABLE_CUDASIM
img = np.ascontiguousarray(np.stack([phantom(14, seed=1), phantom(14, seed=2)[:, ::-1]]))
mask = np.ones(img.shape, np.uint8)
mask[1, :4, :5] = 0
args = (img, sobel_magnitude(img), mask, kernels.seed_key(4), 3, 3, 30, 3.5, 19.8, 0.5, 0.3)
for ours, theirs in zip(kernels.enhance_layers(*args), _stochastic_cuda.enhance_layers(*args)):
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
"""


def test_cuda_device_functions_include_every_kernel_they_call():
    """Each function rebuilt for the GPU finds the device version of every kernel function it
    calls, built before it; a missing one would be the CPU dispatcher, which fails only on a
    real GPU (the simulator accepts it)."""
    from numba.core.registry import CPUDispatcher

    from transforms import _stochastic_cuda

    built = {"_floor"}  # substituted by the CUDA module
    for name in _stochastic_cuda._DEVICE_CHAIN:
        code = getattr(kernels, name).py_func.__code__
        callees = {n for n in code.co_names if isinstance(getattr(kernels, n, None), CPUDispatcher)}
        assert callees <= built, f"{name} calls {sorted(callees - built)} before they are built"
        built.add(name)


@pytest.mark.slow  # a fresh interpreter imports torch and MONAI: about 10 s
def test_cuda_kernel_gives_the_cpu_layers_in_the_cuda_simulator():
    """The CUDA module's logic (device functions rebuilt from the CPU kernels' source, one thread
    per pixel, masked pixels, slice offsets) run by numba's CUDA simulator gives the CPU kernel's
    layers, interior (table) walks included. The compiled GPU code needs a GPU: see below."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    subprocess.run(
        [sys.executable, "-c", _SIMULATED_CUDA_VS_CPU], check=True, timeout=300, env=env, cwd=REPO_ROOT
    )


@pytest.mark.cuda
@pytest.mark.skipif(not cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu():
    volume = np.stack([phantom(40, seed=s) for s in range(3)], axis=-1)[None]
    for kwargs in ({}, {"preset": "paper"}):
        cpu = StochasticEnhance(chains=8, points=100, seed=9, return_layers=True, **kwargs)(volume)
        gpu = StochasticEnhance(chains=8, points=100, seed=9, return_layers=True, device="cuda", **kwargs)(
            volume
        )
        for ours, theirs in (
            (cpu.base, gpu.base),
            (cpu.stochastic, gpu.stochastic),
            (cpu.enhanced, gpu.enhanced),
        ):
            gap = np.abs(ours - theirs)
            assert np.mean(gap < 1e-5) > 0.99  # same streams: equal up to rounding, rare boundary cases
            assert gap.max() < 0.1
