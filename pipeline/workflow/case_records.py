"""Per-case completion records of batch inference, so that a rerun into the same folder resumes it.

A scored case is complete once ``output_dir/<case_id>/prediction.json`` exists: it is written
atomically after the case's other files (attention CSV, figure, heatmaps) and holds the case's
source (image path and DICOM series) and its row of ``predictions.csv``. A run killed at any
point leaves each case either recorded, with all its files, or not recorded, to be scored
again. :func:`pending_cases` drops the recorded cases from a run's case list (all of them are
scored again with ``overwrite``); a record whose source is not the case's (the folder's content
changed) or that cannot be read does not count.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.atomic_files import atomic_write_json

__all__ = ["RECORD_FILE", "pending_cases", "read_record", "record_path", "write_record"]

RECORD_FILE = "prediction.json"
"""Name of a case's completion record in its output folder."""

logger = logging.getLogger(__name__)


def record_path(output_dir: str | os.PathLike, case_id: str) -> Path:
    """Where the completion record of case ``case_id`` lives."""
    return Path(output_dir) / case_id / RECORD_FILE


def _source(case: Mapping[str, Any]) -> dict[str, str | None]:
    series = case.get("series_uid")
    return {"image": os.fspath(case["image"]), "series_uid": None if series is None else str(series)}


def write_record(output_dir: str | os.PathLike, case: Mapping[str, Any], row: Mapping[str, Any]) -> Path:
    """Record that ``case`` is complete with its ``predictions.csv`` row, atomically.

    Args:
        output_dir: the run's output folder.
        case: the case as listed for the run (``image``, ``case_id``, optional ``series_uid``).
        row: its row of ``predictions.csv``.
    """
    return atomic_write_json(
        {"source": _source(case), "row": dict(row)}, record_path(output_dir, str(case["case_id"]))
    )


def read_record(output_dir: str | os.PathLike, case: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``predictions.csv`` row recorded for ``case``, or ``None`` when it is not complete.

    A record that cannot be parsed, or whose source or case id is not ``case``'s, is ignored
    (with a warning for the unreadable one): the case is scored again.
    """
    path = record_path(output_dir, str(case["case_id"]))
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable completion record (%s); the case is scored again", path, error)
        return None
    if not isinstance(record, dict) or record.get("source") != _source(case):
        return None
    row = record.get("row")
    if not isinstance(row, dict) or row.get("case_id") != case["case_id"]:
        return None
    return row


def pending_cases(
    cases: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, overwrite: bool = False
) -> list[Mapping[str, Any]]:
    """The cases of ``cases`` still to score: all with ``overwrite``, else those without a valid record."""
    if overwrite:
        return list(cases)
    pending = [case for case in cases if read_record(output_dir, case) is None]
    if len(pending) < len(cases):
        logger.info(
            "%d of %d cases already scored in %s: skipped (overwrite=True scores them again)",
            len(cases) - len(pending),
            len(cases),
            output_dir,
        )
    return pending
