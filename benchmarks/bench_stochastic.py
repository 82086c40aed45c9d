"""Speed of the stochastic enhancer against a straightforward numba port of the reference loop.

Both compute ``B`` and ``S`` of the same CT slice in the same run (default parameters: 20 chains
x 250 points = 5,000 samples per pixel), after a warm-up that compiles them. The slice is the
middle slice of the real CT series beside the repository, windowed to the lung window and
resized; a synthetic phantom stands in when the series is absent. The baseline is timed at the
sizes up to ``--baseline-max`` and extrapolated beyond (the cost is proportional to the pixel
count). Prints a table of seconds per slice, samples per second and the speed-up, plus the full
transform's time (Sobel gradient and type conversions included).

Usage::

    python benchmarks/bench_stochastic.py [--sizes 128 256 512] [--baseline-max 256]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import numba
import numpy as np
from skimage.transform import resize
from stochastic_baseline import baseline_layers  # the sibling module: run as a script from anywhere

from pipeline.synthetic.base_ct import cached_base_ct
from transforms import StochasticEnhance
from transforms import _stochastic_kernels as kernels
from transforms.stochastic_enhance import sobel_magnitude
from transforms.tone_map import LUNG_WINDOW_HU

CT_SERIES = cached_base_ct()
"""The demo's real CT in the cache (``python -m pipeline fetch-base-ct``); a phantom slice without it."""


def ct_slice() -> tuple[np.ndarray, str]:
    """The middle axial slice of the real CT series in the lung window, in [0, 1]."""
    if CT_SERIES.is_dir():
        from monai.transforms import LoadImage

        volume = np.asarray(LoadImage(reader="ITKReader", image_only=True)(str(CT_SERIES)))
        hu = volume[..., volume.shape[-1] // 2].astype(np.float64)
        low, high = LUNG_WINDOW_HU
        return np.clip((hu - low) / (high - low), 0.0, 1.0), f"{CT_SERIES.name}, middle slice, lung window"
    yy, xx = np.mgrid[:512, :512] / 512.0
    body = ((yy - 0.5) ** 2 / 0.16 + (xx - 0.5) ** 2 / 0.2 < 1).astype(float)
    lungs = ((yy - 0.5) ** 2 / 0.06 + (np.abs(xx - 0.5) - 0.2) ** 2 / 0.01 < 1).astype(float)
    noise = np.random.default_rng(0).normal(0.0, 0.02, yy.shape)
    phantom = np.clip(0.05 + 0.6 * body - 0.5 * lungs + noise, 0.0, 1.0)
    return phantom, "synthetic phantom (CT series not found)"


def best_time(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Smallest wall-clock and process CPU seconds of ``repeats`` calls."""
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        function()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--baseline-max", type=int, default=256, help="largest size the baseline runs at")
    parser.add_argument("--chains", type=int, default=20)
    parser.add_argument("--points", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast kernel (best kept)")
    args = parser.parse_args()

    source, description = ct_slice()
    chains, points, r1, alpha, beta = args.chains, args.points, 10.0, 10.0, 10.0
    print(f"slice: {description}; {chains} chains x {points} points per pixel, r1={r1:g}, alpha=beta=10")
    print(
        f"machine: {os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} at start (a shared machine inflates wall times)"
    )

    warm = np.ascontiguousarray(resize(source, (32, 32), anti_aliasing=True)[None], dtype=np.float32)
    warm_grad, warm_mask = sobel_magnitude(warm), np.ones(warm.shape, dtype=np.uint8)
    kernels.enhance_layers(warm, warm_grad, warm_mask, kernels.seed_key(0), 0, 2, 20, r1, 45.0, alpha, beta)
    baseline_layers(warm[0].astype(np.float64), warm_grad[0].astype(np.float64), 2, 20, r1, 45.0, alpha, beta)

    rows = []
    baseline_per_pixel = None
    for size in args.sizes:
        img = np.ascontiguousarray(resize(source, (size, size), anti_aliasing=True)[None], dtype=np.float32)
        grad, mask, r2 = sobel_magnitude(img), np.ones(img.shape, dtype=np.uint8), math.hypot(size, size)
        samples = size * size * chains * points

        def fast(img=img, grad=grad, mask=mask, r2=r2):
            key = kernels.seed_key(0)
            return kernels.enhance_layers(img, grad, mask, key, 0, chains, points, r1, r2, alpha, beta)

        fast_wall, fast_cpu = best_time(fast, args.repeats)
        transform_wall, _ = best_time(lambda img=img: StochasticEnhance(chains=chains, points=points)(img), 1)
        if size <= args.baseline_max:
            img64, grad64 = img[0].astype(np.float64), grad[0].astype(np.float64)
            base_wall, base_cpu = best_time(
                lambda img64=img64, grad64=grad64, r2=r2: baseline_layers(
                    img64, grad64, chains, points, r1, r2, alpha, beta
                ),
                1,
            )
            baseline_per_pixel = (base_wall / size**2, base_cpu / size**2)
            measured = "measured"
        elif baseline_per_pixel is not None:
            base_wall, base_cpu = (per_pixel * size**2 for per_pixel in baseline_per_pixel)
            measured = "extrapolated"
        else:
            base_wall = base_cpu = math.nan
            measured = "not run"
        rows.append(
            {
                "size": size,
                "fast": fast_wall,
                "fast_cpu": fast_cpu,
                "transform": transform_wall,
                "samples": samples,
                "baseline": base_wall,
                "baseline_cpu": base_cpu,
                "how": measured,
            }
        )

    header = (
        f"{'size':>9} | {'fast s/slice':>12} | {'cpu s':>6} | {'transform s':>11} | "
        f"{'fast samples/s':>14} | {'baseline s/slice':>16} | {'cpu s':>6} | {'baseline samples/s':>18} | "
        f"{'speed-up':>8} | {'by cpu':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['size']:>4}x{row['size']:<4} | {row['fast']:>12.3f} | {row['fast_cpu']:>6.2f} | "
            f"{row['transform']:>11.3f} | {row['samples'] / row['fast']:>14.3e} | "
            f"{row['baseline']:>10.2f} {row['how'][:5]:>5} | {row['baseline_cpu']:>6.1f} | "
            f"{row['samples'] / row['baseline']:>18.3e} | {row['baseline'] / row['fast']:>7.1f}x | "
            f"{row['baseline_cpu'] / row['fast_cpu']:>5.1f}x"
        )
    print(
        "fast = transforms._stochastic_kernels.enhance_layers (B and S); transform = the whole "
        "StochasticEnhance call (Sobel, conversions, layers); baseline = benchmarks/stochastic_baseline.py; "
        "'extra' = baseline extrapolated by pixel count from the largest measured size; cpu s = process CPU "
        "time of all threads; samples/s and speed-up use wall time, 'by cpu' the CPU times (robust on a "
        "shared machine)."
    )


if __name__ == "__main__":
    main()
