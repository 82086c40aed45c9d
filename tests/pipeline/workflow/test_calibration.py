"""Expected calibration error and reliability bins, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.workflow.calibration import expected_calibration_error, reliability_bins


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
