"""Checkpoint and result files: written atomically, read back as weights only.

- :func:`atomic_torch_save` and :func:`atomic_write_json` write to a temporary file in the
  same folder, flush it to disk, then rename it over the target: a reader (or a run killed
  while writing) sees the old file or the complete new one, never a half-written one.
- :func:`load_checkpoint` reads with ``torch.load(weights_only=True)`` only, so a file that
  carries pickled Python objects is refused, without running them, with a clear message.
- :func:`non_finite_entries` names the tensors of a state dict that hold NaN or infinity.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_checkpoint",
    "non_finite_entries",
]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as plain tensors (it carries pickled objects)."""


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through ``write(stream)`` to a temporary file beside ``path``, flush it, rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it normal permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically: readers see the old file or the complete new one."""
    return _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the complete new one."""
    return _atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` as UTF-8, atomically (whatever the locale's encoding)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN and infinities become ``null``)."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, lambda stream: stream.write(text), mode="w")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return _jsonable(value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


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
