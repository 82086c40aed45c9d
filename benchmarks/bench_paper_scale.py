"""Seconds per training volume and peak memory of the bundle at the paper's sizes; prints a table.

Two 512 x 512 x S volumes are made from the real chest CT (one with inserted lesions, one
without, :func:`pipeline.jobs.paper_scale.write_paper_scale_data`); then ``train.json`` runs at
its defaults (resize 256, crop 224, 50 slices sampled per volume, batch size 1, CBAM, mask,
slice attention, no slice checkpointing) for one epoch over both volumes and validates on one
of them, in a fresh process. Nothing is cached, so the epoch includes reading and
preprocessing (lung mask at full resolution), as a first epoch does.

Peak memory is the fresh process's peak resident set size (``ru_maxrss`` of the waited-for
child): model, optimiser state, data and the training step's activations, all included. Its
CPU seconds (user + system) are printed too: on a shared machine they vary less than wall time.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_paper_scale.py
    python benchmarks/bench_paper_scale.py --base-ct /path/to/ct --slices 64 --num-slices 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-ct",
        default="auto",
        help="real chest CT to build the volumes from (default: the one `python -m pipeline fetch-base-ct` "
        "put in the cache)",
    )
    parser.add_argument("--slices", type=int, default=64, help="axial slices of each volume (default: 64)")
    parser.add_argument(
        "--num-slices", type=int, default=50, help="slices sampled per training volume (bundle default: 50)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where to write the volumes (default: a temp folder)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON: the run, in a fresh process
    return parser.parse_args(argv)


def child(config: dict) -> None:
    from pipeline.jobs.paper_scale import run_paper_scale_epoch

    result = run_paper_scale_epoch(
        config["out_dir"], config["datalist"], {"num_slices": config["num_slices"]}
    )
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    import torch

    from pipeline.jobs.paper_scale import PAPER_SIZE, write_paper_scale_data
    from pipeline.synthetic.base_ct import resolve_base_ct

    base_ct = resolve_base_ct(args.base_ct)
    if base_ct is None:
        raise SystemExit("no base CT: run `python -m pipeline fetch-base-ct` or pass --base-ct")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        start = time.perf_counter()
        datalist = write_paper_scale_data(work / "data", base_ct, slices=args.slices)
        data_s = time.perf_counter() - start
        config = {
            "out_dir": os.fspath(work / "run"),
            "datalist": os.fspath(datalist),
            "num_slices": args.num_slices,
        }
        command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)]
        load_before = os.getloadavg()[0]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        load_after = os.getloadavg()[0]
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"the training run failed (exit {result.returncode})")
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_gib = usage.ru_maxrss / 2**20  # KiB on Linux
        cpu_s = usage.ru_utime + usage.ru_stime

    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={threads}; load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        f"\nbundle defaults (resize 256, crop 224, batch 1), {int(measured['train_volumes'])} training "
        f"volumes of {PAPER_SIZE} x {PAPER_SIZE} x {args.slices}, {args.num_slices} slices sampled "
        f"per volume; data made in {data_s:.0f} s"
    )
    print(
        "| training epoch (s) | of which reading + preprocessing (s) | s per training volume "
        "| CPU s per training volume "
        "| validation, 1 volume (s) | whole run (s) | whole run, CPU (s) | peak RSS (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {measured['train_s']:.1f} | {measured['data_s']:.1f} | {measured['seconds_per_volume']:.1f} | "
        f"{measured['train_cpu_s'] / measured['train_volumes']:.1f} | "
        f"{measured['validation_s']:.1f} | {measured['total_s']:.0f} | {cpu_s:.0f} | {peak_gib:.2f} |"
    )


if __name__ == "__main__":
    main()
