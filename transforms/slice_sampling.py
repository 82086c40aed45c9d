"""Random subsets of axial slices, kept in axial order, the same for every image of a sample."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends

from transforms.validation import InvalidVolumeError, source_name

__all__ = [
    "RandSliceSample",
    "RandSliceSampleD",
    "RandSliceSampleDict",
    "RandSliceSampled",
    "take_slices",
]


def take_slices(img: NdarrayOrTensor, indices: np.ndarray) -> NdarrayOrTensor:
    """The slices ``indices`` along the last axis of ``img``, same type, device and meta data.

    A MetaTensor keeps its affine unchanged: it still describes the input grid, and output slice ``j`` is
    input slice ``indices[j]``.
    """
    if isinstance(img, torch.Tensor):
        return torch.index_select(img, -1, torch.as_tensor(indices, dtype=torch.long, device=img.device))
    return np.take(img, indices, axis=-1)


def _subset_labels(labels: Any, indices: np.ndarray, depth: int, name: str) -> NdarrayOrTensor:
    """Per-slice labels (first axis: slices) at ``indices``; a list or tuple comes back as a numpy array."""
    if not isinstance(labels, torch.Tensor):
        labels = np.asarray(labels)
    if labels.ndim == 0 or labels.shape[0] != depth:
        raise InvalidVolumeError(
            f"{name}: {tuple(labels.shape)[:1] or 'no'} slice labels for a volume of {depth} axial slices"
        )
    if isinstance(labels, torch.Tensor):
        return labels[torch.as_tensor(indices, dtype=torch.long, device=labels.device)]
    return labels[indices]


class RandSliceSample(Randomizable, Transform):
    """Pick ``num_slices`` random axial slices (last axis), without repetition, kept in axial order.

    A volume with at most ``num_slices`` slices passes through unchanged. The chosen indices (sorted) are in
    :attr:`indices` after each call, so per-slice results (attention) can be mapped back.

    Args:
        num_slices: number of slices to keep.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_slices: int = 50) -> None:
        if num_slices < 1:
            raise ValueError(f"num_slices must be at least 1, got {num_slices}")
        self.num_slices = num_slices
        self.indices: np.ndarray | None = None

    def randomize(self, depth: int) -> None:
        """Draw the slice indices for a volume of ``depth`` axial slices."""
        if depth <= self.num_slices:
            self.indices = np.arange(depth)
        else:
            self.indices = np.sort(self.R.choice(depth, size=self.num_slices, replace=False))

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """The sampled slices of ``img`` (same type); ``randomize=False`` reuses the last draw."""
        depth = int(img.shape[-1])
        if randomize:
            self.randomize(depth)
        if self.indices is None:
            raise RuntimeError("RandSliceSample: call randomize(depth) before randomize=False")
        if self.indices.size and self.indices[-1] >= depth:
            raise InvalidVolumeError(
                f"{source_name(img)}: {depth} axial slices, fewer than the drawn indices need "
                f"(up to {self.indices[-1]}); all images of a sample must have the same number of slices"
            )
        if self.indices.size == depth:
            return img
        return take_slices(img, self.indices)


class RandSliceSampled(Randomizable, MapTransform):
    """Dictionary-based :class:`RandSliceSample`: the same random axial slices of every key, in axial order.

    Per-slice labels under ``slice_labels_key`` (a list, numpy array or tensor with one entry per slice; a
    list comes back as a numpy array) are subset to match, and the chosen indices (sorted, int64 numpy) are
    stored under ``slice_indices_key``; for a volume that passes through unchanged they are all indices.

    Args:
        keys: keys of the images ``(C, H, W, D)``; all must have the same number of slices ``D``.
        num_slices: number of slices to keep; volumes with at most that many pass through unchanged.
        slice_labels_key: key of the per-slice labels, subset when present; ``None`` to ignore labels.
        slice_indices_key: key under which to store the chosen indices.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = RandSliceSample.backend

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask"),
        num_slices: int = 50,
        slice_labels_key: str | None = "slice_labels",
        slice_indices_key: str = "slice_indices",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.sampler = RandSliceSample(num_slices)
        self.slice_labels_key = slice_labels_key
        self.slice_indices_key = slice_indices_key

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSliceSampled:
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, depth: int) -> None:
        self.sampler.randomize(depth)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            return d
        depths = {key: int(d[key].shape[-1]) for key in present}
        if len(set(depths.values())) > 1:
            raise InvalidVolumeError(
                f"{source_name(d[present[0]])}: the images have different numbers of axial slices {depths}"
            )
        depth = depths[present[0]]
        self.randomize(depth)
        indices = self.sampler.indices
        for key in present:
            d[key] = self.sampler(d[key], randomize=False)
        if self.slice_labels_key is not None and self.slice_labels_key in d:
            d[self.slice_labels_key] = _subset_labels(
                d[self.slice_labels_key], indices, depth, source_name(d[present[0]])
            )
        d[self.slice_indices_key] = indices.astype(np.int64)
        return d


RandSliceSampleD = RandSliceSampleDict = RandSliceSampled
