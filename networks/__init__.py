"""Torch modules of the ResNext+ network."""

from networks.cbam import CBAM, ChannelAttention, SpatialAttention
from networks.checkpoint_contents import NoModelWeightsError, describe_contents, require_model_weights
from networks.pretrained import PretrainedLoadResult, load_pretrained
from networks.resnext import Bottleneck, ResNeXt, resnext50_32x4d
from networks.resnext_plus import ResNextPlus, SliceEncoder
from networks.slice_attention import MeanSlicePooling, SliceAttention, SliceRule
from networks.temperature import TemperatureScaling

__all__ = [
    "CBAM",
    "Bottleneck",
    "ChannelAttention",
    "MeanSlicePooling",
    "NoModelWeightsError",
    "PretrainedLoadResult",
    "ResNeXt",
    "ResNextPlus",
    "SliceAttention",
    "SliceEncoder",
    "SliceRule",
    "SpatialAttention",
    "TemperatureScaling",
    "describe_contents",
    "load_pretrained",
    "require_model_weights",
    "resnext50_32x4d",
]
