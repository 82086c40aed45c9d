"""Bootstrap confidence intervals of the detection metrics, resampling whole volumes.

The unit resampled is the volume: at volume level its prediction, at slice level all its slices
together (slices of one volume are not independent, so resampling slices alone would give
intervals too narrow). Volumes are drawn with replacement within each class (a stratified
bootstrap, as pROC does for the ROC AUC), so every resample holds as many COVID-19 and negative
volumes as the data; SciPy's :func:`scipy.stats.bootstrap` draws them, seeded. The interval is
the percentile interval of the bootstrap distribution; resamples where a ratio is undefined (no
predicted positive for PRE) are left out of that ratio's percentiles.

A resample is a count per volume (how often it was drawn), so every metric is computed for all
resamples at once: confusion counts are weighted sums of per-volume counts, and the ROC AUC is
the weighted Mann-Whitney statistic over the distinct scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.stats import bootstrap

from pipeline.workflow.calibration import expected_calibration_error

__all__ = [
    "BootstrapSettings",
    "bootstrap_intervals",
    "confusion_ratios",
    "slice_intervals",
    "volume_intervals",
    "weighted_auc",
]

RATIOS = ("acc", "pre", "rec", "f1", "sen", "spe")
"""The ratios of the confusion counts given intervals (the keys of the metrics)."""
MAX_BATCH_CELLS = 20_000_000
"""Resamples are evaluated in batches of at most this many (resample, distinct score) cells."""


@dataclass(frozen=True)
class BootstrapSettings:
    """How the intervals are drawn.

    Attributes:
        resamples: bootstrap resamples (0: no intervals).
        confidence: the intervals' confidence level.
        seed: seed of the resampling.
    """

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 0:
            raise ValueError(f"resamples must be 0 (no intervals) or positive, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"the confidence level must lie in (0, 1), got {self.confidence}")


def confusion_ratios(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """ACC, PRE, REC, F1, SEN and SPE of (weighted) confusion counts; NaN where undefined.

    The definitions are MONAI's ``compute_confusion_matrix_metric``'s. Arrays broadcast.
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=float) for v in (tp, fp, tn, fn))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    sen = ratio(tp, tp + fn)
    return {
        "acc": ratio(tp + tn, tp + fp + tn + fn),
        "pre": ratio(tp, tp + fp),
        "rec": sen,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "sen": sen,
        "spe": ratio(tn, tn + fp),
    }


@dataclass(frozen=True)
class _RankedScores:
    """Per volume, how many positive and negative items hold each distinct score (ascending)."""

    positive: sparse.csr_matrix
    negative: sparse.csr_matrix

    @classmethod
    def build(cls, volume: np.ndarray, scores: np.ndarray, labels: np.ndarray, volumes: int) -> _RankedScores:
        distinct, group = np.unique(scores, return_inverse=True)
        shape = (volumes, max(distinct.size, 1))
        labels = labels.astype(bool)

        def counts(mask: np.ndarray) -> sparse.csr_matrix:
            ones = np.ones(int(mask.sum()))
            return sparse.csr_matrix((ones, (volume[mask], group[mask])), shape=shape)

        return cls(counts(labels), counts(~labels))

    @property
    def groups(self) -> int:
        return self.positive.shape[1]


def weighted_auc(weights: np.ndarray, ranked: _RankedScores) -> np.ndarray:
    """ROC AUC per row of ``weights`` (a count per volume): the weighted Mann-Whitney statistic.

    Ties count one half, as in the ROC AUC; NaN where a resample lacks a class.
    """
    positive = np.asarray((ranked.positive.T @ weights.T).T)
    negative = np.asarray((ranked.negative.T @ weights.T).T)
    below = np.cumsum(negative, axis=-1) - negative
    pairs = positive.sum(-1) * negative.sum(-1)
    wins = (positive * (below + 0.5 * negative)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    strata: Any,
    settings: BootstrapSettings,
    cells_per_resample: int = 1,
) -> dict[str, list[float] | None]:
    """Percentile intervals of statistics of volumes resampled with replacement within each stratum.

    Args:
        statistic: maps resample weights ``(B, V)`` (how often each of the ``V`` volumes was
            drawn) to ``{name: (B,) values}``.
        strata: per volume, its stratum (the volume label).
        settings: resamples, confidence level and seed.
        cells_per_resample: memory a resample takes in ``statistic`` (e.g. its distinct scores),
            to size the batches.

    Returns:
        ``{name: [low, high]}``, ``None`` where the statistic is undefined in every resample.
    """
    strata = np.asarray(strata).reshape(-1)
    count = strata.size
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    drawn = [group for group in groups if group.size > 1]
    fixed = np.zeros(count)
    for group in groups:
        if group.size == 1:  # one volume in its stratum: every resample holds it once
            fixed[group] = 1.0
    names = list(statistic(np.ones((1, count))))
    if not drawn:
        values = statistic(fixed[None])
        return {name: _interval(np.asarray(values[name], dtype=float), settings.confidence) for name in names}

    def stacked(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        indices = np.concatenate([np.atleast_2d(s) for s in samples], axis=-1)
        weights = np.repeat(fixed[None], indices.shape[0], axis=0)
        np.add.at(weights, (np.arange(indices.shape[0])[:, None], indices), 1.0)
        values = statistic(weights)
        return np.stack([np.asarray(values[name], dtype=float) for name in names])

    batch = max(1, min(settings.resamples, MAX_BATCH_CELLS // max(cells_per_resample + count, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy warns of NaN and degenerate distributions; handled below
        result = bootstrap(
            tuple(drawn),
            stacked,
            n_resamples=settings.resamples,
            batch=batch,
            vectorized=True,
            paired=False,
            method="percentile",
            confidence_level=settings.confidence,
            rng=np.random.default_rng(settings.seed),
        )
    distribution = np.asarray(result.bootstrap_distribution).reshape(len(names), -1)
    return {name: _interval(values, settings.confidence) for name, values in zip(names, distribution)}


def _interval(values: np.ndarray, confidence: float = 0.95) -> list[float] | None:
    """The percentile interval of the finite values (``None`` when there are none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 50 * (1 - confidence)
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def volume_intervals(
    labels: Any, predictions: Any, scores: Any, settings: BootstrapSettings
) -> dict[str, list[float] | None]:
    """Intervals of the volume-level ratios, ROC AUC and ECE, volumes resampled within each class.

    Args:
        labels: per volume, 0 or 1.
        predictions: per volume, the predicted class.
        scores: per volume, the probability of COVID-19.
        settings: resamples, confidence level and seed.

    Returns:
        ``{"acc_ci": [low, high], ..., "auc_ci": [low, high], "ece_ci": [low, high]}``.
    """
    labels = np.asarray(labels).reshape(-1).astype(int)
    predictions = np.asarray(predictions).reshape(-1).astype(int)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    counts = np.stack(_confusion(labels, predictions), axis=-1)
    ranked = _RankedScores.build(np.arange(labels.size), scores, labels, labels.size)

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {
            **confusion_ratios(*(weights @ counts).T),
            "auc": weighted_auc(weights, ranked),
            "ece": expected_calibration_error(scores, labels, weights=weights),
        }

    intervals = bootstrap_intervals(statistic, labels, settings, ranked.groups)
    return {f"{name}_ci": value for name, value in intervals.items()}


def slice_intervals(
    volume: Any,
    volume_labels: Any,
    labels: Any,
    predictions: Any,
    scores: Any,
    settings: BootstrapSettings,
) -> dict[str, list[float] | None]:
    """Intervals of the slice-level ratios and attention ROC AUC, resampling volumes with their slices.

    Args:
        volume: per slice, the index of its volume (``0 .. V - 1``).
        volume_labels: per volume, 0 or 1 (the strata; the AUC uses the slices of the 1s).
        labels: per slice, 0 or 1.
        predictions: per slice, the slice rule's call.
        scores: per slice, attention x number of slices.
        settings: resamples, confidence level and seed.

    Returns:
        ``{"acc_ci": [low, high], ..., "auc_ci": [low, high]}``.
    """
    volume = np.asarray(volume).reshape(-1).astype(int)
    volume_labels = np.asarray(volume_labels).reshape(-1).astype(int)
    labels = np.asarray(labels).reshape(-1).astype(int)
    predictions = np.asarray(predictions).reshape(-1).astype(int)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    count = volume_labels.size
    counts = np.zeros((count, 4))
    for column, hits in enumerate(_confusion(labels, predictions)):
        np.add.at(counts[:, column], volume, hits)
    in_positive = volume_labels[volume] == 1
    ranked = _RankedScores.build(volume[in_positive], scores[in_positive], labels[in_positive], count)

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {**confusion_ratios(*(weights @ counts).T), "auc": weighted_auc(weights, ranked)}

    intervals = bootstrap_intervals(statistic, volume_labels, settings, ranked.groups)
    return {f"{name}_ci": value for name, value in intervals.items()}


def _confusion(labels: np.ndarray, predictions: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per item, 1 where it is a TP, FP, TN, FN (in that order)."""
    positive, called = labels == 1, predictions == 1
    return tuple(
        hits.astype(float)
        for hits in (positive & called, ~positive & called, ~positive & ~called, positive & ~called)
    )
