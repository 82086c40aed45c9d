"""Markdown tables of the accuracy study in the paper's layout.

Table 1 compares the enhancement settings (original, stochastic enhancement, tone mapping),
Table 2 the ablations (N-SCA, N-MSCA, N-SLA, proposed); each has a volume-level and a
slice-level block. The columns are the paper's (Table 2 has no REC, which equals SEN) plus the
ROC AUC. Without slice attention (N-SLA) the attention is uniform, so no slice is singled out:
its slice-level row reads ``NA`` as in the paper. A third table sets each slice rule's F1 beside
the trivial rule's (every slice of a volume predicted positive) at the slice prevalence of the
test split.

A cell shows the metric with its bootstrap confidence interval in brackets when the run's
metrics hold one (``<metric>_ci``), and ``mean ± SD`` over training seeds for a row that
:func:`seed_summary` made from several runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.export.report import with_interval

__all__ = [
    "ABLATION_COLUMNS",
    "ENHANCEMENT_COLUMNS",
    "LEVELS",
    "LEVEL_NAMES",
    "RunResult",
    "format_cell",
    "format_value",
    "metrics_table",
    "render_results",
    "seed_summary",
    "slice_baseline_table",
    "timing_table",
]

LEVELS = ("volume", "slice_paper", "slice")
"""Evaluation levels: volume, slice with the paper's rule, slice with the rule tuned on validation."""
LEVEL_NAMES = {
    "volume": "Volume level",
    "slice_paper": "Slice level, paper rule",
    "slice": "Slice level, tuned rule",
}
"""Row labels of the levels in the tables."""
ENHANCEMENT_COLUMNS = ("acc", "pre", "rec", "f1", "sen", "spe", "auc")
"""Columns of Table 1 (the paper's, plus the ROC AUC)."""
ABLATION_COLUMNS = ("acc", "pre", "f1", "sen", "spe", "auc")
"""Columns of Table 2 (the paper's, plus the ROC AUC)."""


@dataclass(frozen=True)
class RunResult:
    """The test metrics and timings of one training-and-evaluation run.

    Attributes:
        name: the run's identifier (``proposed``, ``n_sca``, ...).
        label: its row label in the tables (``Orig.``, ``N-SCA``, ...).
        metrics: ``{"volume": {...}, "slice": {...}, "slice_paper": {...}}`` as the bundle's
            ``metrics.json`` holds them (a level that is missing shows ``n/a``).
        train_seconds: wall-clock time of training (validation each epoch included).
        eval_seconds: wall-clock time of the test-split evaluation.
        slice_level: whether the run singles out slices (``False`` without slice attention).
        settings: the bundle overrides that distinguish the run.
    """

    name: str
    label: str
    metrics: Mapping[str, Mapping[str, Any]]
    train_seconds: float
    eval_seconds: float
    slice_level: bool = True
    settings: Mapping[str, Any] = field(default_factory=dict)


def format_value(value: Any, digits: int = 3) -> str:
    """A metric as table text: ``digits`` decimals, ``n/a`` when undefined (``None`` or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def format_cell(measured: Mapping[str, Any], column: str) -> str:
    """A table cell: ``mean ± SD`` over seeds, else the value with its interval, else the value."""
    value = measured.get(column)
    if measured.get(f"{column}_sd") is not None and format_value(value) != "n/a":
        return f"{format_value(value)} ± {format_value(measured[f'{column}_sd'])}"
    if measured.get(f"{column}_seeds") == 1 and format_value(value) != "n/a":
        return f"{format_value(value)} (1 seed)"
    if measured.get(f"{column}_ci") is not None and format_value(value) != "n/a":
        return with_interval(value, measured[f"{column}_ci"])
    return format_value(value)


def seed_summary(runs: Sequence[RunResult]) -> RunResult:
    """One row from the runs of one setting trained with different seeds: mean and SD per metric.

    Each metric's mean is over the seeds where it is defined, ``<metric>_sd`` the sample standard
    deviation (``None`` with fewer than two such seeds); ``<metric>_seeds`` counts them. Times
    are the means; ``name``, ``label`` and settings are the first run's.

    Raises:
        ValueError: no runs.
    """
    if not runs:
        raise ValueError("no runs to summarise")
    metrics: dict[str, dict[str, Any]] = {}
    for level in LEVELS:
        keys = [k for k, v in runs[0].metrics.get(level, {}).items() if _is_number(v) or v is None]
        summary: dict[str, Any] = {}
        for key in keys:
            raw = [run.metrics.get(level, {}).get(key) for run in runs]
            values = np.array([_number(value) for value in raw])
            values = values[np.isfinite(values)]
            mean = float(values.mean()) if values.size else None
            counts = all(isinstance(value, int) for value in raw) and mean is not None and mean.is_integer()
            summary[key] = int(mean) if counts else mean
            summary[f"{key}_sd"] = float(values.std(ddof=1)) if values.size > 1 else None
            summary[f"{key}_seeds"] = int(values.size)
        if keys:
            metrics[level] = summary
    return replace(
        runs[0],
        metrics=metrics,
        train_seconds=float(np.mean([run.train_seconds for run in runs])),
        eval_seconds=float(np.mean([run.eval_seconds for run in runs])),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def metrics_table(rows: Sequence[RunResult], columns: Sequence[str]) -> str:
    """One markdown table: a block per level of :data:`LEVELS`, one row per run.

    Args:
        rows: the runs, in table order.
        columns: metric keys shown (``acc``, ``pre``, ...), upper-cased as headers.

    Returns:
        The table, ending in a newline.
    """
    header = ["Level", "Setting", *(c.upper() for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level in LEVELS:
        for position, run in enumerate(rows):
            level_text = LEVEL_NAMES[level] if position == 0 else ""
            if level != "volume" and not run.slice_level:
                values = ["NA"] * len(columns)
            else:
                measured = run.metrics.get(level, {})
                values = [format_cell(measured, column) for column in columns]
            lines.append("| " + " | ".join([level_text, run.label, *values]) + " |")
    return "\n".join(lines) + "\n"


def slice_baseline_table(rows: Sequence[RunResult]) -> str:
    """Markdown table of each run's slice F1 beside the trivial rule's, at the prevalence measured.

    The trivial rule calls every slice of a volume predicted positive (at the same volume
    threshold as the rule it stands beside); the margin is the model's F1 minus the trivial
    rule's. Runs without slice attention are left out.
    """
    header = [
        "Setting",
        "Slice rule",
        "Prevalence, all volumes",
        "Prevalence, positive volumes",
        "F1",
        "F1, every slice of a called volume",
        "Margin",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in rows:
        if not run.slice_level:
            continue
        for level in LEVELS[1:]:
            measured = run.metrics.get(level, {})
            f1, trivial = measured.get("f1"), measured.get("trivial_f1")
            margin = None if f1 is None or trivial is None else float(f1) - float(trivial)
            values = (measured.get("prevalence"), measured.get("prevalence_positive"), f1, trivial, margin)
            rule = LEVEL_NAMES[level].removeprefix("Slice level, ")
            lines.append("| " + " | ".join([run.label, rule, *map(format_value, values)]) + " |")
    return "\n".join(lines) + "\n"


def timing_table(rows: Sequence[RunResult]) -> str:
    """Markdown table of each run's settings, training and evaluation times, and test counts."""
    header = ["Run", "Setting", "Bundle overrides", "Training (s)", "Test evaluation (s)", "Test volumes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in rows:
        overrides = ", ".join(f"`{key}={value}`" for key, value in run.settings.items()) or "defaults"
        count = run.metrics.get("volume", {}).get("count", "?")
        lines.append(
            f"| {run.name} | {run.label} | {overrides} | {run.train_seconds:.0f} | "
            f"{run.eval_seconds:.0f} | {count} |"
        )
    return "\n".join(lines) + "\n"


def render_results(
    title: str,
    summary: Mapping[str, str],
    enhancement_rows: Sequence[RunResult],
    ablation_rows: Sequence[RunResult],
    notes: Sequence[str] = (),
) -> str:
    """The whole ``results.md``: summary, Table 1, Table 2, slice F1 against the trivial rule, runs, notes.

    Args:
        title: the first heading.
        summary: ``label -> text`` lines (command, seed, machine, data, budget).
        enhancement_rows: Table 1's runs (original, stochastic enhancement, tone mapping).
        ablation_rows: Table 2's runs (N-SCA, N-MSCA, N-SLA, proposed).
        notes: more markdown paragraphs at the end.

    Returns:
        Markdown text.
    """
    parts = [f"# {title}\n"]
    parts.append("\n".join(f"- **{label}**: {text}" for label, text in summary.items()) + "\n")
    parts.append("## Table 1: detection results of the enhancement settings (test split)\n")
    parts.append(metrics_table(enhancement_rows, ENHANCEMENT_COLUMNS))
    parts.append("## Table 2: ablation study (test split)\n")
    parts.append(
        "N-SCA: without spatial and channel attention (CBAM); N-MSCA: without the lung mask and "
        "without CBAM; N-SLA: without slice attention (mean over slices).\n"
    )
    parts.append(metrics_table(ablation_rows, ABLATION_COLUMNS))
    parts.append("## Slice F1 against the trivial rule (test split)\n")
    parts.append(
        "Prevalence: the share of the test slices labelled positive, over all volumes and over "
        "the positive volumes. The trivial rule calls every slice of a volume predicted positive; "
        "the margin is the rule's F1 minus the trivial rule's.\n"
    )
    parts.append(slice_baseline_table(_unique(list(enhancement_rows) + list(ablation_rows))))
    parts.append("## Runs\n")
    parts.append(timing_table(_unique(list(enhancement_rows) + list(ablation_rows))))
    parts.extend(f"{note.rstrip()}\n" for note in notes)
    return "\n".join(parts)


def _unique(rows: Sequence[RunResult]) -> list[RunResult]:
    seen: set[str] = set()
    unique = []
    for run in rows:
        if run.name not in seen:
            seen.add(run.name)
            unique.append(run)
    return unique
