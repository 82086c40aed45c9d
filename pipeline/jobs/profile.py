"""Where the time of one training volume and one batch-inference volume goes, stage by stage.

The bundle's own objects are built from ``train.json`` and ``inference.json`` (transforms,
network, optimiser, ``prepare_batch``, inferer, writers) and each stage is run and timed on its
own, in the order the engines run them, on one volume. The network's own forward and backward
over the same slices (a plain tensor straight into the network, nothing else) is timed in the
same run, so that the overhead of everything around it reads as a ratio that does not depend
on how busy the machine is. ``benchmarks/bench_profile.py`` prints the tables;
``benchmarks/bench_gpu.py`` runs the same on a GPU.

Training, per volume:

- first epoch: reading, lung mask, window (and enhancement), resize and crop, compact storage,
  cache write; then what every epoch does;
- every epoch: cache read, slice sampling, augmentation (positive volumes), network input,
  collation and transfer (``prepare_batch``), forward, loss, backward, optimiser step.

Batch inference, per volume: reading, lung mask, window, resize and crop, network input, the
scoring pass with or without the heatmaps' Grad-CAM, the heatmap files, the attention files.

``before`` rows time what the bundle did before its speed-ups on the same data in the same run:
a MetaTensor into a contiguous-format network, Adam's for-each implementation, float32 in the
cache, heatmaps that run the CNN again.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import list_data_collate
from monai.transforms import Compose

from pipeline.jobs.demo import BUNDLE_DIR

__all__ = [
    "INFERENCE_STAGES",
    "TRAINING_STAGES",
    "Profile",
    "bundle_workflow",
    "profile_inference",
    "profile_training",
    "summarise",
]

READING = "reading (load, checks, orientation)"
LUNG_MASK = "lung mask"
WINDOW = "window / enhancement"
RESIZE = "resize + crop"
COMPACT = "compact storage (float16 CT, uint8 mask)"
CACHE_WRITE = "cache write"
CACHE_READ = "cache read"
SAMPLING = "slice sampling"
AUGMENTATION = "augmentation"
NETWORK_INPUT = "network input + collation + transfer"
FORWARD = "forward"
LOSS = "loss"
BACKWARD = "backward"
OPTIMISER = "optimiser step"
SCORING = "scoring pass"
SCORING_WITH_CAM = "scoring pass with Grad-CAM"
HEATMAP_FILES = "heatmap files (NIfTI + PNG per positive slice)"
LESION_HEATMAP_FILES = "heatmap files, lesion slices called"
ATTENTION_FILES = "attention files (CSV + PNG)"

PREPROCESSING_STAGES = (READING, LUNG_MASK, WINDOW, RESIZE, COMPACT)
TRAINING_STAGES = (
    *PREPROCESSING_STAGES,
    CACHE_WRITE,
    CACHE_READ,
    SAMPLING,
    AUGMENTATION,
    NETWORK_INPUT,
    FORWARD,
    LOSS,
    BACKWARD,
    OPTIMISER,
)
"""Stages of a training volume, in the order they run."""
INFERENCE_STAGES = (
    *PREPROCESSING_STAGES,
    NETWORK_INPUT,
    SCORING,
    SCORING_WITH_CAM,
    HEATMAP_FILES,
    LESION_HEATMAP_FILES,
    ATTENTION_FILES,
)
"""Stages of a batch-inference volume, in the order they run (the heatmap files once with every
slice called, once with the labelled lesion slices called, as a correct rule calls them)."""

_STAGE_OF_TRANSFORM = {
    "LungMaskd": LUNG_MASK,
    "ScaleIntensityRanged": WINDOW,
    "ToneMapd": WINDOW,
    "StochasticEnhanced": WINDOW,
    "Resized": RESIZE,
    "CenterSpatialCropd": RESIZE,
    "CacheableMetad": COMPACT,
    "CastToTyped": COMPACT,
}


@dataclass
class Profile:
    """Wall and CPU seconds of each stage, over repeats (the median is reported).

    Attributes:
        wall: stage -> wall seconds of each repeat.
        cpu: stage -> CPU seconds (this process, all threads) of each repeat.
        facts: sizes and settings of the run (shown with the table).
    """

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        """Time the block as one repeat of ``name`` (CUDA work is waited for at both ends)."""
        _synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        _synchronize(device)
        self.wall.setdefault(name, []).append(time.perf_counter() - wall)
        self.cpu.setdefault(name, []).append(time.process_time() - cpu)

    def seconds(self, name: str, cpu: bool = False) -> float:
        """Median seconds of a stage over its repeats (0 when it never ran)."""
        values = (self.cpu if cpu else self.wall).get(name, [])
        return statistics.median(values) if values else 0.0


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def bundle_workflow(config: str, overrides: Mapping[str, Any]) -> Any:
    """The bundle's ``config`` (a file in its ``configs/``) with ``overrides``, initialised, not run."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=os.fspath(BUNDLE_DIR / "configs" / config),
        meta_file=os.fspath(BUNDLE_DIR / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **dict(overrides),
    )
    workflow.initialize()
    return workflow


def _run_preprocessing(chain: Sequence[Any], item: dict, profile: Profile) -> dict:
    """Run the deterministic chain transform by transform, each timed under its stage."""
    for transform in chain:
        with profile.stage(_STAGE_OF_TRANSFORM.get(type(transform).__name__, READING)):
            item = transform(item)
    return item


def _cache_round_trip(item: dict, folder: Path, profile: Profile | None) -> tuple[dict, int]:
    """Write and read ``item`` as ``PersistentDataset`` does; returns what was read and its size in bytes."""
    path = folder / "item.pt"
    with profile.stage(CACHE_WRITE) if profile else contextlib.nullcontext():
        torch.save(item, path)
    with profile.stage(CACHE_READ) if profile else contextlib.nullcontext():
        loaded = torch.load(path, weights_only=True)
    return loaded, path.stat().st_size


def _own_forward_backward(
    network: torch.nn.Module, shape: Sequence[int], repeats: int, device: torch.device
) -> Profile:
    """The network alone: a plain float32 tensor in, forward, cross-entropy, backward."""
    profile = Profile()
    inputs = torch.rand(*shape, device=device)
    label = torch.ones(shape[0], dtype=torch.long, device=device)
    for _ in range(repeats):
        with profile.stage("network forward + backward", device):
            loss = torch.nn.functional.cross_entropy(network(inputs), label)
            loss.backward()
        network.zero_grad(set_to_none=True)
    return profile


def profile_training(
    item: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    repeats: int = 2,
    before: bool = True,
    bf16: bool = False,
) -> dict[str, Profile]:
    """Profile one training volume through ``train.json`` at its defaults (``overrides`` change them).

    Args:
        item: one data-list item (``image`` path, ``label``, ``slice_labels``); a positive
            volume shows the augmentation's cost.
        overrides: bundle ids to override (e.g. ``num_slices``, ``spatial_size``, ``device``).
        repeats: timed repeats of the per-epoch stages and of the network's own step, after
            one untimed warm-up.
        before: also time the step as it was before the speed-ups (MetaTensor input,
            contiguous-format network, float32 cache).
        bf16: also time the step under CPU bfloat16 autocast (on a CPU device only).

    Returns:
        ``{"bundle": ..., "network": ...}`` and, as asked, ``"before"`` and ``"bf16"``
        profiles. ``bundle.facts`` holds the input shape and the cache's bytes per slice.
    """
    settings = {"cache_dir": "none", "num_workers": 0, "progress_bar": False, **dict(overrides or {})}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        settings.setdefault("ckpt_dir", os.fspath(folder / "models"))
        settings.setdefault("output_dir", os.fspath(folder / "eval"))
        workflow = bundle_workflow("train.json", settings)
        content = workflow.parser.get_parsed_content
        device = content("device")
        network, optimizer, loss_function = content("network"), content("optimizer"), content("loss")
        prepare_batch = content("prepare_batch")
        deterministic = content("train#deterministic_transforms")
        random_part = content("train#random_transforms")
        sampling, augmentation = Compose(random_part[:2]), Compose(random_part[2:])
        network_input = Compose(content("train#input_transforms"))
        sampling.set_random_state(seed=0)
        augmentation.set_random_state(seed=0)
        network.train()

        profile = Profile()
        cached = _run_preprocessing(deterministic, dict(item), profile)
        cached, stored = _cache_round_trip(cached, folder, profile)
        slices = int(cached["image"].shape[-1])
        profile.facts.update(slices_in_volume=slices, cache_bytes_per_slice=stored / slices)

        def step(
            profile: Profile | None,
            batch_preparer: Any,
            net: torch.nn.Module,
            optimizer: Any = optimizer,
            cpu_bf16: bool = False,
        ) -> tuple[int, ...]:
            timer = profile or Profile()
            data = _cache_round_trip(cached, folder, timer)[0]
            with timer.stage(SAMPLING):
                data = sampling(data)
            with timer.stage(AUGMENTATION):
                data = augmentation(data)
            with timer.stage(NETWORK_INPUT, device):
                data = network_input(data)
                inputs, label = batch_preparer(list_data_collate([data]), device)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)
            with timer.stage(FORWARD, device), autocast:
                outputs = net(inputs)
            with timer.stage(LOSS, device), autocast:
                loss = loss_function(outputs, label)
            with timer.stage(BACKWARD, device):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with timer.stage(OPTIMISER, device):
                optimizer.step()
            return tuple(inputs.shape)

        step(None, prepare_batch, network)  # warm-up: oneDNN primitives, allocator
        per_epoch = Profile()
        for _ in range(repeats):
            shape = step(per_epoch, prepare_batch, network)
        for name in (CACHE_READ, SAMPLING, AUGMENTATION, NETWORK_INPUT, FORWARD, LOSS, BACKWARD, OPTIMISER):
            profile.wall[name], profile.cpu[name] = per_epoch.wall[name], per_epoch.cpu[name]
        profile.facts.update(network_input=list(shape), device=str(device))
        results = {"bundle": profile, "network": _own_forward_backward(network, shape, repeats, device)}

        if before:
            results["before"] = _profile_before(network, optimizer, cached, folder, step, repeats)
        if bf16 and device.type == "cpu":
            bf16_profile = Profile()
            for _ in range(repeats):
                step(bf16_profile, prepare_batch, network, cpu_bf16=True)
            results["bf16"] = bf16_profile
    return results


def _profile_before(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cached: dict,
    folder: Path,
    step: Any,
    repeats: int,
) -> Profile:
    """The step as before: MetaTensor into a contiguous-format network, for-each Adam, float32 cache."""
    from monai.engines.utils import default_prepare_batch

    old_network = copy.deepcopy(network)
    old_network.channels_last = False
    old_network.encoder.to(memory_format=torch.contiguous_format)
    old_network.train()
    # the optimiser as it was: Adam's default (for-each) implementation, not the fused one
    old_optimizer = torch.optim.Adam(old_network.parameters(), lr=optimizer.defaults["lr"])
    profile = Profile()
    step(None, default_prepare_batch, old_network, old_optimizer)
    for _ in range(repeats):
        step(profile, default_prepare_batch, old_network, old_optimizer)
    float32_item = {
        key: value.float() if isinstance(value, torch.Tensor) and key in ("image", "mask") else value
        for key, value in cached.items()
    }
    old_cache = Profile()
    for _ in range(repeats):
        _cache_round_trip(float32_item, folder, old_cache)
    profile.wall[CACHE_READ], profile.cpu[CACHE_READ] = old_cache.wall[CACHE_READ], old_cache.cpu[CACHE_READ]
    profile.facts["cache_bytes_per_slice"] = _cache_round_trip(float32_item, folder, None)[1] / int(
        cached["image"].shape[-1]
    )
    return profile


def profile_inference(
    item: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    repeats: int = 2,
    before: bool = True,
) -> dict[str, Profile]:
    """Profile batch inference of one volume through ``inference.json``, every slice called positive.

    The network keeps its random weights (no checkpoint is read); the slice rule is set so that
    every slice is called (``slice_tau 0``, thresholds 0), the heaviest case for the heatmaps.
    The heatmap files are also timed with only the item's labelled lesion slices called (when
    it has ``slice_labels``), as on a positive scan whose rule calls the diseased slices.

    Args:
        item: one case (``image`` path).
        overrides: bundle ids to override (e.g. ``spatial_size``, ``device``, ``cpu_bf16``).
        repeats: timed repeats of the scoring passes and the writers, after one warm-up.
        before: also time the heatmaps as before (the CNN run again over the called slices).

    Returns:
        ``{"bundle": ...}`` with every stage and, as asked, ``"before"`` with the heatmap files
        written by re-running the CNN.
    """
    from pipeline.export.attention_export import SliceAttentionSaver
    from pipeline.export.heatmap_export import SliceHeatmapWriter
    from pipeline.workflow.inferer import SliceAttentionInferer

    settings = {"slice_tau": 0.0, "slice_threshold": 0.0, "threshold": 0.0, **dict(overrides or {})}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        settings.setdefault("output_dir", os.fspath(folder / "predictions"))
        workflow = bundle_workflow("inference.json", settings)
        content = workflow.parser.get_parsed_content
        device, network, prepare_batch = content("device"), content("network"), content("prepare_batch")
        inferer: SliceAttentionInferer = content("inferer")
        postprocessing = content("postprocessing")
        chain = content("preprocessing").transforms
        network.eval()
        heatmaps = SliceHeatmapWriter(network, target_layer=content("heatmap_layer"))
        saver = SliceAttentionSaver(
            folder / "attention", slice_tau=0.0, slice_threshold=0.0, threshold=0.0, heatmaps=None
        )
        saver.read_slice_rule(None)
        plain_inferer = SliceAttentionInferer(inferer.slice_chunk, cpu_bf16=inferer.cpu_bf16)
        cam_inferer = SliceAttentionInferer(
            inferer.slice_chunk, grad_cam_layer=content("heatmap_layer"), cpu_bf16=inferer.cpu_bf16
        )

        profile = Profile()
        cached_part = _cached_part_length(chain)
        data = _run_preprocessing(chain[:cached_part], dict(item), profile)
        with profile.stage(NETWORK_INPUT, device):
            data = Compose(chain[cached_part:])(data)
            inputs, _ = prepare_batch(list_data_collate([data]), device)
        profile.facts.update(network_input=list(inputs.shape), device=str(device), cpu_bf16=inferer.cpu_bf16)

        def score(timer: Profile, name: str, scorer: SliceAttentionInferer) -> dict:
            with timer.stage(name, device), torch.no_grad():
                raw = scorer(inputs, network)
                return postprocessing({"pred": {key: value[0] for key, value in raw.items()}})

        case_dir = folder / "case"
        old = Profile()
        for k in range(repeats + 1):
            timer = profile if k else Profile()  # the first round warms up
            result = score(timer, SCORING, plain_inferer)
            result = score(timer, SCORING_WITH_CAM, cam_inferer)
            slice_pred = torch.ones(inputs.shape[-1], dtype=torch.long)
            indices = data["slice_indices"]
            with timer.stage(HEATMAP_FILES, device):
                heatmaps(case_dir, data["image"], slice_pred, indices, "case", result["cam"])
            if "slice_labels" in data:
                lesion_slices = torch.as_tensor(data["slice_labels"]).reshape(-1).long()
                with timer.stage(LESION_HEATMAP_FILES, device):
                    heatmaps(case_dir, data["image"], lesion_slices, indices, "case", result["cam"])
            with timer.stage(ATTENTION_FILES):
                saver.save_case({**data, "case_id": "case"}, result)
            if before:
                with (old if k else Profile()).stage(HEATMAP_FILES, device):
                    heatmaps(case_dir, data["image"], slice_pred, indices, "case")
        results = {"bundle": profile}
        if before:
            results["before"] = old
    return results


def _cached_part_length(chain: Sequence[Any]) -> int:
    """How many transforms of an evaluation chain make the deterministic part (up to the compact cast)."""
    names = [type(transform).__name__ for transform in chain]
    return names.index("CacheableMetad") + 2  # CacheableMetad, then the compact cast


def summarise(profile: Profile, stages: Sequence[str]) -> list[tuple[str, float, float, float]]:
    """``(stage, wall s, CPU s, share of the wall total)`` for each stage that ran, in order."""
    rows = [
        (name, profile.seconds(name), profile.seconds(name, cpu=True))
        for name in stages
        if name in profile.wall
    ]
    total = sum(wall for _, wall, _ in rows) or 1.0
    return [(name, wall, cpu, wall / total) for name, wall, cpu in rows]
