"""One training epoch and one validation of the bundle at the paper's sizes, on real-size volumes.

The bundle's defaults (in-plane resize to 256, central crop to 224, 50 sampled slices, batch
size 1) are what a user trains with on a public collection; the demo runs far smaller
volumes. :func:`write_paper_scale_data` makes full-size volumes from the real chest CT (one
with inserted lesions, one without) and :func:`run_paper_scale_epoch` runs ``train.json`` over
them for one epoch with a validation, timing both. ``benchmarks/bench_paper_scale.py`` prints
the numbers with the peak memory; the slow test runs the same step on fewer slices.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.atomic_files import atomic_write_text
from pipeline.data.nifti_files import write_nifti
from pipeline.jobs.demo import BUNDLE_DIR, run_bundle
from pipeline.synthetic.real_scan_volumes import load_base_scan, make_base_volume

__all__ = ["PAPER_SIZE", "run_paper_scale_epoch", "write_paper_scale_data"]

PAPER_SIZE = 512
"""In-plane size of the volumes: that of a clinical CT slice."""


def write_paper_scale_data(
    out_dir: str | os.PathLike,
    base_ct: str | os.PathLike,
    slices: int = 64,
    seed: int = 0,
    size: int = PAPER_SIZE,
) -> Path:
    """Write two ``size`` x ``size`` x ``slices`` volumes made from ``base_ct`` and their ``datalist.json``.

    The positive volume holds inserted lesions, the negative one none; both train, and the
    positive one also validates (one epoch needs no held-out data to be timed).

    Returns:
        The datalist's path.
    """
    out_dir = Path(out_dir)
    base = load_base_scan(base_ct, size=size, slices=slices)
    items = []
    for label in (1, 0):
        volume = make_base_volume(base, label, 0, seed=seed)
        name = f"images/{'positive' if label else 'negative'}.nii.gz"
        write_nifti(out_dir / name, volume.hu, volume.affine)
        items.append({"image": name, "label": label, "slice_labels": volume.slice_labels})
    datalist = out_dir / "datalist.json"
    atomic_write_text(datalist, json.dumps({"training": items, "validation": items[:1]}, indent=1) + "\n")
    return datalist


class _TrainingTimer:
    """Times a trainer's epoch up to its last iteration, and the part spent waiting for batches.

    Ignite's own epoch time includes the epoch-end handlers (batch-norm re-estimation and the
    validation run), which are timed apart here.
    """

    def __init__(self) -> None:
        self.epoch_seconds = 0.0
        self.epoch_cpu_seconds = 0.0
        self.data_seconds = 0.0
        self._epoch_started = self._epoch_cpu_started = self._batch_started = 0.0

    def attach(self, workflow: Any) -> None:
        from ignite.engine import Events

        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_done)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._start_batch)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_done)

    def _start_epoch(self, _engine: Any) -> None:
        self._epoch_started = time.perf_counter()
        self._epoch_cpu_started = time.process_time()

    def _iteration_done(self, _engine: Any) -> None:
        self.epoch_seconds = time.perf_counter() - self._epoch_started
        self.epoch_cpu_seconds = time.process_time() - self._epoch_cpu_started

    def _start_batch(self, _engine: Any) -> None:
        self._batch_started = time.perf_counter()

    def _batch_done(self, _engine: Any) -> None:
        self.data_seconds += time.perf_counter() - self._batch_started


def run_paper_scale_epoch(
    out_dir: str | os.PathLike, datalist: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Train the bundle for one epoch at its defaults on ``datalist`` and validate once.

    Only what a run on this machine needs is overridden (paths, ``epochs=1``, no data loader
    workers, no progress bar); ``overrides`` may change more (the slow test uses fewer slices).
    Nothing is cached between runs: the epoch includes reading and preprocessing the volumes,
    as a first epoch does.

    Returns:
        ``train_s`` (the training epoch up to its last step: reading, preprocessing, forward,
        backward, optimiser steps), ``train_cpu_s`` (its CPU seconds, all threads),
        ``data_s`` (the part of it spent reading and preprocessing the volumes),
        ``validation_s`` (the validation run), ``train_volumes``, ``seconds_per_volume`` and
        ``total_s`` (the whole run: set-up, epoch, batch-norm re-estimation, validation).
    """
    out_dir = Path(out_dir)
    datalist = Path(datalist)
    settings = {
        "bundle_root": os.fspath(BUNDLE_DIR),
        "dataset_dir": os.fspath(datalist.parent),
        "datalist": os.fspath(datalist),
        "ckpt_dir": os.fspath(out_dir / "models"),
        "output_dir": os.fspath(out_dir / "eval"),
        "cache_dir": "none",
        "epochs": 1,
        "num_workers": 0,
        "progress_bar": False,
        **dict(overrides or {}),
    }
    timer = _TrainingTimer()
    start = time.perf_counter()
    workflow = run_bundle([BUNDLE_DIR / "configs" / "train.json"], settings, before_run=timer.attach)
    total_s = time.perf_counter() - start
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    volumes = len(workflow.parser.get_parsed_content("train#datalist"))
    train_s = timer.epoch_seconds
    return {
        "train_s": train_s,
        "train_cpu_s": timer.epoch_cpu_seconds,
        "data_s": timer.data_seconds,
        "validation_s": float(evaluator.state.times["COMPLETED"]),
        "train_volumes": float(volumes),
        "seconds_per_volume": train_s / volumes,
        "total_s": total_s,
    }
