"""Grad-CAM of a volume's class logit over the in-plane feature maps of chosen slices.

In ResNext+ every slice goes through the CNN on its own and the slices only meet in the
BiLSTM after the CNN's pooled features. The gradient of the volume logit with respect to a
slice's CNN activations therefore factors into (logit -> that slice's pooled features), taken
once for the whole volume, and (pooled features -> activations), taken slice by slice. This
module computes exactly the map of MONAI's ``monai.visualize.GradCAM`` on a whole-volume forward
pass (ReLU of the gradient-weighted sum of the target layer's channels, upsampled bilinearly),
but only for the slices asked for and a chunk of slices at a time, so memory stays bounded on
long volumes.

For the last stage, whose global average pool is the slice feature, the chain rule needs no
second pass at all: the gradient of the logit with respect to that stage's maps is the
gradient with respect to the pooled feature spread evenly over the map's cells.
:func:`attention_and_pooled_grad_cam` therefore returns the logits, the attention and every
slice's map from one inference pass (the stage's maps kept by a hook, one backward through
the small BiLSTM head), equal to :func:`slice_grad_cam` for that layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "CAM_METHODS",
    "DEFAULT_TARGET_LAYER",
    "POOLED_LAYER",
    "attention_and_pooled_grad_cam",
    "class_activation_map",
    "slice_grad_cam",
]

POOLED_LAYER = "encoder.backbone.layer4"
"""ResNext+'s last ResNeXt stage: its global average pool is the slice feature."""
DEFAULT_TARGET_LAYER = POOLED_LAYER
CAM_METHODS = ("gradcam", "gradcampp", "layercam")
"""How :func:`class_activation_map` weights a layer's maps by their gradients."""


def class_activation_map(activations: Tensor, grads: Tensor, method: str = "gradcam") -> Tensor:
    """Combine a layer's maps ``(N, K, h, w)`` and their gradients into one map per item ``(N, h, w)``.

    - ``"gradcam"`` (Selvaraju et al. 2017): channel weights are the gradients' spatial mean;
    - ``"gradcampp"`` (Chattopadhay et al. 2018): channel weights sum the positive gradients,
      each cell weighted by Grad-CAM++'s ``alpha``, as ``monai.visualize.GradCAMpp`` computes them
      (without its factor ``exp(score)``, one positive number per volume here, which no
      normalised map, ranking or argmax sees);
    - ``"layercam"`` (Jiang et al. 2021): each cell weighted by its own positive gradient.

    Returns:
        The ReLU of the weighted channel sum, float32.

    Raises:
        ValueError: an unknown method.
    """
    activations, grads = activations.float(), grads.float()
    if method == "gradcam":
        weighted = grads.mean(dim=(2, 3), keepdim=True) * activations
    elif method == "gradcampp":
        numerator = grads.pow(2)
        denominator = 2 * numerator + (activations * grads.pow(3)).sum(dim=(2, 3), keepdim=True)
        alpha = numerator / (torch.where(denominator != 0, denominator, torch.ones_like(denominator)) + 1e-7)
        weighted = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True) * activations
    elif method == "layercam":
        weighted = F.relu(grads) * activations
    else:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    return F.relu(weighted.sum(dim=1))


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
    method: str = "gradcam",
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
        method: how the maps are weighted (:data:`CAM_METHODS`, see :func:`class_activation_map`).

    Returns:
        ``(len(slices), H, W)`` non-negative maps, not normalised, on ``volume``'s device.

    Raises:
        ValueError: ``volume`` is not one ``(1, C, H, W, S)`` volume, ``chunk < 1`` or an unknown
            method.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
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
    all_slices = _prepared_slices(model, torch.as_tensor(volume).permute(0, 4, 1, 2, 3)[0])  # (S, C, H, W)

    with _eval_mode(model):
        with torch.no_grad():
            features = torch.cat([model.encoder(part) for part in all_slices.split(step)])
        with torch.enable_grad():
            features.requires_grad_(True)
            logits, _ = model.classify_slice_features(features[None])
            (feature_grads,) = torch.autograd.grad(logits[0, class_index], features)
            for start in range(0, positions.numel(), step):
                part = positions[start : start + step]
                maps[start : start + part.numel()] = _chunk_cam(
                    model, layer, all_slices[part], feature_grads[part], (height, width), method
                )
    return maps


def _prepared_slices(model: nn.Module, slices: Tensor) -> Tensor:
    """``slices`` as the model's CNN takes them (its dtype and memory format when it says so)."""
    prepare = getattr(model, "prepared_slices", None)
    return prepare(slices) if callable(prepare) else slices.float().contiguous()


def attention_and_pooled_grad_cam(
    model: nn.Module,
    volumes: Tensor,
    class_index: int = 1,
    pooled_layer: str = POOLED_LAYER,
    method: str = "gradcam",
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, slice attention and the Grad-CAM of ``pooled_layer`` for every slice, in one pass.

    ``model`` must be a :class:`~networks.resnext_plus.ResNextPlus`-like network: an
    ``encode_slices`` whose features are the global average pool of ``pooled_layer``'s output,
    and ``classify_slice_features``. Call it in eval mode; the CNN runs without gradients
    (under an enclosing ``torch.no_grad()`` or autocast as the caller set them), and only the
    head after it is differentiated.

    Args:
        model: the network.
        volumes: ``(B, C, H, W, S)`` network input.
        class_index: the logit explained (1: COVID-19).
        pooled_layer: dotted name of the layer whose pooled output is the slice feature.
        method: how the maps are weighted (:data:`CAM_METHODS`, see :func:`class_activation_map`).

    Returns:
        ``logits`` ``(B, num_classes)``, ``attention`` ``(B, S)`` and non-negative maps
        ``(B, S, h, w)`` on the layer's grid (``h = H / 32`` for ResNeXt), float32, not
        normalised: bilinearly upsampled to ``(H, W)`` they are :func:`slice_grad_cam`'s maps.
    """
    if volumes.dim() != 5:
        raise ValueError(f"expected volumes of shape (B, C, H, W, S), got {list(volumes.shape)}")
    batch, channels, height, width, depth = volumes.shape
    captured: list[Tensor] = []
    handle = model.get_submodule(pooled_layer).register_forward_hook(
        lambda _module, _inputs, output: captured.append(output.detach())
    )
    try:
        with torch.no_grad():
            slices = volumes.permute(0, 4, 1, 2, 3).reshape(batch * depth, channels, height, width)
            features = model.encode_slices(slices)
    finally:
        handle.remove()
    activations = torch.cat(captured)  # (B * S, K, h, w)
    if activations.shape[0] != batch * depth:
        raise RuntimeError(f"{pooled_layer} ran {activations.shape[0]} times for {batch * depth} slices")
    with torch.enable_grad():
        pooled = features.detach().reshape(batch, depth, -1).requires_grad_(True)
        logits, attention = model.classify_slice_features(pooled)
        (feature_grads,) = torch.autograd.grad(logits[:, class_index].sum(), pooled)
    cells = activations.shape[2] * activations.shape[3]
    # d logit / d map = (d logit / d pooled feature) / cells, the same at every cell
    grads = (feature_grads.reshape(batch * depth, -1, 1, 1).float() / cells).expand_as(activations)
    cams = class_activation_map(activations, grads, method)
    return logits.detach(), attention.detach(), cams.reshape(batch, depth, *cams.shape[1:])


def _chunk_cam(
    model: nn.Module,
    layer: nn.Module,
    slices: Tensor,
    feature_grads: Tensor,
    size: tuple[int, int],
    method: str,
) -> Tensor:
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        # the input requires grad so that the activations are in the graph even with frozen weights
        features = model.encoder(slices.detach().requires_grad_(True))
    finally:
        handle.remove()
    activations = captured[-1]
    (grads,) = torch.autograd.grad(features, activations, grad_outputs=feature_grads)
    cam = class_activation_map(activations.detach(), grads, method)[:, None]
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
