"""Process-group set-up for torchrun, and metrics gathered over a (one-process Gloo) group."""

from __future__ import annotations

import socket

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist

from pipeline.workflow import distributed
from pipeline.workflow.metrics import SliceMetrics, VolumeMetrics


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch):
    """A Gloo group of one process, set up as torchrun would announce it."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    created = distributed.init_process_group(timeout_minutes=1)
    yield created
    dist.destroy_process_group()
    idist.sync()  # Ignite (and MONAI through it) keeps its own record of the group: reset it too


def test_backend_and_device_follow_cuda() -> None:
    assert distributed.backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        assert distributed.local_device() == torch.device("cpu")


def test_outside_torchrun_the_missing_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(RuntimeError, match=r"RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: .*torchrun"):
        distributed.init_process_group()
    assert distributed.is_main_process()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_group_is_joined_once_and_metrics_gather_over_it(one_process_group: bool) -> None:
    assert one_process_group and dist.get_backend() == distributed.backend()
    assert distributed.init_process_group() is False  # already joined
    assert distributed.is_main_process() and distributed.local_rank() == 0

    volume, slices = VolumeMetrics(), SliceMetrics()
    volume.update(([torch.tensor([0.2, 0.8]), torch.tensor([0.9, 0.1])], [torch.tensor(1), torch.tensor(0)]))
    slices.update((torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.8]), torch.tensor([0, 1]), 1))

    assert volume.compute()["volume_acc"] == 1.0
    assert slices.compute()["slice_confusion_matrix"] == [[1, 0], [0, 1]]


@pytest.mark.parametrize("cases", [1, 2, 5])
def test_shards_of_every_rank_hold_each_case_once_and_interleave_back(cases: int) -> None:
    data = [f"case_{index}" for index in range(cases)]
    shares = []
    for rank in range(2):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(distributed, "world_size", lambda: 2)
            patch.setattr(dist, "get_rank", lambda rank=rank: rank)
            shares.append([data[index] for index in distributed.shard_sampler(data)])

    assert sorted(shares[0] + shares[1]) == sorted(data)  # none dropped, none repeated
    assert distributed.interleave(shares) == data  # back in case order
    with pytest.raises(ValueError, match="not a split"):
        distributed.interleave([shares[0], shares[1] + ["x", "y"]])  # rank 1 gained two


def test_outside_a_group_one_process_holds_everything() -> None:
    assert distributed.world_size() == 1 and distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert list(distributed.shard_sampler(["a", "b"])) == [0, 1]
    assert distributed.require_cases_per_process(["a"]) == 1
