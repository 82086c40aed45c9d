"""In-slice heatmaps of scored cases, written beside ``slice_attention.csv``.

For every case it is given, :class:`SliceHeatmapWriter` writes to the case's folder

- ``heatmap.nii.gz``: float32 in [0, 1], the Grad-CAM of the COVID-19 logit on the
  predicted-positive slices (0 elsewhere, all 0 for a volume predicted negative), with the
  array shape and affine of the input image as loaded, so that a viewer shows it over the
  scan (see :mod:`pipeline.workflow.heatmaps`);
- ``heatmap_slice_<index>.png`` for each predicted-positive slice (``index`` as in
  ``slice_attention.csv``: the slice's index in the volume on disk): the network's view of the
  slice (windowed, resized and cropped) in grey with the map overlaid. The slice PNGs of an
  earlier run into the same folder are removed first, so the folder shows this run's calls only.

:class:`~pipeline.export.attention_export.SliceAttentionSaver` calls it for each case when
given one (bundle option ``save_heatmaps``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.nifti_files import write_nifti
from pipeline.export.figures import plot_heatmap_slices
from pipeline.workflow.heatmaps import DEFAULT_TARGET_LAYER, to_input_grid, volume_heatmap

__all__ = ["HEATMAP_NIFTI", "HEATMAP_PNG", "SliceHeatmapWriter"]

HEATMAP_NIFTI = "heatmap.nii.gz"
HEATMAP_PNG = "heatmap_slice_{index}.png"


class SliceHeatmapWriter:
    """Compute and write one case's heatmaps (NIfTI volume on the input grid, PNG per positive slice).

    Args:
        network: the scoring network (its weights as in the evaluator).
        target_layer: dotted name of the layer whose maps are weighted (ResNext+'s last
            ResNeXt stage by default: 1/32 of the input size, e.g. 7 x 7 for 224 x 224).
        slice_chunk: slices through the CNN at a time while mapping (bounds the memory).
        save_figures: also write the PNG overlays (with the lesion outline when the case has a
            lesion mask).
        method: how the maps are weighted (:data:`networks.grad_cam.CAM_METHODS`).
        in_lung: multiply the maps by the lung mask.
    """

    def __init__(
        self,
        network: nn.Module,
        target_layer: str = DEFAULT_TARGET_LAYER,
        slice_chunk: int | None = 8,
        save_figures: bool = True,
        method: str = "gradcam",
        in_lung: bool = False,
    ) -> None:
        self.network = network
        self.target_layer = target_layer
        self.method = method
        self.in_lung = in_lung
        self.slice_chunk = slice_chunk
        self.save_figures = save_figures

    def __call__(
        self,
        case_dir: str | os.PathLike,
        image: torch.Tensor,
        slice_pred: Sequence[int] | np.ndarray,
        slice_indices: Sequence[int] | np.ndarray,
        case_id: str | None = None,
        cams: torch.Tensor | None = None,
        lesion: torch.Tensor | None = None,
    ) -> Path:
        """Write the heatmaps of one case.

        Args:
            case_dir: the case's output folder.
            image: the network input ``(C, H, W, S)`` as a MetaTensor (its meta data locate the
                input image; channel 0 is the windowed CT).
            slice_pred: ``(S,)`` 0/1 slice predictions; the positive slices are mapped.
            slice_indices: ``(S,)`` index of each slice in the volume on disk (PNG names).
            case_id: shown in the PNG titles.
            cams: ``(S, h, w)`` Grad-CAM maps of ``target_layer`` from the inference pass, when
                it computed them (then the CNN does not run again), else ``None``.
            lesion: the case's lesion mask on the network grid (``(1, H, W, S)``), drawn as an
                outline over the map, or ``None``.

        Returns:
            The path of ``heatmap.nii.gz``.
        """
        case_dir = Path(case_dir)
        for stale in case_dir.glob(HEATMAP_PNG.format(index="*")):  # a previous run's calls
            stale.unlink()
        heatmap = volume_heatmap(
            self.network,
            image,
            slice_pred,
            self.target_layer,
            self.slice_chunk,
            cams,
            method=self.method,
            in_lung=self.in_lung,
        )
        values, affine = to_input_grid(heatmap, getattr(image, "meta", {}))
        path = write_nifti(case_dir / HEATMAP_NIFTI, values, affine)
        if self.save_figures:
            ct = torch.as_tensor(image)[0].detach().float().cpu().numpy()
            indices = np.asarray(slice_indices).reshape(-1)
            maps = heatmap.numpy()
            outline = None if lesion is None else torch.as_tensor(lesion).cpu().numpy().reshape(ct.shape) > 0
            plot_heatmap_slices(
                (
                    case_dir / HEATMAP_PNG.format(index=int(indices[position])),
                    ct[..., position],
                    maps[..., position],
                    f"{case_id or case_dir.name}, slice {int(indices[position])}",
                    None if outline is None else outline[..., position],
                )
                for position in np.flatnonzero(np.asarray(slice_pred).reshape(-1))
            )
        return path
