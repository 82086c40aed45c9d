"""Re-estimate batch-norm running statistics with the trained weights before each validation.

A network trained from scratch with small batches normalises every training step with that
step's own statistics, while evaluation uses running averages that trail the weights and
average over batches of different make-up. The network then ranks volumes well in evaluation
mode but its probabilities drift (every volume called positive, say). Re-estimating the running
statistics as a plain average over training batches with the current weights ("precise batch
norm") before validating removes that drift.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from ignite.engine import Engine, Events
from torch import nn

from pipeline.workflow.inferer import unwrap_network

__all__ = ["BatchNormRecalibrator", "recalibrate_batch_norm"]


def recalibrate_batch_norm(network: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Set the running estimates of the network's trainable batch-norm layers to their mean over ``inputs``.

    Layers whose statistics are frozen (kept in evaluation mode by the network's ``train``, as
    ``ResNextPlus`` does with ImageNet weights) are left alone. The network's mode is restored.

    Args:
        network: the network (its batch-norm layers are updated in place).
        inputs: network inputs, one batch each, already on the network's device.

    Returns:
        The number of batches averaged over (0 when no layer was updated).
    """
    was_training = network.training
    network.train()
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [layer.momentum for layer in layers]
    count = 0
    try:
        if not layers:
            return 0
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average: every batch counts the same
        with torch.no_grad():
            for batch in inputs:
                network(batch)
                count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        network.train(was_training)
    return count


class BatchNormRecalibrator:
    """Re-estimate the trainer's batch-norm statistics on training batches after an epoch.

    Attach to a MONAI ``SupervisedTrainer`` before the ``ValidationHandler`` (handlers of the
    same event run in the order they were attached), so that validation, best-model selection
    and the saved checkpoints all use the re-estimated statistics. The batches come from the
    trainer's own data loader, prepared as the trainer prepares them; no gradients are
    computed. Under ``DistributedDataParallel`` each process re-estimates on its own shard and
    the wrapper broadcasts rank 0's buffers at the next forward pass.

    Args:
        num_batches: training batches to average over (``None``: a whole pass of the loader).
        interval: run every this many epochs (match the validation interval).
    """

    def __init__(self, num_batches: int | None = 50, interval: int = 1) -> None:
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be a positive number of batches or None, got {num_batches}")
        self.num_batches = num_batches
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _inputs(self, engine: Engine) -> Iterator[torch.Tensor]:
        for batchdata in itertools.islice(engine.data_loader, self.num_batches):
            inputs, *_ = engine.prepare_batch(
                batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
            )
            yield inputs

    def __call__(self, engine: Engine) -> None:
        recalibrate_batch_norm(unwrap_network(engine.network), self._inputs(engine))
