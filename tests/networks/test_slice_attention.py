"""Slice attention (eqs. 18-19) and the uniform mean used without it."""

from __future__ import annotations

import torch

from networks import MeanSlicePooling, SliceAttention


def test_attention_matches_equations_18_and_19():
    torch.manual_seed(0)
    module = SliceAttention(in_features=16, hidden_features=8)
    features = torch.randn(3, 5, 16)
    scores = torch.tanh(features @ module.project.weight.T + module.project.bias) @ module.score.weight.T
    expected_weights = torch.softmax(scores.squeeze(-1), dim=1)
    pooled, weights = module(features)
    assert weights.shape == (3, 5) and pooled.shape == (3, 16)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(pooled, (expected_weights[..., None] * features).sum(dim=1))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert torch.all(weights > 0)


def test_attention_follows_slice_order_and_is_uniform_on_identical_slices():
    torch.manual_seed(0)
    module = SliceAttention(in_features=8)
    features = torch.randn(1, 6, 8)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    _, weights = module(features)
    _, permuted = module(features[:, order])
    torch.testing.assert_close(permuted, weights[:, order])
    _, same = module(features[:, :1].expand(1, 4, 8))
    torch.testing.assert_close(same, torch.full((1, 4), 0.25))


def test_single_slice_gets_all_attention():
    features = torch.randn(2, 1, 4)
    pooled, weights = SliceAttention(in_features=4)(features)
    torch.testing.assert_close(weights, torch.ones(2, 1))
    torch.testing.assert_close(pooled, features[:, 0])


def test_mean_pooling_is_uniform():
    features = torch.randn(2, 7, 5)
    pooled, weights = MeanSlicePooling()(features)
    torch.testing.assert_close(pooled, features.mean(dim=1))
    torch.testing.assert_close(weights, torch.full((2, 7), 1 / 7))
