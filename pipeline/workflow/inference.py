"""Batch inference that survives bad inputs: failed cases become markers the evaluator passes on.

:class:`FailSafeDataset` runs the preprocessing of each case and, when it raises (an
unreadable file, a 2D image, values not in HU, NaN voxels, no lungs found...), returns a
small marker ``{"image", "case_id", "error"}`` instead. :class:`FailSafeEvaluator` is MONAI's
``SupervisedEvaluator`` that hands such a marker straight to its handlers as the iteration
output, without running the network, so a handler like
:class:`~pipeline.export.attention_export.SliceAttentionSaver` records it in ``errors.csv`` and the
run goes on with the next case.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.data import Dataset
from monai.engines import SupervisedEvaluator

from pipeline.workflow.preprocessing_transforms import SeriesLoadImaged

__all__ = [
    "ERROR_KEY",
    "FailSafeDataset",
    "FailSafeEvaluator",
    "SeriesLoadImaged",
    "describe_failure",
    "is_failed",
    "output_dir_checked",
]

ERROR_KEY = "error"
"""Key of the failure message in the marker that replaces a case that could not be preprocessed."""

MAX_MESSAGE_LENGTH = 400
_NO_READER = "cannot find a suitable reader"
_EXCEPTION_LINE = re.compile(r"^(\w[\w.]*(?:Error|Exception): .+)$", re.MULTILINE)


def describe_failure(error: BaseException) -> str:
    """A one-line message for why a case failed: the innermost cause of a transform chain's error.

    MONAI's ``Compose`` wraps a failing transform's exception in ``RuntimeError("applying
    transform ...")`` once per nesting level; the message that explains the problem is the
    innermost one (e.g. ``InvalidVolumeError: scan.nii.gz: values range 0..255 ...``).
    """
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root)
    if _NO_READER in text:  # LoadImage tried every reader: report the first reader's own reason
        reasons = _EXCEPTION_LINE.findall(text)
        reason = reasons[0] if reasons else "no image reader could open it"
        return _bounded(f"unreadable file: not an image any reader can open ({reason})")
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    # ITK's messages start with the C++ source location; the explanation is on the last line.
    if lines and lines[0].startswith(("/", "C:\\")) and len(lines) > 1:
        lines = lines[-1:]
    return _bounded(f"{type(root).__name__}: {' '.join(lines) if lines else 'no message'}")


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_LENGTH else message[: MAX_MESSAGE_LENGTH - 3] + "..."


def is_failed(batch: Any) -> bool:
    """Whether ``batch`` (one item, a collated batch, or a list of items) is a failure marker."""
    if isinstance(batch, Mapping):
        return ERROR_KEY in batch
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        return all(isinstance(item, Mapping) and ERROR_KEY in item for item in batch)
    return False


class FailSafeDataset(Dataset):
    """MONAI ``Dataset`` that turns a case whose transforms raise into a failure marker.

    Args:
        data: the cases, dictionaries with at least ``image`` (and usually ``case_id``).
        transform: the preprocessing chain.
        keep_keys: fields of the input item copied into the marker (besides the error).

    A failed item becomes ``{"image": <path>, "case_id": <id>, "error": <message>}`` with the
    message from :func:`describe_failure`. Keep ``batch_size=1`` (volumes differ in slice
    count anyway), so a batch is either one case or one marker.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Sequence[Callable] | Callable | None = None,
        keep_keys: Sequence[str] = ("image", "case_id", "series_uid"),
    ) -> None:
        super().__init__(data=data, transform=transform)
        self.keep_keys = tuple(keep_keys)

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:
            item = self.data[index]
            marker = {key: str(item[key]) for key in self.keep_keys if key in item}
            marker[ERROR_KEY] = describe_failure(error)
            return marker


class FailSafeEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that passes failure markers to its handlers instead of the network.

    A batch made by :class:`FailSafeDataset` from a case that could not be preprocessed is
    returned unchanged as the iteration's output: no forward pass, no post-processing, and
    ``Events.ITERATION_COMPLETED`` handlers see ``engine.state.output[ERROR_KEY]``. Attach no
    metric to this evaluator that cannot read such an output; everything else is as
    ``SupervisedEvaluator`` (same arguments).
    """

    def _iteration(self, engine: SupervisedEvaluator, batchdata: Any) -> Any:
        if is_failed(batchdata):
            return batchdata
        return super()._iteration(engine, batchdata)


def output_dir_checked(output_dir: str | os.PathLike) -> str:
    """Create ``output_dir`` and check that it is writable, failing before any case is processed."""
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"{output_dir}: the output folder is not writable")
    return os.fspath(output_dir)
