"""Batch-norm re-estimation: the running statistics become the plain average over training batches."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from torch import nn

from networks import ResNextPlus
from pipeline.workflow.batch_norm_stats import BatchNormRecalibrator, recalibrate_batch_norm


def small_network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 8, 8, generator=generator) * (i + 1) + i for i in range(count)]


def expected_mean(network: nn.Sequential, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The average over the batches of each batch's per-channel mean after the convolution."""
    with torch.no_grad():
        return torch.stack([network[0](x).mean(dim=(0, 2, 3)) for x in inputs]).mean(dim=0)


def test_running_mean_becomes_the_average_of_the_batch_means_and_mode_is_restored() -> None:
    network = small_network().eval()
    network[1].momentum = 0.3
    inputs = batches(3)
    assert recalibrate_batch_norm(network, inputs) == 3
    torch.testing.assert_close(network[1].running_mean, expected_mean(network, inputs))
    assert not network.training and network[1].momentum == 0.3
    assert network[1].num_batches_tracked == 3


def test_frozen_batch_norm_statistics_are_left_alone() -> None:
    network = ResNextPlus(lstm_hidden=4, fc_hidden=4, freeze_bn_stats=True)
    before = {name: buffer.clone() for name, buffer in network.named_buffers()}
    assert recalibrate_batch_norm(network, [torch.rand(1, 2, 32, 32, 2)]) == 0
    for name, buffer in network.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_recalibrator_uses_the_trainers_batches_after_each_epoch() -> None:
    network = small_network()
    inputs = batches(4)
    loader = [{"image": x, "label": torch.zeros(len(x), dtype=torch.long)} for x in inputs]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0),  # weights stay as they are
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[BatchNormRecalibrator(num_batches=2)],
    )
    trainer.run()
    torch.testing.assert_close(network[1].running_mean, expected_mean(network, inputs[:2]))


def test_num_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_batches"):
        BatchNormRecalibrator(num_batches=0)
