"""Checks of bundle config values before a workflow starts, so mistakes fail at once and clearly.

- :func:`require_bools`: ``python -m monai.bundle run --flag false`` passes the text
  ``"false"``, which Python takes as true (the command line reads only ``True`` and ``False``
  as booleans); such a value is refused instead of silently meaning the opposite.
- :func:`require_writable_dirs`: output folders are created and tried before training, not
  found unwritable when the first checkpoint is due.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["require_bools", "require_writable_dirs"]


def require_bools(**flags: Any) -> None:
    """Raise ``ValueError`` naming every flag whose value is not a boolean.

    Args:
        flags: config id and value of each on/off setting.
    """
    wrong = {name: value for name, value in flags.items() if not isinstance(value, bool)}
    if wrong:
        listing = ", ".join(f"{name}={value!r}" for name, value in wrong.items())
        raise ValueError(
            f"these settings must be True or False: {listing} (on the command line write True or False, "
            "capitalised; 'true' and 'false' arrive as text)"
        )


def require_writable_dirs(**folders: str | os.PathLike) -> None:
    """Create each folder when missing and check that a file can be written in it.

    Args:
        folders: config id and path of each output folder.

    Raises:
        PermissionError: listing every folder that cannot be created or written to.
    """
    problems = []
    for name, folder in folders.items():
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as error:
            problems.append(f"{name}={os.fspath(path)!r} ({error.strerror or error})")
    if problems:
        raise PermissionError(f"cannot write the outputs: {'; '.join(problems)}")
