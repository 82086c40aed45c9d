"""Which part of ResNext+ keeps it from learning the demo lesions: pooling or depth? Prints a table.

Each row trains one network from random weights in a plain PyTorch loop on the demo volumes
(preprocessed once, every slice, CT and lung mask stacked, kept in memory): Adam steps on
``--batch-size`` volumes drawn at random, each with ``--slices`` random slices in axial order,
scored on the test split after the last step, for ``--seeds`` seeds (of the initial weights and
of the batches drawn). The rows vary one part at a time:

- the slice encoder: the 3-layer CNN of ``bench_learnability.py`` or ResNext+'s own encoder
  (ResNeXt-50 with mask fusion and CBAM, under bfloat16 autocast where the CPU has it);
- its in-plane pooling: the average (ResNeXt's) or the maximum over the slice;
- the pooling over the slices: the maximum or the mean of per-slice logits, the maximum of slice
  features, or ResNext+'s slice attention (with or without its BiLSTM and FC 1024 head);
- the labels: the volume's (as ResNext+ trains) or, for reference, each slice's.

The volume score is the network's logit of COVID-19 (its softmax for two-logit heads).

Usage::

    python benchmarks/bench_pooling.py [--datalist runs/accuracy/data/datalist.json] [--rows small]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_learnability import (  # sibling module: run as a script
    LabelledSplit,
    SmallCNN,
    load_labelled_split,
)
from monai.metrics import compute_roc_auc
from torch import Tensor, nn
from torch.nn import functional as F

from networks import ResNextPlus
from networks.resnext_plus import LSTM_INIT_STD
from networks.slice_attention import SliceAttention
from pipeline.jobs.demo import DEFAULT, make_demo_datalist
from pipeline.synthetic.base_ct import resolve_base_ct
from pipeline.workflow.precision import cpu_has_native_bf16


class SmallEncoder(nn.Module):
    """The 3-layer CNN's slice features, with the maximum or the average over the slice."""

    def __init__(self, in_plane: str) -> None:
        super().__init__()
        layers = list(SmallCNN().features)[:-1]
        pool = nn.AdaptiveMaxPool2d(1) if in_plane == "max" else nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(*layers, pool, nn.Flatten())
        self.out_features = 64

    def forward(self, slices: Tensor) -> Tensor:
        return self.features(slices)


def resnext_encoder(in_plane: str) -> nn.Module:
    encoder = ResNextPlus().encoder
    if in_plane == "max":
        encoder.backbone.avgpool = nn.AdaptiveMaxPool2d(1)
    return encoder


class VolumeNet(nn.Module):
    """A slice encoder and a pooling over the slices; ``slice_logits`` for slice supervision."""

    def __init__(self, encoder: nn.Module, over_slices: str) -> None:
        super().__init__()
        self.encoder, self.over_slices = encoder, over_slices
        features = encoder.out_features
        if over_slices in ("max logit", "mean logit", "max feature"):
            self.head: nn.Module = nn.Linear(features, 1)
            return
        self.lstm = (
            nn.LSTM(features, 512, batch_first=True, bidirectional=True) if "BiLSTM" in over_slices else None
        )
        if self.lstm is not None:
            for name, parameter in self.lstm.named_parameters():
                nn.init.normal_(parameter, 0.0, LSTM_INIT_STD) if name.startswith(
                    "weight"
                ) else nn.init.zeros_(parameter)
            features = 1024
        self.attention = SliceAttention(features)
        self.head = nn.Sequential(nn.Linear(features, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def features(self, x: Tensor) -> Tensor:
        batch, channels, height, width, depth = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(batch * depth, channels, height, width)
        return self.encoder(slices).reshape(batch, depth, -1).float()

    def slice_logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        if self.over_slices == "max logit":
            return self.slice_logits(x).amax(1)
        if self.over_slices == "mean logit":
            return self.slice_logits(x).mean(1)
        features = self.features(x)
        if self.over_slices == "max feature":
            return self.head(features.amax(1)).squeeze(-1)
        if self.lstm is not None:
            features, _ = self.lstm(features)
        return self.head(self.attention(features)[0]).squeeze(-1)


@dataclass(frozen=True)
class Row:
    encoder: str  # "3-layer CNN" or "ResNeXt-50"
    in_plane: str  # "max" or "average"
    over_slices: str
    labels: str = "volume"
    lr: float = 1e-3
    steps: int = 300

    @property
    def description(self) -> str:
        return f"{self.encoder}, {self.in_plane}, {self.over_slices}, {self.labels}"

    def network(self) -> nn.Module:
        if self.encoder == "ResNext+" and self.over_slices == "ResNext+ head":
            network = ResNextPlus()
            if self.in_plane == "max":
                network.encoder.backbone.avgpool = nn.AdaptiveMaxPool2d(1)
            return TwoLogits(network)
        encoder = (
            SmallEncoder(self.in_plane) if self.encoder == "3-layer CNN" else resnext_encoder(self.in_plane)
        )
        return VolumeNet(encoder, self.over_slices)


class TwoLogits(nn.Module):
    """ResNext+ itself, its COVID-19 logit minus the other as one score."""

    def __init__(self, network: ResNextPlus) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        logits = self.network(x).float()
        return logits[:, 1] - logits[:, 0]


SMALL_ROWS = (
    Row("3-layer CNN", "max", "max logit", labels="slice"),
    Row("3-layer CNN", "max", "max logit"),
    Row("3-layer CNN", "max", "max feature"),
    Row("3-layer CNN", "average", "max logit"),
    Row("3-layer CNN", "average", "max feature"),
    Row("3-layer CNN", "max", "mean logit"),
    Row("3-layer CNN", "max", "attention, FC 1024"),
    Row("3-layer CNN", "max", "BiLSTM, attention, FC 1024", steps=1000),
    Row("3-layer CNN", "average", "BiLSTM, attention, FC 1024"),
)
RESNEXT_ROWS = (
    Row("ResNeXt-50", "average", "max logit", labels="slice", lr=2e-4, steps=200),
    Row("ResNext+", "average", "ResNext+ head", steps=200),
    Row("ResNext+", "max", "ResNext+ head", steps=200),
    Row("ResNeXt-50", "max", "max feature", steps=200),
    Row("ResNeXt-50", "max", "max feature", lr=2e-4, steps=300),
)


def test_auc(network: nn.Module, test: LabelledSplit, autocast: Callable[[], object]) -> float:
    network.eval()
    with torch.no_grad(), autocast():
        scores = torch.cat(
            [network(test.volumes[i : i + 10].float()).float() for i in range(0, len(test.labels), 10)]
        )
    network.train()
    return float(compute_roc_auc(scores, test.labels))


def train(
    row: Row, training: LabelledSplit, test: LabelledSplit, args: argparse.Namespace, seed: int
) -> tuple[float, float]:
    """Test ROC AUC after the last step and the mean training loss over the last ``--every`` steps."""
    torch.manual_seed(seed)
    network = row.network()
    bf16 = row.encoder != "3-layer CNN" and cpu_has_native_bf16()

    def autocast() -> object:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    optimizer = torch.optim.Adam(network.parameters(), lr=row.lr)
    generator = torch.Generator().manual_seed(seed)
    depth = training.volumes.shape[-1]
    losses = []
    for _ in range(row.steps):
        batch = torch.randint(len(training.labels), (args.batch_size,), generator=generator)
        slices = torch.sort(torch.randperm(depth, generator=generator)[: args.slices]).values
        x = training.volumes[batch][..., slices].float()
        with autocast():
            if row.labels == "slice":
                target = training.slice_labels[batch][:, slices].float()
                loss = F.binary_cross_entropy_with_logits(network.slice_logits(x).float(), target)
            else:
                loss = F.binary_cross_entropy_with_logits(network(x).float(), training.labels[batch].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return test_auc(network, test, autocast), float(np.mean(losses[-args.every :]))


def table_row(row: Row, training: LabelledSplit, test: LabelledSplit, args: argparse.Namespace) -> str:
    """One table row: the test ROC AUC over ``--seeds`` seeds (mean, SD, each) and the loss."""
    start = time.perf_counter()
    runs = np.array([train(row, training, test, args, args.seed + k) for k in range(args.seeds)])
    aucs, losses = runs[:, 0], runs[:, 1]
    spread = f" ± {aucs.std(ddof=1):.2f}" if len(aucs) > 1 else ""
    return (
        f"| {row.encoder} | {row.in_plane} | {row.over_slices} | {row.labels} | {row.lr:g} | {row.steps} | "
        f"{aucs.mean():.2f}{spread} | {' '.join(f'{a:.2f}' for a in aucs)} | {losses.mean():.3f} | "
        f"{time.perf_counter() - start:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datalist", type=Path, default=None, help="demo data list (default: make the demo's data)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/pooling"), help="where the demo data are made")
    parser.add_argument("--rows", choices=("small", "resnext", "all"), default="all")
    parser.add_argument(
        "--match", default="", help="only the rows whose 'encoder, pooling, pooling, labels' hold it"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="training volumes per step")
    parser.add_argument("--slices", type=int, default=8, help="random slices per volume and step")
    parser.add_argument("--every", type=int, default=50, help="last steps whose training loss is shown")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="first seed (of the weights and the batches)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datalist = args.datalist or make_demo_datalist(args.out / "data", DEFAULT, resolve_base_ct())[0]
    training, test = (load_labelled_split(datalist, split, DEFAULT.size) for split in ("training", "test"))
    shape = tuple(test.volumes.shape[1:])
    print(f"{len(training.labels)} training, {len(test.labels)} test volumes, each {shape}")
    print(
        f"| encoder | in-plane pooling | over the slices | labels | Adam lr | steps | test ROC AUC | "
        f"per seed | loss, last {args.every} steps | seconds |"
    )
    print("|---|---|---|---|---:|---:|---:|---|---:|---:|")
    rows = {"small": SMALL_ROWS, "resnext": RESNEXT_ROWS, "all": SMALL_ROWS + RESNEXT_ROWS}[args.rows]
    for row in (row for row in rows if args.match in row.description):
        print(table_row(row, training, test, args), flush=True)


if __name__ == "__main__":
    main()
