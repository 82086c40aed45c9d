"""How well the heatmaps point at the lesions: pointing game and pixel ROC AUC against lesion masks.

Scored on the slices of positive volumes that hold lesion pixels (after preprocessing, on the
network grid), for the data whose items carry a lesion mask (``lesion``, e.g. the demo data):

- **pointing game** (Zhang et al. 2018, as used for saliency maps of chest images): a slice is
  a hit when its map's hottest pixel lies inside a lesion dilated by ``tolerance`` pixels
  (8-connected); the score is the share of hits. A map that is zero everywhere is a miss.
  Its chance level, ``pointing_game_chance``, is what a hottest pixel drawn at random within the
  lung would score: the share of the lung the dilated lesions cover, averaged over the slices.
- **pixel ROC AUC**: the ROC AUC of the map's values against the lesion pixels, within the
  lung mask (the network's mask channel), per slice, averaged over slices. Per slice, because
  maps are compared within a slice: a slice's ranking of its own pixels is what a reader sees.

Both are reported for every lesion slice and for the lesion slices the slice rule called (the
slices whose heatmaps batch inference writes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.metrics import compute_roc_auc
from monai.utils import convert_to_numpy
from scipy import ndimage

from networks.grad_cam import CAM_METHODS, DEFAULT_TARGET_LAYER
from pipeline.workflow.distributed import gather_values
from pipeline.workflow.heatmaps import slice_maps
from pipeline.workflow.metrics import slice_predictions, volume_items
from pipeline.workflow.slice_rule import network_slice_rule

__all__ = ["LocalisationMetrics", "pointing_chance", "pointing_hit", "slice_pixel_auc"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def pointing_hit(heatmap: np.ndarray, lesion: np.ndarray, tolerance: int = 1) -> bool:
    """Whether the hottest pixel of ``heatmap`` ``(H, W)`` lies in ``lesion`` dilated by ``tolerance``.

    Ties go to the first pixel in row-major order; a map without a positive value is a miss.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if not heatmap.size or not np.nanmax(heatmap) > 0:
        return False
    return bool(_pointing_target(lesion, tolerance).flat[int(np.nanargmax(heatmap))])


def pointing_chance(lesion: np.ndarray, region: np.ndarray | None = None, tolerance: int = 1) -> float:
    """The pointing game's chance on one slice: the share of ``region`` in the dilated ``lesion``.

    It is the hit rate of a hottest pixel drawn uniformly within ``region`` (the lung; all pixels:
    ``None``); NaN for an empty region.
    """
    target = _pointing_target(lesion, tolerance)
    inside = np.ones_like(target) if region is None else np.asarray(region, dtype=bool)
    return float(target[inside].mean()) if inside.any() else float("nan")


def _pointing_target(lesion: np.ndarray, tolerance: int) -> np.ndarray:
    target = np.asarray(lesion, dtype=bool)
    if tolerance > 0:
        target = ndimage.binary_dilation(target, structure=_EIGHT_CONNECTED, iterations=tolerance)
    return target


def slice_pixel_auc(heatmap: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """ROC AUC of ``heatmap``'s values against ``lesion`` pixels within ``region`` (all pixels: ``None``).

    Returns:
        The AUC, or NaN when the region holds only lesion or only background pixels.
    """
    lesion = np.asarray(lesion, dtype=bool)
    inside = np.ones_like(lesion) if region is None else np.asarray(region, dtype=bool)
    truth, values = lesion[inside], np.asarray(heatmap, dtype=np.float64)[inside]
    if truth.all() or not truth.any():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(values), torch.as_tensor(truth, dtype=torch.float64)))


class LocalisationMetrics(Metric):
    """Ignite metric: pointing game and pixel ROC AUC of the heatmaps against lesion masks.

    Per volume it reads the network input and the lesion mask (aligned with it, ``(1, H, W, S)``)
    from ``engine.state.batch`` and the probabilities and attention from ``engine.state.output``;
    volumes without a lesion mask, negative volumes and slices without lesion pixels are
    skipped. The maps are those batch inference writes (:func:`pipeline.workflow.heatmaps.slice_maps`
    with the same ``layer``, ``method`` and ``in_lung``), computed with the engine's network.
    ``compute()`` returns ``pointing_game``, ``pixel_auc`` (every lesion slice),
    ``pointing_game_called``, ``pixel_auc_called`` (the lesion slices the slice rule called),
    ``pointing_game_chance`` (a hottest pixel drawn at random within the lung, every lesion slice)
    and the counts ``slices``, ``slices_called`` and ``volumes``, each key with ``prefix``. Works
    across distributed processes.

    Args:
        layer: dotted name of the network layer whose maps are weighted.
        method: how they are weighted (:data:`networks.grad_cam.CAM_METHODS`).
        in_lung: multiply the maps by the lung mask.
        tolerance: the pointing game's dilation of the lesions, in pixels.
        tau, threshold: the slice rule (``None``: the engine network's, as in
            :class:`~pipeline.workflow.metrics.SliceMetrics`).
        slice_chunk: slices through the CNN at a time while mapping.
        prefix: prefix of the result keys.
        image_key, lesion_key: keys of the network input and the lesion mask in the batch.
        pred_key, attention_key, label_key: keys in the engine output.
    """

    def __init__(
        self,
        layer: str = DEFAULT_TARGET_LAYER,
        method: str = "gradcam",
        in_lung: bool = False,
        tolerance: int = 1,
        tau: float | None = None,
        threshold: float | None = None,
        slice_chunk: int | None = 8,
        prefix: str = "localisation",
        image_key: str = "image",
        lesion_key: str = "lesion",
        pred_key: str = "pred",
        attention_key: str = "attention",
        label_key: str = "label",
        device: str | torch.device = "cpu",
    ) -> None:
        if method not in CAM_METHODS:
            raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be at least 0 pixels, got {tolerance}")
        self.layer, self.method, self.in_lung, self.tolerance = layer, method, bool(in_lung), int(tolerance)
        self.tau, self.threshold, self.slice_chunk = tau, threshold, slice_chunk
        self.prefix = prefix
        self.image_key, self.lesion_key = image_key, lesion_key
        self.pred_key, self.attention_key, self.label_key = pred_key, attention_key, label_key
        self._network: Any = None
        super().__init__(device=device, skip_unrolling=True)

    def reset(self) -> None:
        self._hits: list[int] = []
        self._aucs: list[float] = []
        self._chances: list[float] = []
        self._called: list[int] = []
        self._volumes = 0
        self._rule = network_slice_rule(None, self.tau, self.threshold)

    def started(self, engine: Any) -> None:
        """Reset, and take the engine's network and its slice rule."""
        super().started(engine)
        self._network = getattr(engine, "network", None)
        self._rule = network_slice_rule(self._network, self.tau, self.threshold)

    @torch.no_grad()
    def iteration_completed(self, engine: Any) -> None:
        """Score each volume of the batch that has a lesion mask."""
        for result, item in zip(volume_items(engine.state.output), volume_items(engine.state.batch)):
            lesion = item.get(self.lesion_key)
            if lesion is None:
                continue
            label = result.get(self.label_key, item.get(self.label_key))
            image, pred, attention = item[self.image_key], result[self.pred_key], result[self.attention_key]
            self.update((image, lesion, pred, attention, label))

    def update(self, output: Sequence[Any]) -> None:
        """Add one volume: ``(input (C, H, W, S), lesion (1, H, W, S), probabilities, attention, label)``."""
        image, lesion, pred, attention, label = output
        if self._network is None:
            raise RuntimeError("LocalisationMetrics needs the engine's network: attach it to an evaluator")
        lesion = convert_to_numpy(lesion).astype(bool).reshape(image.shape[1:])
        if label is not None and int(convert_to_numpy(label).reshape(-1)[-1]) != 1:
            return
        slices = np.flatnonzero(lesion.any(axis=(0, 1)))
        if slices.size == 0:
            return
        tau, threshold = self._rule
        probabilities = convert_to_numpy(pred).reshape(-1)
        weights = convert_to_numpy(attention).reshape(-1).astype(float)
        called = slice_predictions(weights, float(probabilities[-1]) >= threshold, tau)[slices]
        maps = slice_maps(
            self._network, image, slices, self.layer, self.method, self.in_lung, self.slice_chunk
        ).numpy()
        lung = convert_to_numpy(image[1]).astype(bool) if image.shape[0] > 1 else None
        for position, index in enumerate(slices):
            self._hits.append(int(pointing_hit(maps[position], lesion[..., index], self.tolerance)))
            region = None if lung is None else lung[..., index]
            self._aucs.append(slice_pixel_auc(maps[position], lesion[..., index], region))
            self._chances.append(pointing_chance(lesion[..., index], region, self.tolerance))
        self._called.extend(int(call) for call in called)
        self._volumes += 1

    def compute(self) -> dict[str, Any]:
        hits = gather_values(self._hits)
        aucs = gather_values(self._aucs)
        called = gather_values(self._called).astype(bool)
        result: dict[str, Any] = {
            "pointing_game": _mean(hits),
            "pixel_auc": _mean(aucs),
            "pointing_game_called": _mean(hits[called]),
            "pixel_auc_called": _mean(aucs[called]),
            "pointing_game_chance": _mean(gather_values(self._chances)),
            "slices": int(hits.size),
            "slices_called": int(called.sum()),
            "volumes": int(gather_values([self._volumes]).sum()),
        }
        return {f"{self.prefix}_{key}": value for key, value in result.items()}


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
