"""Temperature scaling: divides the logits in evaluation only, travels in the state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks import TemperatureScaling


def test_divides_in_eval_mode_only() -> None:
    scaling = TemperatureScaling(2.0)
    logits = torch.tensor([[1.0, -3.0]])
    assert torch.equal(scaling.eval()(logits), logits / 2)
    assert torch.equal(scaling.train()(logits), logits)
    with pytest.raises(ValueError, match="positive"):
        scaling.set(0.0)


def test_state_dicts_without_a_temperature_load_as_one() -> None:
    model = nn.Sequential(nn.Linear(2, 2), TemperatureScaling(3.0))
    saved = {k: v for k, v in model.state_dict().items() if not k.endswith("temperature")}
    model.load_state_dict(saved)  # strict: the missing temperature is not an error
    assert float(model[1].temperature) == 1.0
    other = nn.Sequential(nn.Linear(2, 2), TemperatureScaling())
    other.load_state_dict(nn.Sequential(nn.Linear(2, 2), TemperatureScaling(1.7)).state_dict())
    assert float(other[1].temperature) == pytest.approx(1.7)


def test_scriptable() -> None:
    scripted = torch.jit.script(TemperatureScaling(4.0).eval())
    assert torch.equal(scripted(torch.tensor([8.0])), torch.tensor([2.0]))
