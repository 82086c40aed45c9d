"""The demo's base CT: fetched into the cache with a content checksum, found there by the runs."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pipeline.synthetic.base_ct as base_ct_module
from pipeline.jobs.cli import main
from pipeline.synthetic.base_ct import (
    AUTO_BASE_CT,
    BASE_CT_SERIES,
    CACHE_ENV,
    BaseCTChecksumError,
    BaseCTDownloadError,
    TciaSeries,
    fetch_base_ct,
    resolve_base_ct,
    series_sha256,
)
from tests.pipeline.data.test_cases import write_dicom_series

SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.2"


def _zip_series(folder: Path, archive: Path, nested: str = "1.000000-5mm-01234") -> Path:
    """A zip of a series' files in a sub-folder, as NBIA serves one."""
    with zipfile.ZipFile(archive, "w") as stream:
        for path in sorted(folder.iterdir()):
            stream.write(path, f"{nested}/{path.name}")
    return archive


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TciaSeries]:
    """A 4-slice CT series on disk and its description with the right hash."""
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 400, size=(8, 8, 4)).astype(np.int16)
    folder = write_dicom_series(volume, (0.8, 0.8, 5.0), tmp_path_factory.mktemp("series") / "s", SERIES_UID)
    series = dataclasses.replace(
        BASE_CT_SERIES, name="small-series", series_uid=SERIES_UID, files=4, sha256=series_sha256(folder)
    )
    return folder, series


def _leftovers(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir()) if cache.is_dir() else []


def test_fetch_from_a_file_url_checks_and_caches_the_series(small_series, tmp_path):
    folder, series = small_series
    url = _zip_series(folder, tmp_path / "series.zip").as_uri()
    cache = tmp_path / "cache"
    fetched = fetch_base_ct(cache, series, url=url, progress=False)
    assert fetched == cache / "small-series"
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert series_sha256(fetched) == series.sha256
    assert _leftovers(cache) == ["small-series"]  # no zip, no temporary folder
    # a second fetch finds the checked copy and downloads nothing (the URL is gone)
    assert fetch_base_ct(cache, series, url=(tmp_path / "gone.zip").as_uri(), progress=False) == fetched


def test_fetch_with_a_wrong_checksum_keeps_nothing(small_series, tmp_path):
    folder, series = small_series
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    for index, path in enumerate(sorted(folder.iterdir())):
        data = bytearray(path.read_bytes())
        if index == 2:
            data[-1] ^= 0xFF  # one voxel's byte changed
        (corrupted / path.name).write_bytes(bytes(data))
    url = _zip_series(corrupted, tmp_path / "series.zip").as_uri()
    cache = tmp_path / "cache"
    with pytest.raises(
        BaseCTChecksumError, match=rf"does not match: SHA-256 [0-9a-f]{{64}}, expected {series.sha256}"
    ):
        fetch_base_ct(cache, series, url=url, progress=False)
    assert _leftovers(cache) == []


def test_fetch_without_network_is_a_download_error(small_series, tmp_path):
    _, series = small_series
    cache = tmp_path / "cache"
    with pytest.raises(BaseCTDownloadError, match="could not download file://"):
        fetch_base_ct(cache, series, url=(tmp_path / "absent.zip").as_uri(), progress=False)
    assert _leftovers(cache) == []


def test_the_recorded_hash_is_that_of_the_real_series(real_ct_dir, tmp_path):
    assert BASE_CT_SERIES.url.endswith(f"getImage?SeriesInstanceUID={BASE_CT_SERIES.series_uid}")
    assert len(list(real_ct_dir.glob("*.dcm"))) == BASE_CT_SERIES.files
    url = _zip_series(real_ct_dir, tmp_path / "A0001.zip").as_uri()
    fetched = fetch_base_ct(tmp_path / "cache", url=url, progress=False)
    assert fetched == tmp_path / "cache" / BASE_CT_SERIES.name
    assert series_sha256(fetched) == BASE_CT_SERIES.sha256


def test_fetch_command_says_in_one_line_when_there_is_no_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(base_ct_module, "NBIA_IMAGE_URL", (tmp_path / "offline" / "{uid}.zip").as_uri())
    assert main(["fetch-base-ct", "--cache", str(tmp_path / "cache")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("base CT not fetched: could not download file://")
    assert len(lines) == 2  # what is fetched, then why it was not
    assert _leftovers(tmp_path / "cache") == []


def test_resolve_base_ct_explicit_then_cache_then_phantoms(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert resolve_base_ct(None) is None
    assert resolve_base_ct(tmp_path / "my_ct.nii.gz") == tmp_path / "my_ct.nii.gz"
    assert resolve_base_ct(AUTO_BASE_CT) is None  # empty cache: phantoms
    (tmp_path / "cache" / BASE_CT_SERIES.name).mkdir(parents=True)
    assert resolve_base_ct() == tmp_path / "cache" / BASE_CT_SERIES.name
    monkeypatch.delenv(CACHE_ENV)
    assert resolve_base_ct() in (
        None,
        Path.home() / ".cache" / "covid19-ct-resnextplus" / BASE_CT_SERIES.name,
    )
