"""A run's ``report.md``: metrics tables, ROC and training curves, attention figures, predictions.

The report is plain Markdown with figures linked by paths relative to the report, so the
run folder can be moved or published as a whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.atomic_files import atomic_write_text

__all__ = ["METRIC_NAMES", "AttentionExample", "Report", "markdown_table", "metrics_table", "with_interval"]

METRIC_NAMES: dict[str, str] = {
    "acc": "Accuracy (ACC)",
    "pre": "Precision (PRE)",
    "rec": "Recall (REC)",
    "f1": "F1 score",
    "sen": "Sensitivity (SEN)",
    "spe": "Specificity (SPE)",
    "auc": "ROC AUC",
    "trivial_f1": "F1, every slice of a called volume",
    "prevalence": "Slice prevalence, all volumes",
    "prevalence_positive": "Slice prevalence, positive volumes",
}
"""The paper's Table 1 metrics plus the ROC AUC, in its order: key -> row title; then, for the
slice level, the trivial rule's F1 and the prevalences they were measured at."""


def _format(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has ``l``, ``r`` or ``c`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(_format(h) for h in header) + " |",
        "| " + " | ".join(rule[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(_format(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def with_interval(value: Any, interval: Sequence[float] | None, digits: int = 3) -> str:
    """A metric and its confidence interval: ``0.964 [0.93, 0.99]`` (bounds to ``digits - 1`` decimals)."""
    text = _format(float(value) if value is not None else None, digits)
    if interval is None or value is None or text == "n/a":
        return text
    low, high = (_format(float(bound), max(digits - 1, 1)) for bound in interval)
    return f"{text} [{low}, {high}]"


def metrics_table(levels: Mapping[str, Mapping[str, Any]], names: Mapping[str, str] = METRIC_NAMES) -> str:
    """One row per metric, one column per level (e.g. ``{"volume level": {...}, "slice level": {...}}``).

    The level names are the column headers. Metric keys are matched case-insensitively; a level lacking
    a metric shows ``-``; a metric with an interval (``<key>_ci``) shows it in brackets.
    """
    lowered = {level: {str(k).lower(): v for k, v in values.items()} for level, values in levels.items()}

    def cell(values: Mapping[str, Any], key: str) -> Any:
        if values.get(f"{key}_ci") is None:
            return values.get(key)
        return with_interval(values.get(key), values[f"{key}_ci"])

    rows = [[title, *(cell(lowered[level], key) for level in levels)] for key, title in names.items()]
    return markdown_table(["Metric", *levels], rows)


def _interval_note(levels: Mapping[str, Mapping[str, Any]]) -> str:
    """What the brackets of :func:`metrics_table` mean, when a level has intervals."""
    if not any(str(key).endswith("_ci") for values in levels.values() for key in values):
        return ""
    return (
        "In brackets: 95% bootstrap confidence intervals (test volumes resampled with replacement "
        "within each class, at slice level each volume with all its slices; percentile intervals)."
    )


def confusion_table(matrix: Sequence[Sequence[int]]) -> str:
    """A 2 x 2 confusion matrix ``[[TN, FP], [FN, TP]]`` (rows: truth, columns: prediction)."""
    (tn, fp), (fn, tp) = matrix
    return markdown_table(
        ["truth \\ predicted", "negative", "COVID-19"],
        [["negative", int(tn), int(fp)], ["COVID-19", int(fn), int(tp)]],
    )


@dataclass
class AttentionExample:
    """One volume shown in the report with its attention figure and the heatmaps of some called slices."""

    case_id: str
    figure: Path
    prob_covid: float
    label: int | None = None
    top_slices: str = ""
    heatmaps: Sequence[Path] = ()


def localisation_section(localisation: Mapping[str, Any]) -> list[str]:
    """The localisation table: pointing game and pixel ROC AUC, on every lesion slice and on called ones."""
    if not localisation or not localisation.get("slices"):
        return []
    rows = [
        [
            scope,
            _format(localisation.get(f"pointing_game{suffix}")),
            _format(localisation.get(f"pixel_auc{suffix}")),
            str(localisation.get(f"slices{suffix}", 0)),
        ]
        for scope, suffix in (("every lesion slice", ""), ("lesion slices the tuned rule called", "_called"))
    ]
    heatmap = localisation.get("heatmap") or {}
    setting = (
        f"{heatmap.get('method', 'gradcam')} on `{heatmap.get('layer', '')}`"
        + (", times the lung mask" if heatmap.get("in_lung") else "")
        if heatmap
        else "the bundle's heatmap"
    )
    return [
        "## Localisation",
        markdown_table(["slices of positive test volumes", "pointing game", "pixel ROC AUC", "slices"], rows),
        f"Heatmaps ({setting}) against the lesion masks, on the network grid, in the "
        f"{localisation.get('volumes', 0)} positive test volumes: the pointing game counts the slices whose "
        "hottest pixel lies in a lesion (dilated by one pixel)"
        + (
            f", {_format(localisation['pointing_game_chance'])} for a pixel drawn at random within the lung"
            if localisation.get("pointing_game_chance") is not None
            else ""
        )
        + "; the pixel ROC AUC ranks the lung's pixels "
        "of each slice by heat against the lesion pixels, averaged over slices (0.5: chance).",
    ]


@dataclass
class Report:
    """The content of ``report.md``; :meth:`write` renders it.

    Attributes:
        title: the report's heading.
        summary: key facts of the run (data, model size, timings), shown as a two-column table.
        metrics: metric values by level, e.g. ``{"volume level": {"acc": ...}, "slice level": {...}}``;
            the level names head the columns.
        confusion: confusion matrices by level (``[[TN, FP], [FN, TP]]``), titled with the level name.
        figures: (caption, PNG path) pairs shown in order (ROC curve, training curves, ...).
        examples: test volumes shown with their attention figures.
        predictions: rows of ``predictions.csv`` to list (trimmed to ``max_predictions``).
        errors: ``(image, error)`` rows of inputs that could not be processed.
        notes: paragraphs added at the end (how to reproduce, where the files are).
        localisation: the ``localisation`` metrics of ``metrics.json`` (pointing game and pixel
            ROC AUC of the heatmaps against the lesion masks) and its ``heatmap`` setting under
            ``"heatmap"``, shown beside the metrics; empty: no section.
    """

    title: str
    summary: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    confusion: Mapping[str, Sequence[Sequence[int]]] = field(default_factory=dict)
    figures: Sequence[tuple[str, Path]] = ()
    examples: Sequence[AttentionExample] = ()
    predictions: Sequence[Mapping[str, Any]] = ()
    errors: Sequence[Sequence[str]] = ()
    notes: Sequence[str] = ()
    localisation: Mapping[str, Any] = field(default_factory=dict)
    max_predictions: int = 20

    def render(self, base: str | os.PathLike) -> str:
        """The Markdown text, with figure links relative to the folder ``base``."""
        base = Path(base)

        def link(path: Path) -> str:
            return Path(os.path.relpath(Path(path), base)).as_posix()

        parts = [f"# {self.title}"]
        if self.summary:
            parts += ["## Run", markdown_table(["", ""], [[k, v] for k, v in self.summary.items()], "ll")]
        if self.metrics:
            parts += ["## Metrics", metrics_table(self.metrics), _interval_note(self.metrics)]
            parts.append(
                "Slice level: a slice is predicted positive when its volume's probability of COVID-19 "
                "reaches the rule's threshold and its attention weight exceeds tau / N (N slices "
                "scored); the paper rule uses 0.5 and tau = 1, the tuned rule the pair chosen on the "
                "validation split and stored with the checkpoint. The slice-level ROC AUC ranks "
                "the slices of the truly positive volumes by attention weight times N: how well the "
                "attention finds the diseased slices of a diseased volume."
                if "slice" in self.metrics
                else ""
            )
        parts += localisation_section(self.localisation)
        for level, matrix in self.confusion.items():
            parts += [f"Confusion matrix, {level}:", confusion_table(matrix)]
        for caption, path in self.figures:
            parts += [f"## {caption}", f"![{caption}]({link(path)})"]
        if self.examples:
            parts.append("## Slice attention of test volumes")
            for example in self.examples:
                truth = (
                    "" if example.label is None else f", truth {'COVID-19' if example.label else 'negative'}"
                )
                parts += [
                    f"**{example.case_id}**: P(COVID-19) = {example.prob_covid:.3f}{truth}; "
                    f"highest-attention slices {example.top_slices or '-'}",
                    f"![{example.case_id}]({link(example.figure)})",
                ]
                if example.heatmaps:
                    images = (f"![{example.case_id} {path.stem}]({link(path)})" for path in example.heatmaps)
                    parts.append(" ".join(images))
        if self.predictions:
            shown = list(self.predictions)[: self.max_predictions]
            columns = list(shown[0])
            parts += [
                f"## Predictions ({len(shown)} of {len(self.predictions)})",
                markdown_table(columns, [[row.get(c, "") for c in columns] for row in shown]),
            ]
        if self.errors:
            parts += [
                "## Inputs that could not be processed",
                markdown_table(["image", "error"], self.errors, "ll"),
            ]
        parts += list(self.notes)
        return "\n\n".join(part for part in parts if part) + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        """Write ``report.md`` atomically to ``path``; links are relative to its folder."""
        path = Path(path)
        atomic_write_text(path, self.render(path.parent))
        return path
