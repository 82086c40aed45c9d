"""Stage-by-stage profile of one training volume and one batch-inference volume; prints tables.

A positive 512 x 512 x S volume is made from the real chest CT
(:func:`pipeline.jobs.paper_scale.write_paper_scale_data`); then the bundle's own objects
(``train.json`` and ``inference.json`` at their defaults unless overridden) run each stage on it
(:mod:`pipeline.jobs.profile`). In the same run it times the network's own forward and
backward on the same slices, the stages as they were before the speed-ups (``before``), and
CPU bfloat16 autocast for training and inference, so every ratio compares numbers taken
under the same load.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_profile.py
    python benchmarks/bench_profile.py --base-ct /path/to/ct --slices 64 --num-slices 50 --repeats 3
    python benchmarks/bench_profile.py --device cuda            # on a GPU (see bench_gpu.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-ct", default="auto", help="real chest CT (default: the cached one)")
    parser.add_argument("--slices", type=int, default=64, help="axial slices of the volume (default: 64)")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volume (default: 512)")
    parser.add_argument("--num-slices", type=int, default=50, help="slices sampled per training volume")
    parser.add_argument("--resize-size", type=int, default=256, help="bundle resize_size")
    parser.add_argument("--spatial-size", type=int, default=224, help="bundle spatial_size")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (median shown)")
    parser.add_argument(
        "--epochs", type=int, default=40, help="epochs over which the first one's cost is spread"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return parser.parse_args(argv)


def _table(title: str, rows: list[tuple], before: Any = None) -> None:
    print(f"\n{title}\n")
    header = "| stage | wall s | CPU s | share |" + (" before, wall s |" if before is not None else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, wall, cpu, share in rows:
        line = f"| {name} | {wall:.2f} | {cpu:.2f} | {share:.0%} |"
        if before is not None:
            line += f" {before.seconds(name):.2f} |" if name in before.wall else " |"
        print(line)


def _sum(profile: Any, stages: tuple[str, ...]) -> float:
    return sum(profile.seconds(name) for name in stages)


def training_report(results: dict, epochs: int) -> dict[str, float]:
    from pipeline.jobs import profile as p

    bundle, network = results["bundle"], results["network"]
    _table(
        f"Training volume ({bundle.facts['slices_in_volume']} slices in the volume, network input "
        f"{bundle.facts['network_input']}, {bundle.facts['device']})",
        p.summarise(bundle, p.TRAINING_STAGES),
        results.get("before"),
    )
    every_epoch = (
        p.CACHE_READ,
        p.SAMPLING,
        p.AUGMENTATION,
        p.NETWORK_INPUT,
        p.FORWARD,
        p.LOSS,
        p.BACKWARD,
        p.OPTIMISER,
    )
    first_only = (*p.PREPROCESSING_STAGES, p.CACHE_WRITE)
    own = network.seconds("network forward + backward")
    numbers = {
        "network_forward_backward_s": own,
        "every_epoch_s": _sum(bundle, every_epoch),
        "first_epoch_s": _sum(bundle, every_epoch) + _sum(bundle, first_only),
        "cache_mb_per_slice": bundle.facts["cache_bytes_per_slice"] / 1e6,
    }
    numbers["average_s"] = numbers["every_epoch_s"] + _sum(bundle, first_only) / epochs
    rows = [
        ("network's own forward + backward (plain tensor)", own),
        ("every epoch (cached volume)", numbers["every_epoch_s"]),
        ("first epoch (preprocessing + cache write)", numbers["first_epoch_s"]),
        (f"average over {epochs} epochs", numbers["average_s"]),
    ]
    if "before" in results:
        before = results["before"]
        numbers["before_every_epoch_s"] = _sum(before, every_epoch)
        numbers["before_cache_mb_per_slice"] = before.facts["cache_bytes_per_slice"] / 1e6
        rows.append(
            ("before: every epoch (MetaTensor, contiguous, for-each Adam)", numbers["before_every_epoch_s"])
        )
    if "bf16" in results:
        bf16 = results["bf16"]
        numbers["bf16_forward_backward_s"] = bf16.seconds(p.FORWARD) + bf16.seconds(p.BACKWARD)
        rows.append(
            ("bf16 autocast: forward + backward in the bundle step", numbers["bf16_forward_backward_s"])
        )
    print("\n| seconds per training volume | wall s | / network's own |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / own:.2f}x |")
    before_mb = numbers.get("before_cache_mb_per_slice")
    print(
        f"\ncache per slice: {numbers['cache_mb_per_slice']:.3f} MB"
        + (f" (before: {before_mb:.3f} MB)" if before_mb else "")
    )
    return numbers


def inference_report(results: dict, results_bf16: dict | None) -> dict[str, float]:
    from pipeline.jobs import profile as p

    bundle = results["bundle"]
    _table(
        f"Batch-inference volume (network input {bundle.facts['network_input']}, every slice called, "
        f"{bundle.facts['device']}, cpu_bf16={bundle.facts['cpu_bf16']})",
        p.summarise(bundle, p.INFERENCE_STAGES),
        results.get("before"),
    )
    common = (*p.PREPROCESSING_STAGES, p.NETWORK_INPUT, p.ATTENTION_FILES)
    without = _sum(bundle, common) + bundle.seconds(p.SCORING)
    with_maps = _sum(bundle, common) + bundle.seconds(p.SCORING_WITH_CAM) + bundle.seconds(p.HEATMAP_FILES)
    numbers = {"without_heatmaps_s": without, "with_heatmaps_s": with_maps}
    rows = [("without heatmaps", without), ("with heatmaps, every slice called", with_maps)]
    if p.LESION_HEATMAP_FILES in bundle.wall:
        lesion = (
            _sum(bundle, common) + bundle.seconds(p.SCORING_WITH_CAM) + bundle.seconds(p.LESION_HEATMAP_FILES)
        )
        numbers["with_heatmaps_lesion_slices_s"] = lesion
        rows.append(("with heatmaps, the lesion's slices called", lesion))
    if "before" in results:
        before = _sum(bundle, common) + bundle.seconds(p.SCORING) + results["before"].seconds(p.HEATMAP_FILES)
        numbers["before_with_heatmaps_s"] = before
        rows.append(("before: with heatmaps (CNN run again)", before))
    print("\n| seconds per inference volume | wall s | / without heatmaps |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / without:.2f}x |")
    if results_bf16 is not None:
        slices = bundle.facts["network_input"][-1]
        other = results_bf16["bundle"]
        print("\n| scoring pass | wall s | slices/s |\n|---|---|---|")
        for facts, profile in ((bundle.facts, bundle), (other.facts, other)):
            seconds = profile.seconds(p.SCORING)
            print(f"| cpu_bf16={facts['cpu_bf16']} | {seconds:.2f} | {slices / seconds:.1f} |")
            numbers[f"scoring_s_cpu_bf16_{facts['cpu_bf16']}"] = seconds
    return numbers


def real_size_item(base_ct: str, folder: Path, slices: int, size: int) -> dict[str, Any]:
    """A positive ``size`` x ``size`` x ``slices`` volume made from the real CT, as a data-list item."""
    from pipeline.jobs.paper_scale import write_paper_scale_data
    from pipeline.synthetic.base_ct import resolve_base_ct

    resolved = resolve_base_ct(base_ct)
    if resolved is None:
        raise SystemExit("no base CT: run `python -m pipeline fetch-base-ct` or pass --base-ct")
    datalist = write_paper_scale_data(folder, resolved, slices=slices, size=size)
    item = json.loads(datalist.read_text())["training"][0]
    return {**item, "image": os.fspath(folder / item["image"])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from pipeline.jobs.profile import profile_inference, profile_training
    from pipeline.workflow.precision import cpu_has_native_bf16

    device = torch.device(args.device)
    overrides = {
        "device": device,
        "resize_size": args.resize_size,
        "spatial_size": args.spatial_size,
        "amp": device.type == "cuda",
    }
    load_before = os.getloadavg()[0]
    numbers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        item = real_size_item(args.base_ct, Path(scratch), args.slices, args.size)
        print(
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"native CPU bf16: {cpu_has_native_bf16()}; "
            f"volume {args.size} x {args.size} x {args.slices}; load average {load_before:.1f} at start"
        )
        if not args.skip_training:
            results = profile_training(
                item, {**overrides, "num_slices": args.num_slices}, args.repeats, bf16=device.type == "cpu"
            )
            numbers["training"] = training_report(results, args.epochs)
            if args.json:
                args.json.write_text(json.dumps(numbers, indent=1) + "\n")
        if not args.skip_inference:
            results = profile_inference(item, {**overrides, "cpu_bf16": False}, args.repeats)
            results_bf16 = None
            if device.type == "cpu":
                results_bf16 = profile_inference(
                    item, {**overrides, "cpu_bf16": True}, args.repeats, before=False
                )
            numbers["inference"] = inference_report(results, results_bf16)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
