"""Batch inference throughput at the paper's size: cases per hour, one process against two.

A few 512 x 512 x S volumes are made from the real chest CT (half with inserted lesions,
:func:`pipeline.synthetic.real_scan_volumes.make_base_volume`); ``inference.json`` then scores the
folder at its defaults (resize 256, crop 224, every slice, ``slice_attention.png`` per case),
without heatmaps (``save_heatmaps False``, the setting for large batches), with an untrained
network of full size (speed does not depend on the weights): once in one process using every
core, once under ``torchrun`` with ``multi_gpu_inference.json`` on CPU (2 Gloo processes, one
thread each). Each run is a fresh process tree; its wall time covers start-up, reading,
preprocessing (lung mask at full resolution), the network and the outputs, and its CPU
seconds are those of every process it started.

Usage:
    python benchmarks/bench_batch_inference.py [--cases 4] [--slices 64] [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "covid19_ct_resnextplus" / "configs"
INFERENCE = str(CONFIGS / "inference.json")


def make_cases(folder: Path, base_ct: str | os.PathLike, cases: int, slices: int) -> None:
    """Write ``cases`` volumes of 512 x 512 x ``slices`` made from ``base_ct`` into ``folder``."""
    from pipeline.data.nifti_files import write_nifti
    from pipeline.jobs.paper_scale import PAPER_SIZE
    from pipeline.synthetic.real_scan_volumes import load_base_scan, make_base_volume

    base = load_base_scan(base_ct, size=PAPER_SIZE, slices=slices)
    for index in range(cases):
        volume = make_base_volume(base, index % 2, index, seed=index)
        write_nifti(folder / f"case_{index:03d}.nii.gz", volume.hu, volume.affine)


ENGINE_TIME = re.compile(r"Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)")


def timed_run(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall and CPU seconds (every process of the tree) of ``command``, which must succeed, and the
    seconds of its (rank 0's) evaluator run: the scoring without the start-up."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(command)}")
    hours, minutes, seconds = ENGINE_TIME.findall(result.stdout + result.stderr)[-1]
    engine = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="volumes to score (default: 4)")
    parser.add_argument("--slices", type=int, default=64, help="axial slices per volume (default: 64)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the torchrun run (default: 2)")
    parser.add_argument("--base-ct", default="auto", help="real chest CT (default: the cached one)")
    args = parser.parse_args(argv)

    import torch

    from networks import ResNextPlus
    from pipeline.synthetic.base_ct import resolve_base_ct

    base_ct = resolve_base_ct(args.base_ct)
    if base_ct is None:
        raise SystemExit("no base CT: run `python -m pipeline fetch-base-ct` or pass --base-ct")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "cases").mkdir()
        make_cases(work / "cases", base_ct, args.cases, args.slices)
        torch.manual_seed(0)
        torch.save(ResNextPlus().state_dict(), work / "model.pt")
        common = [
            "--dataset_dir", os.fspath(work / "cases"),
            "--ckpt_path", os.fspath(work / "model.pt"),
            "--save_heatmaps", "False",
            "--progress", "False",
        ]  # fmt: skip
        runs = {
            f"1 process, {cores} threads": (
                [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFERENCE],
                {"OMP_NUM_THREADS": str(cores)},
                1,
            ),
            f"{args.processes} processes (torchrun, Gloo), 1 thread each": (
                [
                    sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.processes}", "-m", "monai.bundle", "run", "--config_file",
                    f"['{INFERENCE}','{CONFIGS / 'multi_gpu_inference.json'}']",
                ],
                {"OMP_NUM_THREADS": "1"},
                args.processes,
            ),
        }  # fmt: skip
        rows = []
        load_before = os.getloadavg()[0]
        for index, (name, (command, threads, processes)) in enumerate(runs.items()):
            out = ["--output_dir", os.fspath(work / f"out_{index}")]
            rows.append((name, processes, *timed_run([*command, *common, *out], {**os.environ, **threads})))
        load_after = os.getloadavg()[0]

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {cores} cores; "
        f"load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        f"\n{args.cases} volumes of 512 x 512 x {args.slices}, inference.json defaults without heatmaps; "
        "each run from a fresh start (start-up included)\n"
    )
    print(
        "| run | wall s (start-up included) | CPU s | scoring s | cases per hour "
        "| cases per hour per process | CPU s per case |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, processes, wall, cpu, engine in rows:
        per_hour = args.cases * 3600.0 / engine
        print(
            f"| {name} | {wall:.0f} | {cpu:.0f} | {engine:.0f} | {per_hour:.0f} | "
            f"{per_hour / processes:.0f} | {cpu / args.cases:.1f} |"
        )
    print("\n'scoring s': the evaluator's run (rank 0's share for torchrun), without the start-up.")


if __name__ == "__main__":
    main()
