"""Speed and memory of ResNextPlus; prints two tables.

1. Inference speed (slices per second, eval mode, no gradients) of ResNextPlus against its bare
   ResNeXt-50 backbone on the same slices. The gap is the cost of the mask convolution, CBAM,
   the BiLSTM and the slice attention.
2. Peak memory of one training step (forward, cross-entropy, backward) over one volume of S
   slices, with and without ``checkpoint_slices``. Each configuration runs in a fresh
   subprocess. On CPU the peak is the rise of the process's resident set size (VmHWM, reset
   through ``/proc/self/clear_refs`` before the step; ``ru_maxrss`` where that is unavailable)
   above its size before the step; on CUDA it is ``torch.cuda.max_memory_allocated`` above the
   memory allocated before the step. Model parameters and the input are not counted; the
   gradient buffers are. The step time is that of the process's first step, warm-up included.
   A configuration whose memory, extrapolated from a smaller plain run, would exceed 80% of
   the available memory is reported as skipped instead of being run.

Usage:
    python benchmarks/bench_network.py                        # defaults below, CPU
    python benchmarks/bench_network.py --size 128 --train-size 128 --train-slices 50 100
    python benchmarks/bench_network.py --device cuda --skip-speed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.nn.functional import cross_entropy

from networks import ResNextPlus, resnext50_32x4d

CLEAR_REFS = "/proc/self/clear_refs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--size", type=int, default=224, help="in-plane size for the speed test")
    parser.add_argument("--slices", type=int, default=16, help="slices per volume for the speed test")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model (median reported)")
    parser.add_argument("--train-size", type=int, default=224, help="in-plane size for the memory test")
    parser.add_argument(
        "--train-slices", type=int, nargs="+", default=[50, 200], help="slices per volume for the memory test"
    )
    parser.add_argument("--chunk", type=int, default=10, help="slice_chunk used with checkpoint_slices")
    parser.add_argument("--skip-speed", action="store_true", help="skip the inference speed table")
    parser.add_argument("--skip-memory", action="store_true", help="skip the training memory table")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON: one memory configuration
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def speed_table(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 2, args.size, args.size, args.slices, device=device)
    ct_slices = x[0, 0:1].permute(3, 0, 1, 2).contiguous()
    models = {
        "ResNeXt-50 backbone (CT channel)": (resnext50_32x4d(in_channels=1), ct_slices),
        "ResNextPlus": (ResNextPlus(), x),
        f"ResNextPlus, slice_chunk={args.chunk}": (ResNextPlus(slice_chunk=args.chunk), x),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model, inputs in models.values():
            model.to(device).eval()
            model(inputs)  # warm-up: allocator and kernel selection
        # round robin, so that a slow spell of a shared machine hits every model alike
        for _ in range(args.repeats):
            for name, (model, inputs) in models.items():
                times[name].append(seconds_per_call(lambda m=model, i=inputs: m(i), device))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    base = seconds["ResNeXt-50 backbone (CT channel)"]
    print(f"\nInference, {args.slices} slices of {args.size} x {args.size}, median of {args.repeats}")
    print(f"| {'model':<34} | slices/s | time/volume (s) | vs backbone |")
    print(f"|{'-' * 36}|----------|-----------------|-------------|")
    for name, value in seconds.items():
        overhead = 100 * (value / base - 1)
        print(f"| {name:<34} | {args.slices / value:8.2f} | {value:15.2f} | {overhead:+10.1f}% |")


def proc_kib(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` value from a /proc file (None where unavailable)."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_training_step(config: dict) -> dict:
    """Peak memory (MiB) and time (s) of one training step; runs in a fresh process."""
    device = torch.device(config["device"])
    torch.manual_seed(0)
    chunk = config["chunk"] if config["checkpoint"] else None
    model = ResNextPlus(slice_chunk=chunk, checkpoint_slices=config["checkpoint"]).to(device).train()
    size = config["size"]
    x = torch.rand(1, 2, size, size, config["slices"], device=device)
    target = torch.tensor([1], device=device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        try:
            with open(CLEAR_REFS, "w") as clear_refs:
                clear_refs.write("5")  # reset the peak resident set size (VmHWM)
            before = proc_kib("/proc/self/status", "VmRSS") * 1024
        except OSError:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    cross_entropy(model(x), target).backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        hwm = proc_kib("/proc/self/status", "VmHWM")
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mib": (peak - before) / 2**20, "seconds": seconds}


def available_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return (proc_kib("/proc/meminfo", "MemAvailable") or 0) / 1024


def memory_table(args: argparse.Namespace, device: torch.device) -> None:
    rows = []
    mib_per_slice: float | None = None
    for slices in sorted(args.train_slices):
        for checkpoint in (False, True):
            config = {
                "device": str(device),
                "size": args.train_size,
                "slices": slices,
                "checkpoint": checkpoint,
                "chunk": args.chunk,
            }
            estimate = None if checkpoint or mib_per_slice is None else mib_per_slice * slices
            limit = 0.8 * available_mib(device)
            if estimate is not None and estimate > limit:
                rows.append((slices, checkpoint, f"skipped: needs ~{estimate / 1024:.0f} GiB", ""))
                continue
            command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                rows.append((slices, checkpoint, f"failed (exit {result.returncode})", ""))
                print(result.stderr[-2000:], file=sys.stderr)
                continue
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            if not checkpoint:
                mib_per_slice = measured["peak_mib"] / slices
            rows.append((slices, checkpoint, f"{measured['peak_mib']:,.0f}", f"{measured['seconds']:.1f}"))

    where = "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS rise"
    print(f"\nOne training step (forward + backward), {args.train_size} x {args.train_size}, {where}")
    print("| slices | checkpoint_slices | peak memory (MiB)         | first step (s) |")
    print("|--------|-------------------|---------------------------|----------------|")
    for slices, checkpoint, peak, seconds in rows:
        label = f"yes (chunk {args.chunk})" if checkpoint else "no"
        print(f"| {slices:6d} | {label:<17} | {peak:>25} | {seconds:>14} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_training_step(json.loads(args.child))))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"torch {torch.__version__} on {name}")
    if not args.skip_speed:
        speed_table(args, device)
    if not args.skip_memory:
        memory_table(args, device)


if __name__ == "__main__":
    main()
