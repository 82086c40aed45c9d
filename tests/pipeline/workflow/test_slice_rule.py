"""The slice rule tuned on validation: the search, the calibrator handler, the metric reading it back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from networks import ResNextPlus, SliceRule
from pipeline.workflow.metrics import SliceMetrics, slice_predictions
from pipeline.workflow.slice_rule import PAPER_RULE, SliceRuleCalibrator, network_slice_rule, tune_slice_rule


def slice_f1(probabilities, scores, labels, tau, threshold) -> float:
    called = (np.asarray(probabilities) >= threshold) & (np.asarray(scores) > tau)
    labels = np.asarray(labels).astype(bool)
    true_positives = int((called & labels).sum())
    return 2 * true_positives / (int(called.sum()) + int(labels.sum()))


def random_validation(seed: int, volumes: int = 12, slices: int = 8):
    """Volumes whose positive slices get more attention, with noisy volume probabilities."""
    rng = np.random.default_rng(seed)
    probabilities, scores, labels = [], [], []
    for _ in range(volumes):
        positive = rng.random() < 0.5
        truth = (rng.random(slices) < 0.6) & positive
        logits = rng.normal(size=slices) + 1.5 * truth
        attention = np.exp(logits) / np.exp(logits).sum()
        probability = float(np.clip(0.5 + (0.3 if positive else -0.3) + rng.normal(0, 0.25), 0, 1))
        probabilities += [probability] * slices
        scores += list(attention * slices)
        labels += list(truth.astype(int))
    return np.array(probabilities), np.array(scores), np.array(labels)


@pytest.mark.parametrize("seed", range(5))
def test_tuned_rule_is_the_best_of_every_cut(seed):
    probabilities, scores, labels = random_validation(seed)
    tuned = tune_slice_rule(probabilities, scores, labels)
    assert tuned.f1 == pytest.approx(slice_f1(probabilities, scores, labels, tuned.tau, tuned.threshold))
    # brute force over every score and probability as a cut point, and just below each
    taus = np.concatenate([scores, scores - 1e-9, [scores.min() - 1]])
    thresholds = np.concatenate([probabilities, [probabilities.max() + 1]])
    best = max(slice_f1(probabilities, scores, labels, t, v) for t, v in itertools.product(taus, thresholds))
    assert tuned.f1 == pytest.approx(best)
    assert tuned.f1 >= slice_f1(probabilities, scores, labels, *PAPER_RULE)


def test_tuned_rule_calls_more_slices_when_attention_is_peaked_but_lesions_are_wide():
    # 6 of 8 slices diseased in each positive volume, attention piled on two of them
    attention = np.array([0.01, 0.4, 0.35, 0.06, 0.06, 0.06, 0.05, 0.01])
    truth = np.array([0, 1, 1, 1, 1, 1, 1, 0])
    probabilities = np.repeat([0.9, 0.9, 0.2, 0.3], 8)
    scores = np.tile(attention * 8, 4)
    labels = np.concatenate([truth, truth, np.zeros(8, int), np.zeros(8, int)])
    paper = slice_f1(probabilities, scores, labels, *PAPER_RULE)
    tuned = tune_slice_rule(probabilities, scores, labels)
    assert paper == pytest.approx(2 * 4 / (4 + 12))
    assert tuned.f1 == pytest.approx(1.0)
    assert 0.08 < tuned.tau < 0.4 and 0.3 < tuned.threshold <= 0.9
    assert slice_predictions(attention, True, tuned.tau).tolist() == truth.tolist()


def test_calling_every_slice_keeps_tau_positive():
    # every slice of the positive volume is diseased: the best rule calls all of them
    scores = np.array([0.2, 1.5, 2.0, 0.3])
    tuned = tune_slice_rule([0.9] * 4 + [0.1] * 4, np.tile(scores, 2), [1] * 4 + [0] * 4)
    assert tuned.f1 == pytest.approx(1.0)
    assert tuned.tau == pytest.approx(0.1)
    assert slice_predictions(scores / 4, True, tuned.tau).all()


def test_without_positive_slices_the_paper_rule_stays():
    tuned = tune_slice_rule([0.9] * 4, [2.0, 1.0, 0.5, 0.5], [0, 0, 0, 0])
    assert (tuned.tau, tuned.threshold, tuned.f1) == (*PAPER_RULE, 0.0)
    with pytest.raises(ValueError, match="3 probabilities, 4 scores"):
        tune_slice_rule([0.9] * 3, [1.0] * 4, [1] * 4)


def test_network_carries_its_rule_in_state_dict_and_torchscript():
    network = ResNextPlus(lstm_hidden=8, fc_hidden=8)
    assert network_slice_rule(network) == PAPER_RULE
    network.slice_rule.set(tau=0.3, threshold=0.8)
    copy = ResNextPlus(lstm_hidden=8, fc_hidden=8)
    copy.load_state_dict(network.state_dict())
    assert network_slice_rule(copy) == pytest.approx((0.3, 0.8))
    assert network_slice_rule(torch.nn.DataParallel(copy)) == pytest.approx((0.3, 0.8))
    assert network_slice_rule(copy, tau=2.0) == pytest.approx((2.0, 0.8))
    scripted = torch.jit.script(copy.eval())
    assert float(scripted.slice_rule.tau) == pytest.approx(0.3)
    assert network_slice_rule(None) == PAPER_RULE


def test_calibrator_stores_the_tuned_rule_and_keeps_fixed_values():
    network = torch.nn.Module()
    network.slice_rule = SliceRule()
    engine = Engine(lambda engine, batch: None)
    engine.state.metrics = {"slice_tuned_tau": 0.4, "slice_tuned_threshold": 0.7}
    SliceRuleCalibrator(network)(engine)
    assert network_slice_rule(network) == pytest.approx((0.4, 0.7))
    SliceRuleCalibrator(network, threshold=0.5)(engine)
    assert network_slice_rule(network) == pytest.approx((0.4, 0.5))
    engine.state.metrics = {"slice_tuned_tau": float("nan"), "slice_tuned_threshold": float("nan")}
    SliceRuleCalibrator(network)(engine)  # no slice labels in validation: the rule stays
    assert network_slice_rule(network) == pytest.approx((0.4, 0.5))
    with pytest.raises(TypeError, match="no slice_rule"):
        SliceRuleCalibrator(torch.nn.Linear(2, 2))


def run_slice_metrics(metric: SliceMetrics, network: torch.nn.Module, volumes) -> dict:
    """Run ``metric`` on an engine that scores ``(probability, attention, slice_labels)`` volumes."""

    def step(engine: Engine, volume) -> list[dict]:
        probability, attention, labels = volume
        engine.state.batch = [{"slice_labels": torch.tensor(labels), "label": 1}]
        return [{"pred": torch.tensor([1 - probability, probability]), "attention": torch.tensor(attention)}]

    engine = Engine(step)
    engine.network = network
    metric.attach(engine, "slice")
    return engine.run(volumes).metrics


def test_slice_metrics_apply_the_networks_rule_and_tune_on_request():
    attention = [0.01, 0.4, 0.35, 0.06, 0.06, 0.06, 0.05, 0.01]
    labels = [0, 1, 1, 1, 1, 1, 1, 0]
    volumes = [(0.9, attention, labels)] * 3
    network = torch.nn.Module()
    network.slice_rule = SliceRule(tau=0.3, threshold=0.5)
    stored = run_slice_metrics(SliceMetrics(tau=None, threshold=None), network, volumes)
    assert (stored["slice_tau"], stored["slice_threshold"]) == pytest.approx((0.3, 0.5))
    assert stored["slice_rec"] == pytest.approx(1.0) and stored["slice_pre"] == pytest.approx(1.0)
    paper = run_slice_metrics(SliceMetrics(tune=True), network, volumes)
    assert paper["slice_rec"] == pytest.approx(2 / 6)
    assert paper["slice_tuned_f1"] == pytest.approx(1.0)
    assert 0.08 < paper["slice_tuned_tau"] < 0.4
