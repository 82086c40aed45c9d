"""The main job, ``python -m pipeline demo``: data, training, evaluation, batch inference, report.

Everything runs through the bundle in ``bundles/covid19_ct_resnextplus`` with CPU-sized
overrides, in this process (MONAI's ``ConfigWorkflow``):

1. data: demo volumes with exact slice labels and lesion masks, most built from the real chest
   CT fetched by ``python -m pipeline fetch-base-ct`` (lesions inserted into its lungs) when it
   is in the cache (:mod:`pipeline.synthetic.base_ct`), the others synthetic phantoms; one
   merged ``datalist.json``;
2. training: ``configs/train.json`` (best model by validation ROC AUC);
3. evaluation: ``configs/train.json`` + ``configs/evaluate.json`` on the test split
   (``metrics.json``: volume and slice level, and how well the heatmaps point at the lesions);
4. batch inference: ``configs/inference.json`` on the test split (``predictions.csv``,
   slice attention CSV and figure, Grad-CAM heatmap volume and slice overlays per volume);
5. report: ``report.md`` with the metrics and localisation tables, ROC curves, training curves
   and the attention figures and heatmaps (with the lesion outlines) of a few test volumes.

The network trains from scratch (no ImageNet weights can be fetched) on many cheap volumes,
each seen a few times, four volumes per step so that batch-norm statistics span several
volumes; see :data:`DEFAULT` and :data:`QUICK`, and ``docs/results.md`` for the trade-off of
size, volume count and epochs within the ten minutes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data.atomic_files import atomic_write_text
from pipeline.data.datalist import LESION_KEY
from pipeline.export.attention_export import ERRORS_FILE, PREDICTIONS_FILE
from pipeline.export.figures import plot_precision_recall, plot_reliability, plot_roc, plot_training_curves
from pipeline.export.heatmap_export import HEATMAP_PNG
from pipeline.export.report import AttentionExample, Report
from pipeline.synthetic.base_ct import AUTO_BASE_CT, resolve_base_ct
from pipeline.synthetic.lesions import LesionSettings
from pipeline.workflow.precision import cpu_has_native_bf16

__all__ = [
    "BUNDLE_DIR",
    "DEFAULT",
    "QUICK",
    "DemoResult",
    "DemoSettings",
    "demo_run_overrides",
    "learning_rate_text",
    "make_demo_datalist",
    "run_bundle",
    "run_demo",
    "summary_line",
    "with_overrides",
    "write_demo_report",
]

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "covid19_ct_resnextplus"
STAGES = ("data", "training", "evaluation", "inference", "report")
"""The stages of the demo job, in order; each one is timed."""
TRAINING_CURVES = ("train_loss", "val_auc", "volume_acc", "volume_f1", "slice_auc", "slice_f1")
"""TensorBoard series drawn in the report: the loss per iteration, validation metrics per epoch."""
TRAINING_ONLY_IDS = ("ckpt_dir", "cache_dir", "num_slices", "seed", "class_balance", "augment_positives")
"""Bundle ids of training that ``inference.json`` does not have."""
TEMPERATURE_KEY = "calibration.temperature"
"""State-dict key of the logit temperature (:class:`networks.TemperatureScaling`)."""
HEATMAPS_PER_EXAMPLE = 2
"""Heatmap PNGs shown per example volume in the report: its called slices of highest attention."""
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run.

    Attributes:
        real_positive, real_negative: volumes built from the real CT (when present).
        phantom_positive, phantom_negative: synthetic phantom volumes (all of them when the
            real CT is absent: its share goes to the phantoms).
        size: in-plane size of the volumes and of the network input, in pixels.
        slices: axial slices per volume (all of them are scored).
        train_slices: slices sampled per training volume and step (in axial order; ``None``:
            all). Half of them halves a training step; a positive volume whose lesions fall
            outside the sample is, for that step, a noisy label.
        val_fraction, test_fraction: share of each class and source in validation and test.
        epochs: training epochs.
        batch_size: training volumes per step. Several volumes per step let batch-norm
            statistics span volumes; with one volume per step ResNext+ learns far more slowly
            from scratch (see ``docs/results.md``).
        lr_min, lr_max: the cyclic learning rate's range.
        lr_half_cycle_epochs: epochs from ``lr_min`` to ``lr_max``.
        bf16_training: train under bfloat16 autocast on CPUs with native bfloat16 (AVX-512 BF16
            or AMX): about 1.5x faster steps; float32 elsewhere.
        num_workers: data loader processes.
        threads: torch's intra-op threads (``None``: torch's default, one per core). One thread
            leaves the second core of a 2-core machine to the data loader, and is several times
            faster than two when other work shares the CPU; the default demo trains batches of
            four volumes, which use both cores well.
        seed: seed of the data and of training.
        pretrained: a local file of ImageNet weights in torchvision's ``resnext50_32x4d``
            layout for the ResNeXt backbone, as the paper started from (``None``: random weights;
            nothing is downloaded).
        lesions: size, density, slice extent and placement of the positives' lesions (the
            default: the slice extent of real COVID-19 CT).
        examples: test volumes shown with their attention figures in the report.
        overrides: more bundle overrides (``id -> value``) for training, evaluation and
            inference. By default every training volume is seen once per epoch as it is
            (``class_balance`` and ``augment_positives`` off): the demo classes are balanced
            and its volumes plentiful, and augmenting only the positives gives the network a
            shortcut (augmented means positive) that fails on clean test volumes.
    """

    real_positive: int = 150
    real_negative: int = 150
    phantom_positive: int = 100
    phantom_negative: int = 100
    size: int = 96
    slices: int = 16
    train_slices: int | None = 8
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    epochs: int = 2
    batch_size: int = 4
    bf16_training: bool = True
    lr_min: float = 2e-4
    lr_max: float = 2e-4
    lr_half_cycle_epochs: float = 1.0
    num_workers: int = 1
    threads: int | None = None
    seed: int = 0
    pretrained: str | None = None
    lesions: LesionSettings = field(default_factory=LesionSettings)
    examples: int = 4
    overrides: Mapping[str, Any] = field(
        default_factory=lambda: {"class_balance": False, "augment_positives": False}
    )

    @property
    def volumes(self) -> int:
        """All the demo's volumes: real-CT and phantom, both classes."""
        return self.real_positive + self.real_negative + self.phantom_positive + self.phantom_negative


DEFAULT = DemoSettings()
"""The default demo: 500 volumes of 96 x 96 x 16, two epochs of four volumes per step on 8 of their
slices (under 10 minutes on a 2-core CPU; see ``docs/results.md`` for the trade-off)."""

QUICK = DemoSettings(
    real_positive=4,
    real_negative=4,
    phantom_positive=4,
    phantom_negative=4,
    size=48,
    slices=8,
    train_slices=None,
    val_fraction=0.25,
    test_fraction=0.25,
    epochs=1,
    threads=1,
    examples=2,
)
"""A smoke run of the whole job on 16 tiny volumes (a minute or two; the numbers mean nothing)."""


@dataclass
class DemoResult:
    """Where a demo run put its results, and what it measured."""

    out_dir: Path
    report: Path
    metrics: dict[str, Any]
    timings: dict[str, float]
    datalist: Path
    inference_dir: Path


def make_demo_datalist(
    data_dir: str | os.PathLike, settings: DemoSettings, base_ct: str | os.PathLike | None
) -> tuple[Path, dict[str, int]]:
    """Write the demo volumes and one merged ``datalist.json`` in ``data_dir``.

    Volumes from the real CT go to ``data_dir/real``, phantoms to ``data_dir/phantom``; each
    item of the merged datalist carries a ``case_id`` naming its source (``real_positive_003``).

    Returns:
        The merged datalist's path and the number of volumes per source.
    """
    from pipeline.synthetic.demo_data import make_demo_data

    data_dir = Path(data_dir)
    sources: dict[str, tuple[int, int, Path | None]] = {}
    use_real = base_ct is not None and Path(base_ct).exists()
    phantom_positive, phantom_negative = settings.phantom_positive, settings.phantom_negative
    if use_real:
        sources["real"] = (settings.real_positive, settings.real_negative, Path(base_ct))
    else:
        phantom_positive += settings.real_positive
        phantom_negative += settings.real_negative
    sources["phantom"] = (phantom_positive, phantom_negative, None)

    merged: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    counts = {}
    for offset, (source, (n_positive, n_negative, base)) in enumerate(sources.items()):
        if n_positive + n_negative == 0:
            continue
        datalist = make_demo_data(
            data_dir / source,
            n_positive=n_positive,
            n_negative=n_negative,
            size=settings.size,
            slices=settings.slices,
            seed=settings.seed + offset,
            base_ct=base,
            val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction,
            lesion_settings=settings.lesions,
            workers=os.cpu_count() or 1,
        )
        counts[source] = n_positive + n_negative
        for split, items in json.loads(Path(datalist).read_text()).items():
            for item in items:
                image = Path(item["image"])
                moved = {key: f"{source}/{item[key]}" for key in ("image", LESION_KEY) if key in item}
                merged.setdefault(split, []).append(
                    {**item, **moved, "case_id": f"{source}_{image.name.split('.')[0]}"}
                )
    path = data_dir / "datalist.json"
    atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
    return path, counts


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep the workflows' INFO logging (every iteration's loss, every epoch's metrics) off the console.

    The progress bars show where the run is; warnings and errors still come through.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def run_bundle(
    config_files: Sequence[str | os.PathLike],
    overrides: Mapping[str, Any],
    before_run: Callable[[Any], None] | None = None,
) -> Any:
    """Run a bundle workflow in this process: ``initialize``, ``run``, ``finalize``.

    Args:
        config_files: the config files, merged in order (as ``--config_file "[...]"``).
        overrides: ``id -> value`` pairs, as ``--id value`` on the command line.
        before_run: called with the initialised workflow before it runs (to attach handlers).

    Returns:
        The finished ``ConfigWorkflow`` (its parsed components can be read back).
    """
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[os.fspath(f) for f in config_files],
        meta_file=os.fspath(BUNDLE_DIR / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **dict(overrides),
    )
    workflow.initialize()
    if before_run is not None:
        before_run(workflow)
    workflow.run()
    workflow.finalize()
    return workflow


def learning_rate_text(lr_min: float, lr_max: float) -> str:
    """``learning rate 0.0002``, or ``cyclic learning rate 0.0001..0.0005`` when the bounds differ."""
    if lr_min == lr_max:
        return f"learning rate {lr_min:g}"
    return f"cyclic learning rate {lr_min:g}..{lr_max:g}"


def _bundle_overrides(out_dir: Path, datalist: Path, settings: DemoSettings) -> dict[str, Any]:
    return {
        "bundle_root": os.fspath(BUNDLE_DIR),
        "dataset_dir": os.fspath(datalist.parent),
        "datalist": os.fspath(datalist),
        "ckpt_dir": os.fspath(out_dir / "models"),
        "cache_dir": os.fspath(out_dir / "cache"),
        "seed": settings.seed,
        "num_workers": settings.num_workers,
        "resize_size": settings.size,
        "spatial_size": settings.size,
        "num_slices": settings.train_slices or settings.slices,
        **dict(settings.overrides),
    }


def demo_run_overrides(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The bundle overrides a finished demo run trained and evaluated with (its ``settings.json``).

    Lets a later evaluation of the run (e.g. ``benchmarks/bench_precision.py``) score the same
    data with the same network and preprocessing settings.
    """
    out_dir = Path(out_dir)
    record = json.loads((out_dir / "settings.json").read_text())
    known = {item.name for item in fields(DemoSettings)} - {"lesions"}  # the data are made already
    settings = DemoSettings(**{key: value for key, value in record.items() if key in known})
    return _bundle_overrides(out_dir, out_dir / "data" / "datalist.json", settings)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def _slice_scores(
    inference_dir: Path, predictions: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[float]]:
    """Slice labels and attention x N of the slices of positive test volumes (the slice-level ROC)."""
    labels: list[int] = []
    scores: list[float] = []
    for row in predictions:
        if row.get("label") != "1":
            continue
        rows = _read_csv(inference_dir / row["case_id"] / "slice_attention.csv")
        if not rows or "slice_label" not in rows[0]:
            continue
        labels += [int(r["slice_label"]) for r in rows]
        scores += [float(r["attention"]) * len(rows) for r in rows]
    return labels, scores


def _slice_table(inference_dir: Path, predictions: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Per labelled test volume: probability, label, and per slice its label, call and attention x N."""
    volumes = []
    for row in predictions:
        rows = _read_csv(inference_dir / row["case_id"] / "slice_attention.csv")
        if not rows or "slice_label" not in rows[0] or row.get("label") not in ("0", "1"):
            continue
        volumes.append(
            {
                "prob": float(row["prob_covid"]),
                "label": int(row["label"]),
                "slice_labels": np.array([int(r["slice_label"]) for r in rows]),
                "calls": np.array([int(r["slice_pred"]) for r in rows]),
                "scores": np.array([float(r["attention"]) * len(rows) for r in rows]),
            }
        )
    return volumes


def _slice_rule_notes(
    volumes: Sequence[Mapping[str, Any]], tuned: Mapping[str, Any], paper: Mapping[str, Any]
) -> list[str]:
    """How many slices each rule calls in the positive test volumes, against how many are labelled."""
    positives = [v for v in volumes if v["label"] == 1]
    if not positives or "tau" not in tuned:
        return []
    tau, threshold = float(tuned["tau"]), float(tuned["threshold"])
    labelled = np.mean([v["slice_labels"].sum() for v in positives])
    tuned_calls = np.mean([v["calls"].sum() for v in positives])
    paper_calls = np.mean([(v["scores"] > 1.0).sum() * (v["prob"] >= 0.5) for v in positives])
    slices = np.mean([v["slice_labels"].size for v in positives])
    return [
        "## Slice rule",
        f"Tuned rule (chosen on the validation split, stored in the checkpoint): a slice is called "
        f"when its volume's probability is at least {threshold:.3f} and its attention weight exceeds "
        f"{tau:.3f} / N. Paper rule: 0.5 and 1 / N. Slice F1 on the test split: tuned "
        f"{_number(tuned.get('f1'))}, paper {_number(paper.get('f1'))}.",
        f"In the {len(positives)} positive test volumes ({slices:.1f} slices each), {labelled:.2f} "
        f"slices a volume hold lesion voxels; the paper rule calls {paper_calls:.2f} of them a volume, "
        f"the tuned rule {tuned_calls:.2f}.",
        *_trivial_rule_note(tuned, paper),
    ]


def _trivial_rule_note(tuned: Mapping[str, Any], paper: Mapping[str, Any]) -> list[str]:
    """The slice prevalence of the test split and each rule's F1 against the trivial rule's."""
    if tuned.get("prevalence") is None:
        return []
    margins = ", ".join(
        f"{name} rule {_number(level.get('f1'))} against {_number(level.get('trivial_f1'))} "
        f"(volume threshold {float(level['threshold']):.3f})"
        for name, level in (("tuned", tuned), ("paper", paper))
        if "threshold" in level
    )
    return [
        f"Slice prevalence of the test split: {_number(tuned['prevalence'])} of all slices, "
        f"{_number(tuned.get('prevalence_positive'))} of the slices of positive volumes. The "
        "trivial rule that calls every slice of a volume predicted positive sets the F1 to beat: "
        f"{margins}."
    ]


def _number(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{float(value):.3f}"


def _examples(
    inference_dir: Path, predictions: Sequence[Mapping[str, str]], count: int
) -> list[AttentionExample]:
    """Test volumes to show: the most confident positives of each source, then a negative."""
    positives = sorted(
        (r for r in predictions if r.get("label") == "1"), key=lambda r: -float(r["prob_covid"])
    )
    negatives = sorted(
        (r for r in predictions if r.get("label") == "0"), key=lambda r: float(r["prob_covid"])
    )
    chosen: list[Mapping[str, str]] = []
    for source in ("real", "phantom"):
        chosen += [r for r in positives if r["case_id"].startswith(source)][:1]
    chosen += [r for r in positives if r not in chosen][: max(count - len(chosen) - 1, 0)]
    chosen += negatives[:1]
    return [
        AttentionExample(
            case_id=row["case_id"],
            figure=inference_dir / row["case_id"] / "slice_attention.png",
            prob_covid=float(row["prob_covid"]),
            label=int(row["label"]) if row.get("label") in ("0", "1") else None,
            top_slices=row.get("top_slices", "").replace(";", ", "),
            heatmaps=_heatmap_figures(inference_dir / row["case_id"], row.get("top_slices", "")),
        )
        for row in chosen[:count]
        if (inference_dir / row["case_id"] / "slice_attention.png").is_file()
    ]


def _heatmap_figures(case_dir: Path, top_slices: str, count: int = HEATMAPS_PER_EXAMPLE) -> list[Path]:
    """The heatmap PNGs of a case's called slices, highest attention first (at most ``count``)."""
    ranked = [int(index) for index in top_slices.split(";") if index.strip()]
    paths = (case_dir / HEATMAP_PNG.format(index=index) for index in ranked)
    return [path for path in paths if path.is_file()][:count]


def _relative(path: str, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path


def _machine() -> str:
    device = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{device}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"


def write_demo_report(
    out_dir: Path,
    settings: DemoSettings,
    metrics: Mapping[str, Any],
    timings: Mapping[str, float],
    counts: Mapping[str, int],
    split_sizes: Mapping[str, int],
    command: str,
) -> Path:
    """Draw the ROC and training curves and write ``out_dir/report.md``."""
    inference_dir = out_dir / "inference"
    figures_dir = out_dir / "figures"
    predictions = _read_csv(inference_dir / PREDICTIONS_FILE)
    errors = [(r["image"], r["error"]) for r in _read_csv(inference_dir / ERRORS_FILE)]
    figures: list[tuple[str, Path]] = []

    curves = {}
    labelled = [r for r in predictions if r.get("label") in ("0", "1")]
    if labelled:
        curves["volume level"] = (
            [int(r["label"]) for r in labelled],
            [float(r["prob_covid"]) for r in labelled],
        )
    slice_labels, slice_scores = _slice_scores(inference_dir, labelled)
    if slice_labels:
        curves["slice level (positive volumes)"] = (slice_labels, slice_scores)
    if curves:
        plot_roc(figures_dir / "roc.png", curves, title="ROC curves, test split")
        figures.append(("ROC curves (test split)", figures_dir / "roc.png"))
    calibration_notes: list[str] = []
    if labelled:
        reliability = figures_dir / "reliability.png"
        calibration_notes = _calibration(
            reliability, curves["volume level"], metrics, out_dir / "models" / "model.pt"
        )
        figures.append(("Calibration of P(COVID-19) (test split)", reliability))
    slice_level = dict(metrics.get("slice", {}))
    paper_rule = dict(metrics.get("slice_paper", {}))
    volumes = _slice_table(inference_dir, predictions)
    if volumes and "threshold" in slice_level:
        gate = float(slice_level["threshold"])
        plot_precision_recall(
            figures_dir / "slice_precision_recall.png",
            np.concatenate([v["slice_labels"] for v in volumes]),
            np.concatenate(
                [v["scores"] if v["prob"] >= gate else np.full(v["scores"].size, -np.inf) for v in volumes]
            ),
            points={
                name: (float(level["rec"]), float(level["pre"]))
                for name, level in (("paper rule", paper_rule), ("tuned rule", slice_level))
                if level.get("rec") is not None and level.get("pre") is not None
            },
            title=f"slice level, test split (volumes with P(COVID-19) >= {gate:.3f})",
        )
        figures.append(
            ("Slice-level precision and recall (test split)", figures_dir / "slice_precision_recall.png")
        )
    try:
        plot_training_curves(
            figures_dir / "training_curves.png",
            out_dir / "train",
            tags=TRAINING_CURVES,
            title="training loss and validation metrics",
        )
        figures.append(("Training curves", figures_dir / "training_curves.png"))
    except ValueError as error:
        logger.warning("no training curves: %s", error)

    volume = dict(metrics.get("volume", {}))
    summary = {
        "command": f"`{command}`",
        "machine": _machine(),
        "volumes": ", ".join(f"{n} {source}" for source, n in counts.items())
        + f" ({', '.join(f'{n} {split}' for split, n in split_sizes.items())})",
        "volume size": f"{settings.size} x {settings.size} x {settings.slices} (all slices scored"
        + (f", {settings.train_slices} sampled per training step)" if settings.train_slices else ")"),
        "training": f"{settings.epochs} epoch(s) {_start_text(settings)}, "
        + f"{settings.batch_size} volume(s) per step, {learning_rate_text(settings.lr_min, settings.lr_max)}",
        "test volumes scored": f"{volume.get('count', len(predictions))}",
        **{f"time: {stage}": f"{seconds:.0f} s" for stage, seconds in timings.items()},
    }
    report = Report(
        title="COVID-19 CT ResNext+ demo",
        summary=summary,
        metrics={
            level: values
            for level, values in (
                ("volume level", volume),
                ("slice level, tuned rule", slice_level),
                ("slice level, paper rule", paper_rule),
            )
            if values or level == "volume level"
        },
        confusion={
            level: values["confusion_matrix"]
            for level, values in (("volume level", volume), ("slice level, tuned rule", slice_level))
            if "confusion_matrix" in values
        },
        figures=figures,
        examples=_examples(inference_dir, predictions, settings.examples),
        predictions=[{**row, "image": _relative(row["image"], out_dir)} for row in predictions],
        errors=errors,
        localisation={**metrics.get("localisation", {}), "heatmap": metrics.get("heatmap", {})},
        notes=[
            *_slice_rule_notes(volumes, slice_level, paper_rule),
            *calibration_notes,
            *_reading(volume.get("auc"), settings),
            "## Files",
            "- `data/`: the demo volumes and `datalist.json`\n"
            "- `models/model.pt`: the best network by validation ROC AUC (with its slice rule and "
            "logit temperature)\n"
            "- `eval/metrics.json`: test metrics at volume and slice level\n"
            "- `inference/predictions.csv`, `inference/<case>/slice_attention.{csv,png}`: batch inference\n"
            "- `train/`: TensorBoard event files of training and validation",
        ],
    )
    return report.write(out_dir / "report.md")


def _stored_temperature(checkpoint: Path) -> float:
    """The logit temperature stored in a checkpoint (1 when it holds none)."""
    from pipeline.workflow.checkpoints import load_checkpoint

    if not checkpoint.is_file():
        return 1.0
    state = load_checkpoint(checkpoint)
    value = state.get(TEMPERATURE_KEY, state.get("model", {}).get(TEMPERATURE_KEY))
    return 1.0 if value is None else float(value)


def _calibration(
    path: Path, test: tuple[list[int], list[float]], metrics: Mapping[str, Any], checkpoint: Path
) -> list[str]:
    """Draw the reliability diagram of the test probabilities and say how calibrated they are.

    With a temperature stored in the checkpoint, the unscaled probabilities (``T = 1``) are
    drawn too: the ECE before and after scaling on the test split.
    """
    from scipy.special import expit, logit

    labels, probabilities = test
    temperature = _stored_temperature(checkpoint)
    curves = {f"stored temperature T = {temperature:.3g}" if temperature != 1 else "test split": test}
    if temperature != 1:
        clipped = np.clip(np.asarray(probabilities, dtype=float), 1e-6, 1 - 1e-6)
        curves["unscaled (T = 1)"] = (labels, expit(logit(clipped) * temperature).tolist())
    errors = plot_reliability(path, curves, title="reliability of P(COVID-19), test split")
    volume = metrics.get("volume", {})
    ece = _number(volume.get("ece", next(iter(errors.values()))))
    interval = volume.get("ece_ci")
    text = f"{ece} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ece
    scaling = (
        f"Temperature scaling: T = {temperature:.3f} was fitted on the validation split and kept "
        f"because it lowered the validation ECE; on the test split the ECE is "
        f"{errors['unscaled (T = 1)']:.3f} without it. It changes no decision and no AUC."
        if temperature != 1
        else "No temperature is stored (T = 1): temperature scaling is off (the bundle's "
        "`temperature_scaling`), or it did not lower the validation ECE."
    )
    return [
        "## Calibration",
        f"Expected calibration error of P(COVID-19) on the test split: {text} (ten equal-width "
        "bins: the mean gap between the share of COVID-19 volumes and the mean probability, "
        f"weighted by the volumes in each bin; 95% bootstrap interval in brackets). {scaling}",
    ]


CHANCE_AUC_BELOW = 0.7
"""A test ROC AUC below this is read as training not having learned the task."""


def _start_text(settings: DemoSettings) -> str:
    """Where training starts: ImageNet weights from a file, or random weights."""
    return (
        f"from ImageNet weights ({Path(settings.pretrained).name})" if settings.pretrained else "from scratch"
    )


def _reading(auc: float | None, settings: DemoSettings = DEFAULT) -> list[str]:
    """A paragraph for the report when the test AUC says the network has not learned the task."""
    if auc is None or not auc < CHANCE_AUC_BELOW:
        return []
    if settings.pretrained:
        return [
            "## Reading",
            f"The test ROC AUC of {auc:.3f} is near chance: the network has not learned the task, "
            f"{_start_text(settings)}. Check that the file holds ImageNet weights of "
            "`resnext50_32x4d`, or train longer (more epochs or volumes).",
        ]
    return [
        "## Reading",
        f"The test ROC AUC of {auc:.3f} is near chance: the network has not learned the task. "
        "ResNext+ trains here from random weights (no ImageNet weights can be fetched); on lesions "
        "of realistic slice extent the demo's budget "
        f"({DEFAULT.epochs} epochs over {DEFAULT.volumes} volumes, {DEFAULT.batch_size} per step) "
        "has not been enough, nor were five epochs over 1,200 volumes (see `docs/results.md`). "
        "Start from an ImageNet file (`python -m pipeline demo --pretrained FILE`) or train far "
        "longer; the outputs above show the whole job either way, and the localisation table then "
        "reads as chance.",
    ]


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    settings: DemoSettings = DEFAULT,
    base_ct: str | os.PathLike | None = AUTO_BASE_CT,
    progress: bool = True,
    command: str = "python -m pipeline demo",
    on_stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole demo job and return where its results are.

    Args:
        out_dir: the run's folder (created; earlier results in it are replaced).
        settings: the sizes of the run (:data:`DEFAULT`, :data:`QUICK`, or your own).
        base_ct: the real chest CT to build realistic volumes from; by default the series
            fetched into the cache (:func:`pipeline.synthetic.base_ct.resolve_base_ct`); phantoms
            only when it is ``None`` or missing.
        progress: show progress bars.
        command: the command line recorded in the report.
        on_stage: called with each stage's name as it starts.

    Returns:
        The report's path, the test metrics and the time of each stage.
    """
    if settings.pretrained and not Path(settings.pretrained).is_file():
        raise FileNotFoundError(
            f"pretrained weights {settings.pretrained}: no such file (nothing is downloaded)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    bar = tqdm(total=len(STAGES), desc="demo", unit="stage", disable=not progress)
    timings: dict[str, float] = {}
    start_all = time.perf_counter()

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        bar.set_postfix_str(name)
        if on_stage is not None:
            on_stage(name)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start
        bar.update()

    try:
        with _quiet_logs():
            with stage("data"):
                datalist, counts = make_demo_datalist(out_dir / "data", settings, resolve_base_ct(base_ct))
            split_sizes = {split: len(items) for split, items in json.loads(datalist.read_text()).items()}
            checkpoint = out_dir / "models" / "model.pt"
            with stage("training"):
                _train(out_dir, datalist, settings)
            with stage("evaluation"):
                metrics = _evaluate(out_dir, datalist, settings, checkpoint)
            with stage("inference"):
                _infer(out_dir, datalist, settings, checkpoint, progress)
            timings["total"] = time.perf_counter() - start_all
            with stage("report"):
                report = write_demo_report(out_dir, settings, metrics, timings, counts, split_sizes, command)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    settings_record = {**asdict(settings), "overrides": dict(settings.overrides)}
    atomic_write_text(out_dir / "settings.json", json.dumps(settings_record, indent=1) + "\n")
    return DemoResult(
        out_dir=out_dir,
        report=report,
        metrics=metrics,
        timings=timings,
        datalist=datalist,
        inference_dir=out_dir / "inference",
    )


def _train(out_dir: Path, datalist: Path, settings: DemoSettings) -> None:
    """Train through ``configs/train.json``; the best network by validation AUC lands in ``models/``."""
    run_bundle(
        [BUNDLE_DIR / "configs" / "train.json"],
        {
            **_bundle_overrides(out_dir, datalist, settings),
            "output_dir": os.fspath(out_dir / "train"),
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr_min": settings.lr_min,
            "lr_max": settings.lr_max,
            "lr_half_cycle_epochs": settings.lr_half_cycle_epochs,
            "cpu_bf16_training": settings.bf16_training and cpu_has_native_bf16(),
            "pretrained": settings.pretrained,
        },
    )


def _evaluate(out_dir: Path, datalist: Path, settings: DemoSettings, checkpoint: Path) -> dict[str, Any]:
    """Score the test split through ``configs/evaluate.json``; returns its ``metrics.json``."""
    configs = BUNDLE_DIR / "configs"
    run_bundle(
        [configs / "train.json", configs / "evaluate.json"],
        {
            **_bundle_overrides(out_dir, datalist, settings),
            "output_dir": os.fspath(out_dir / "eval"),
            "ckpt_path": os.fspath(checkpoint),
        },
    )
    return json.loads((out_dir / "eval" / "metrics.json").read_text())


def _infer(out_dir: Path, datalist: Path, settings: DemoSettings, checkpoint: Path, progress: bool) -> None:
    """Batch inference on the test split through ``configs/inference.json``."""
    overrides = _bundle_overrides(out_dir, datalist, settings)
    for training_only in TRAINING_ONLY_IDS:
        overrides.pop(training_only, None)
    run_bundle(
        [BUNDLE_DIR / "configs" / "inference.json"],
        {
            **overrides,
            "dataset_dir": None,
            "split": "test",
            "ckpt_path": os.fspath(checkpoint),
            "output_dir": os.fspath(out_dir / "inference"),
            "progress": progress,
        },
    )


def with_overrides(settings: DemoSettings, **changes: Any) -> DemoSettings:
    """A copy of ``settings`` with some fields changed (``None`` values are ignored)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})


def summary_line(result: DemoResult) -> str:
    """One line for the console: the key numbers and where the report is."""
    volume = result.metrics.get("volume", {})
    auc = volume.get("auc")
    total = result.timings.get("total", float("nan"))
    auc_text = "n/a" if auc is None or (isinstance(auc, float) and np.isnan(auc)) else f"{auc:.3f}"
    if auc_text != "n/a" and volume.get("auc_ci"):
        auc_text += " [{:.3f}, {:.3f}]".format(*volume["auc_ci"])
    return (
        f"test ROC AUC {auc_text}, accuracy {volume.get('acc', float('nan')):.3f} "
        f"on {volume.get('count', '?')} volumes; {total:.0f} s in all; report: {result.report}"
    )
