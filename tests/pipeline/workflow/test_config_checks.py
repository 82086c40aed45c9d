"""Up-front checks of bundle settings: booleans typed as text, output folders that cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.workflow.config_checks import require_bools, require_writable_dirs


def test_booleans_pass_and_text_is_refused_by_name() -> None:
    require_bools(resume=True, use_mask=False)

    with pytest.raises(
        ValueError, match=r"resume='false', use_cbam=1 \(on the command line write True or False"
    ):
        require_bools(resume="false", use_mask=True, use_cbam=1)


def test_output_folders_are_created(tmp_path: Path) -> None:
    require_writable_dirs(ckpt_dir=tmp_path / "models", output_dir=tmp_path / "eval" / "run")

    assert (tmp_path / "models").is_dir() and (tmp_path / "eval" / "run").is_dir()
    assert os.listdir(tmp_path / "models") == []  # the trial file is gone


@pytest.mark.skipif(
    not Path("/proc/self").is_dir(), reason="needs Linux /proc, where nobody may create folders"
)
def test_unwritable_folders_are_all_named(tmp_path: Path) -> None:
    with pytest.raises(PermissionError, match=r"ckpt_dir='/proc/models' .*; log_dir='/proc/logs'"):
        require_writable_dirs(ckpt_dir="/proc/models", output_dir=tmp_path, log_dir="/proc/logs")


def test_a_file_in_the_way_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "eval"
    blocker.write_text("not a folder")

    with pytest.raises(PermissionError, match=r"output_dir=.*eval"):
        require_writable_dirs(output_dir=blocker)
