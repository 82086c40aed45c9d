"""Expected calibration error and reliability bins, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from networks import SliceRule, TemperatureScaling
from pipeline.workflow.calibration import (
    TemperatureCalibrator,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def test_ece_by_hand() -> None:
    # bin [0.8, 0.9): probabilities 0.8, 0.85, labels 1, 0 -> |0.5 - 0.825| = 0.325, weight 2/4
    # bin [0.1, 0.2): 0.1 with label 0 -> 0.1, weight 1/4; bin [0.9, 1]: 1.0 with label 1 -> 0
    probabilities, labels = [0.8, 0.85, 0.1, 1.0], [1, 0, 0, 1]
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.325 / 2 + 0.1 / 4)


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    probabilities = np.repeat([0.25, 0.75], 4)
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)


def test_resample_weights_give_one_ece_per_row() -> None:
    probabilities, labels = np.array([0.8, 0.85, 0.1, 1.0]), np.array([1, 0, 0, 1])
    weights = np.array([[1, 1, 1, 1], [2, 0, 1, 1], [0, 0, 4, 0]])
    ece = expected_calibration_error(probabilities, labels, weights=weights)
    repeated = np.repeat(probabilities, weights[1]), np.repeat(labels, weights[1])
    assert ece[0] == pytest.approx(expected_calibration_error(probabilities, labels))
    assert ece[1] == pytest.approx(expected_calibration_error(*repeated))
    assert ece[2] == pytest.approx(0.1)


def test_reliability_bins_count_and_average() -> None:
    bins = reliability_bins([0.05, 0.07, 0.95, 1.0], [0, 1, 1, 1], bins=10)
    assert bins.counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins.mean_probability[0] == pytest.approx(0.06) and bins.positive_rate[0] == 0.5
    assert np.isnan(bins.mean_probability[1])
    with pytest.raises(ValueError, match="lie in"):
        reliability_bins([1.5], [1])


def test_fit_temperature_recovers_the_temperature_of_overconfident_log_odds() -> None:
    rng = np.random.default_rng(0)
    log_odds = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-log_odds))).astype(int)
    assert fit_temperature(3.0 * log_odds, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature([1.0, 2.0], [1, 1]) == 1.0  # one class: nothing to fit


class _Network(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calibration = TemperatureScaling()
        self.slice_rule = SliceRule(threshold=0.8)


def _validate(calibrator: TemperatureCalibrator, log_odds: np.ndarray, labels: np.ndarray) -> Engine:
    """One validation epoch whose outputs carry logits ``[0, log-odds / T]`` under the stored T."""
    temperature = float(calibrator.network.calibration.temperature)

    def step(engine: Engine, index: int) -> list[dict]:
        logits = torch.tensor([0.0, log_odds[index] / temperature])
        return [{"logits": logits, "label": torch.tensor(int(labels[index]))}]

    engine = Engine(step)
    calibrator.attach(engine)
    engine.run(range(len(labels)))
    return engine


def test_calibrator_keeps_a_temperature_that_lowers_the_validation_ece() -> None:
    rng = np.random.default_rng(1)
    log_odds = rng.normal(0, 2, 400)
    labels = (rng.random(400) < 1 / (1 + np.exp(-log_odds))).astype(int)
    network = _Network()
    calibrator = TemperatureCalibrator(network)

    engine = _validate(calibrator, 4.0 * log_odds, labels)  # over-confident by a factor 4

    temperature = float(network.calibration.temperature)
    assert temperature == pytest.approx(4.0, rel=0.25)
    metrics = engine.state.metrics
    assert metrics["calibration_temperature"] == pytest.approx(temperature)
    assert metrics["calibration_ece"] < metrics["calibration_ece_unscaled"]
    # the slice threshold 0.8 (log-odds 1.386 unscaled) is carried over: same volumes pass it
    assert float(network.slice_rule.threshold) == pytest.approx(1 / (1 + np.exp(-np.log(4) / temperature)))

    # a second validation sees the scaled logits, recovers the unscaled ones, fits the same T
    _validate(calibrator, 4.0 * log_odds, labels)
    assert float(network.calibration.temperature) == pytest.approx(temperature, rel=1e-4)


def test_a_disabled_calibrator_keeps_t_at_one_and_reports_the_ece() -> None:
    log_odds = np.array([-3.0, -1.0, 1.0, 3.0])
    labels = np.array([0, 0, 1, 1])
    network = _Network()
    calibrator = TemperatureCalibrator(network, enabled=False)
    engine = _validate(calibrator, log_odds, labels)
    assert float(network.calibration.temperature) == 1.0
    assert float(network.slice_rule.threshold) == pytest.approx(0.8)
    assert engine.state.metrics["calibration_ece"] == engine.state.metrics["calibration_ece_unscaled"]
    with pytest.raises(TypeError, match="no calibration"):
        TemperatureCalibrator(torch.nn.Linear(2, 2))
