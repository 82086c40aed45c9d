"""PrepareNetworkBatch: the network gets plain tensors, the handlers keep the MetaTensor batch."""

from __future__ import annotations

import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedTrainer
from torch import nn

from pipeline.workflow.batches import PrepareNetworkBatch


def _items(count: int) -> list[dict]:
    return [
        {
            "image": MetaTensor(torch.rand(2, 8, 8, 3), meta={"filename_or_obj": f"case_{i}.nii.gz"}),
            "label": i % 2,
        }
        for i in range(count)
    ]


def test_trainer_hands_the_network_plain_tensors_and_keeps_the_meta_data() -> None:
    network = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8 * 3, 2))
    seen: list[type] = []
    network.register_forward_pre_hook(lambda _module, args: seen.append(type(args[0])))
    batch_images: list[type] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(Dataset(_items(4)), batch_size=2),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=nn.CrossEntropyLoss(),
        prepare_batch=PrepareNetworkBatch(),
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: batch_images.append(type(engine.state.batch[0]["image"]))
    )  # the engine decollates the batch: one dictionary per item

    trainer.run()

    assert seen == [torch.Tensor, torch.Tensor]
    assert batch_images == [MetaTensor, MetaTensor]
    assert trainer.state.output[0]["loss"] > 0


def test_batch_without_a_label_gives_none() -> None:
    image, label = PrepareNetworkBatch()({"image": MetaTensor(torch.zeros(1, 2, 4, 4, 2))}, "cpu")

    assert type(image) is torch.Tensor and image.shape == (1, 2, 4, 4, 2) and label is None
