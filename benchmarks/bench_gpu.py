"""The bundle on one GPU, in under five minutes; prints four tables.

1. The AMP training step at paper size (resize 256, crop 224, 50 slices), stage by stage, with
   the network's own forward and backward beside it (:mod:`pipeline.jobs.profile`).
2. The cached epoch: volumes per second the data loader delivers from the persistent cache
   (the bundle's ``num_workers``) against volumes per second the GPU consumes in training
   steps. The loader is the bottleneck where it delivers fewer.
3. Batch inference of one 512 x 512 x ``--long-slices`` scan (300 by default), every slice
   called, with heatmaps: seconds per scan, stage by stage.
4. The stochastic enhancer on a 256 x 256 slice: the numba.cuda kernel against the CPU one.

Usage (on a machine with a CUDA GPU):
    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --device cpu --size 96 --spatial-size 64 --num-slices 8 \\
        --long-slices 12 --volumes 2 --repeats 1                  # a small run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-ct", default="auto", help="real chest CT (default: the cached one)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a trial run")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volumes")
    parser.add_argument("--slices", type=int, default=64, help="axial slices of the training volumes")
    parser.add_argument("--long-slices", type=int, default=300, help="axial slices of the inference scan")
    parser.add_argument("--num-slices", type=int, default=50, help="slices sampled per training volume")
    parser.add_argument("--resize-size", type=int, default=256)
    parser.add_argument("--spatial-size", type=int, default=224)
    parser.add_argument("--volumes", type=int, default=16, help="volumes of the cached epoch")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader workers (bundle default: 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enhancer-size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return parser.parse_args(argv)


def cached_epoch(
    item: dict, overrides: dict[str, Any], volumes: int, num_workers: int, repeats: int
) -> dict[str, float]:
    """Volumes per second: the data loader over a warm persistent cache, and the GPU's training steps."""
    import torch
    from monai.data import DataLoader, PersistentDataset

    from pipeline.jobs.profile import bundle_workflow
    from pipeline.workflow.preprocessing import cache_subdir

    with tempfile.TemporaryDirectory() as scratch:
        settings = {
            **overrides,
            "cache_dir": os.fspath(Path(scratch) / "cache"),
            "ckpt_dir": os.fspath(Path(scratch) / "models"),
            "output_dir": os.fspath(Path(scratch) / "eval"),
            "progress_bar": False,
        }
        workflow = bundle_workflow("train.json", settings)
        content = workflow.parser.get_parsed_content
        dataset = PersistentDataset(
            [{**item, "copy": k} for k in range(volumes)],  # distinct cache entries of one scan
            transform=content("train#preprocessing"),
            cache_dir=cache_subdir(settings["cache_dir"], **content("preprocessing_args")),
        )
        for k in range(volumes):  # fill the cache
            dataset[k]
        loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=num_workers)
        start = time.perf_counter()
        batches = [batch for batch in loader]
        loader_rate = volumes / (time.perf_counter() - start)

        device, network = content("device"), content("network")
        optimizer, loss_function, prepare_batch = (
            content("optimizer"),
            content("loss"),
            content("prepare_batch"),
        )
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        network.train()

        def step(batch: dict) -> None:
            inputs, label = prepare_batch(batch, device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = loss_function(network(inputs), label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        step(batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches[: max(1, min(len(batches), repeats * 2))]:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps = max(1, min(len(batches), repeats * 2))
        gpu_rate = steps / (time.perf_counter() - start)
    return {"loader_volumes_per_s": loader_rate, "training_volumes_per_s": gpu_rate}


def enhancer(size: int, device: str, base_ct: Path, repeats: int) -> dict[str, float]:
    """Seconds of ``StochasticEnhance`` on one lung-window slice of the real scan, CPU and ``device``."""
    import numpy as np
    from monai.transforms import LoadImage, ScaleIntensityRange

    from transforms import StochasticEnhance

    volume = LoadImage(reader="ITKReader", image_only=True)(os.fspath(base_ct))
    middle = np.asarray(volume)[..., volume.shape[-1] // 2]
    window = ScaleIntensityRange(-1350, 150, 0, 1, clip=True)(middle)
    import torch

    ct = torch.nn.functional.interpolate(torch.as_tensor(window)[None, None].float(), size=(size, size))[0]
    numbers = {}
    for name in dict.fromkeys(["cpu", device]):
        transform = StochasticEnhance(seed=0, device=name)
        transform(ct)  # compile
        start = time.perf_counter()
        for _ in range(repeats):
            transform(ct)
        numbers[f"enhancer_{name}_s"] = (time.perf_counter() - start) / repeats
    return numbers


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from bench_profile import inference_report, real_size_item, training_report  # beside this script

    from pipeline.jobs.profile import profile_inference, profile_training
    from pipeline.synthetic.base_ct import resolve_base_ct

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}")
    overrides = {
        "device": device,
        "amp": device.type == "cuda",
        "resize_size": args.resize_size,
        "spatial_size": args.spatial_size,
        "num_slices": args.num_slices,
        "num_workers": args.num_workers,
    }
    numbers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        item = real_size_item(args.base_ct, scratch / "train", args.slices, args.size)
        results = profile_training(item, {**overrides, "num_workers": 0}, args.repeats, before=False)
        numbers["training"] = training_report(results, epochs=40)

        numbers["cached_epoch"] = epoch = cached_epoch(
            item, overrides, args.volumes, args.num_workers, args.repeats
        )
        print("\n| cached epoch | volumes/s |\n|---|---|")
        print(
            f"| data loader ({args.num_workers} workers, from the cache) "
            f"| {epoch['loader_volumes_per_s']:.2f} |"
        )
        print(f"| training steps ({device.type}) | {epoch['training_volumes_per_s']:.2f} |")
        bottleneck = (
            "data loader" if epoch["loader_volumes_per_s"] < epoch["training_volumes_per_s"] else "network"
        )
        print(f"bottleneck: the {bottleneck}")

        long_item = {
            "image": real_size_item(args.base_ct, scratch / "long", args.long_slices, args.size)["image"]
        }
        results = profile_inference(long_item, {**overrides, "num_workers": 0}, args.repeats, before=False)
        numbers["inference"] = inference_report(results, None)

        numbers["enhancer"] = enhancer(
            args.enhancer_size, args.device, resolve_base_ct(args.base_ct), args.repeats
        )
        print(f"\n| stochastic enhancer, {args.enhancer_size} x {args.enhancer_size} slice | s |\n|---|---|")
        for key, seconds in numbers["enhancer"].items():
            print(f"| {key.removeprefix('enhancer_').removesuffix('_s')} | {seconds:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
