"""Figures of a run: slice attention with thumbnails, heatmap overlays, ROC curve, training curves (PNG).

Everything is drawn with Matplotlib's non-interactive Agg backend and written atomically
(temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from pipeline.workflow.calibration import ECE_BINS, expected_calibration_error, reliability_bins
from pipeline.workflow.ranking import ranked_cuts

__all__ = [
    "plot_heatmap_slice",
    "plot_heatmap_slices",
    "plot_precision_recall",
    "plot_reliability",
    "plot_roc",
    "plot_slice_attention",
    "plot_training_curves",
    "precision_recall_curve",
    "read_scalar_log",
    "read_tensorboard_scalars",
    "roc_curve",
    "save_figure",
]

POSITIVE_COLOUR = "#d62728"
LABEL_COLOUR = "#ff9896"
CURVE_COLOUR = "#1f77b4"


def save_figure(
    figure: Figure, path: str | os.PathLike, dpi: int = 110, close: bool = True, bbox_inches: Any = "tight"
) -> Path:
    """Save ``figure`` as PNG through a temporary file and a rename, then close it unless told not to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=dpi, format="png", bbox_inches=bbox_inches)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        if close:
            plt.close(figure)
    return path


def _display(slice_2d: np.ndarray) -> np.ndarray:
    """An axial slice ``(H, W)`` indexed (x, y) in RAS order, turned for display: anterior up,
    patient's right on the image's left (the radiological convention)."""
    return np.asarray(slice_2d, dtype=float).T[::-1, ::-1]


def plot_slice_attention(
    path: str | os.PathLike,
    attention: Sequence[float] | np.ndarray,
    slice_indices: Sequence[int] | np.ndarray | None = None,
    thumbnails: np.ndarray | None = None,
    prob_covid: float | None = None,
    slice_tau: float = 1.0,
    slice_labels: Sequence[int] | np.ndarray | None = None,
    top_k: int = 5,
    title: str | None = None,
    threshold: float = 0.5,
) -> Path:
    """Draw a volume's slice attention like the paper's Figures 5 and 6.

    Top: the attention weight of every scored slice against its axial index, the slice rule's
    threshold ``tau / N``, the slices predicted positive in red and, when known, the true
    lesion slices shaded. Middle: the attention as a gray-level strip (black irrelevant,
    white relevant). Bottom: thumbnails of the ``top_k`` highest-attention slices in axial
    order.

    Args:
        path: the PNG file to write.
        attention: ``(S,)`` weights (summing to 1).
        slice_indices: ``(S,)`` original axial indices of the scored slices (default ``0..S-1``).
        thumbnails: ``(H, W, S)`` slices matching ``attention`` (e.g. the windowed CT channel
            of the network input), or ``None`` for no thumbnails.
        prob_covid: the volume's probability of COVID-19, shown in the title.
        slice_tau: the slice rule's factor: a slice is positive above ``tau / N`` when the
            volume is predicted positive.
        slice_labels: ``(S,)`` true slice labels, shaded when given.
        top_k: number of thumbnails.
        title: the figure title (e.g. the case id).
        threshold: the probability at which a volume counts as positive.

    Returns:
        The path written.
    """
    attention = np.asarray(attention, dtype=float).reshape(-1)
    count = attention.size
    indices = np.arange(count) if slice_indices is None else np.asarray(slice_indices).reshape(-1)
    volume_positive = prob_covid is not None and prob_covid >= threshold
    limit = slice_tau / max(count, 1)
    predicted = (attention > limit) & volume_positive
    show_thumbnails = thumbnails is not None and top_k > 0 and count > 0

    figure = plt.figure(figsize=(11, 7.2 if show_thumbnails else 4.4), layout="constrained")
    ratios = [3, 0.3, 2.6] if show_thumbnails else [3, 0.3]
    grid = figure.add_gridspec(len(ratios), 1, height_ratios=ratios)
    curve = figure.add_subplot(grid[0])
    if slice_labels is not None:
        labels = np.asarray(slice_labels).reshape(-1)
        for position, label in zip(indices, labels):
            if label:
                curve.axvspan(position - 0.5, position + 0.5, color=LABEL_COLOUR, alpha=0.35, lw=0)
        curve.fill_between([], [], color=LABEL_COLOUR, alpha=0.35, label="lesion slices (truth)")
    curve.plot(indices, attention, color=CURVE_COLOUR, marker="o", markersize=3, lw=1.5, label="attention")
    curve.axhline(limit, color="gray", ls="--", lw=1, label=f"tau/N = {limit:.3g}")
    if predicted.any():
        curve.scatter(
            indices[predicted],
            attention[predicted],
            color=POSITIVE_COLOUR,
            s=22,
            zorder=3,
            label="slice predicted",
        )
    top = np.argsort(-attention, kind="stable")[: min(top_k, count)]
    for rank in top:
        curve.annotate(
            str(int(indices[rank])),
            (indices[rank], attention[rank]),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=8,
        )
    curve.set_xlim(indices.min() - 0.5 if count else -0.5, indices.max() + 0.5 if count else 0.5)
    curve.set_ylim(0, max(float(attention.max(initial=0.0)) * 1.18, limit * 1.5))
    curve.set_ylabel("attention weight")
    curve.tick_params(labelbottom=False)
    curve.legend(loc="upper right", fontsize=8, framealpha=0.85)
    curve.grid(alpha=0.3)
    heading = title or "slice attention"
    if prob_covid is not None:
        heading += f"  |  P(COVID-19) = {prob_covid:.3f} -> {'positive' if volume_positive else 'negative'}"
    curve.set_title(heading, fontsize=11)

    strip = figure.add_subplot(grid[1], sharex=curve)
    strip.imshow(
        (attention / attention.max() if count and attention.max() > 0 else attention)[None, :],
        cmap="gray",
        aspect="auto",
        extent=(indices.min() - 0.5, indices.max() + 0.5, 0, 1) if count else None,
        vmin=0,
        vmax=1,
    )
    strip.set_yticks([])
    strip.set_xlabel("axial slice index (original volume)")

    if show_thumbnails:
        chosen = sorted(top, key=lambda i: indices[i])
        row = grid[2].subgridspec(1, len(chosen), wspace=0.05)
        labels = None if slice_labels is None else np.asarray(slice_labels).reshape(-1)
        for column, rank in enumerate(chosen):
            axis = figure.add_subplot(row[column])
            axis.imshow(_display(thumbnails[..., rank]), cmap="gray", vmin=0, vmax=1)
            caption = f"slice {int(indices[rank])}\nattention {attention[rank]:.3f}"
            if labels is not None:
                caption += "\nlesion" if labels[rank] else "\nno lesion"
            axis.set_title(caption, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
            colour = POSITIVE_COLOUR if predicted[rank] else "gray"
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5 if predicted[rank] else 1)
    return save_figure(figure, path)


def plot_heatmap_slice(
    path: str | os.PathLike,
    ct_slice: np.ndarray,
    heatmap_slice: np.ndarray,
    title: str | None = None,
    alpha: float = 0.45,
    size_inches: float = 3.0,
) -> Path:
    """Write one axial slice in grey with its heatmap overlaid (PNG, radiological orientation).

    Args:
        path: output PNG file.
        ct_slice: ``(H, W)`` CT windowed to [0, 1], indexed (x, y) in RAS order.
        heatmap_slice: ``(H, W)`` heatmap in [0, 1] on the same grid.
        title: figure title (e.g. the case and the slice index).
        alpha: opacity of the heatmap at its hottest point (0 where it is 0).
        size_inches: width and height of the figure.
    """
    return plot_heatmap_slices([(path, ct_slice, heatmap_slice, title)], alpha, size_inches)[0]


def plot_heatmap_slices(
    slices: Iterable[tuple[str | os.PathLike, np.ndarray, np.ndarray, str | None, np.ndarray | None]],
    alpha: float = 0.45,
    size_inches: float = 3.0,
) -> list[Path]:
    """Write several slices with their heatmaps as :func:`plot_heatmap_slice` does, one PNG each.

    The figure, its axes and colour bar are built and laid out once (the first slice's tight
    bounding box serves them all) and only the images and the title change from slice to
    slice, which makes the many PNGs of a volume several times cheaper.

    Args:
        slices: ``(path, ct_slice, heatmap_slice, title, lesion_slice)`` for each PNG; the
            lesion mask (or ``None``) is drawn as a white outline (the truth over the map).
        alpha: opacity of the heatmap at its hottest point (0 where it is 0).
        size_inches: width and height of the figure.

    Returns:
        The paths written, in order.
    """
    figure = axis = grey = overlay = bounds = None
    outline: Any = None
    paths: list[Path] = []
    try:
        for path, ct_slice, heatmap_slice, title, lesion_slice in slices:
            heat = np.clip(_display(heatmap_slice), 0.0, 1.0)
            if figure is None:
                figure, axis = plt.subplots(figsize=(size_inches, size_inches))
                grey = axis.imshow(_display(ct_slice), cmap="gray", vmin=0, vmax=1)
                overlay = axis.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=alpha * heat)
                figure.colorbar(overlay, ax=axis, fraction=0.046, pad=0.04)
                axis.set_xticks([])
                axis.set_yticks([])
                axis.set_title("slice", fontsize=9)
                bounds = figure.get_tightbbox().padded(0.1)  # as savefig's tight box, in inches
            else:
                grey.set_data(_display(ct_slice))
                overlay.set_data(heat)
                overlay.set_alpha(alpha * heat)
            axis.set_title(title or "", fontsize=9)
            if outline is not None:
                outline.remove()
                outline = None
            if lesion_slice is not None and np.any(lesion_slice):
                lesion_display = _display(np.asarray(lesion_slice, dtype=float))
                outline = axis.contour(lesion_display, levels=[0.5], colors="white", linewidths=1.0)
            paths.append(save_figure(figure, path, dpi=80, close=False, bbox_inches=bounds))
    finally:
        if figure is not None:
            plt.close(figure)
    return paths


def _finish_rate_axes(axis: Any, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Unit-square limits, labels, title, legend and grid of a curve of rates (ROC, precision-recall)."""
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(loc=legend_loc, fontsize=8)
    axis.grid(alpha=0.3)


def roc_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, ...]:
    """False and true positive rates over all thresholds, and the area under the curve.

    Returns:
        ``(fpr, tpr, auc)``; ``auc`` is ``nan`` when only one class is present.
    """
    labels = np.asarray(labels, dtype=int).reshape(-1)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    if positives == 0 or negatives == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.float64(np.nan)
    _, cuts, true_positives = ranked_cuts(scores, labels)
    tpr = np.r_[0.0, true_positives / positives]
    fpr = np.r_[0.0, (cuts + 1 - true_positives) / negatives]
    return fpr, tpr, np.float64(np.trapezoid(tpr, fpr))


def plot_roc(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    title: str = "ROC curve",
) -> dict[str, float]:
    """Draw one ROC curve per entry of ``curves`` (name -> (labels, scores)) on the same axes.

    Returns:
        The area under each curve, by name.
    """
    figure, axis = plt.subplots(figsize=(5.2, 5))
    areas = {}
    for name, (labels, scores) in curves.items():
        fpr, tpr, area = roc_curve(labels, scores)
        areas[name] = float(area)
        axis.plot(fpr, tpr, lw=2, label=f"{name} (AUC {area:.3f}, n = {len(labels)})")
    axis.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="chance")
    rates = ("false positive rate (1 - specificity)", "true positive rate (sensitivity)")
    _finish_rate_axes(axis, *rates, title, "lower right")
    save_figure(figure, path)
    return areas


def precision_recall_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of ``score > t`` over every threshold ``t`` between distinct scores.

    A score of ``-inf`` is never called positive (e.g. a slice of a volume predicted negative),
    so recall can stay below 1 at every threshold.

    Returns:
        ``(precision, recall)``, from the highest threshold to the lowest.
    """
    labels = np.asarray(labels, dtype=int).reshape(-1)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    positives = int(labels.sum())
    callable_ = np.isfinite(scores)
    if positives == 0 or not callable_.any():
        return np.array([1.0]), np.array([0.0])
    _, cuts, true_positives = ranked_cuts(scores[callable_], labels[callable_])
    return true_positives / (cuts + 1), true_positives / positives


def plot_precision_recall(
    path: str | os.PathLike,
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    points: Mapping[str, tuple[float, float]] | None = None,
    title: str = "precision-recall curve",
) -> Path:
    """Draw a precision-recall curve and mark operating points (name -> (recall, precision)).

    Args:
        path: the PNG to write.
        labels: 0 or 1 per sample.
        scores: per sample, higher means more likely positive; ``-inf`` is never called.
        points: operating points to mark, e.g. the rules in use.
        title: the figure's title.
    """
    precision, recall = precision_recall_curve(labels, scores)
    figure, axis = plt.subplots(figsize=(5.2, 5))
    axis.plot(recall, precision, lw=2, label=f"attention x N over tau (n = {len(labels)})")
    for (name, (point_recall, point_precision)), marker in zip((points or {}).items(), "os^Dv"):
        f1 = 2 * point_recall * point_precision / max(point_recall + point_precision, 1e-12)
        axis.plot([point_recall], [point_precision], marker, ms=9, label=f"{name} (F1 {f1:.3f})")
    _finish_rate_axes(axis, "recall (sensitivity)", "precision", title, "lower left")
    return save_figure(figure, path)


def plot_reliability(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    bins: int = ECE_BINS,
    title: str = "reliability diagram",
) -> dict[str, float]:
    """Draw a reliability diagram: per probability bin, the share of positives against the mean probability.

    Below it, how many samples fall in each bin. A calibrated probability lies on the diagonal.

    Args:
        path: the PNG to write.
        curves: name -> (labels, probabilities of the positive class), drawn on the same axes.
        bins: equal-width bins over [0, 1].
        title: the figure's title.

    Returns:
        The expected calibration error of each curve, by name.
    """
    figure, (axis, counts_axis) = plt.subplots(
        2, 1, figsize=(5.2, 6.2), sharex=True, gridspec_kw={"height_ratios": (3, 1)}
    )
    errors = {}
    width = 1.0 / bins / max(len(curves), 1)
    for position, (name, (labels, probabilities)) in enumerate(curves.items()):
        table = reliability_bins(probabilities, labels, bins)
        errors[name] = float(expected_calibration_error(probabilities, labels, bins))
        filled = table.counts > 0
        axis.plot(
            table.mean_probability[filled],
            table.positive_rate[filled],
            "o-",
            lw=2,
            label=f"{name} (ECE {errors[name]:.3f}, n = {len(labels)})",
        )
        counts_axis.bar(table.edges[:-1] + (position + 0.5) * width, table.counts, width=width, label=name)
    axis.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="calibrated")
    _finish_rate_axes(axis, "", "share of COVID-19 volumes", title, "upper left")
    counts_axis.set_xlabel("predicted probability of COVID-19 (bin mean)")
    counts_axis.set_ylabel("volumes")
    counts_axis.grid(alpha=0.3)
    save_figure(figure, path)
    return errors


def read_tensorboard_scalars(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series in the TensorBoard event files below ``log_dir``: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, tuple[list[int], list[float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            steps, values = series.setdefault(tag, ([], []))
            for event in accumulator.Scalars(tag):
                steps.append(int(event.step))
                values.append(float(event.value))
    for tag, (steps, values) in series.items():
        order = np.argsort(steps, kind="stable")
        series[tag] = ([steps[i] for i in order], [values[i] for i in order])
    return series


def read_scalar_log(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Scalar series from a metrics log: CSV with a ``step`` (or ``epoch``) column, or JSON lines.

    Every other numeric column (or key) becomes a series over the steps.
    """
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as stream:
            records: list[dict[str, Any]] = list(csv.DictReader(stream))
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    series: dict[str, tuple[list[int], list[float]]] = {}
    for number, record in enumerate(records):
        step = int(float(record.get("step", record.get("iteration", record.get("epoch", number)))))
        for key, value in record.items():
            if key in ("step", "iteration", "epoch"):
                continue
            try:
                number_value = float(value)
            except (TypeError, ValueError):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(number_value)
    return series


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    padded = np.r_[np.full(window - 1, values[0]), values]
    return np.convolve(padded, kernel, mode="valid")


def plot_training_curves(
    path: str | os.PathLike,
    source: str | os.PathLike | Mapping[str, tuple[Sequence[int], Sequence[float]]],
    tags: Sequence[str] | None = None,
    title: str = "training",
) -> list[str]:
    """Plot training curves: one panel per scalar series.

    Args:
        path: the PNG file to write.
        source: a TensorBoard log folder, a metrics log (see :func:`read_scalar_log`), or the
            series themselves (tag -> (steps, values)).
        tags: the series to draw, in order (default: all of them, sorted); series without a
            finite value are left out. Series whose tag starts with ``train`` are drawn over
            iterations, the others over epochs (the bundle logs validation once an epoch).
        title: the figure title.

    Returns:
        The tags drawn.

    Raises:
        ValueError: no scalar series found.
    """
    if isinstance(source, Mapping):
        series = dict(source)
    elif Path(source).is_dir():
        series = read_tensorboard_scalars(source)
    else:
        series = read_scalar_log(source)
    chosen = [
        tag
        for tag in (tags or sorted(series))
        if tag in series and np.isfinite(np.asarray(series[tag][1], dtype=float)).any()
    ]
    if not chosen:
        raise ValueError(
            f"{source if not isinstance(source, Mapping) else 'series'}: no scalar series to plot"
        )
    columns = min(len(chosen), 3)
    rows = (len(chosen) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.2 * rows), squeeze=False)
    for axis, tag in zip(axes.flat, chosen):
        steps, values = (np.asarray(v, dtype=float) for v in series[tag])
        if steps.size > 40:  # noisy per-iteration series: raw in light, moving average on top
            axis.plot(steps, values, color=CURVE_COLOUR, alpha=0.25, lw=0.8)
            axis.plot(steps, _smooth(values, max(steps.size // 25, 2)), color=CURVE_COLOUR, lw=1.8)
        else:
            axis.plot(steps, values, color=CURVE_COLOUR, marker="o", markersize=3, lw=1.8)
        axis.set_title(tag, fontsize=10)
        axis.set_xlabel("iteration" if tag.startswith("train") else "epoch")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(chosen) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(figure, path)
    return chosen
