"""Pooling of per-slice features into one volume descriptor.

:class:`SliceAttention` is the paper's slice attention (eqs. 18-19): a two-layer scorer
``w^T tanh(V f_n)`` gives one score per slice, a softmax over the slices turns the scores into
weights ``alpha_n`` and the volume descriptor is ``S = sum_n alpha_n f_n``.
:class:`MeanSlicePooling` is the ablation without slice attention (N-SLA): the plain mean,
reported with uniform weights so that both modules share one interface. :class:`SliceRule`
holds the threshold of the slice rule that reads the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MeanSlicePooling", "SliceAttention", "SliceRule"]


class SliceAttention(nn.Module):
    """Attention-weighted sum over slices.

    Args:
        in_features: size of each slice's feature vector (1024 after the bidirectional LSTM).
        hidden_features: size of the scorer's hidden layer (``V`` maps ``in_features`` to it);
            the paper does not state it.
        temperature: the scores are divided by it before the softmax; above 1 the weights
            spread over more slices (1: the paper's attention).

    Shape:
        ``(B, S, F) -> ((B, F), (B, S))``: the pooled features and the weights, which are
        positive and sum to one over the ``S`` slices of each volume.
    """

    def __init__(self, in_features: int, hidden_features: int = 128, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.project = nn.Linear(in_features, hidden_features)
        self.score = nn.Linear(hidden_features, 1, bias=False)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score(torch.tanh(self.project(features))).squeeze(-1)
        weights = torch.softmax(scores / self.temperature, dim=1)
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


class SliceRule(nn.Module):
    """The operating point of the slice rule, kept in the network's state dict.

    A slice is called positive when its volume's COVID-19 probability is at least
    ``threshold`` and its attention weight times the number of slices scored exceeds ``tau``
    (the paper's rule is ``tau = 1``, ``threshold = 0.5``). The values are buffers, so a rule
    tuned on validation data travels with the weights: in checkpoints and TorchScript exports.

    Args:
        tau: threshold factor on the attention, in units of a uniform share ``1 / N``.
        threshold: probability of COVID-19 at or above which a volume's slices may be called.
    """

    def __init__(self, tau: float = 1.0, threshold: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def set(self, tau: float | None = None, threshold: float | None = None) -> None:
        """Change ``tau`` and/or ``threshold`` in place (``None`` keeps a value)."""
        with torch.no_grad():
            if tau is not None:
                self.tau.fill_(float(tau))
            if threshold is not None:
                self.threshold.fill_(float(threshold))

    def extra_repr(self) -> str:
        return f"tau={float(self.tau):.4g}, threshold={float(self.threshold):.4g}"
