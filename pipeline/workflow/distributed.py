"""Process group set-up for multi-GPU and multi-node training under ``torchrun``.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`init_process_group` joins them with NCCL when CUDA is available and
Gloo otherwise (CPU training), and :func:`local_device` is this process's device: the GPU of
its local rank (so several nodes work unchanged), or the CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import evenly_divisible_all_gather

__all__ = ["backend", "gather_values", "init_process_group", "is_main_process", "local_device", "local_rank"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables ``torchrun`` sets for every process it starts."""


def backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` set by ``torchrun``; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """The device of this process: ``cuda:<local rank>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank()}")
    return torch.device("cpu")


def init_process_group(timeout_minutes: float = 30.0) -> bool:
    """Join the process group started by ``torchrun`` (no-op when already joined).

    Selects the backend with :func:`backend` and, on CUDA, makes the local GPU current.

    Args:
        timeout_minutes: how long collective operations wait for the other processes.

    Returns:
        ``True`` when this call created the process group.

    Raises:
        RuntimeError: not started by ``torchrun`` (no ``RANK``/``WORLD_SIZE`` environment).
    """
    if dist.is_initialized():
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: start multi-process training with torchrun, e.g. "
            "torchrun --standalone --nproc_per_node=2 -m monai.bundle run --config_file ..."
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend(), timeout=timedelta(minutes=timeout_minutes))
    return True


def is_main_process() -> bool:
    """Whether this process writes logs and files: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def gather_values(values: list[float], dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Concatenate each process's ``values`` in rank order (unchanged in a single process)."""
    tensor = torch.as_tensor(values, dtype=dtype).reshape(-1, 1)
    if dist.is_available() and dist.is_initialized():
        tensor = evenly_divisible_all_gather(tensor, concat=True)
    return tensor.reshape(-1).cpu().numpy()
