"""How the bundle's engines hand a batch to the network: plain tensors, moved to the device.

The data loader yields MONAI ``MetaTensor`` images, whose meta data (file name, affine) the
handlers read from ``engine.state.batch``. The network needs none of it, and every one of its
operations on a ``MetaTensor`` goes through MONAI's meta-data bookkeeping, forward and
backward: at the paper's sizes that cost a training step about half as much again as the
same step on plain tensors (``benchmarks/bench_profile.py``). :class:`PrepareNetworkBatch`
gives the network the plain tensor; ``engine.state.batch`` keeps the ``MetaTensor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.utils import convert_to_tensor

__all__ = ["PrepareNetworkBatch"]


def _plain(value: Any) -> Any:
    return convert_to_tensor(value, track_meta=False) if isinstance(value, torch.Tensor) else value


class PrepareNetworkBatch(PrepareBatch):
    """``prepare_batch`` for MONAI engines: image and label as plain tensors on the device.

    Same contract as MONAI's ``default_prepare_batch`` (``(image, label)``, label ``None``
    when the batch has none), with the meta data dropped from the returned tensors only; the
    image keeps its dtype (a compact float16 batch is cast by the network, on the device, after
    a half-size transfer).
    """

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor] | torch.Tensor | Sequence[torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prepared = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if isinstance(prepared, torch.Tensor):
            return _plain(prepared), None
        image, label = prepared
        return _plain(image), _plain(label)
