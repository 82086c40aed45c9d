"""A threshold swept down through ranked scores: the counts behind ROC and precision-recall curves.

:func:`ranked_cuts` ranks samples by descending score and, at each cut between distinct scores
(tied samples are called together), counts the samples called and the positives among them.
The ROC and precision-recall curves of the reports and the slice-rule tuning read their
operating points from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ranked_cuts"]


def ranked_cuts(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Call the samples from the highest score down, cutting only between distinct scores.

    Args:
        scores: per sample, higher means more likely positive.
        labels: per sample, 0 or 1.

    Returns:
        ``(ranked, cuts, true_positives)``: the scores in descending order; for each cut, the
        index in ``ranked`` of the last sample called (``cuts + 1`` samples are called); and the
        positives among the called samples. All empty when there are no samples.
    """
    scores = np.asarray(scores, dtype=float).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(int)
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    if ranked.size == 0:
        return ranked, np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    cuts = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
    return ranked, cuts, np.cumsum(labels[order])[cuts]
