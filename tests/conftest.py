"""Shared fixtures: paths to the repository, its bundle and the real CT series beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundles" / "covid19_ct_resnextplus"
REAL_CT_DIR = REPO_ROOT.parent / "shared" / "data" / "lung-pet-ct-dx-A0001"
METADATA_SCHEMA = REPO_ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real chest CT DICOM series (64 slices, HU); the test is skipped when it is absent."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"real CT series not found at {REAL_CT_DIR}")
    return REAL_CT_DIR
