"""Small MONAI transforms the bundle's preprocessing chains need around the CT transforms.

- :class:`ValidateVolume` / :class:`ValidateVolumed`: right after loading, refuse an image that
  is not a usable CT volume (2D, several channels, truncated file, NaN voxels hidden by the
  reader, DICOM series of another modality) with an error naming the file.
- :class:`OriginalSliceIndices` / :class:`OriginalSliceIndicesd`: after reorientation, the index
  of each axial slice in the volume as stored on disk, and the slice labels put in the same
  order as the slices.
- :class:`CacheableMeta` / :class:`CacheableMetad`: meta data that ``torch.load(weights_only=True)``
  accepts, so ``PersistentDataset`` can cache MetaTensors (numpy arrays in the meta data and
  the applied-operations trace are otherwise refused on loading and the cache never hits).
- :class:`SeriesLoadImaged`: load the one DICOM series an item names in a folder holding several.
- :class:`SameGridd`: refuse a mask (e.g. of the lesions) that is not on its image's grid.
- :class:`ApplyToClassd`: apply random transforms only to items of some classes (the
  positive-only augmentation).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.image_reader import ITKReader
from monai.transforms import Compose, LoadImaged, MapTransform, Randomizable, Transform
from monai.utils import TransformBackends, convert_to_tensor

from pipeline.data.datalist import check_image_file
from transforms.validation import InvalidVolumeError, check_volume, source_name

__all__ = [
    "ApplyToClassd",
    "CacheableMeta",
    "CacheableMetad",
    "OriginalSliceIndices",
    "OriginalSliceIndicesd",
    "SameGridd",
    "SeriesLoadImaged",
    "ValidateVolume",
    "ValidateVolumed",
]


class ValidateVolume(Transform):
    """Refuse a loaded image that is not a usable CT volume; pass it on unchanged otherwise.

    Checks that the image is channel-first ``(1, H, W, D)`` with voxels (a 2D image or a
    multi-channel one is refused) and, when its meta data names the file it came from, what
    the reader cannot show: a truncated NIfTI file (read with zeros in place of the missing
    data), NaN or infinite voxels of a floating-point NIfTI file (read as 0), a DICOM series
    whose Modality is not CT (see :func:`pipeline.data.datalist.check_image_file`).

    Args:
        check_file: also check the source file.

    Raises:
        InvalidVolumeError: naming the file and the problem.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, check_file: bool = True) -> None:
        self.check_file = check_file

    def __call__(self, img: NdarrayOrTensor, series_uid: str | None = None) -> NdarrayOrTensor:
        """Return ``img`` unchanged; ``series_uid`` names the series of a multi-series DICOM folder."""
        name = source_name(img)
        check_volume(img, name)
        if self.check_file and name != "<array>":
            try:
                check_image_file(name, series_uid)
            except ValueError as error:
                raise InvalidVolumeError(f"{name}: {error}") from None
        return img


class ValidateVolumed(MapTransform):
    """Dictionary-based :class:`ValidateVolume`.

    Args:
        keys: the image keys.
        series_key: key of the DICOM series identifier of the item, when it names one.
        check_file: also check the source file.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = ValidateVolume.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        series_key: str = "series_uid",
        check_file: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_key = series_key
        self.validator = ValidateVolume(check_file)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        series = d.get(self.series_key)
        for key in self.key_iterator(d):
            d[key] = self.validator(d[key], str(series) if series else None)
        return d


ValidateVolumeD = ValidateVolumeDict = ValidateVolumed


class OriginalSliceIndices(Transform):
    """Index, in the volume as loaded from disk, of each slice along the last axis of ``img``.

    Reorientation (``Orientationd``) may flip or permute the voxel axes; the image's meta data
    keeps the affine at loading (``original_affine``) and the current one (``affine``), which
    together map each current slice back to its original index. Without that meta data (numpy
    or torch input), the slices are taken as unchanged: ``0 .. S-1``.

    Returns:
        ``torch.int64`` tensor ``(S,)``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        count = int(img.shape[-1])
        positions = np.arange(count)
        original = getattr(img, "meta", {}).get("original_affine") if isinstance(img, MetaTensor) else None
        if original is None:
            return torch.as_tensor(positions, dtype=torch.int64)
        current_to_original = np.linalg.inv(np.asarray(original, dtype=np.float64)) @ np.asarray(
            img.affine, dtype=np.float64
        )
        axis = int(np.argmax(np.abs(current_to_original[:3, 2])))  # original axis of the slices
        step, offset = current_to_original[axis, 2], current_to_original[axis, 3]
        return torch.as_tensor(np.rint(step * positions + offset).astype(np.int64))


class OriginalSliceIndicesd(MapTransform):
    """Dictionary-based :class:`OriginalSliceIndices`; also orders the slice labels like the slices.

    Run it right after reorientation, before any resampling along the slices. The slice
    labels of a data list follow the volume's slice order on disk; this puts them in the
    order of the reoriented slices (as ``torch.int64``) so that ``slice_labels[k]`` belongs to
    slice ``k`` of the network input.

    Args:
        keys: the image key (one).
        indices_key: where to store the original slice indices.
        labels_key: the slice labels to reorder, when present.
        allow_missing_keys: don't raise when the image is missing.

    Raises:
        InvalidVolumeError: the number of slice labels differs from the number of slices.
    """

    backend = OriginalSliceIndices.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        indices_key: str = "slice_indices",
        labels_key: str = "slice_labels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.indices_key = indices_key
        self.labels_key = labels_key
        self.indexer = OriginalSliceIndices()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            indices = self.indexer(d[key])
            d[self.indices_key] = indices
            labels = d.get(self.labels_key)
            if labels is None:
                continue
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if labels.numel() != indices.numel():
                raise InvalidVolumeError(
                    f"{source_name(d[key])}: {labels.numel()} slice labels for {indices.numel()} axial slices"
                )
            d[self.labels_key] = labels[indices]
        return d


OriginalSliceIndicesD = OriginalSliceIndicesDict = OriginalSliceIndicesd


class CacheableMeta(Transform):
    """Make a MetaTensor's meta data loadable by ``torch.load(weights_only=True)``.

    Numpy arrays and scalars in the meta data become tensors and the applied-operations trace
    is dropped (the cached result is an end point: it is not inverted). Other inputs pass
    unchanged.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if not isinstance(img, MetaTensor):
            return img
        meta = convert_to_tensor(dict(img.meta), track_meta=False)
        return MetaTensor(img.as_tensor(), meta=meta, applied_operations=[])  # shares the voxel data


class CacheableMetad(MapTransform):
    """Dictionary-based :class:`CacheableMeta`."""

    backend = CacheableMeta.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = CacheableMeta()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


CacheableMetaD = CacheableMetaDict = CacheableMetad


class ApplyToClassd(Randomizable, Transform):
    """Apply ``transforms`` to the items whose class label is in ``classes``; pass the others.

    The positive-only augmentation of the paper: the few positive volumes get random
    variations, the negatives are seen as they are. Random states propagate to the wrapped
    transforms (``set_random_state``, MONAI's data loader seeding).

    Args:
        transforms: a transform or sequence of transforms (wrapped in ``Compose``).
        label_key: key of the class label (an int, or a one-element array or tensor).
        classes: labels whose items are transformed.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        transforms: Callable | Sequence[Callable],
        label_key: str = "label",
        classes: Sequence[int] = (1,),
    ) -> None:
        self.transform = transforms if isinstance(transforms, Compose) else Compose(transforms)
        self.label_key = label_key
        self.classes = {int(c) for c in classes}

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ApplyToClassd:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """The wrapped transforms draw their own parameters."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        label = data.get(self.label_key)
        if label is None:
            return dict(data)
        value = int(np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label).reshape(-1)[0])
        return self.transform(dict(data)) if value in self.classes else dict(data)


ApplyToClassD = ApplyToClassDict = ApplyToClassd


class SeriesLoadImaged(MapTransform):
    """Load an item with a ``LoadImaged``, reading the DICOM series the item names under ``series_key``.

    A folder holding several DICOM series gives one case per series (see
    :func:`pipeline.data.cases.discover_cases`); such a case carries the series identifier, and
    this transform has ``loader`` read it with ``ITKReader(series_name=...)``. Items without
    the key load exactly as ``loader`` loads them.

    Args:
        loader: the ``LoadImaged`` of the preprocessing chain.
        series_key: key of the series identifier in the item.
        reader_kwargs: more arguments of the per-series ``ITKReader``.
    """

    def __init__(
        self,
        loader: LoadImaged,
        series_key: str = "series_uid",
        reader_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(loader.keys, loader.allow_missing_keys)
        self.loader = loader
        self.series_key = series_key
        self.reader_kwargs = dict(reader_kwargs or {})

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        series = data.get(self.series_key)
        if not series:
            return self.loader(data)
        return self.loader(data, reader=ITKReader(series_name=str(series), **self.reader_kwargs))


class SameGridd(MapTransform):
    """Refuse an item whose ``keys`` (masks) are not on the grid of ``reference_key`` (the image).

    Run it after loading, before anything resamples: a mask of another shape or affine would
    otherwise be resized onto the image and silently mark the wrong voxels.

    Args:
        keys: the masks to check (missing ones are skipped).
        reference_key: the image they belong to.
        atol: tolerance on the affines, in mm.

    Raises:
        ValueError: naming the mask file and the image when the shapes or affines differ.
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", atol: float = 1e-3) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.reference_key = reference_key
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = d[self.reference_key]
        for key in self.key_iterator(d):
            mask = d[key]
            same_shape = tuple(mask.shape[1:]) == tuple(reference.shape[1:])
            same_affine = True
            if same_shape and isinstance(mask, MetaTensor) and isinstance(reference, MetaTensor):
                affines = np.asarray(mask.affine), np.asarray(reference.affine)
                same_affine = np.allclose(*affines, atol=self.atol)
            if not (same_shape and same_affine):
                raise ValueError(
                    f"{source_name(mask)}: the {key} mask is not on the grid of its image "
                    f"{source_name(reference)} (shape {tuple(mask.shape[1:])} against "
                    f"{tuple(reference.shape[1:])}{', and another affine' if same_shape else ''})"
                )
        return d
