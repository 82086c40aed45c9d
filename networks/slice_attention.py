"""Pooling of per-slice features into one volume descriptor.

:class:`SliceAttention` is the paper's slice attention (eqs. 18-19): a two-layer scorer
``w^T tanh(V f_n)`` gives one score per slice, a softmax over the slices turns the scores into
weights ``alpha_n`` and the volume descriptor is ``S = sum_n alpha_n f_n``.
:class:`MeanSlicePooling` is the ablation without slice attention (N-SLA): the plain mean,
reported with uniform weights so that both modules share one interface.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MeanSlicePooling", "SliceAttention"]


class SliceAttention(nn.Module):
    """Attention-weighted sum over slices.

    Args:
        in_features: size of each slice's feature vector (1024 after the bidirectional LSTM).
        hidden_features: size of the scorer's hidden layer (``V`` maps ``in_features`` to it);
            the paper does not state it.

    Shape:
        ``(B, S, F) -> ((B, F), (B, S))``: the pooled features and the weights, which are
        positive and sum to one over the ``S`` slices of each volume.
    """

    def __init__(self, in_features: int, hidden_features: int = 128) -> None:
        super().__init__()
        self.project = nn.Linear(in_features, hidden_features)
        self.score = nn.Linear(hidden_features, 1, bias=False)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score(torch.tanh(self.project(features))).squeeze(-1)
        weights = torch.softmax(scores, dim=1)
        pooled = torch.bmm(weights.unsqueeze(1), features).squeeze(1)
        return pooled, weights


class MeanSlicePooling(nn.Module):
    """Mean over slices, with the uniform weights ``1 / S`` as its attention.

    Shape:
        ``(B, S, F) -> ((B, F), (B, S))``.
    """

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        weights = torch.full(
            features.shape[:2], 1.0 / features.shape[1], dtype=features.dtype, device=features.device
        )
        return features.mean(dim=1), weights
