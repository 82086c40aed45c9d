"""Temperature scaling of the classifier's logits (Guo et al., 2017), kept in the state dict.

Dividing the logits by a temperature ``T`` changes no decision (the class with the larger logit
stays the larger) and no ranking (the ROC AUC is unchanged), only how sure the probabilities
are: ``T > 1`` softens an over-confident network. ``T`` is a buffer, so a value fitted on
validation data travels with the weights, in checkpoints and TorchScript exports; it applies in
evaluation mode only, so training's loss always sees the raw logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TemperatureScaling"]


class TemperatureScaling(nn.Module):
    """``logits / T`` in evaluation mode, the logits unchanged in training mode.

    A state dict saved before the module existed loads with ``T = 1`` (no scaling).

    Args:
        temperature: the initial ``T`` (1: no scaling).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(1.0))
        self.set(temperature)

    def set(self, temperature: float) -> None:
        """Change ``T`` in place."""
        if not temperature > 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        with torch.no_grad():
            self.temperature.fill_(float(temperature))

    def forward(self, logits: Tensor) -> Tensor:
        if self.training:
            return logits
        return logits / self.temperature

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict.setdefault(prefix + "temperature", torch.ones_like(self.temperature))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4g}"
