"""Checkpoints read back as weights only.

- :func:`load_checkpoint` reads with ``torch.load(weights_only=True)`` only, so a file that
  carries pickled Python objects is refused, without running them, with a clear message.
- :func:`non_finite_entries` names the tensors of a state dict that hold NaN or infinity.

Checkpoints are written with :func:`pipeline.data.atomic_files.atomic_torch_save`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "load_checkpoint", "non_finite_entries"]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as plain tensors (it carries pickled objects)."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file holds pickled objects (which are never unpickled) or is
            not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise UnsafeCheckpointError(
                f"{path}: not a readable checkpoint ({_weights_only_detail(error)})"
            ) from None
        raise UnsafeCheckpointError(
            f"{path}: refused: the checkpoint holds pickled Python objects ({found.group(1)}), not only "
            "tensors, and checkpoints are loaded as weights only (torch.load weights_only=True)"
        ) from None
    except Exception as error:  # truncated or foreign files fail in many ways inside torch.load
        raise UnsafeCheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise UnsafeCheckpointError(
            f"{path}: expected a dictionary of state dicts, got {type(checkpoint).__name__}"
        )
    return dict(checkpoint)


def _weights_only_detail(error: Exception) -> str:
    """The line of torch's weights-only error that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    if marker is None:
        return lines[-1] if lines else type(error).__name__
    detail = lines[marker].split("WeightsUnpickler error:", 1)[1].strip()
    return detail or (lines[marker + 1] if marker + 1 < len(lines) else "unknown")


def non_finite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or infinity."""
    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return [] if finite else [prefix or "<tensor>"]
    if isinstance(state, Mapping):
        return [
            name for k, v in state.items() for name in non_finite_entries(v, f"{prefix}.{k}" if prefix else k)
        ]
    if isinstance(state, (list, tuple)):
        return [name for i, v in enumerate(state) for name in non_finite_entries(v, f"{prefix}[{i}]")]
    return []
