"""Shared fixtures: paths to the repository, its bundle and the real CT series beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.datalist import LESION_KEY
from pipeline.synthetic.base_ct import BASE_CT_SERIES, CACHE_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "bundles" / "covid19_ct_resnextplus"
REAL_CT_DIR = REPO_ROOT.parent / "shared" / "data" / "lung-pet-ct-dx-A0001"
METADATA_SCHEMA = REPO_ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


def pytest_configure(config: pytest.Config) -> None:
    """Use ``../shared/data`` as the base-CT cache when it holds the series and no cache is set.

    This repository's CI keeps the demo's real CT there, named as the cache names it, so the
    demo and the accuracy study build on it by default, as they do for a user after
    ``python -m pipeline fetch-base-ct``.
    """
    if (REAL_CT_DIR.parent / BASE_CT_SERIES.name).is_dir():
        os.environ.setdefault(CACHE_ENV, os.fspath(REAL_CT_DIR.parent))


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real chest CT DICOM series (64 slices, HU); the test is skipped when it is absent."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"real CT series not found at {REAL_CT_DIR}")
    return REAL_CT_DIR


def with_absolute_paths(item: dict, base_dir: Path) -> dict:
    """A copy of a data list item whose image and lesion mask paths are absolute under ``base_dir``.

    For tests that write a demo data set's items into a data list of another folder.
    """
    paths = {key: os.fspath(base_dir / item[key]) for key in ("image", LESION_KEY) if key in item}
    return {**item, **paths}


TINY_DEMO = {"n_positive": 4, "n_negative": 4, "size": 64, "slices": 8, "seed": 0}
"""Arguments of :func:`pipeline.synthetic.demo_data.make_demo_data` behind ``tiny_demo_dataset``."""


@pytest.fixture(scope="session")
def tiny_demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small synthetic chest CT volumes (64 x 64 x 8) with ``datalist.json`` and ``README.txt``.

    Written once per test session: 4 positive and 4 negative phantoms, seed 0, split 2 / 1 / 1
    per class into training, validation and test. Tests must not modify it.
    """
    from pipeline.synthetic.demo_data import make_demo_data

    out_dir = tmp_path_factory.mktemp("tiny_demo_dataset")
    make_demo_data(out_dir, **TINY_DEMO)
    return out_dir
