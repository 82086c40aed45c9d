"""Process group set-up for multi-GPU and multi-node training and inference under ``torchrun``.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`init_process_group` joins them with NCCL when CUDA is available and
Gloo otherwise (CPU training), and :func:`local_device` is this process's device: the GPU of
its local rank (so several nodes work unchanged), or the CPU. For evaluation and inference,
:func:`shard_sampler` gives each process its share of the cases (case ``i`` to rank
``i % world size``, none dropped or repeated) and :func:`interleave` puts the per-process
results back in case order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DistributedSampler
from monai.utils import evenly_divisible_all_gather

__all__ = [
    "backend",
    "gather_objects",
    "gather_values",
    "init_process_group",
    "interleave",
    "is_main_process",
    "local_device",
    "local_rank",
    "require_cases_per_process",
    "shard_sampler",
    "world_size",
]

T = TypeVar("T")

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


def world_size() -> int:
    """Number of processes in the group: 1 outside ``torch.distributed``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard_sampler(dataset: Sequence[Any]) -> DistributedSampler | list[int]:
    """This process's share of ``dataset``, in order: item ``i`` goes to rank ``i % world size``.

    MONAI's ``DistributedSampler(even_divisible=False, shuffle=False)``, which neither drops
    nor repeats an item; with fewer items than processes (the last cases of a resumed run),
    which that sampler refuses, the same assignment as a plain list of indices, empty for the
    ranks left without a case.
    """
    rank, size = (dist.get_rank(), world_size()) if world_size() > 1 else (0, 1)
    if len(dataset) >= size:
        return DistributedSampler(dataset, even_divisible=False, shuffle=False, num_replicas=size, rank=rank)
    return list(range(rank, len(dataset), size))


def gather_objects(obj: T) -> list[T]:
    """``obj`` of every process, by rank (``[obj]`` outside ``torch.distributed``); a collective call."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def interleave(shares: Sequence[Sequence[T]]) -> list[T]:
    """Items in dataset order from each rank's results in :func:`shard_sampler` order.

    Raises:
        ValueError: the shares' lengths are not those of such a split (a rank lost or gained items).
    """
    total = sum(len(share) for share in shares)
    size = len(shares)
    if any(len(share) != len(range(rank, total, size)) for rank, share in enumerate(shares)):
        raise ValueError(f"results per process {[len(s) for s in shares]} are not a split of {total} items")
    return [shares[index % size][index // size] for index in range(total)]


def require_cases_per_process(cases: Sequence[Any]) -> int:
    """Check that every process has a case to evaluate (the metrics are gathered over all of them).

    Returns:
        The number of cases.

    Raises:
        ValueError: fewer cases than processes, naming both counts.
    """
    if len(cases) < world_size():
        raise ValueError(
            f"{len(cases)} cases to evaluate for {world_size()} processes: start at most {len(cases)} "
            "processes (--nproc_per_node)"
        )
    return len(cases)
