"""How fast networks learn the demo task from scratch on a CPU; prints a table of test ROC AUC per epoch.

The demo volumes (``pipeline.jobs.demo.make_demo_datalist`` with the demo's default settings) go
through the evaluation preprocessing once (every slice, CT and lung mask stacked) and are kept
in memory; then each network trains with Adam on ``--batch-size`` volumes per step, every
training volume once per epoch, in a plain PyTorch loop, and is scored on the test split after
every epoch.

- ``signal``: the mean CT intensity inside the lung mask alone, as a score (no training): how
  visible the volume label is.
- ``3-layer CNN``: three 3 x 3 convolutions with batch norm and max pooling, the maximum over
  slices, one linear layer. A reference for what a small network picks up within the budget.
- ``ResNextPlus``: the bundle's network (ResNeXt-50, mask fusion, CBAM, BiLSTM, slice attention).

Usage::

    python benchmarks/bench_learnability.py [--epochs 6] [--resnext-epochs 4] [--lr 2e-4] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.transforms import Compose
from torch import Tensor, nn

from networks import ResNextPlus
from pipeline.data.datalist import load_datalist
from pipeline.jobs.demo import DEFAULT, make_demo_datalist
from pipeline.synthetic.base_ct import resolve_base_ct
from pipeline.workflow.preprocessing import evaluation_transforms


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-max-pool stages per slice, the maximum over slices, a linear classifier."""

    def __init__(self, in_channels: int = 2, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for inplanes, planes in zip((in_channels, *widths[:-1]), widths):
            layers += [
                nn.Conv2d(inplanes, planes, 3, padding=1),
                nn.BatchNorm2d(planes),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1))
        self.classifier = nn.Linear(widths[-1], 2)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width, slices = x.shape
        per_slice = x.permute(0, 4, 1, 2, 3).reshape(batch * slices, channels, height, width)
        features = self.features(per_slice).flatten(1).reshape(batch, slices, -1)
        return self.classifier(features.amax(dim=1))


@dataclass
class LabelledSplit:
    """One split's preprocessed volumes with their volume and slice labels."""

    volumes: Tensor  # (N, 2, size, size, S), float16 as the evaluation preprocessing stores them
    labels: Tensor  # (N,)
    slice_labels: Tensor  # (N, S)


def load_labelled_split(datalist: Path, split: str, size: int) -> LabelledSplit:
    """The split's volumes (every slice, CT and lung mask stacked) with volume and slice labels."""
    transform = Compose(evaluation_transforms(use_mask=True, resize_size=size, spatial_size=size))
    volumes, labels, slice_labels = [], [], []
    for item in load_datalist(datalist, split, base_dir=datalist.parent):
        data = transform(dict(item))
        volumes.append(torch.as_tensor(data["image"]).as_subclass(Tensor).half())
        labels.append(int(data["label"]))
        slice_labels.append(torch.as_tensor(np.asarray(data["slice_labels"])))
    return LabelledSplit(torch.stack(volumes), torch.tensor(labels), torch.stack(slice_labels).long())


def load_split(datalist: Path, split: str, size: int) -> tuple[Tensor, Tensor]:
    """Preprocessed volumes ``(N, 2, size, size, S)`` in float32 and labels ``(N,)`` of one split."""
    loaded = load_labelled_split(datalist, split, size)
    return loaded.volumes.float(), loaded.labels


def test_auc(network: nn.Module, volumes: Tensor, labels: Tensor) -> float:
    network.eval()
    with torch.no_grad():
        scores = torch.cat([torch.softmax(network(v[None]), dim=1)[:, 1] for v in volumes])
    network.train()
    return float(compute_roc_auc(scores, labels))


def train(
    name: str,
    network: nn.Module,
    data: dict[str, tuple[Tensor, Tensor]],
    epochs: int,
    lr: float,
    batch_size: int,
) -> list[str]:
    """Rows ``name | batch size | epoch | steps | mean loss | test AUC | seconds`` after every epoch."""
    volumes, labels = data["training"]
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    rows, start, steps = [], time.perf_counter(), 0
    network.train()
    for epoch in range(1, epochs + 1):
        losses = []
        for batch in torch.randperm(len(volumes)).split(batch_size):
            loss = nn.functional.cross_entropy(network(volumes[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
        auc = test_auc(network, *data["test"])
        rows.append(
            f"| {name} | {batch_size} | {epoch} | {steps} | {sum(losses) / len(losses):.3f} | {auc:.3f} | "
            f"{time.perf_counter() - start:.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/learnability"))
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the 3-layer CNN")
    parser.add_argument("--resnext-epochs", type=int, default=4, help="epochs of ResNextPlus")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4, help="training volumes per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datalist, _ = make_demo_datalist(args.out / "data", DEFAULT, resolve_base_ct())
    data = {split: load_split(datalist, split, DEFAULT.size) for split in ("training", "test")}
    volumes, labels = data["test"]
    lung_mean = (volumes[:, 0] * volumes[:, 1]).sum((1, 2, 3)) / volumes[:, 1].sum((1, 2, 3))
    print(
        f"demo data: {len(data['training'][1])} training, {len(labels)} test volumes, "
        f"each {tuple(volumes.shape[1:])}"
    )
    print("| network | volumes per step | epoch | steps | mean training loss | test ROC AUC | seconds |")
    print("|---|---|---|---|---|---|---|")
    signal_auc = float(compute_roc_auc(lung_mean, labels))
    print(f"| signal: mean lung intensity | - | - | - | - | {signal_auc:.3f} | - |")
    torch.manual_seed(args.seed)
    train("3-layer CNN", SmallCNN(), data, args.epochs, args.lr, args.batch_size)
    torch.manual_seed(args.seed)
    train("ResNextPlus", ResNextPlus(), data, args.resnext_epochs, args.lr, args.batch_size)


if __name__ == "__main__":
    main()
