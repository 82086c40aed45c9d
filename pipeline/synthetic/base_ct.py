"""The demo's real chest CT: where it is cached, how it is fetched from TCIA, which copy a run uses.

The demo and the accuracy study insert synthetic lesions into one public CT series: patient
Lung_Dx-A0001 of the TCIA collection "Lung-PET-CT-Dx" (CC BY 4.0), 64 axial DICOM slices of
512 x 512. ``python -m pipeline fetch-base-ct`` downloads it once, through NBIA's REST API
and MONAI's :func:`monai.apps.download_url` and :func:`monai.apps.extractall`, into a cache folder:
``$COVID_CT_CACHE/lung-pet-ct-dx-A0001``, with ``~/.cache/covid19-ct-resnextplus`` when the
variable is unset. Nothing else downloads it; a run only looks in the cache
(:func:`resolve_base_ct`).

The checksum: TCIA builds the zip on request, so its bytes (and hash) are not fixed. What is
fixed is the series itself, so :func:`series_sha256` hashes the DICOM files of the extracted
series: the SHA-256 of the sorted SHA-256 digests of the files' bytes, independent of file
names and of the order the zip lists them in. A download whose series does not match
:data:`BASE_CT_SERIES`'s hash is deleted and reported; the cache then holds nothing of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUTO_BASE_CT",
    "BASE_CT_SERIES",
    "CACHE_ENV",
    "BaseCTChecksumError",
    "BaseCTDownloadError",
    "TciaSeries",
    "cache_dir",
    "cached_base_ct",
    "fetch_base_ct",
    "resolve_base_ct",
    "series_sha256",
]

CACHE_ENV = "COVID_CT_CACHE"
"""Environment variable naming the cache folder (the base CT lies in ``<cache>/lung-pet-ct-dx-A0001``)."""

DEFAULT_CACHE = Path("~/.cache/covid19-ct-resnextplus")
"""The cache folder when :data:`CACHE_ENV` is unset."""

AUTO_BASE_CT = "auto"
"""``base_ct`` value meaning: the cached series when it is there, phantoms otherwise."""

NBIA_IMAGE_URL = (
    "https://services.cancerimagingarchive.net/nbia-api/services/v1/getImage?SeriesInstanceUID={uid}"
)
"""NBIA's REST call that returns one series as a zip of DICOM files (public collections: no login)."""

DICOM_SUFFIX = ".dcm"


@dataclass(frozen=True)
class TciaSeries:
    """One public TCIA series: what it is, where it is cached and how its content is checked.

    Attributes:
        name: its folder in the cache.
        collection: the TCIA collection.
        patient_id: the patient's id in the collection.
        series_uid: the DICOM SeriesInstanceUID (as read from the files' headers).
        files: the number of DICOM files of the series.
        sha256: :func:`series_sha256` of the series.
        citation: how to cite the collection (its licence is CC BY 4.0).
    """

    name: str
    collection: str
    patient_id: str
    series_uid: str
    files: int
    sha256: str
    citation: str

    @property
    def url(self) -> str:
        """The NBIA REST address that serves the series as a zip."""
        return NBIA_IMAGE_URL.format(uid=self.series_uid)


BASE_CT_SERIES = TciaSeries(
    name="lung-pet-ct-dx-A0001",
    collection="Lung-PET-CT-Dx",
    patient_id="Lung_Dx-A0001",
    series_uid="1.3.6.1.4.1.14519.5.2.1.6655.2359.213534032021332276911485641315",
    files=64,
    sha256="cc6142a496c1f2e0be473d8f26a788427c21800ad65e2eff3fd4f9ec530fd626",
    citation=(
        "Li P, Wang S, Li T, Lu J, HuangFu Y, Wang D. A Large-Scale CT and PET/CT Dataset for Lung "
        "Cancer Diagnosis (Lung-PET-CT-Dx). The Cancer Imaging Archive, 2020. CC BY 4.0."
    ),
)
"""The demo's base CT: 64 axial slices of 512 x 512, 5 mm apart, in HU; COVID-19 negative (2007)."""


class BaseCTDownloadError(OSError):
    """The series could not be downloaded (no network, server error); the message says why in one line."""


class BaseCTChecksumError(ValueError):
    """A downloaded series is not the expected one; nothing of it was kept."""


def cache_dir() -> Path:
    """The cache folder: ``$COVID_CT_CACHE``, else ``~/.cache/covid19-ct-resnextplus``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def cached_base_ct(cache: str | os.PathLike | None = None, series: TciaSeries = BASE_CT_SERIES) -> Path:
    """Where the series lies (or would lie) in ``cache`` (default :func:`cache_dir`)."""
    return Path(cache).expanduser() / series.name if cache is not None else cache_dir() / series.name


def resolve_base_ct(base_ct: str | os.PathLike | None = AUTO_BASE_CT) -> Path | None:
    """The real CT a run builds on.

    Args:
        base_ct: a path (used as given), ``None`` (none: phantoms only) or :data:`AUTO_BASE_CT`
            (the cached series when it is there; see :func:`cache_dir`).

    Returns:
        The path, or ``None`` for phantoms only. An explicit path is returned even when it
        does not exist, so the caller can say so.
    """
    if base_ct is None:
        return None
    if os.fspath(base_ct) != AUTO_BASE_CT:
        return Path(base_ct)
    cached = cached_base_ct()
    return cached if cached.is_dir() else None


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(DICOM_SUFFIX))


def series_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 of a DICOM series: over the sorted SHA-256 digests of its ``.dcm`` files' bytes.

    Independent of file names and listing order; any changed, missing or extra file changes it.
    """
    digests = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in _series_files(Path(folder)))
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def _one_series_folder(extracted: Path, url: str) -> Path:
    """The folder holding the extracted DICOM files (a zip may nest them in sub-folders)."""
    folders = {path.parent for path in _series_files(extracted)}
    if len(folders) != 1:
        raise BaseCTChecksumError(
            f"{url}: expected one folder of DICOM files in the download, found {len(folders)}"
        )
    return folders.pop()


@contextlib.contextmanager
def _monai_download_logs_off() -> Iterator[None]:
    """MONAI logs each download step (and a failure before raising it); the caller reports instead.

    Its warning that the zip's hash is not checked is silenced too: the series inside is.
    """
    logger = logging.getLogger("monai.apps")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No hash value provided")
            yield
    finally:
        logger.setLevel(level)


def fetch_base_ct(
    cache: str | os.PathLike | None = None,
    series: TciaSeries = BASE_CT_SERIES,
    url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``series`` into the cache, check it, and return its folder.

    A series already in the cache with the right hash is kept (no download). Otherwise the zip
    is downloaded and extracted (:func:`monai.apps.download_url`, :func:`monai.apps.extractall`;
    not ``download_and_extract``, which asks the server for a file name first) into a temporary
    folder inside the cache, the series' :func:`series_sha256` is checked, and only then the
    folder is moved into place; on any failure the temporary folder is removed.

    Args:
        cache: the cache folder (default :func:`cache_dir`).
        series: what to fetch (default: the demo's base CT).
        url: where to fetch it from (default ``series.url``); any address ``urllib`` opens,
            ``file://`` included.
        progress: show MONAI's download progress bar.

    Returns:
        ``<cache>/<series.name>``.

    Raises:
        BaseCTDownloadError: the download failed (no network, server error).
        BaseCTChecksumError: the downloaded series has another hash, or is not one folder of
            DICOM files.
    """
    from monai.apps import download_url, extractall

    target = cached_base_ct(cache, series)
    if target.is_dir() and series_sha256(target) == series.sha256:
        return target
    url = url or series.url
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{series.name}-", dir=target.parent))
    try:
        archive = scratch / f"{series.name}.zip"
        try:
            with _monai_download_logs_off():
                download_url(url, filepath=archive, progress=progress)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            reason = getattr(error, "reason", None) or error
            raise BaseCTDownloadError(f"could not download {url}: {' '.join(str(reason).split())}") from error
        try:
            with _monai_download_logs_off():
                extractall(archive, output_dir=scratch / "series", file_type="zip", has_base=False)
        except (zipfile.BadZipFile, OSError) as error:
            raise BaseCTChecksumError(
                f"{url}: the download is not a readable zip ({error}); nothing was kept"
            ) from None
        folder = _one_series_folder(scratch / "series", url)
        found = series_sha256(folder)
        if found != series.sha256:
            raise BaseCTChecksumError(
                f"{url}: the downloaded series does not match: SHA-256 {found}, expected {series.sha256} "
                f"({len(_series_files(folder))} DICOM files, expected {series.files}); nothing was kept"
            )
        if target.exists():  # an incomplete or changed copy: replaced by the checked one
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
