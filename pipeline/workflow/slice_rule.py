"""The slice rule's operating point: tuned on validation, stored in the network, read back.

The rule (see :func:`pipeline.workflow.metrics.slice_predictions`) calls a slice positive when
its volume's COVID-19 probability is at least ``threshold`` and its attention weight times the
number of slices exceeds ``tau``. The paper fixes ``tau = 1`` and ``threshold = 0.5``. An
attention softmax that puts most of its weight on two or three slices then calls too few of
the slices a lesion touches, and volumes called positive on thin evidence add false slices.

:func:`tune_slice_rule` picks the pair with the best slice-level F1 on labelled slices (the
validation split's: slice labels are never used to train the weights).
:class:`SliceRuleCalibrator` writes the pair into the network's
:class:`~networks.slice_attention.SliceRule` after each validation, so the best checkpoint
carries the rule of its own epoch; evaluation and inference read it back with
:func:`network_slice_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from torch import nn

from pipeline.workflow.inferer import unwrap_network
from pipeline.workflow.ranking import ranked_cuts

__all__ = ["PAPER_RULE", "SliceRuleCalibrator", "TunedSliceRule", "network_slice_rule", "tune_slice_rule"]

PAPER_RULE = (1.0, 0.5)
"""``(tau, threshold)`` of the paper's rule, used where a network holds no tuned rule."""


@dataclass(frozen=True)
class TunedSliceRule:
    """The result of :func:`tune_slice_rule`.

    Attributes:
        tau: threshold on attention x N.
        threshold: least volume probability of COVID-19 for a slice to be called.
        f1: slice-level F1 of the pair on the data it was tuned on (optimistic).
    """

    tau: float
    threshold: float
    f1: float


def _midpoints(values: np.ndarray) -> np.ndarray:
    """Cut points between consecutive distinct values, plus one below and one above all of them."""
    distinct = np.unique(values)
    if distinct.size == 0:
        return np.zeros(1)
    inner = (distinct[1:] + distinct[:-1]) / 2
    return np.concatenate([[distinct[0] - 1.0], inner, [distinct[-1] + 1.0]])


def tune_slice_rule(probabilities: Any, scores: Any, labels: Any) -> TunedSliceRule:
    """The ``(tau, threshold)`` with the best slice-level F1 on labelled slices.

    Every cut between consecutive distinct volume probabilities and between consecutive
    distinct scores is tried, so the result does not depend on a grid. Ties go to the higher
    ``threshold``, then to the higher ``tau`` (the rule that calls fewer slices).

    Args:
        probabilities: per slice, its volume's probability of COVID-19.
        scores: per slice, attention weight x number of slices scored in its volume.
        labels: per slice, 0 or 1.

    Returns:
        The tuned rule; the paper's rule with F1 0 when no slice is labelled positive.
    """
    probabilities = np.asarray(probabilities, dtype=float).reshape(-1)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if not probabilities.size == scores.size == labels.size:
        raise ValueError(f"{probabilities.size} probabilities, {scores.size} scores, {labels.size} labels")
    positives = int(labels.sum())
    best = TunedSliceRule(*PAPER_RULE, f1=0.0)
    if positives == 0:
        return best
    for threshold in _midpoints(probabilities)[::-1]:
        gated = probabilities >= threshold
        ranked_scores, cuts, true_positives = ranked_cuts(scores[gated], labels[gated])
        if cuts.size == 0:
            continue
        f1 = 2 * true_positives / (cuts + 1 + positives)
        k = int(np.argmax(f1))
        if f1[k] > best.f1 + 1e-12:
            last = cuts[k]
            # calling every slice: halfway down to 0, as scores (attention x N) are positive
            below = ranked_scores[last + 1] if last + 1 < ranked_scores.size else 0.0
            best = TunedSliceRule(
                tau=float((ranked_scores[last] + below) / 2), threshold=float(threshold), f1=float(f1[k])
            )
    return best


def network_slice_rule(
    network: nn.Module | None, tau: float | None = None, threshold: float | None = None
) -> tuple[float, float]:
    """``(tau, threshold)`` of the slice rule: the given values, else the network's ``slice_rule``.

    Args:
        network: a network with a ``slice_rule`` (possibly wrapped for data parallelism); with
            ``None`` or a network without one, the paper's rule fills the missing values.
        tau: a fixed ``tau`` (``None``: the network's).
        threshold: a fixed volume threshold (``None``: the network's).
    """
    rule = None if network is None else getattr(unwrap_network(network), "slice_rule", None)
    stored = PAPER_RULE if rule is None else (float(rule.tau), float(rule.threshold))
    return (stored[0] if tau is None else float(tau), stored[1] if threshold is None else float(threshold))


class SliceRuleCalibrator:
    """After each validation, store the slice rule tuned on it in the network's ``slice_rule``.

    Attach it to the validation evaluator before the best-checkpoint saver, so that the saved
    weights carry the rule tuned at the same epoch. Reads ``<prefix>_tuned_tau`` and
    ``<prefix>_tuned_threshold`` from the evaluator's metrics
    (:class:`~pipeline.workflow.metrics.SliceMetrics` with ``tune=True``). A validation split
    without slice labels leaves the rule as it is.

    Args:
        network: the network whose ``slice_rule`` is set.
        tau: a fixed ``tau`` to store instead of the tuned one (``None``: tuned).
        threshold: a fixed volume threshold to store instead of the tuned one (``None``: tuned).
        prefix: prefix of the slice metrics' keys.
    """

    def __init__(
        self,
        network: nn.Module,
        tau: float | None = None,
        threshold: float | None = None,
        prefix: str = "slice",
    ) -> None:
        rule = getattr(unwrap_network(network), "slice_rule", None)
        if rule is None:
            raise TypeError(f"{type(unwrap_network(network)).__name__} has no slice_rule to calibrate")
        self.rule = rule
        self.tau = tau
        self.threshold = threshold
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        tuned_tau = metrics.get(f"{self.prefix}_tuned_tau")
        tuned_threshold = metrics.get(f"{self.prefix}_tuned_threshold")
        if tuned_tau is None or not np.isfinite(tuned_tau):
            tuned_tau = tuned_threshold = None
        self.rule.set(
            tau=self.tau if self.tau is not None else tuned_tau,
            threshold=self.threshold if self.threshold is not None else tuned_threshold,
        )
