"""Volume- and slice-level detection metrics (paper Table 1) as functions and Ignite metrics.

Volume level: a volume is predicted positive when its COVID-19 probability is at least
``threshold`` (0.5). Slice level, the rule of the design: a slice is predicted positive when
its volume is predicted positive and its attention weight exceeds ``tau / N`` (``N`` slices
scored; ``tau = 1``: above a uniform share). Slice labels are only used here, never to train.

Both levels report ACC, PRE, REC, F1, SEN, SPE (REC and SEN are the same number under their
two names), the ROC AUC and the confusion matrix ``[[TN, FP], [FN, TP]]``. The confusion
counts and ratios come from MONAI's ``get_confusion_matrix`` / ``compute_confusion_matrix_metric``
and the AUC from ``compute_roc_auc``; a ratio whose denominator is zero (no predicted
positives for PRE, one class only for the AUC) is NaN.

With ``bootstrap_resamples``, each metric also gets its 95% bootstrap interval under
``<metric>_ci`` (``[low, high]``; :mod:`pipeline.workflow.intervals`: volumes resampled within
each class, at slice level with all their slices). The volume level also reports the expected
calibration error of the probability of COVID-19 (``ece``, :mod:`pipeline.workflow.calibration`).

The slice-level AUC ranks slices by ``attention x N`` (1 = a uniform share, so volumes of
different lengths are comparable) over the slices of the positive volumes: it measures how
well the attention finds the diseased slices of a diseased volume.

Slice F1 depends on how many slices are diseased, so the slice metrics also report what they
were measured at (:func:`slice_baselines`): the slice prevalence, the share of all scored
slices labelled positive; the prevalence in positive volumes, the share of the slices of the
truly positive volumes labelled positive (the lesions' slice extent); and the F1 of the trivial
rule that calls every slice of a volume predicted positive (at the rule's volume threshold),
the score to beat with attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.metrics import Metric
from monai.data import decollate_batch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix

from pipeline.workflow.calibration import expected_calibration_error
from pipeline.workflow.distributed import gather_values
from pipeline.workflow.intervals import BootstrapSettings, slice_intervals, volume_intervals
from pipeline.workflow.slice_rule import network_slice_rule, tune_slice_rule

__all__ = [
    "METRIC_NAMES",
    "SliceMetrics",
    "VolumeMetrics",
    "binary_metrics",
    "score_and_label",
    "slice_baselines",
    "slice_predictions",
    "volume_items",
]

METRIC_NAMES = {
    "acc": "accuracy",
    "pre": "precision",
    "rec": "recall",
    "f1": "f1 score",
    "sen": "sensitivity",
    "spe": "specificity",
}
"""Short names reported, mapped to MONAI's confusion-matrix metric names."""


def slice_predictions(attention: Any, volume_positive: bool, tau: float = 1.0) -> np.ndarray:
    """Slice predictions from the attention: positive iff the volume is and ``attention > tau / N``.

    Args:
        attention: the ``N`` attention weights of one volume's scored slices.
        volume_positive: whether the volume is predicted positive.
        tau: threshold factor; 1 means above a uniform share ``1 / N``.

    Returns:
        ``int`` array of 0 and 1, one per slice.
    """
    weights = _numpy(attention).reshape(-1).astype(float)
    if not volume_positive:
        return np.zeros(weights.shape, dtype=int)
    return (weights > tau / max(weights.size, 1)).astype(int)


def binary_metrics(labels: Any, predictions: Any, scores: Any | None = None) -> dict[str, Any]:
    """ACC, PRE, REC, F1, SEN, SPE, ROC AUC and the confusion matrix of binary predictions.

    Args:
        labels: ground truth, 0 or 1 per sample.
        predictions: predicted class, 0 or 1 per sample.
        scores: optional score per sample for the ROC AUC (higher: more likely positive).

    Returns:
        ``{"acc", "pre", "rec", "f1", "sen", "spe", "auc", "confusion_matrix", "count"}``; the
        ratios are floats (NaN when undefined), ``confusion_matrix`` is ``[[TN, FP], [FN, TP]]``.
    """
    y = torch.as_tensor(_numpy(labels).reshape(-1).astype(np.int64))
    y_hat = torch.as_tensor(_numpy(predictions).reshape(-1).astype(np.int64))
    if y.numel() != y_hat.numel():
        raise ValueError(f"{y.numel()} labels but {y_hat.numel()} predictions")
    if not set(torch.unique(torch.cat([y, y_hat])).tolist()) <= {0, 1}:
        raise ValueError("labels and predictions must be 0 or 1")
    result: dict[str, Any] = {}
    if y.numel():
        onehot = torch.nn.functional.one_hot
        counts = get_confusion_matrix(onehot(y_hat, 2), onehot(y, 2), include_background=False)
        counts = counts.sum(dim=0, keepdim=True).double()  # (1, 1, 4): tp, fp, tn, fn over all samples
        for short, name in METRIC_NAMES.items():
            result[short] = float(compute_confusion_matrix_metric(name, counts).reshape(-1)[0])
        tp, fp, tn, fn = (int(v) for v in counts.reshape(-1))
    else:
        result.update(dict.fromkeys(METRIC_NAMES, math.nan))
        tp = fp = tn = fn = 0
    result["auc"] = math.nan
    if scores is not None:
        s = torch.as_tensor(_numpy(scores).reshape(-1).astype(np.float64))
        if s.numel() != y.numel():
            raise ValueError(f"{y.numel()} labels but {s.numel()} scores")
        if not torch.isfinite(s).all():
            raise ValueError("scores must be finite")
        if y.numel() and 0 < int(y.sum()) < y.numel():  # both classes present
            result["auc"] = float(compute_roc_auc(s, y))
    result["confusion_matrix"] = [[tn, fp], [fn, tp]]
    result["count"] = int(y.numel())
    return result


def slice_baselines(labels: Any, in_positive: Any, volume_called: Any) -> dict[str, float]:
    """Slice prevalences and the F1 of calling every slice of each volume predicted positive.

    Args:
        labels: per slice, 0 or 1.
        in_positive: per slice, whether its volume is truly positive.
        volume_called: per slice, whether its volume is predicted positive.

    Returns:
        ``{"prevalence", "prevalence_positive", "trivial_f1"}``: the share of all slices labelled
        positive, the share of the slices of positive volumes labelled positive, and the trivial
        rule's F1 (NaN where undefined: no slices, no positive volume, or no positive slice and
        none called).
    """
    labels = _numpy(labels).reshape(-1).astype(int)
    in_positive = _numpy(in_positive).reshape(-1).astype(bool)
    called = _numpy(volume_called).reshape(-1).astype(int)
    return {
        "prevalence": float(labels.mean()) if labels.size else math.nan,
        "prevalence_positive": float(labels[in_positive].mean()) if in_positive.any() else math.nan,
        "trivial_f1": binary_metrics(labels, called)["f1"],
    }


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return np.stack([_numpy(v) for v in value])
    return np.asarray(value)


def volume_items(data: Any) -> list:
    """One entry per volume: decollated engine data stays as it is, a collated batch is split."""
    if isinstance(data, list):
        return data
    return decollate_batch(data, detach=True)


def _gather(values: list[float], dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Concatenate ``values`` across distributed processes (unchanged in a single process)."""
    return gather_values(values, dtype)


def _prefixed(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def _positive_probability(pred: Any) -> float:
    """Probability of class 1 from ``(2,)`` probabilities, or a single probability."""
    values = _numpy(pred).reshape(-1).astype(float)
    return float(values[1] if values.size > 1 else values[0])


class VolumeMetrics(Metric):
    """Ignite metric: volume-level ACC, PRE, REC, F1, SEN, SPE, ROC AUC and confusion matrix.

    ``update((probabilities, labels))`` takes per-volume class probabilities (``(2,)`` each, or
    ``(B, 2)``) and labels (class index or one-hot). ``compute()`` returns a dictionary whose
    keys carry ``prefix`` (``volume_acc``, ...), so Ignite also stores every entry in
    ``engine.state.metrics`` under its own name. Works across distributed processes.

    Args:
        threshold: probability of class 1 at or above which a volume is predicted positive.
        prefix: prefix of the result keys.
        output_transform: maps ``engine.state.output`` to ``(probabilities, labels)``.
        bootstrap_resamples: resamples of the bootstrap intervals (``<metric>_ci``); 0: none.
        confidence_level: confidence level of the intervals.
        bootstrap_seed: seed of the resampling.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        prefix: str = "volume",
        output_transform: Callable | None = None,
        device: str | torch.device = "cpu",
        bootstrap_resamples: int = 0,
        confidence_level: float = 0.95,
        bootstrap_seed: int = 0,
    ) -> None:
        self.threshold = threshold
        self.prefix = prefix
        self.intervals = BootstrapSettings(bootstrap_resamples, confidence_level, bootstrap_seed)
        super().__init__(
            output_transform=output_transform or _pred_and_label, device=device, skip_unrolling=True
        )

    def reset(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []

    def update(self, output: Sequence[Any]) -> None:
        probabilities, labels = output
        probabilities = list(probabilities)  # rows of a (B, 2) tensor, or a list of (2,) tensors
        labels = _labels(labels, len(probabilities))
        for pred, label in zip(probabilities, labels):
            score = _positive_probability(pred)
            if not math.isfinite(score):
                raise ValueError(f"non-finite volume probability {score}: the network output is not finite")
            self._scores.append(score)
            self._labels.append(label)

    def compute(self) -> dict[str, Any]:
        scores = _gather(self._scores)
        labels = _gather(self._labels, torch.int64)
        predictions = (scores >= self.threshold).astype(int)
        result = binary_metrics(labels, predictions, scores)
        result["ece"] = expected_calibration_error(scores, labels) if scores.size else math.nan
        if self.intervals.resamples and scores.size:
            result.update(volume_intervals(labels, predictions, scores, self.intervals))
        return _prefixed(self.prefix, result)


def score_and_label(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Output transform for MONAI's ``ROCAUC`` handler: per volume, P(class 1) ``(1,)`` and label ``(1,)``.

    ``ROCAUC`` wants one-hot labels for ``(2,)`` probabilities; the positive-class score with
    the class index is the same binary AUC and leaves the engine's ``label`` as it is.
    """
    items = volume_items(output)
    scores = [torch.as_tensor(item["pred"]).detach().reshape(-1)[-1:].float().cpu() for item in items]
    labels = [torch.as_tensor(item["label"]).detach().reshape(-1)[-1:].float().cpu() for item in items]
    return scores, labels


def _pred_and_label(output: Any) -> tuple[list, list]:
    items = volume_items(output)
    return [item["pred"] for item in items], [item["label"] for item in items]


def _labels(labels: Any, count: int) -> list[int]:
    """Class indices from class indices or one-hot rows."""
    values = _numpy(labels)
    if values.size == 2 * count and count > 0 and values.reshape(count, -1).shape[1] == 2:
        return [int(v) for v in values.reshape(count, 2).argmax(axis=1)]
    values = values.reshape(-1)
    if values.size != count:
        raise ValueError(f"{values.size} labels for {count} predictions")
    return [int(v) for v in values]


class SliceMetrics(Metric):
    """Ignite metric: slice-level ACC, PRE, REC, F1, SEN, SPE, attention ROC AUC, confusion matrix.

    Reads, per volume, the class probabilities and attention from ``engine.state.output`` and
    the per-slice labels (aligned with the scored slices) from ``engine.state.batch``; volumes
    without slice labels are skipped. The slice rule is :func:`slice_predictions`. Result keys
    carry ``prefix`` (``slice_acc``, ...) plus ``slice_volumes``, the volumes counted, and
    ``slice_tau`` and ``slice_threshold``, the rule applied, and ``slice_prevalence``,
    ``slice_prevalence_positive`` and ``slice_trivial_f1`` (:func:`slice_baselines`, the
    trivial rule at the same volume threshold). With ``tune``, also
    ``slice_tuned_tau``, ``slice_tuned_threshold`` and ``slice_tuned_f1``: the rule with the
    best F1 on these slices (:func:`pipeline.workflow.slice_rule.tune_slice_rule`). Works
    across distributed processes.

    Args:
        tau: threshold factor of the slice rule; ``None``: the engine network's
            ``slice_rule`` (the paper's 1 when it has none).
        threshold: probability of class 1 at or above which a volume's slices may be called;
            ``None``: the engine network's ``slice_rule`` (0.5 when it has none).
        tune: also report the best rule on these slices.
        prefix: prefix of the result keys.
        pred_key, attention_key, label_key: keys in the engine output.
        slice_labels_key: key of the slice labels in the engine batch.
        bootstrap_resamples: resamples of the bootstrap intervals (``<metric>_ci``, volumes
            resampled with their slices); 0: none.
        confidence_level: confidence level of the intervals.
        bootstrap_seed: seed of the resampling.
    """

    def __init__(
        self,
        tau: float | None = 1.0,
        threshold: float | None = 0.5,
        prefix: str = "slice",
        pred_key: str = "pred",
        attention_key: str = "attention",
        label_key: str = "label",
        slice_labels_key: str = "slice_labels",
        tune: bool = False,
        device: str | torch.device = "cpu",
        bootstrap_resamples: int = 0,
        confidence_level: float = 0.95,
        bootstrap_seed: int = 0,
    ) -> None:
        if tau is not None and tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = tau
        self.threshold = threshold
        self.tune = tune
        self.prefix = prefix
        self.pred_key = pred_key
        self.attention_key = attention_key
        self.label_key = label_key
        self.slice_labels_key = slice_labels_key
        self.intervals = BootstrapSettings(bootstrap_resamples, confidence_level, bootstrap_seed)
        super().__init__(device=device, skip_unrolling=True)

    def reset(self) -> None:
        self._labels: list[int] = []
        self._predictions: list[int] = []
        self._scores: list[float] = []
        self._probabilities: list[float] = []
        self._in_positive: list[int] = []
        self._volume_keys: list[int] = []  # per slice, its volume's key (unique across processes)
        self._volumes = 0
        self._rule = network_slice_rule(None, self.tau, self.threshold)

    def started(self, engine: Any) -> None:
        """Reset, and read the rule once: the engine network's stored rule is fixed during a run."""
        super().started(engine)
        self._rule = network_slice_rule(getattr(engine, "network", None), self.tau, self.threshold)

    @torch.no_grad()
    def iteration_completed(self, engine: Any) -> None:
        """Pair each volume's output with its batch entry (for the slice labels), then update."""
        outputs, batch = volume_items(engine.state.output), volume_items(engine.state.batch)
        for result, item in zip(outputs, batch):
            label = result.get(self.label_key, item.get(self.label_key))
            slice_labels = item.get(self.slice_labels_key)
            self.update((result[self.pred_key], result[self.attention_key], slice_labels, label))

    def update(self, output: Sequence[Any]) -> None:
        """Add one volume: ``(probabilities (2,), attention (S,), slice_labels (S,) or None, label)``."""
        pred, attention, slice_labels, label = output
        if slice_labels is None:
            return
        weights = _numpy(attention).reshape(-1).astype(float)
        truth = _numpy(slice_labels).reshape(-1).astype(int)
        if truth.size != weights.size:
            raise ValueError(f"{truth.size} slice labels for {weights.size} attention weights")
        if not np.isfinite(weights).all():
            raise ValueError("non-finite attention weights: the network output is not finite")
        tau, threshold = self._rule
        probability = _positive_probability(pred)
        # the volume label: a class index, or one-hot whose last entry is the positive class
        positive_volume = int(truth.any()) if label is None else int(_numpy(label).reshape(-1)[-1])
        self._labels.extend(truth.tolist())
        self._predictions.extend(slice_predictions(weights, probability >= threshold, tau).tolist())
        self._scores.extend((weights * weights.size).tolist())
        self._probabilities.extend([probability] * weights.size)
        self._in_positive.extend([positive_volume] * weights.size)
        self._volume_keys.extend([self._volumes * idist.get_world_size() + idist.get_rank()] * weights.size)
        self._volumes += 1

    def compute(self) -> dict[str, Any]:
        labels = _gather(self._labels, torch.int64)
        predictions = _gather(self._predictions, torch.int64)
        scores = _gather(self._scores)
        in_positive = _gather(self._in_positive, torch.int64).astype(bool)
        volumes = int(_gather([self._volumes], torch.int64).sum())
        result = binary_metrics(labels, predictions)
        result["auc"] = binary_metrics(labels[in_positive], labels[in_positive], scores[in_positive])["auc"]
        result["volumes"] = volumes
        result["tau"], result["threshold"] = self._rule
        probabilities = _gather(self._probabilities)
        result.update(slice_baselines(labels, in_positive, probabilities >= self._rule[1]))
        if self.intervals.resamples and labels.size:
            keys, volume = np.unique(_gather(self._volume_keys, torch.int64), return_inverse=True)
            volume_labels = np.zeros(keys.size, dtype=int)
            volume_labels[volume] = in_positive
            result.update(slice_intervals(volume, volume_labels, labels, predictions, scores, self.intervals))
        if self.tune:
            tuned = tune_slice_rule(probabilities, scores, labels)
            result.update(tuned_tau=tuned.tau, tuned_threshold=tuned.threshold, tuned_f1=tuned.f1)
        return _prefixed(self.prefix, result)
