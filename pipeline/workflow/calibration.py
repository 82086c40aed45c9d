"""Calibration of the volume probability of COVID-19: expected calibration error and reliability bins.

A clinician reads P(COVID-19) = 0.8 as "eight in ten such volumes have the disease". The
reliability of that reading is measured over equal-width probability bins: in each bin, the
share of COVID-19 volumes against the mean predicted probability. The expected calibration
error (ECE) is their absolute difference averaged over the bins, weighted by the volumes in
each (Naeini et al. 2015; Guo et al. 2017 apply it to the confidence of the predicted class,
here it is applied to the probability of COVID-19 itself, the number the pipeline reports).

Temperature scaling (Guo et al. 2017) divides the network's logits by one number ``T`` fitted
on the validation split (:func:`fit_temperature`, least negative log-likelihood); it changes no
decision and no ranking, only how sure the probabilities are. :class:`TemperatureCalibrator`
fits it after each validation and stores it in the network
(:class:`~networks.temperature.TemperatureScaling`) only when it lowers the validation ECE;
otherwise ``T = 1``. The best checkpoint then carries the temperature of its own epoch, as it
carries its slice rule. The bundle leaves it off by default (``temperature_scaling``): the
validation split also chooses the best epoch, so it is more separable than the test split, and
a temperature fitted on a small one can make the test probabilities over-confident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, logit
from torch import nn

from pipeline.workflow.distributed import gather_values
from pipeline.workflow.inferer import unwrap_network

__all__ = [
    "ECE_BINS",
    "ReliabilityBins",
    "TemperatureCalibrator",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_bins",
]

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


TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The range :func:`fit_temperature` searches."""


def fit_temperature(margins: Any, labels: Any, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``sigmoid(margin / T)``.

    Args:
        margins: per volume, the logit of COVID-19 minus the logit of the other class (the
            log-odds of COVID-19 before scaling).
        labels: per volume, 0 or 1.
        bounds: the range searched.

    Returns:
        The fitted ``T``; 1 without volumes of both classes.
    """
    margins = np.asarray(margins, dtype=float).reshape(-1)
    labels = np.asarray(labels, dtype=float).reshape(-1)
    if margins.size != labels.size:
        raise ValueError(f"{margins.size} margins but {labels.size} labels")
    if not 0 < labels.sum() < labels.size:
        return 1.0

    def loss(log_t: float) -> float:
        scaled = margins / math.exp(log_t)
        return -float(np.mean(labels * log_expit(scaled) + (1 - labels) * log_expit(-scaled)))

    result = minimize_scalar(loss, bounds=tuple(math.log(b) for b in bounds), method="bounded")
    return float(math.exp(result.x))


class TemperatureCalibrator:
    """After each validation, fit the logit temperature and keep it where it lowers the validation ECE.

    Attach it to the validation evaluator after the
    :class:`~pipeline.workflow.slice_rule.SliceRuleCalibrator` and before the best-checkpoint
    saver. It reads each volume's logits (under the temperature in force) and label from the
    engine output, recovers the unscaled log-odds, fits ``T`` (:func:`fit_temperature`) and sets
    the network's ``calibration`` to it when the ECE of the scaled probabilities is below that of
    the unscaled ones, else to 1. Since the slice rule's volume threshold is a probability, a
    tuned threshold is carried over to the new temperature (the same volumes pass it).
    ``engine.state.metrics`` gains ``calibration_temperature`` (the ``T`` stored),
    ``calibration_ece_unscaled`` and ``calibration_ece`` (under that ``T``), of the validation
    split. Works across distributed processes.

    Args:
        network: the network whose ``calibration`` is set.
        enabled: ``False`` keeps ``T = 1`` (and still reports the unscaled ECE).
        rescale_slice_threshold: carry the slice rule's threshold over to the new temperature
            (``False`` when the threshold is fixed by the user).
        logits_key, label_key: keys in the engine output.
        bins: bins of the ECE.
    """

    def __init__(
        self,
        network: nn.Module,
        enabled: bool = True,
        rescale_slice_threshold: bool = True,
        logits_key: str = "logits",
        label_key: str = "label",
        bins: int = ECE_BINS,
    ) -> None:
        module = unwrap_network(network)
        if getattr(module, "calibration", None) is None:
            raise TypeError(f"{type(module).__name__} has no calibration (temperature) to fit")
        self.network = module
        self.enabled = enabled
        self.rescale_slice_threshold = rescale_slice_threshold
        self.logits_key = logits_key
        self.label_key = label_key
        self.bins = bins
        self._margins: list[float] = []
        self._labels: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the volumes of the previous validation."""
        self._margins, self._labels = [], []

    def collect(self, engine: Engine) -> None:
        """Keep each volume's log-odds of COVID-19 under the temperature in force, and its label."""
        output = engine.state.output
        items = output if isinstance(output, list) else decollate_batch(output, detach=True)
        for item in items:
            logits = torch.as_tensor(item[self.logits_key]).detach().float().reshape(-1).cpu()
            label = torch.as_tensor(item[self.label_key]).detach().reshape(-1).cpu()
            self._margins.append(float(logits[-1] - logits[0]))
            self._labels.append(float(label[-1] if label.numel() > 1 else label[0]))

    def __call__(self, engine: Engine) -> None:
        current = float(self.network.calibration.temperature)
        margins = gather_values(self._margins) * current  # the unscaled log-odds
        labels = gather_values(self._labels)
        if margins.size == 0:
            return
        unscaled = float(expected_calibration_error(expit(margins), labels, self.bins))
        fitted = fit_temperature(margins, labels) if self.enabled else 1.0
        scaled = float(expected_calibration_error(expit(margins / fitted), labels, self.bins))
        temperature = fitted if scaled < unscaled else 1.0
        rule = getattr(self.network, "slice_rule", None)
        if self.rescale_slice_threshold and rule is not None and temperature != current:
            threshold = float(np.clip(float(rule.threshold), 1e-12, 1 - 1e-12))
            rule.set(threshold=float(expit(logit(threshold) * current / temperature)))
        self.network.calibration.set(temperature)
        engine.state.metrics["calibration_temperature"] = temperature
        engine.state.metrics["calibration_ece_unscaled"] = unscaled
        engine.state.metrics["calibration_ece"] = scaled if temperature != 1.0 else unscaled
