"""Evaluation and inference output contract: volume logits together with the slice attention.

:class:`SliceAttentionInferer` calls the network's ``forward_with_attention`` on every slice of
the volume (no sampling; its ``slice_chunk`` bounds the memory) and returns
``{"logits": (B, 2), "attention": (B, S)}`` as the engine's ``"pred"``. Asked for the Grad-CAM
of the network's pooled layer (``grad_cam_layer``), it computes those maps in the same pass and
adds ``"cam": (B, S, h, w)`` (:func:`networks.grad_cam.attention_and_pooled_grad_cam`), so that
batch inference writes heatmaps without running the CNN again. On a CPU it can run the CNN
under bfloat16 autocast (``cpu_bf16``); on CUDA, MONAI's engines own mixed precision (``amp``).

:func:`attention_postprocessing` then flattens that dictionary. After it, for every iteration
of a :class:`~monai.engines.SupervisedEvaluator` (decollated, one dictionary per volume):

- ``engine.state.output[i]["pred"]``: class probabilities ``(2,)`` (softmax of the logits);
  stacked over a batch by ``from_engine(["pred"])`` they are ``(B, 2)``;
- ``engine.state.output[i]["logits"]``: the raw logits ``(2,)``;
- ``engine.state.output[i]["attention"]``: softmax weights ``(S,)`` over the slices scored,
  in the order of the network input (they sum to 1);
- ``engine.state.output[i]["cam"]``: with ``grad_cam_layer``, the Grad-CAM maps ``(S, h, w)``
  of the COVID-19 logit on that layer's grid, every slice;
- ``engine.state.output[i]["label"]``: the volume label, when the data has one;
- ``engine.state.batch[i]["image"].meta``: the image meta data (``filename_or_obj``, affine);
- ``engine.state.batch[i]["slice_indices"]``: for each scored slice, its index among the axial
  slices of the original volume (every slice in evaluation and inference);
- ``engine.state.batch[i]["slice_labels"]``: per-slice labels aligned with the scored slices,
  when the data list has them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from monai.inferers import Inferer
from monai.transforms import Activationsd, Compose, CopyItemsd, FlattenSubKeysd
from torch import nn

from networks.grad_cam import CAM_METHODS, POOLED_LAYER, attention_and_pooled_grad_cam
from pipeline.workflow.precision import cpu_has_native_bf16

__all__ = ["CpuBFloat16Inferer", "SliceAttentionInferer", "attention_postprocessing", "unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` wrappers, else ``network``."""
    while isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        network = network.module
    return network


class SliceAttentionInferer(Inferer):
    """Run ``network.forward_with_attention`` and return the logits with the slice attention.

    Args:
        slice_chunk: when given, the network's CNN runs over at most this many slices at a time
            during the call (its ``slice_chunk`` attribute is set, then restored), which bounds
            the memory of scoring long volumes without changing training. ``None`` keeps the
            network's own setting.
        grad_cam_layer: the layer whose Grad-CAM heatmaps are wanted, or ``None``. Maps of
            the pooled layer (:data:`networks.grad_cam.POOLED_LAYER`, the default heatmap layer)
            come from this same pass under ``cam_key``; any other layer is left to
            :func:`networks.grad_cam.slice_grad_cam`, which runs the CNN again.
        grad_cam_method: how those maps are weighted (:data:`networks.grad_cam.CAM_METHODS`).
        cpu_bf16: on a CPU, run the network under ``torch.autocast("cpu", dtype=torch.bfloat16)``
            (fast on CPUs with AVX-512 BF16 or AMX; see
            :func:`pipeline.workflow.precision.cpu_has_native_bf16`).
        logits_key: key of the logits in the returned dictionary.
        attention_key: key of the attention weights in the returned dictionary.
        cam_key: key of the Grad-CAM maps in the returned dictionary.
    """

    def __init__(
        self,
        slice_chunk: int | None = None,
        grad_cam_layer: str | None = None,
        grad_cam_method: str = "gradcam",
        cpu_bf16: bool = False,
        logits_key: str = "logits",
        attention_key: str = "attention",
        cam_key: str = "cam",
    ) -> None:
        super().__init__()
        if slice_chunk is not None and slice_chunk < 1:
            raise ValueError(f"slice_chunk must be a positive number of slices or None, got {slice_chunk}")
        self.slice_chunk = slice_chunk
        if grad_cam_method not in CAM_METHODS:
            raise ValueError(f"grad_cam_method must be one of {CAM_METHODS}, got {grad_cam_method!r}")
        self.grad_cam_layer = grad_cam_layer
        self.grad_cam_method = grad_cam_method
        self.cpu_bf16 = bool(cpu_bf16)
        if self.cpu_bf16 and not cpu_has_native_bf16():
            warnings.warn(
                "cpu_bf16: this CPU has no native bfloat16 arithmetic (AVX-512 BF16 or AMX); "
                "bfloat16 autocast will be emulated, slower than float32",
                stacklevel=2,
            )
        self.logits_key = logits_key
        self.attention_key = attention_key
        self.cam_key = cam_key

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict:
        """Score ``inputs`` ``(B, C, H, W, S)``.

        Returns:
            ``{logits_key: (B, num_classes), attention_key: (B, S)}``, and ``cam_key: (B, S, h, w)``
            when the pooled layer's Grad-CAM was asked for.

        Raises:
            TypeError: the network has no ``forward_with_attention`` method.
        """
        module = unwrap_network(network)
        forward = getattr(module, "forward_with_attention", None)
        if not callable(forward):
            raise TypeError(
                f"{type(module).__name__} has no forward_with_attention(x) -> (logits, attention) method"
            )
        autocast = torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16 and inputs.device.type == "cpu"
        )
        with _slice_chunk(module, self.slice_chunk), autocast:
            if self.grad_cam_layer == POOLED_LAYER:
                logits, attention, cams = attention_and_pooled_grad_cam(
                    module, inputs, pooled_layer=POOLED_LAYER, method=self.grad_cam_method
                )
                return {self.logits_key: logits, self.attention_key: attention, self.cam_key: cams}
            logits, attention = forward(inputs, *args, **kwargs)
        return {self.logits_key: logits, self.attention_key: attention}


class CpuBFloat16Inferer(Inferer):
    """``network(inputs)``, on a CPU under ``torch.autocast("cpu", dtype=torch.bfloat16)`` when enabled.

    The training counterpart of :class:`SliceAttentionInferer`'s ``cpu_bf16``: the weights and
    the optimiser stay float32, the convolutions run in bfloat16 (about 1.5x faster for a
    training step on CPUs with AMX), and ResNext+'s slice head stays float32. On CUDA, or when
    disabled, it is MONAI's ``SimpleInferer``; on CUDA the engines' ``amp`` sets the precision.

    Args:
        enabled: use bfloat16 autocast on a CPU.
    """

    def __init__(self, enabled: bool = False) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        if self.enabled and not cpu_has_native_bf16():
            warnings.warn(
                "bfloat16 training on a CPU without native bfloat16 arithmetic (AVX-512 BF16 or AMX) "
                "is emulated, slower than float32",
                stacklevel=2,
            )

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run ``network(inputs, *args, **kwargs)``."""
        enabled = self.enabled and inputs.device.type == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            return network(inputs, *args, **kwargs)


@contextlib.contextmanager
def _slice_chunk(module: nn.Module, chunk: int | None) -> Iterator[None]:
    """Set ``module.slice_chunk`` to ``chunk`` for the duration (unless ``None`` or not supported)."""
    if chunk is None or not hasattr(module, "slice_chunk"):
        yield
        return
    previous = module.slice_chunk
    module.slice_chunk = chunk
    try:
        yield
    finally:
        module.slice_chunk = previous


def attention_postprocessing(pred_key: str = "pred", logits_key: str = "logits") -> Compose:
    """Post-processing that turns :class:`SliceAttentionInferer`'s output into the contract above.

    Moves ``logits``, ``attention`` (and ``cam`` when present) out of ``pred`` to the top level,
    then stores the softmax of the logits as ``pred``.
    """
    return Compose(
        [
            FlattenSubKeysd(keys=pred_key, sub_keys=None),
            CopyItemsd(keys=logits_key, names=pred_key),
            Activationsd(keys=pred_key, softmax=True),
        ]
    )
