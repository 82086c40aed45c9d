"""Grad-CAM of a volume's class logit over the in-plane feature maps of chosen slices.

In ResNext+ every slice goes through the CNN on its own and the slices only meet in the
BiLSTM after the CNN's pooled features. The gradient of the volume logit with respect to a
slice's CNN activations therefore factors into (logit -> that slice's pooled features), taken
once for the whole volume, and (pooled features -> activations), taken slice by slice. This
module computes exactly the map of MONAI's ``monai.visualize.GradCAM`` on a whole-volume forward
pass (ReLU of the gradient-weighted sum of the target layer's channels, upsampled bilinearly),
but only for the slices asked for and a chunk of slices at a time, so memory stays bounded on
long volumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["slice_grad_cam"]

DEFAULT_TARGET_LAYER = "encoder.backbone.layer4"


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def slice_grad_cam(
    model: nn.Module,
    volume: Tensor,
    slices: Sequence[int] | Tensor,
    target_layer: str = DEFAULT_TARGET_LAYER,
    class_index: int = 1,
    chunk: int | None = None,
) -> Tensor:
    """Grad-CAM maps of ``class_index``'s volume logit for some slices of one volume.

    ``model`` must have an ``encoder`` (slices ``(N, C, H, W)`` -> features ``(N, F)``) holding
    ``target_layer``, and ``classify_slice_features`` (``(1, S, F)`` -> logits, attention), as
    :class:`~networks.resnext_plus.ResNextPlus` has. It runs in eval mode (restored after).

    Args:
        model: the network.
        volume: ``(1, C, H, W, S)`` network input.
        slices: positions (along the last axis of ``volume``) of the slices to map.
        target_layer: dotted name of the module whose output maps are weighted.
        class_index: the logit explained (1: COVID-19).
        chunk: at most this many slices through the CNN at a time; ``None``: all at once.

    Returns:
        ``(len(slices), H, W)`` non-negative maps, not normalised, on ``volume``'s device.

    Raises:
        ValueError: ``volume`` is not one ``(1, C, H, W, S)`` volume, or ``chunk < 1``.
    """
    if volume.dim() != 5 or volume.shape[0] != 1:
        raise ValueError(f"expected one volume of shape (1, C, H, W, S), got {list(volume.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of slices or None, got {chunk}")
    height, width, depth = volume.shape[2:]
    positions = torch.as_tensor(slices, dtype=torch.long).reshape(-1)
    maps = volume.new_zeros((positions.numel(), height, width), dtype=torch.float32)
    if positions.numel() == 0:
        return maps
    step = chunk or depth
    layer = model.get_submodule(target_layer)
    all_slices = torch.as_tensor(volume).float().permute(0, 4, 1, 2, 3)[0]  # (S, C, H, W)

    with _eval_mode(model):
        with torch.no_grad():
            features = torch.cat([model.encoder(part.contiguous()) for part in all_slices.split(step)])
        with torch.enable_grad():
            features.requires_grad_(True)
            logits, _ = model.classify_slice_features(features[None])
            (feature_grads,) = torch.autograd.grad(logits[0, class_index], features)
            for start in range(0, positions.numel(), step):
                part = positions[start : start + step]
                maps[start : start + part.numel()] = _chunk_cam(
                    model, layer, all_slices[part], feature_grads[part], (height, width)
                )
    return maps


def _chunk_cam(
    model: nn.Module, layer: nn.Module, slices: Tensor, feature_grads: Tensor, size: tuple[int, int]
) -> Tensor:
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        # the input requires grad so that the activations are in the graph even with frozen weights
        features = model.encoder(slices.contiguous().requires_grad_(True))
    finally:
        handle.remove()
    activations = captured[-1]
    (grads,) = torch.autograd.grad(features, activations, grad_outputs=feature_grads)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
