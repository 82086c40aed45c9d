"""Volume- and slice-level metrics: the numbers by hand, the slice rule, real Ignite engines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import ROCAUC

from pipeline.workflow.metrics import (
    SliceMetrics,
    VolumeMetrics,
    binary_metrics,
    score_and_label,
    slice_baselines,
    slice_predictions,
)


def test_binary_metrics_match_the_confusion_matrix() -> None:
    labels = [0, 0, 0, 1, 1, 1, 1]
    predictions = [0, 1, 0, 1, 1, 0, 1]  # TN 2, FP 1, FN 1, TP 3
    scores = [0.1, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7]

    result = binary_metrics(labels, predictions, scores)

    assert result["confusion_matrix"] == [[2, 1], [1, 3]]
    assert result["count"] == 7
    assert result["acc"] == pytest.approx(5 / 7)
    assert result["pre"] == pytest.approx(3 / 4)
    assert result["rec"] == result["sen"] == pytest.approx(3 / 4)
    assert result["spe"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    # 12 positive/negative pairs; only the negative 0.6 outranks the positive 0.3
    assert result["auc"] == pytest.approx(11 / 12)


@pytest.mark.parametrize("kind", [np.array, torch.tensor, list])
def test_binary_metrics_accept_numpy_torch_and_lists(kind) -> None:
    result = binary_metrics(kind([1, 0]), kind([1, 1]), kind([0.9, 0.4]))

    assert result["confusion_matrix"] == [[0, 1], [0, 1]]
    assert result["auc"] == 1.0


def test_undefined_ratios_are_nan() -> None:
    result = binary_metrics([0, 0, 0], [0, 0, 0], [0.1, 0.2, 0.3])

    assert result["acc"] == 1.0 and result["spe"] == 1.0
    assert math.isnan(result["pre"]) and math.isnan(result["sen"])
    assert math.isnan(result["auc"])  # one class only


def test_binary_metrics_refuse_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="2 labels but 3 predictions"):
        binary_metrics([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        binary_metrics([0, 2], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        binary_metrics([0, 1], [0, 1], [0.2, float("nan")])


def test_slice_rule_needs_a_positive_volume_and_more_than_tau_over_n() -> None:
    attention = np.array([0.1, 0.25, 0.3, 0.35])  # uniform share: 0.25

    assert slice_predictions(attention, True).tolist() == [0, 0, 1, 1]  # strictly above 1/N
    assert slice_predictions(attention, True, tau=1.3).tolist() == [0, 0, 0, 1]
    assert slice_predictions(torch.tensor(attention), False).tolist() == [0, 0, 0, 0]


def _engine(outputs: list[list[dict]], batches: list[list[dict]]) -> Engine:
    """An Ignite engine whose iterations yield the given decollated outputs and batches."""

    def step(engine: Engine, index: int) -> list[dict]:
        engine.state.batch = batches[index]
        return outputs[index]

    return Engine(step)


def test_volume_metrics_on_an_engine() -> None:
    outputs = [
        [{"pred": torch.tensor([0.2, 0.8]), "label": torch.tensor(1)}],
        [{"pred": torch.tensor([0.6, 0.4]), "label": torch.tensor(1)}],
        [{"pred": torch.tensor([0.9, 0.1]), "label": torch.tensor(0)}],
    ]
    engine = _engine(outputs, [[{}]] * 3)
    VolumeMetrics().attach(engine, "volume")

    engine.run(range(3))

    metrics = engine.state.metrics
    assert metrics["volume_confusion_matrix"] == [[1, 0], [1, 1]]
    assert metrics["volume_acc"] == pytest.approx(2 / 3)
    assert metrics["volume_sen"] == pytest.approx(0.5) and metrics["volume_spe"] == 1.0
    assert metrics["volume_auc"] == 1.0
    assert metrics["volume"]["volume_count"] == 3


def test_volume_metrics_take_batches_and_one_hot_labels() -> None:
    metric = VolumeMetrics(threshold=0.7)
    metric.update((torch.tensor([[0.4, 0.6], [0.1, 0.9]]), torch.tensor([[0, 1], [0, 1]])))

    result = metric.compute()

    assert result["volume_confusion_matrix"] == [[0, 0], [1, 1]]  # 0.6 is below the threshold


def test_volume_metrics_refuse_non_finite_probabilities() -> None:
    with pytest.raises(ValueError, match="not finite"):
        VolumeMetrics().update(([torch.tensor([float("nan"), float("nan")])], [torch.tensor(1)]))


def test_slice_metrics_apply_the_rule_and_read_slice_labels_from_the_batch() -> None:
    outputs = [
        # positive volume predicted positive: slices 1 and 2 above 1/4
        [{"pred": torch.tensor([0.1, 0.9]), "attention": torch.tensor([0.1, 0.4, 0.3, 0.2]), "label": 1}],
        # negative volume predicted negative: no positive slice whatever the attention
        [{"pred": torch.tensor([0.8, 0.2]), "attention": torch.tensor([0.7, 0.1, 0.1, 0.1]), "label": 0}],
        # no slice labels: not counted
        [{"pred": torch.tensor([0.1, 0.9]), "attention": torch.tensor([0.5, 0.5]), "label": 1}],
    ]
    batches = [
        [{"slice_labels": torch.tensor([0, 1, 0, 0])}],
        [{"slice_labels": torch.tensor([0, 0, 0, 0])}],
        [{}],
    ]
    engine = _engine(outputs, batches)
    SliceMetrics(tau=1.0).attach(engine, "slice")

    engine.run(range(3))

    metrics = engine.state.metrics
    assert metrics["slice_volumes"] == 2 and metrics["slice_count"] == 8
    assert metrics["slice_confusion_matrix"] == [[6, 1], [0, 1]]
    assert metrics["slice_pre"] == pytest.approx(0.5) and metrics["slice_sen"] == 1.0
    # attention AUC over the positive volume's slices: the labelled slice has the top weight
    assert metrics["slice_auc"] == 1.0


def test_slice_baselines_on_a_known_case() -> None:
    # A: positive, called, 2 of 4 slices diseased; B: negative, called; C: positive, missed.
    labels = [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # volumes A, B, C of 4 slices
    in_positive = [1] * 4 + [0] * 4 + [1] * 4
    called = [1] * 4 + [1] * 4 + [0] * 4

    result = slice_baselines(labels, in_positive, called)

    assert result["prevalence"] == pytest.approx(3 / 12)
    assert result["prevalence_positive"] == pytest.approx(3 / 8)
    # every slice of A and B called: TP 2, FP 6, FN 1
    assert result["trivial_f1"] == pytest.approx(2 * 2 / (2 * 2 + 6 + 1))


def test_slice_baselines_without_slices_are_nan() -> None:
    result = slice_baselines([], [], [])
    assert all(math.isnan(value) for value in result.values())


def test_slice_metrics_report_prevalence_and_the_trivial_rule() -> None:
    metric = SliceMetrics(tau=1.0, threshold=0.5)
    metric.update((torch.tensor([0.1, 0.9]), torch.tensor([0.1, 0.4, 0.3, 0.2]), [1, 1, 0, 0], 1))
    metric.update((torch.tensor([0.3, 0.7]), torch.tensor([0.4, 0.2, 0.2, 0.2]), [0, 0, 0, 0], 0))
    metric.update((torch.tensor([0.7, 0.3]), torch.tensor([0.7, 0.1, 0.1, 0.1]), [1, 0, 0, 0], 1))

    result = metric.compute()

    assert result["slice_prevalence"] == pytest.approx(0.25)
    assert result["slice_prevalence_positive"] == pytest.approx(0.375)
    assert result["slice_trivial_f1"] == pytest.approx(4 / 11)
    # the attention rule: slice 1 and 2 of the first volume, slice 0 of the second
    assert result["slice_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))


def test_slice_metrics_check_lengths() -> None:
    metric = SliceMetrics()

    with pytest.raises(ValueError, match="3 slice labels for 2 attention weights"):
        metric.update((torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), [0, 1, 0], 1))
    with pytest.raises(ValueError, match="tau must be positive"):
        SliceMetrics(tau=0)


def test_slice_metrics_without_slice_labels_are_nan() -> None:
    metric = SliceMetrics()
    metric.update((torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), None, 1))

    result = metric.compute()

    assert result["slice_count"] == 0 and result["slice_volumes"] == 0
    assert math.isnan(result["slice_acc"]) and math.isnan(result["slice_auc"])


def test_score_and_label_feed_monai_rocauc() -> None:
    outputs = [
        [{"pred": torch.tensor([0.3, 0.7]), "label": torch.tensor(1)}],
        [{"pred": torch.tensor([0.4, 0.6]), "label": torch.tensor(0)}],
        [{"pred": torch.tensor([0.9, 0.1]), "label": torch.tensor(0)}],
    ]
    engine = _engine(outputs, [[{}]] * 3)
    ROCAUC(output_transform=score_and_label).attach(engine, "val_auc")

    engine.run(range(3))

    assert engine.state.metrics["val_auc"] == pytest.approx(1.0)
