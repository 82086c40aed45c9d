"""Lung mask speed and quality on the real CT series: LungMask against a straightforward baseline.

The baseline is what a first implementation of the paper's description looks like: per axial slice, threshold
at -600 HU, drop the air touching the image border, take the slice's convex hull (kept when at most twice the
air's area), then a 3D binary dilation with a 5 mm ball. Both are timed on the same volume and scored on the
same criteria.

A second table scores ``LungMask`` on partial-lung scans built from the same series
(``partial_lung_cases.py``: lung bases, gas below the diaphragm, a small field of view) against the
series' own lungs where each case keeps them, and measures the inserted gas left in the mask.

Usage:
    python benchmarks/bench_lung_mask.py [--series DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage
from partial_lung_cases import abdomen_without_lung, partial_lung_cases  # sibling module: run as a script
from scipy import ndimage
from skimage.morphology import convex_hull_image
from skimage.segmentation import clear_border

from pipeline.synthetic.base_ct import cached_base_ct
from transforms import LungMask, NoLungFoundError, segment_lungs

DEFAULT_SERIES = cached_base_ct()
"""The demo's real CT in the cache (``python -m pipeline fetch-base-ct``)."""
THRESHOLD_HU = -600.0
DILATION_MM = 5.0


def baseline_lung_mask(hu: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Per-slice threshold, border air removed, per-slice convex hull, 3D binary dilation by a 5 mm ball."""
    mask = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[2]):
        air = clear_border(hu[:, :, z] < THRESHOLD_HU)
        if air.any():
            hull = convex_hull_image(air)
            mask[:, :, z] = hull if hull.sum() <= 2 * air.sum() else air
    radius = np.floor(DILATION_MM / spacing).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in radius), indexing="ij"), axis=-1) * spacing
    ball = (grid**2).sum(axis=-1) <= DILATION_MM**2 + 1e-6
    return ndimage.binary_dilation(mask, structure=ball)


def body_of(hu: np.ndarray) -> np.ndarray:
    """The largest region above -500 HU with its in-slice holes (lungs, airways, gas) filled."""
    labels, _ = ndimage.label(hu > -500)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(labels == sizes.argmax(), structure=in_plane)


def timed(run: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float, float, float]:
    """Result, median wall seconds, median CPU seconds and peak traced memory (MiB) of ``run``."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    tracemalloc.start()
    run()
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, float(np.median(walls)), float(np.median(cpus)), peak_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="DICOM series folder or CT file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    args = parser.parse_args()

    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(args.series))
    hu = image[0].numpy()
    spacing = np.asarray(image.pixdim, dtype=np.float64)
    voxel_l = float(np.prod(spacing)) / 1e6
    body = body_of(hu)
    parenchyma = (hu < -700) & body

    methods: dict[str, Callable[[], np.ndarray]] = {
        "baseline (per-slice hull + 3D dilation)": lambda: baseline_lung_mask(hu, spacing),
        "segment_lungs": lambda: segment_lungs(hu, spacing, dilation_mm=DILATION_MM),
        "LungMask transform (incl. checks)": lambda: LungMask(dilation_mm=DILATION_MM)(image)[0].numpy() > 0,
    }
    print(f"series: {args.series.name}  shape {hu.shape}  spacing {np.round(spacing, 4).tolist()} mm")
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPU cores, load average {load:.1f}; median of {args.repeats} runs")
    print()
    header = (
        f"{'method':42s} {'wall s':>7s} {'cpu s':>7s} {'peak MiB':>9s} {'mask l':>7s} "
        f"{'<-700 HU covered':>17s} {'>-100 HU in mask':>17s} {'outside body l':>15s}"
    )
    print(header)
    print("-" * len(header))
    masks = {}
    for name, run in methods.items():
        mask, wall, cpu, peak = timed(run, args.repeats)
        masks[name] = mask
        covered = np.count_nonzero(mask & parenchyma) / np.count_nonzero(parenchyma)
        soft = np.count_nonzero(mask & (hu > -100)) / np.count_nonzero(mask)
        print(
            f"{name:42s} {wall:7.2f} {cpu:7.2f} {peak:9.0f} {np.count_nonzero(mask) * voxel_l:7.2f} "
            f"{covered:17.1%} {soft:17.1%} {np.count_nonzero(mask & ~body) * voxel_l:15.3f}"
        )
    lungs = segment_lungs(hu, spacing, dilation_mm=0.0)
    lungs_l = np.count_nonzero(lungs) * voxel_l
    print()
    print(f"lung volume before dilation (segment_lungs, dilation_mm=0): {lungs_l:.2f} l")
    print("'>-100 HU in mask': soft tissue and bone in the mask (lung wall from the dilation, vessels, and")
    print("the heart or mediastinum where a convex hull swallows them). 'peak MiB': numpy allocations.")
    print()
    partial_scans(image, lungs, spacing, args.repeats)


def partial_scans(image: MetaTensor, lungs: np.ndarray, spacing: np.ndarray, repeats: int) -> None:
    """``LungMask`` (5 mm dilation) on the whole series and its partial-lung cases, against their lungs."""
    voxel_l = float(np.prod(spacing)) / 1e6
    hu = image[0].numpy()
    cases = [("whole chest (the series)", hu, lungs, np.zeros(hu.shape, dtype=bool))]
    cases += [(case.name, case.hu, case.lungs, case.gas) for case in partial_lung_cases(hu, lungs, spacing)]
    header = (
        f"{'partial-lung case':30s} {'slices':>6s} {'wall s':>7s} {'cpu s':>7s} {'lung l':>7s} "
        f"{'mask l':>7s} {'lung covered':>13s} {'mask / lung':>12s} {'undilated / lung':>17s} {'gas ml':>7s} "
        f"{'gas in mask ml':>15s}"
    )
    print(header)
    print("-" * len(header))
    for name, case_hu, case_lungs, gas in cases:
        case_image = MetaTensor(case_hu[None], affine=image.affine)
        mask, wall, cpu, _ = timed(lambda img=case_image: LungMask()(img)[0].numpy() > 0, repeats)
        undilated = np.count_nonzero(LungMask(dilation_mm=0.0)(case_image)[0].numpy())
        lung, masked = np.count_nonzero(case_lungs), np.count_nonzero(mask)
        covered = np.count_nonzero(mask & case_lungs) / lung
        gas_ml, gas_kept_ml = (np.count_nonzero(g) * voxel_l * 1e3 for g in (gas, mask & gas))
        print(
            f"{name:30s} {case_hu.shape[2]:6d} {wall:7.2f} {cpu:7.2f} {lung * voxel_l:7.3f} "
            f"{masked * voxel_l:7.3f} {covered:13.1%} {masked / lung:12.2f} {undilated / lung:17.2f} "
            f"{gas_ml:7.0f} {gas_kept_ml:15.1f}"
        )
    no_lung = abdomen_without_lung(hu, lungs, spacing)
    try:
        LungMask()(MetaTensor(no_lung.hu[None], affine=image.affine))
        outcome = "a mask (wrong: it holds no lung)"
    except NoLungFoundError as error:
        outcome = f"refused: {str(error).split(': ', 1)[1]}"
    gas_ml = np.count_nonzero(no_lung.gas) * voxel_l * 1e3
    print(f"{no_lung.name} ({no_lung.hu.shape[2]} slices, {gas_ml:.0f} ml of gas): {outcome}")
    print()
    print("'lung l': the series' lungs before dilation (segment_lungs, dilation_mm=0) where each case")
    print("keeps them; 'mask / lung': mask volume over that (the 5 mm dilation: 1.3 on the whole chest);")
    print("'undilated / lung': the same without the dilation (LungMask(dilation_mm=0)).")


if __name__ == "__main__":
    main()
