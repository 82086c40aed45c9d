"""The preprocessing chains of training, evaluation and inference, defined once.

:func:`deterministic_transforms` is the one definition of the cached, deterministic part that
training, evaluation and inference all share::

    LoadImaged (ITKReader: NIfTI, MetaImage, DICOM series folders; the item's ``series_uid``
    of a folder holding several series) -> channel first
    -> refuse what is not a CT volume (2D, truncated file, NaN, not CT)
    -> Orientationd RAS (axial slices last) -> original slice indices, slice labels aligned
    -> LungMaskd (HU, before any rescaling) -> HU window to [0, 1] (or ToneMapd)
    -> optional StochasticEnhanced -> in-plane resize to ``resize_size`` (slices kept)
    -> central crop to ``spatial_size`` -> meta data made cacheable
    -> compact storage: CT as float16, lung mask as uint8

:func:`training_transforms` is the random part of training: ``RandSliceSampled`` (``num_slices``
slices kept in axial order), expanded back to float32, then, for positive volumes only,
:func:`positive_augmentation`. :func:`network_input_transforms` stacks CT and lung mask into the
network's 2-channel input (or keeps the CT alone). A training item is ``deterministic +
training + network_input``; an evaluation or inference item is ``deterministic +
network_input`` in float16 (every slice scored), which the network casts to float32 on its
device.

What ``PersistentDataset`` caches (the chain up to its first random transform) is thus stored
compactly: 3 bytes a voxel in training (CT + mask), 4 in evaluation (both channels float16),
against 8 in float32. float16 keeps the [0, 1] window to within 2**-12 (0.4 HU of the 1,500 HU
lung window), below the CT's own noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from monai.transforms import (
    CastToTyped,
    CenterSpatialCropd,
    ConcatItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    Orientationd,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Resized,
    ScaleIntensityRanged,
    SqueezeDimd,
    Transform,
    Transposed,
)

from pipeline.workflow.preprocessing_transforms import (
    ApplyToClassd,
    CacheableMetad,
    OriginalSliceIndicesd,
    SameGridd,
    SeriesLoadImaged,
    ValidateVolumed,
)
from transforms import LungMaskd, RandSliceSampled, StochasticEnhanced, ToneMapd

__all__ = [
    "CACHE_DTYPES",
    "ENHANCEMENTS",
    "HU_WINDOW",
    "cache_subdir",
    "deterministic_transforms",
    "evaluation_transforms",
    "network_input_transforms",
    "positive_augmentation",
    "training_transforms",
]

ENHANCEMENTS = ("none", "tone", "stochastic")
"""Image enhancement options: plain HU window, tone mapping, stochastic enhancement."""

HU_WINDOW = (-1350.0, 150.0)
"""Lung window (HU) mapped to [0, 1]."""

CACHE_DTYPES = {"image": "float16", "mask": "uint8"}
"""dtypes of the deterministic chain's output (what the cache stores): CT, lung mask."""

NO_CACHE = ("false", "none", "null")
"""``cache_dir`` values (as typed on a command line) that turn the persistent cache off."""


def deterministic_transforms(
    enhancement: str = "none",
    resize_size: int = 256,
    spatial_size: int = 224,
    window: Sequence[float] = HU_WINDOW,
    dilation_mm: float = 5.0,
    lung_mask_failure: str = "raise",
    check_hu: bool = True,
    seed: int = 0,
    reader: str = "ITKReader",
    image_key: str = "image",
    mask_key: str = "mask",
    slice_labels_key: str = "slice_labels",
    slice_indices_key: str = "slice_indices",
    lesion_key: str | None = None,
) -> list[Transform]:
    """The deterministic preprocessing shared by training, evaluation and inference.

    Args:
        enhancement: ``"none"`` (HU window to [0, 1]), ``"tone"`` (``ToneMapd`` over the window)
            or ``"stochastic"`` (window, then ``StochasticEnhanced``; slow, hence cached).
        resize_size: in-plane size the slices are resized to (the paper's 256).
        spatial_size: in-plane size of the central crop fed to the network (the paper's 224).
        window: HU window ``(low, high)`` mapped to [0, 1].
        dilation_mm: dilation of the lung mask (includes the lung wall).
        lung_mask_failure: ``"raise"`` or ``"full"`` (all-ones mask, with a warning) when no
            lung is found or the mask cannot be trusted (the message names the check that failed);
            see ``transforms.LungMaskd``.
        check_hu: refuse volumes that are not in Hounsfield units.
        seed: seed of the stochastic enhancer (fixed, so its result can be cached).
        reader: MONAI image reader: ``"ITKReader"`` (NIfTI, MetaImage, DICOM series folders) or
            ``"NibabelReader"`` (NIfTI only, without ITK installed).
        image_key, mask_key: keys of the CT and of the lung mask it adds.
        slice_labels_key, slice_indices_key: keys of the per-slice labels (reordered with the
            slices when present) and of the original slice indices (added).
        lesion_key: key of an item's lesion mask file, loaded when the item has one and brought
            onto the network grid with the image (nearest neighbour); ``None``: not loaded.

    Returns:
        The transforms, in order; the item then holds ``image`` ``(1, S', S', S)`` float16 in
        [0, 1] (``S' = spatial_size``, ``S`` axial slices), the 0/1 uint8 ``mask`` ``(1, S', S', S)``,
        ``slice_indices`` ``(S,)`` and, when given, ``slice_labels`` ``(S,)`` in the same order,
        and with ``lesion_key`` the item's 0/1 uint8 lesion mask ``(1, S', S', S)``.

    Raises:
        ValueError: unknown enhancement or inconsistent sizes.
    """
    if enhancement not in ENHANCEMENTS:
        raise ValueError(f"enhancement must be one of {ENHANCEMENTS}, got {enhancement!r}")
    if not 0 < spatial_size <= resize_size:
        raise ValueError(f"need 0 < spatial_size <= resize_size, got {spatial_size} and {resize_size}")
    low, high = (float(v) for v in window)
    both = [image_key, mask_key]
    if enhancement == "tone":
        windowing: list[Transform] = [ToneMapd(keys=image_key, window=(low, high), check_hu=check_hu)]
    else:
        windowing = [
            ScaleIntensityRanged(keys=image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        ]
    if enhancement == "stochastic":
        windowing.append(StochasticEnhanced(keys=image_key, seed=seed))
    lesion = [lesion_key] if lesion_key else []
    return [
        # reads the series an item names under "series_uid" in a folder of several DICOM series
        SeriesLoadImaged(LoadImaged(keys=image_key, reader=reader, image_only=True)),
        EnsureChannelFirstd(keys=image_key),
        ValidateVolumed(keys=image_key),
        *_lesion_loading(lesion, image_key, reader),
        Orientationd(keys=[image_key, *lesion], axcodes="RAS", labels=None, allow_missing_keys=True),
        OriginalSliceIndicesd(keys=image_key, indices_key=slice_indices_key, labels_key=slice_labels_key),
        EnsureTyped(keys=image_key, dtype="float32", track_meta=True),
        LungMaskd(
            keys=image_key,
            mask_key=mask_key,
            dilation_mm=dilation_mm,
            on_failure=lung_mask_failure,
            check_hu=check_hu,
        ),
        *windowing,
        Resized(
            keys=[*both, *lesion],
            spatial_size=(resize_size, resize_size, -1),
            mode=("trilinear", "nearest-exact", *["nearest-exact"] * len(lesion)),
            anti_aliasing=(True, False, *[False] * len(lesion)),
            allow_missing_keys=bool(lesion),
        ),
        CenterSpatialCropd(
            keys=[*both, *lesion], roi_size=(spatial_size, spatial_size, -1), allow_missing_keys=bool(lesion)
        ),
        CacheableMetad(keys=[*both, *lesion], allow_missing_keys=bool(lesion)),
        CastToTyped(
            keys=[*both, *lesion],
            dtype=[CACHE_DTYPES["image"], CACHE_DTYPES["mask"], *[CACHE_DTYPES["mask"]] * len(lesion)],
            allow_missing_keys=bool(lesion),
        ),
    ]


def _lesion_loading(lesion: list[str], image_key: str, reader: str) -> list[Transform]:
    """Load an item's lesion mask (when it has one) and check it lies on its image's grid."""
    if not lesion:
        return []
    return [
        LoadImaged(keys=lesion, reader=reader, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys=lesion, allow_missing_keys=True),
        SameGridd(keys=lesion, reference_key=image_key),
        Lambdad(keys=lesion, func=_binary, allow_missing_keys=True),
    ]


def _binary(mask: Any) -> Any:
    return (mask > 0).to(dtype=mask.dtype) if hasattr(mask, "to") else (mask > 0).astype(mask.dtype)


def _add_channel_axis(volume: Any) -> Any:
    return volume[None]


def positive_augmentation(
    prob: float = 0.5, image_key: str = "image", mask_key: str = "mask"
) -> list[Transform]:
    """Random variations of a positive volume: the same draw for every slice, in-plane only.

    The slices are moved to the channel axis so that MONAI's 2D random transforms draw one
    set of parameters for the whole volume and never mix neighbouring slices: contrast
    stretching (gamma), Gaussian noise, Gaussian blur, rotation with zoom/scaling, and elastic
    deformation. The lung mask follows the spatial ones (nearest neighbour).

    Args:
        prob: probability of each variation.
        image_key, mask_key: keys of the CT ``(1, H, W, S)`` in [0, 1] and its mask.
    """
    both = [image_key, mask_key]
    modes = ("bilinear", "nearest")
    return [
        Transposed(keys=both, indices=(3, 1, 2, 0)),  # (1, H, W, S) -> (S, H, W, 1)
        # update_meta=False keeps the volume's 3D affine, so that augmented and unaugmented
        # volumes carry alike meta data and stack into one batch.
        SqueezeDimd(keys=both, dim=3, update_meta=False),  # slices as channels: (S, H, W)
        RandAdjustContrastd(keys=image_key, prob=prob, gamma=(0.7, 1.5)),
        RandGaussianNoised(keys=image_key, prob=prob, std=0.02),
        RandGaussianSmoothd(keys=image_key, prob=prob, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandAffined(
            keys=both, prob=prob, rotate_range=math.pi / 12, scale_range=0.1, mode=modes, padding_mode="zeros"
        ),
        Rand2DElasticd(
            keys=both,
            prob=prob,
            spacing=(16, 16),
            magnitude_range=(0.0, 1.0),
            mode=modes,
            padding_mode="zeros",
        ),
        Transposed(keys=both, indices=(1, 2, 0)),  # (H, W, S)
        Lambdad(keys=both, func=_add_channel_axis),  # (1, H, W, S), meta data as they were
    ]


def training_transforms(
    num_slices: int = 50,
    augment: bool = True,
    augment_prob: float = 0.5,
    positive_classes: Sequence[int] = (1,),
    image_key: str = "image",
    mask_key: str = "mask",
    label_key: str = "label",
    slice_labels_key: str = "slice_labels",
    slice_indices_key: str = "slice_indices",
    lesion_key: str = "lesion",
) -> list[Transform]:
    """The random part of training: slice sampling, float32 again, then positive-only augmentation.

    An item's lesion mask (``lesion_key``) is dropped: training sees volume labels only.

    Args:
        num_slices: slices sampled per volume (kept in axial order).
        augment: apply :func:`positive_augmentation` to items of ``positive_classes``.
        augment_prob: probability of each variation.
        positive_classes: labels whose volumes are augmented.
        image_key, mask_key, label_key, slice_labels_key, slice_indices_key, lesion_key: item keys.
    """
    chain: list[Transform] = [
        DeleteItemsd(keys=lesion_key),
        RandSliceSampled(
            keys=(image_key, mask_key),
            num_slices=num_slices,
            slice_labels_key=slice_labels_key,
            slice_indices_key=slice_indices_key,
        ),
        CastToTyped(keys=(image_key, mask_key), dtype="float32"),
    ]
    if augment:
        augmentation = positive_augmentation(augment_prob, image_key=image_key, mask_key=mask_key)
        chain.append(ApplyToClassd(augmentation, label_key=label_key, classes=positive_classes))
    return chain


def network_input_transforms(
    use_mask: bool = True, image_key: str = "image", mask_key: str = "mask", dtype: str = "float32"
) -> list[Transform]:
    """Stack CT and lung mask into the network input ``(2, H, W, S)`` (CT only without the mask).

    The mask item is removed afterwards: the network input carries it.

    Args:
        use_mask: stack the lung mask as channel 1.
        image_key, mask_key: keys of the CT and its mask.
        dtype: dtype of the input (``"float16"`` keeps an evaluation item compact; the network
            casts it to its own dtype).
    """
    chain: list[Transform] = [CastToTyped(keys=image_key, dtype=dtype)]
    if use_mask:
        chain += [
            CastToTyped(keys=mask_key, dtype=dtype),
            ConcatItemsd(keys=[image_key, mask_key], name=image_key, dim=0),
        ]
    return [*chain, DeleteItemsd(keys=mask_key), EnsureTyped(keys=image_key, track_meta=True)]


def evaluation_transforms(use_mask: bool = True, **kwargs: Any) -> list[Transform]:
    """Evaluation and inference chain: :func:`deterministic_transforms` (``kwargs``) + network input.

    The item's ``image`` is float16 (what the cache stores); the network casts it to float32.
    """
    image_key, mask_key = kwargs.get("image_key", "image"), kwargs.get("mask_key", "mask")
    network_input = network_input_transforms(use_mask, image_key, mask_key, dtype=CACHE_DTYPES["image"])
    return deterministic_transforms(**kwargs) + network_input


def cache_subdir(cache_dir: str | os.PathLike | bool | None, **settings: Any) -> str | None:
    """A sub-folder of ``cache_dir`` named after the preprocessing settings; ``None`` without a cache.

    ``PersistentDataset`` keys its files by the data item only; giving each combination of
    settings (enhancement, sizes, window, ...) and storage dtypes its own folder keeps a cache
    made with other settings from being reused. ``None``, ``False``, ``""`` and the texts in :data:`NO_CACHE`
    mean no cache.
    """
    if not cache_dir or str(cache_dir).strip().lower() in NO_CACHE:
        return None
    text = json.dumps({**settings, "stored_as": CACHE_DTYPES}, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return os.path.join(os.fspath(cache_dir), f"{settings.get('enhancement', 'preprocessed')}-{digest}")
