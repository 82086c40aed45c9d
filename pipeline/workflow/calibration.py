"""Calibration of the volume probability of COVID-19: expected calibration error and reliability bins.

A clinician reads P(COVID-19) = 0.8 as "eight in ten such volumes have the disease". The
reliability of that reading is measured over equal-width probability bins: in each bin, the
share of COVID-19 volumes against the mean predicted probability. The expected calibration
error (ECE) is their absolute difference averaged over the bins, weighted by the volumes in
each (Naeini et al. 2015; Guo et al. 2017 apply it to the confidence of the predicted class,
here it is applied to the probability of COVID-19 itself, the number the pipeline reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ECE_BINS", "ReliabilityBins", "expected_calibration_error", "reliability_bins"]

ECE_BINS = 10
"""Equal-width probability bins of the ECE and the reliability diagram."""


@dataclass(frozen=True)
class ReliabilityBins:
    """Per probability bin: its edges, volume count, mean predicted probability and share of positives.

    Bins without volumes hold NaN means and count 0.
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_probability: np.ndarray
    positive_rate: np.ndarray


def _bin_index(probabilities: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each probability; bins are ``[k/bins, (k+1)/bins)``, the last one closed at 1."""
    return np.clip(np.floor(probabilities * bins).astype(int), 0, bins - 1)


def _check(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=float).reshape(-1)
    labels = np.asarray(labels, dtype=float).reshape(-1)
    if probabilities.size != labels.size:
        raise ValueError(f"{probabilities.size} probabilities but {labels.size} labels")
    if probabilities.size and not (np.all(probabilities >= 0) and np.all(probabilities <= 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    return probabilities, labels


def reliability_bins(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> ReliabilityBins:
    """The reliability diagram's numbers: per equal-width bin, count, mean probability, positive share.

    Args:
        probabilities: per volume, its probability of COVID-19.
        labels: per volume, 0 or 1.
        bins: number of equal-width bins over [0, 1].
    """
    probabilities, labels = _check(probabilities, labels)
    index = _bin_index(probabilities, bins)
    counts = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(index, probabilities, minlength=bins) / counts
        rate = np.bincount(index, labels, minlength=bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), counts.astype(int), mean, rate)


def expected_calibration_error(
    probabilities: Any, labels: Any, bins: int = ECE_BINS, weights: np.ndarray | None = None
) -> np.ndarray | float:
    """Expected calibration error of the probability of COVID-19 over equal-width bins.

    ``sum_b (n_b / n) |mean label in b - mean probability in b|``.

    Args:
        probabilities: per volume, its probability of COVID-19.
        labels: per volume, 0 or 1.
        bins: number of equal-width bins over [0, 1].
        weights: optional ``(B, V)`` count of each volume in each of ``B`` bootstrap resamples;
            the ECE of each resample is returned.

    Returns:
        The ECE (NaN without volumes), or one per row of ``weights``.
    """
    probabilities, labels = _check(probabilities, labels)
    single = weights is None
    weights = np.ones((1, probabilities.size)) if single else np.atleast_2d(np.asarray(weights, dtype=float))
    onehot = np.zeros((probabilities.size, bins))
    onehot[np.arange(probabilities.size), _bin_index(probabilities, bins)] = 1.0
    total = weights.sum(-1)
    gap = np.abs(weights @ (onehot * (labels - probabilities)[:, None])).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ece = np.where(total > 0, gap / np.where(total > 0, total, 1.0), np.nan)
    return float(ece[0]) if single else ece
