"""Completion records of batch inference: which cases a rerun into the same folder skips."""

from __future__ import annotations

from pathlib import Path

from pipeline.workflow.case_records import pending_cases, read_record, record_path, write_record

CASES = [
    {"image": "/scans/a.nii.gz", "case_id": "a"},
    {"image": "/scans/series", "case_id": "b", "series_uid": "1.2.3"},
    {"image": "/scans/c.nii.gz", "case_id": "c"},
]


def _row(case: dict) -> dict:
    return {"case_id": case["case_id"], "image": case["image"], "prob_covid": "0.500000", "pred": 1}


def test_recorded_cases_are_skipped_unless_overwrite(tmp_path: Path) -> None:
    for case in CASES[:2]:
        write_record(tmp_path, case, _row(case))

    assert pending_cases(CASES, tmp_path) == CASES[2:]
    assert pending_cases(CASES, tmp_path, overwrite=True) == CASES
    assert read_record(tmp_path, CASES[1]) == _row(CASES[1])


def test_a_record_of_another_source_or_unreadable_does_not_count(tmp_path: Path) -> None:
    for case in CASES:
        write_record(tmp_path, case, _row(case))
    moved = {**CASES[0], "image": "/elsewhere/a.nii.gz"}  # the folder's content changed
    other_series = {**CASES[1], "series_uid": "1.2.4"}
    record_path(tmp_path, "c").write_text('{"source": {"image": "/scans/c.nii.gz"', encoding="utf-8")

    assert pending_cases([moved, other_series, CASES[2]], tmp_path) == [moved, other_series, CASES[2]]
    assert read_record(tmp_path, {"image": "/scans/d.nii.gz", "case_id": "d"}) is None  # never scored
