"""Which heatmap points at the lesions best: every layer, weighting and lung masking, scored on a split.

``python -m pipeline compare-heatmaps runs/demo`` takes a finished demo run (its network, data
and settings) and scores, on the validation and test splits, the heatmaps of each combination
of

- layer: ResNext+'s last three ResNeXt stages (``layer4``, ``layer3``, ``layer2``: 1/32, 1/16
  and 1/8 of the input size);
- weighting: Grad-CAM, Grad-CAM++ and LayerCAM (:data:`networks.grad_cam.CAM_METHODS`);
- with and without multiplying the map by the lung mask,

with the pointing game and the pixel ROC AUC against the lesion masks
(:class:`pipeline.workflow.localisation.LocalisationMetrics`). All of them are attached to one
evaluation of the split through ``evaluate.json``, so the volumes are scored once. The setting
with the highest validation pixel AUC is the one to use (the bundle's ``heatmap_layer``,
``heatmap_method`` and ``heatmap_in_lung``); the test split then says what it reaches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from networks.grad_cam import CAM_METHODS
from pipeline.data.atomic_files import atomic_write_text
from pipeline.jobs.demo import BUNDLE_DIR, demo_run_overrides, run_bundle
from pipeline.workflow.localisation import LocalisationMetrics

__all__ = [
    "HEATMAP_LAYERS",
    "HeatmapSetting",
    "best_setting",
    "compare_heatmaps",
    "heatmap_settings",
    "study_table",
]

HEATMAP_LAYERS = ("encoder.backbone.layer4", "encoder.backbone.layer3", "encoder.backbone.layer2")
"""The layers compared, coarsest first."""
STUDY_FILE = "heatmap_study.json"


@dataclass(frozen=True)
class HeatmapSetting:
    """A way of drawing heatmaps: bundle ids ``heatmap_layer``, ``heatmap_method``, ``heatmap_in_lung``."""

    layer: str
    method: str
    in_lung: bool

    @property
    def name(self) -> str:
        """Short name, e.g. ``layer3 gradcampp x lung``."""
        return f"{self.layer.rsplit('.', 1)[-1]} {self.method}" + (" x lung" if self.in_lung else "")

    @property
    def key(self) -> str:
        """Metric name under which the evaluator stores its numbers."""
        return "heatmap_" + self.name.replace(" ", "_")


def heatmap_settings(
    layers: Sequence[str] = HEATMAP_LAYERS, methods: Sequence[str] = CAM_METHODS
) -> list[HeatmapSetting]:
    """Every combination of layer, weighting and lung masking."""
    return [
        HeatmapSetting(layer, method, in_lung)
        for layer in layers
        for method in methods
        for in_lung in (False, True)
    ]


def compare_heatmaps(
    run_dir: str | os.PathLike,
    splits: Sequence[str] = ("validation", "test"),
    settings: Sequence[HeatmapSetting] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Score every heatmap setting on ``splits`` of a finished demo run (also in ``heatmap_study.json``).

    Returns:
        ``{split: {setting name: {"layer", "method", "in_lung", "pointing_game", "pixel_auc",
        "pointing_game_called", "pixel_auc_called", "slices", "slices_called", "volumes"}}}``.
    """
    run_dir = Path(run_dir)
    settings = list(settings or heatmap_settings())
    configs = [BUNDLE_DIR / "configs" / "train.json", BUNDLE_DIR / "configs" / "evaluate.json"]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for split in splits:

        def attach(workflow: Any) -> None:
            evaluator = workflow.parser.get_parsed_content("validate#evaluator")
            for setting in settings:
                metric = LocalisationMetrics(
                    layer=setting.layer, method=setting.method, in_lung=setting.in_lung, prefix=setting.key
                )
                metric.attach(evaluator, setting.key)

        out_dir = run_dir / "heatmap_study" / split
        workflow = run_bundle(
            configs,
            {
                **demo_run_overrides(run_dir),
                "output_dir": os.fspath(out_dir),
                "ckpt_path": os.fspath(run_dir / "models" / "model.pt"),
                "eval_split": split,
                "ci_resamples": 0,
            },
            before_run=attach,
        )
        metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
        results[split] = {
            setting.name: {
                **asdict(setting),
                **{
                    key.removeprefix(f"{setting.key}_"): value
                    for key, value in metrics.items()
                    if key.startswith(f"{setting.key}_")
                },
            }
            for setting in settings
        }
    atomic_write_text(run_dir / STUDY_FILE, json.dumps(results, indent=1, default=_json_number) + "\n")
    return results


def _json_number(value: Any) -> Any:
    return float(value)


def best_setting(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The setting with the highest pixel AUC (then pointing game) in one split's results."""

    def rank(name: str) -> tuple[float, float]:
        row = results[name]
        return tuple(
            -1.0 if _missing(row.get(key)) else float(row[key]) for key in ("pixel_auc", "pointing_game")
        )

    return max(results, key=rank)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def study_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], chosen_on: str = "validation") -> str:
    """A markdown table: one row per setting, pointing game and pixel AUC per split; the best marked."""
    splits = list(results)
    names = list(next(iter(results.values())))
    best = best_setting(results[chosen_on]) if chosen_on in results else None
    header = "| heatmap | " + " | ".join(
        f"{split} pointing | {split} pixel AUC | {split} pixel AUC, called slices" for split in splits
    )
    lines = [header + " |", "|---|" + "---:|" * (3 * len(splits))]
    for name in names:
        cells = []
        for split in splits:
            row = results[split][name]
            cells += [_cell(row.get(key)) for key in ("pointing_game", "pixel_auc", "pixel_auc_called")]
        label = f"**{name}** (best on {chosen_on})" if name == best else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = ", ".join(
        f"{split}: {first.get('slices', 0)} lesion slices in {first.get('volumes', 0)} positive volumes, "
        f"pointing game {_cell(first.get('pointing_game_chance'))} for a pixel drawn at random in the lung"
        for split, first in ((split, next(iter(results[split].values()))) for split in splits)
    )
    return "\n".join(lines) + f"\n\n({counts}.)\n"


def _cell(value: Any) -> str:
    return "n/a" if _missing(value) else f"{float(value):.3f}"
