"""Bootstrap intervals: a case whose bootstrap distribution is known, degenerate cases, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap

from pipeline.workflow.intervals import (
    BootstrapSettings,
    bootstrap_intervals,
    slice_intervals,
    volume_intervals,
)
from pipeline.workflow.metrics import SliceMetrics, VolumeMetrics, binary_metrics

SETTINGS = BootstrapSettings(resamples=4000, seed=0)


def test_known_case_matches_the_hand_computed_percentile_bootstrap() -> None:
    # Two positives (one found, one missed) and two negatives (both right). Resampled within each
    # class, the negatives stay right and the positives found are Binomial(2, 1/2): SEN takes 0,
    # 1/2, 1 with probabilities 1/4, 1/2, 1/4 and ACC = (found + 2) / 4 takes 1/2, 3/4, 1. The
    # 2.5th and 97.5th percentiles are the extremes; SPE and PRE never move.
    intervals = volume_intervals([1, 1, 0, 0], [1, 0, 0, 0], [0.9, 0.4, 0.3, 0.1], SETTINGS)
    assert intervals["sen_ci"] == [0.0, 1.0]
    assert intervals["acc_ci"] == [0.5, 1.0]
    assert intervals["spe_ci"] == [1.0, 1.0]
    assert intervals["pre_ci"] == [1.0, 1.0]  # resamples without a predicted positive are left out
    assert intervals["auc_ci"] == [1.0, 1.0]  # every positive scores above every negative


def test_intervals_equal_scipy_percentile_bootstrap_of_the_same_statistic() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat([1, 0], 30)
    scores = np.clip(0.3 * labels + rng.random(60) * 0.7, 0, 1)
    predictions = (scores >= 0.5).astype(int)
    ours = volume_intervals(labels, predictions, scores, BootstrapSettings(resamples=500, seed=7))
    correct = (predictions == labels).astype(float)

    def accuracy(negative: np.ndarray, positive: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.concatenate([correct[negative], correct[positive]], axis=-1).mean(axis=-1)

    reference = bootstrap(  # the strata in ascending label order: negatives, then positives
        (np.arange(30, 60), np.arange(30)),
        accuracy,
        n_resamples=500,
        vectorized=True,
        method="percentile",
        rng=np.random.default_rng(7),
    ).confidence_interval
    assert ours["acc_ci"] == pytest.approx([reference.low, reference.high])


def test_point_estimate_lies_in_the_interval_and_seeds_reproduce() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    scores = np.clip(0.4 * labels + 0.6 * rng.random(80), 0, 1)
    predictions = (scores >= 0.5).astype(int)
    point = binary_metrics(labels, predictions, scores)
    first = volume_intervals(labels, predictions, scores, BootstrapSettings(resamples=1000, seed=1))
    for name in ("acc", "sen", "spe", "f1", "auc"):
        low, high = first[f"{name}_ci"]
        assert low < point[name] < high
    assert volume_intervals(labels, predictions, scores, BootstrapSettings(resamples=1000, seed=1)) == first
    assert volume_intervals(labels, predictions, scores, BootstrapSettings(resamples=1000, seed=2)) != first


def test_one_volume_per_class_gives_a_point_interval() -> None:
    intervals = volume_intervals([1, 0], [1, 1], [0.8, 0.6], SETTINGS)
    assert intervals["acc_ci"] == [0.5, 0.5]
    assert intervals["spe_ci"] == [0.0, 0.0]
    assert intervals["auc_ci"] == [1.0, 1.0]


def test_one_class_only_leaves_the_auc_undefined() -> None:
    intervals = volume_intervals([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.7], SETTINGS)
    assert intervals["auc_ci"] is None
    assert intervals["spe_ci"] is None
    assert intervals["sen_ci"] == [pytest.approx(0.0), 1.0]


def test_slice_intervals_resample_volumes_with_their_slices() -> None:
    # Volume 0 (positive) has both of its lesion slices found; volume 1 (positive) has its one
    # lesion slice missed; volume 2 (negative) is clean. Resampling volumes (positives within
    # their class), the slice SEN is 2/2 when only volume 0 is drawn, 0/2 when only volume 1,
    # and 2/3 with one of each: never 1/3 or 1/2, as it would be were slices drawn one by one.
    volume = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0])
    calls = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([1.2, 1.5, 0.3, 0.5, 1.3, 1.2, 1.0, 1.0, 1.0])
    intervals = slice_intervals(volume, [1, 1, 0], labels, calls, scores, SETTINGS)
    assert intervals["sen_ci"] == [0.0, 1.0]
    seen: set[float] = set()

    def sensitivity(weights: np.ndarray) -> dict[str, np.ndarray]:
        found = weights @ np.array([2.0, 0.0, 0.0])
        lesions = weights @ np.array([2.0, 1.0, 0.0])
        seen.update(np.round(found / lesions, 6).tolist())
        return {"sen": found / lesions}

    bootstrap_intervals(sensitivity, [1, 1, 0], SETTINGS)
    assert seen <= {0.0, round(2 / 3, 6), 1.0}
    assert intervals["spe_ci"][1] == 1.0
    # the AUC over the positive volumes' slices: volume 0 alone ranks perfectly, volume 1
    # alone worst, both together in between
    assert intervals["auc_ci"][0] == 0.0 and intervals["auc_ci"][1] == 1.0


def test_settings_are_checked() -> None:
    assert BootstrapSettings(resamples=0).resamples == 0
    with pytest.raises(ValueError, match="confidence level"):
        BootstrapSettings(confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSettings(resamples=-1)


def test_volume_and_slice_metrics_report_intervals_and_ece() -> None:
    volume = VolumeMetrics(bootstrap_resamples=500, bootstrap_seed=0)
    slices = SliceMetrics(tau=1.0, threshold=0.5, bootstrap_resamples=500, bootstrap_seed=0)
    cases = [  # (P(COVID-19), label, attention, slice labels)
        (0.9, 1, [0.1, 0.6, 0.3], [0, 1, 1]),
        (0.7, 1, [0.5, 0.3, 0.2], [1, 0, 0]),
        (0.2, 0, [0.4, 0.3, 0.3], [0, 0, 0]),
        (0.4, 0, [0.3, 0.3, 0.4], [0, 0, 0]),
    ]
    for probability, label, attention, slice_labels in cases:
        pred = torch.tensor([1 - probability, probability])
        volume.update(([pred], [torch.tensor(label)]))
        slices.update((pred, torch.tensor(attention), slice_labels, label))

    volume_result, slice_result = volume.compute(), slices.compute()

    # every volume is right: the intervals of ACC and AUC are points
    assert volume_result["volume_acc_ci"] == [1.0, 1.0] and volume_result["volume_auc_ci"] == [1.0, 1.0]
    # ECE over ten bins: each volume alone in its bin, |label - p| averaged
    assert volume_result["volume_ece"] == pytest.approx((0.1 + 0.3 + 0.2 + 0.4) / 4)
    low, high = volume_result["volume_ece_ci"]
    assert low <= volume_result["volume_ece"] <= high
    for name in ("acc", "f1", "sen", "spe", "auc"):
        low, high = slice_result[f"slice_{name}_ci"]
        assert low <= slice_result[f"slice_{name}"] <= high


def test_metrics_without_resamples_have_no_intervals() -> None:
    metric = VolumeMetrics()
    metric.update(([torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])], [torch.tensor(1), torch.tensor(0)]))
    assert not any(key.endswith("_ci") for key in metric.compute())
