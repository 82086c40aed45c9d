"""Reusable MONAI transforms for chest CT: lung mask, tone mapping, stochastic enhancer, slice sampling."""

from transforms.validation import InvalidVolumeError, check_finite, check_hu, check_volume, source_name
