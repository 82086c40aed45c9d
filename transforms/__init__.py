"""Reusable MONAI transforms for chest CT: lung mask, tone mapping, stochastic enhancer, slice sampling."""

from transforms.lung_mask import (
    LungMask,
    LungMaskD,
    LungMaskd,
    LungMaskDict,
    LungSegmentation,
    NoLungFoundError,
    find_lungs,
    segment_lungs,
)
from transforms.slice_sampling import (
    RandSliceSample,
    RandSliceSampleD,
    RandSliceSampled,
    RandSliceSampleDict,
    take_slices,
)
from transforms.stochastic_enhance import (
    EnhancementLayers,
    StochasticEnhance,
    StochasticEnhanceD,
    StochasticEnhanced,
    StochasticEnhanceDict,
)
from transforms.tone_map import LUNG_WINDOW_HU, ToneMap, ToneMapD, ToneMapd, ToneMapDict, tone_curve
from transforms.validation import InvalidVolumeError, check_finite, check_hu, check_volume, source_name
