"""Loading of ImageNet weights saved in torchvision's ``resnext50_32x4d`` state-dict layout.

Nothing is ever downloaded: the weights must be a local file, read with
``torch.load(weights_only=True)``. The classification head (``fc.*``) is skipped and the RGB
stem kernel is summed over its three input channels, which gives the response of the
pretrained stem to a grey image repeated on all three channels.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from networks.checkpoint_contents import describe_contents, require_model_weights
from networks.resnext import ResNeXt

__all__ = ["PretrainedLoadResult", "load_pretrained"]

logger = logging.getLogger(__name__)

SKIPPED_PREFIXES = ("fc.",)
STEM_KEY = "conv1.weight"


class PretrainedLoadResult(NamedTuple):
    """Keys that did not match between the file and the backbone.

    Attributes:
        missing_keys: backbone tensors that the file did not provide (left as initialised).
        unexpected_keys: tensors in the file that the backbone has no place for (ignored).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


def _find_backbone(model: nn.Module) -> ResNeXt:
    if isinstance(model, ResNeXt):
        return model
    for module in model.modules():
        if isinstance(module, ResNeXt):
            return module
    raise TypeError(f"{type(model).__name__} contains no ResNeXt backbone to load weights into")


def _adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Sum an RGB stem kernel over its input channels when the backbone takes one channel."""
    if weight.ndim == 4 and weight.shape[1] != in_channels and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> PretrainedLoadResult:
    """Load a local torchvision ``resnext50_32x4d`` state dict into a ResNeXt backbone.

    Args:
        model: a :class:`~networks.resnext.ResNeXt`, or a module containing one (such as
            :class:`~networks.resnext_plus.ResNextPlus`); only the backbone is loaded.
        path: local file holding the state dict (keys ``conv1.weight``, ``bn1.*``,
            ``layer1.0.conv1.weight``, ...).

    Returns:
        The missing and unexpected keys (``fc.*`` is skipped, not reported); both are also
        logged as a warning when not empty.

    Raises:
        FileNotFoundError: the file does not exist (no download is attempted).
        NoModelWeightsError: the file holds no ResNeXt weights (a ``ValueError``; the one-line
            message says what the file holds).
        ValueError: the file holds values other than tensors, holds pickled Python objects (refused
            unread: it is loaded with ``weights_only=True``), or a tensor's shape differs from the
            backbone's (every such key is named with both shapes).
        TypeError: ``model`` holds no ResNeXt backbone.
    """
    backbone = _find_backbone(model)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {file} (a local file in torchvision's resnext50_32x4d "
            "state-dict layout is required; nothing is downloaded)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"pickled Python objects ({found.group(1)})" if found else "data that is not plain tensors"
        raise ValueError(
            f"{file}: refused: the file holds {what}, and pretrained weights are loaded as weights only "
            "(torch.load weights_only=True); nothing in it was run"
        ) from None
    require_model_weights(state, backbone, os.fspath(file))
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors: {describe_contents(state)}")

    target = backbone.state_dict()
    source = {k: v for k, v in state.items() if not k.startswith(SKIPPED_PREFIXES)}
    if STEM_KEY in source and STEM_KEY in target:
        source[STEM_KEY] = _adapt_stem(source[STEM_KEY], target[STEM_KEY].shape[1])

    mismatched = [
        f"{key}: file {list(value.shape)} vs backbone {list(target[key].shape)}"
        for key, value in source.items()
        if key in target and value.shape != target[key].shape
    ]
    if mismatched:
        raise ValueError(f"shape mismatch loading {file}:\n  " + "\n  ".join(mismatched))

    missing = [key for key in target if key not in source]
    unexpected = [key for key in source if key not in target]
    backbone.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    if missing:
        logger.warning("%s: %d backbone tensors missing (kept): %s", file, len(missing), missing)
    if unexpected:
        logger.warning("%s: %d unexpected tensors ignored: %s", file, len(unexpected), unexpected)
    return PretrainedLoadResult(missing, unexpected)
