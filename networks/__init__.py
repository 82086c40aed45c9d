"""Torch modules of the ResNext+ network."""

from networks.cbam import CBAM, ChannelAttention, SpatialAttention
from networks.pretrained import PretrainedLoadResult, load_pretrained
from networks.resnext import Bottleneck, ResNeXt, resnext50_32x4d
from networks.resnext_plus import ResNextPlus, SliceEncoder
from networks.slice_attention import MeanSlicePooling, SliceAttention

__all__ = [
    "CBAM",
    "Bottleneck",
    "ChannelAttention",
    "MeanSlicePooling",
    "PretrainedLoadResult",
    "ResNeXt",
    "ResNextPlus",
    "SliceAttention",
    "SliceEncoder",
    "SpatialAttention",
    "load_pretrained",
    "resnext50_32x4d",
]
