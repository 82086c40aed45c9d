"""In-slice heatmaps of a scored volume: Grad-CAM on the network grid, then back on the input's grid.

:func:`volume_heatmap` maps the predicted-positive slices of a preprocessed volume (zeros
elsewhere): from the maps the inference pass already computed when it has them (the pooled
layer's, see :class:`~pipeline.workflow.inferer.SliceAttentionInferer`), else with
:func:`networks.grad_cam.slice_grad_cam`, which runs the CNN again. It scales the volume's maps to
[0, 1] together, so that a weakly suspicious slice also looks weak. :func:`to_input_grid`
undoes the preprocessing's reorientation, in-plane resize and central crop by resampling the
map from the network input's affine onto the image as loaded (``original_affine`` and
``spatial_shape`` of the meta data); the crop's border, never seen by the network, is 0. The
preprocessing drops its trace of applied operations for caching, so ``Invertd`` cannot be
used; the affines carry the same geometry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from monai.utils import convert_to_tensor
from torch import nn
from torch.nn import functional as F

from networks.grad_cam import DEFAULT_TARGET_LAYER, slice_grad_cam
from pipeline.workflow.inferer import unwrap_network

__all__ = ["DEFAULT_TARGET_LAYER", "slice_maps", "to_input_grid", "volume_heatmap"]


def slice_maps(
    network: nn.Module,
    image: torch.Tensor,
    slices: Sequence[int] | np.ndarray,
    target_layer: str = DEFAULT_TARGET_LAYER,
    method: str = "gradcam",
    in_lung: bool = False,
    slice_chunk: int | None = 8,
    cams: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class activation maps of the COVID-19 logit for some slices of one volume, on the network grid.

    Args:
        network: the scoring network (possibly wrapped in ``DataParallel``), in eval mode.
        image: the network input of one volume, ``(C, H, W, S)``; with two channels, channel 1
            is the lung mask.
        slices: positions of the slices to map.
        target_layer: dotted name of the network layer whose maps are weighted.
        method: how they are weighted (:data:`networks.grad_cam.CAM_METHODS`).
        in_lung: multiply each map by the lung mask (channel 1 of ``image``), so that nothing
            outside the (dilated) lung is hot.
        slice_chunk: slices through the CNN at a time (bounds the memory).
        cams: ``(S, h, w)`` maps of ``target_layer`` and ``method`` for every slice from the
            inference pass, or ``None`` to compute them; they are upsampled bilinearly to
            ``(H, W)``, as :func:`~networks.grad_cam.slice_grad_cam` does.

    Returns:
        ``(len(slices), H, W)`` non-negative float32 maps on the CPU, not normalised.
    """
    positions = torch.as_tensor(np.asarray(slices, dtype=np.int64).reshape(-1))
    height, width = image.shape[1:3]
    if positions.numel() == 0:
        return torch.zeros((0, height, width), dtype=torch.float32)
    if cams is not None:
        chosen = torch.as_tensor(cams)[positions].float()[:, None]
        maps = F.interpolate(chosen, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    else:
        module = unwrap_network(network)
        device = next(module.parameters()).device
        volume = convert_to_tensor(image, track_meta=False).to(device=device)[None]
        maps = slice_grad_cam(
            module, volume, positions.tolist(), target_layer=target_layer, chunk=slice_chunk, method=method
        )
    maps = maps.float().cpu()
    if in_lung and image.shape[0] > 1:
        lung = convert_to_tensor(image[1], track_meta=False).float().cpu()  # (H, W, S)
        maps = maps * lung[..., positions].permute(2, 0, 1)
    return maps


def volume_heatmap(
    network: nn.Module,
    image: torch.Tensor,
    slice_pred: Sequence[int] | np.ndarray | torch.Tensor,
    target_layer: str = DEFAULT_TARGET_LAYER,
    slice_chunk: int | None = 8,
    cams: torch.Tensor | None = None,
    method: str = "gradcam",
    in_lung: bool = False,
) -> torch.Tensor:
    """Class activation maps of the COVID-19 logit on the predicted-positive slices of one volume.

    Args:
        network: the scoring network (possibly wrapped in ``DataParallel``), in eval mode.
        image: the network input of one volume, ``(C, H, W, S)``.
        slice_pred: ``(S,)`` 0/1 slice predictions; only slices marked 1 are mapped.
        target_layer, method, in_lung, slice_chunk, cams: as in :func:`slice_maps`.

    Returns:
        ``(H, W, S)`` float32 on the CPU, in [0, 1] (1 at the volume's hottest point), zero on
        the other slices and everywhere when no slice is positive or the maps vanish.
    """
    positive = np.flatnonzero(np.asarray(torch.as_tensor(slice_pred).cpu()).reshape(-1))
    heatmap = torch.zeros(image.shape[1:], dtype=torch.float32)
    if positive.size == 0:
        return heatmap
    maps = slice_maps(network, image, positive, target_layer, method, in_lung, slice_chunk, cams)
    peak = maps.max()
    if peak > 0:
        heatmap[..., torch.as_tensor(positive)] = (maps / peak).permute(1, 2, 0)
    return heatmap


def to_input_grid(heatmap: torch.Tensor, meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Resample a heatmap on the network grid onto the grid of the image as loaded.

    Args:
        heatmap: ``(H, W, S)`` values in [0, 1] on the network input's grid.
        meta: the network input's meta data: ``affine`` (its grid), ``original_affine`` and
            ``spatial_shape`` (the loaded image's).

    Returns:
        The heatmap with the loaded image's array shape (float32, linear interpolation, 0
        outside the network's field of view) and that image's affine ``(4, 4)``.

    Raises:
        KeyError: the meta data lacks one of the three entries.
    """
    missing = [key for key in ("affine", "original_affine", "spatial_shape") if meta.get(key) is None]
    if missing:
        raise KeyError(f"the image's meta data lacks {missing}: cannot map the heatmap back onto it")
    target_affine = torch.as_tensor(np.asarray(meta["original_affine"], dtype=np.float64))
    shape = tuple(int(v) for v in np.asarray(meta["spatial_shape"]).reshape(-1))
    source = MetaTensor(
        convert_to_tensor(heatmap, dtype=torch.float32, track_meta=False)[None],
        affine=torch.as_tensor(np.asarray(meta["affine"], dtype=np.float64)),
    )
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)(
        source, dst_affine=target_affine, spatial_size=shape
    )
    values = np.clip(np.asarray(resampled.as_tensor()[0], dtype=np.float32), 0.0, 1.0)
    return values, target_affine.numpy()
