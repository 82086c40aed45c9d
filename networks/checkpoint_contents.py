"""What a loaded checkpoint file holds, and a one-line refusal when it holds no weights of a model.

A ``.pt`` file is not always a checkpoint: a cached data item of ``PersistentDataset`` (an image,
its mask, its label) or a training state saved under other names loads just as well. Loading
such a file with ``load_state_dict`` reports every key of the model as missing; instead,
:func:`require_model_weights` says in one line that the file holds none of the model's weights
and what it does hold (:func:`describe_contents`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["NoModelWeightsError", "describe_contents", "require_model_weights"]

MAX_ENTRIES_SHOWN = 6
DATA_ITEM_KEYS = frozenset({"image", "label", "mask"})
"""Keys of a data item: a file holding these is a (cached) dataset item, not a checkpoint."""


class NoModelWeightsError(ValueError):
    """A file loaded as a model's weights holds none of that model's tensors."""


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        shape = "x".join(str(n) for n in value.shape) or "scalar"
        return f"{type(value).__name__} {shape} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict of {len(value)} entries, {tensors} tensors"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def describe_contents(obj: Any) -> str:
    """A one-line summary of a loaded file's top level: type, size and its first entries.

    Args:
        obj: what ``torch.load`` returned.

    Returns:
        For example ``"a dict of 4 entries (a data item: image, label, mask; not a checkpoint):
        image (MetaTensor 1x32x32x8 float32), label (int), ..."``.
    """
    if isinstance(obj, Mapping):
        shown = [f"{key} ({_describe_value(value)})" for key, value in list(obj.items())[:MAX_ENTRIES_SHOWN]]
        more = f", ... {len(obj) - MAX_ENTRIES_SHOWN} more" if len(obj) > MAX_ENTRIES_SHOWN else ""
        item_keys = sorted(DATA_ITEM_KEYS & {str(key) for key in obj})
        kind = f" (a data item: {', '.join(item_keys)}; not a checkpoint)" if len(item_keys) >= 2 else ""
        return f"a dict of {len(obj)} entries{kind}: {', '.join(shown)}{more}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {_describe_value(obj)}"


def require_model_weights(state: Any, model: nn.Module, source: str) -> None:
    """Raise :class:`NoModelWeightsError` unless ``state`` is a state dict sharing tensors with ``model``.

    Only a file with none of the model's parameter or buffer names is refused here; a state dict of
    the right model with some keys or shapes that differ is left to ``load_state_dict`` to report.

    Args:
        state: what was loaded for ``model`` (the file, or its entry for the model).
        model: the module the weights are meant for; its class names it in the message.
        source: the file, for the message.

    Raises:
        NoModelWeightsError: one line naming the file, the model and what the file holds.
    """
    if isinstance(state, Mapping) and any(
        isinstance(state.get(key), torch.Tensor) for key in model.state_dict()
    ):
        return
    name = type(model).__name__
    raise NoModelWeightsError(f"{source}: holds no {name} weights; it holds {describe_contents(state)}")
