"""SliceAttentionSaver on a real Ignite engine, the CSV files it writes, and the figures module."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate

from pipeline.data.atomic_files import atomic_write_text
from pipeline.export.attention_export import SliceAttentionSaver, top_slices, write_csv
from pipeline.export.figures import (
    plot_roc,
    plot_slice_attention,
    plot_training_curves,
    read_scalar_log,
    roc_curve,
)
from pipeline.workflow.inference import ERROR_KEY


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def _case(
    name: str, attention: list[float], prob: float, indices: list[int] | None = None, label: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One decollated (batch item, output item) pair as a MONAI evaluator leaves them."""
    slices = len(attention)
    image = MetaTensor(torch.rand(2, 16, 16, slices), meta={"filename_or_obj": f"/data/{name}.nii.gz"})
    item: dict[str, Any] = {"image": image, "case_id": name}
    if indices is not None:
        item["slice_indices"] = torch.tensor(indices)
    output: dict[str, Any] = {"pred": torch.tensor([1 - prob, prob]), "attention": torch.tensor(attention)}
    if label is not None:
        item["label"] = torch.tensor(label)
        item["slice_labels"] = torch.tensor([1 if a > 1 / slices else 0 for a in attention])
    return item, output


def _run(saver: SliceAttentionSaver, steps: list[tuple[Any, Any]]) -> Engine:
    """Run a real Ignite engine whose iterations yield the given (batch, output) pairs."""

    def step(engine: Engine, batch: Any) -> Any:
        engine.state.batch = batch[0]
        return batch[1]

    engine = Engine(step)
    saver.attach(engine)
    engine.run(steps, max_epochs=1)
    return engine


def test_saver_writes_predictions_attention_and_errors(tmp_path: Path) -> None:
    positive = _case("pos", [0.1, 0.5, 0.3, 0.1], prob=0.9, indices=[3, 2, 1, 0])
    negative = _case("neg", [0.2, 0.2, 0.2, 0.2, 0.2], prob=0.2)
    failure = {"image": ["/data/broken.nii.gz"], "case_id": ["broken"], ERROR_KEY: ["InvalidVolumeError: 2D"]}
    saver = SliceAttentionSaver(tmp_path, top_k=2)

    _run(saver, [([positive[0]], [positive[1]]), (failure, failure), ([negative[0]], [negative[1]])])

    predictions = _read(tmp_path / "predictions.csv")
    assert list(predictions[0]) == ["case_id", "image", "prob_covid", "pred", "n_slices", "top_slices"]
    assert [(r["case_id"], r["pred"], r["n_slices"]) for r in predictions] == [
        ("pos", "1", "4"),
        ("neg", "0", "5"),
    ]
    assert float(predictions[0]["prob_covid"]) == pytest.approx(0.9)
    assert predictions[0]["image"] == "/data/pos.nii.gz"
    assert predictions[0]["top_slices"] == "2;1"  # original indices of the two highest weights

    attention = _read(tmp_path / "pos" / "slice_attention.csv")
    assert [int(r["slice_index"]) for r in attention] == [3, 2, 1, 0]
    assert [float(r["attention"]) for r in attention] == pytest.approx([0.1, 0.5, 0.3, 0.1])
    assert [int(r["slice_pred"]) for r in attention] == [0, 1, 1, 0]  # above 1/4 in a positive volume
    assert [int(r["slice_pred"]) for r in _read(tmp_path / "neg" / "slice_attention.csv")] == [0] * 5

    assert _read(tmp_path / "errors.csv") == [
        {"image": "/data/broken.nii.gz", "error": "InvalidVolumeError: 2D"}
    ]
    figure = matplotlib.image.imread(tmp_path / "pos" / "slice_attention.png")
    assert figure.shape[0] > 300 and figure.shape[1] > 600
    assert not list(tmp_path.rglob("*.tmp*"))


def test_collated_and_decollated_outputs_give_the_same_files(tmp_path: Path) -> None:
    item, output = _case("vol", [0.05, 0.6, 0.35], prob=0.7, indices=[0, 1, 2], label=1)
    _run(SliceAttentionSaver(tmp_path / "a", save_figures=False), [([item], [output])])
    _run(
        SliceAttentionSaver(tmp_path / "b", save_figures=False),
        [(list_data_collate([item]), list_data_collate([output]))],
    )
    for name in ("predictions.csv", "errors.csv", "vol/slice_attention.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    rows = _read(tmp_path / "a" / "vol" / "slice_attention.csv")
    assert [int(r["slice_label"]) for r in rows] == [0, 1, 1]
    assert _read(tmp_path / "a" / "predictions.csv")[0]["label"] == "1"


def test_hostile_and_repeated_case_ids_stay_inside_the_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps = []
    for name in ["../../evil", "/etc/cron.d/x", "predictions.csv", "same", "same"]:
        item, output = _case("v", [0.5, 0.5], prob=0.4)
        item["case_id"] = name
        steps.append(([item], [output]))
    _run(SliceAttentionSaver(out, save_figures=False), steps)

    ids = [row["case_id"] for row in _read(out / "predictions.csv")]
    assert ids == ["evil", "etc_cron.d_x", "predictions.csv_case", "same", "same_2"]
    written = [p for p in tmp_path.rglob("slice_attention.csv")]
    assert len(written) == 5 and all(p.parent.parent == out for p in written)


def test_a_new_run_starts_fresh_tables(tmp_path: Path) -> None:
    saver = SliceAttentionSaver(tmp_path, save_figures=False)
    _run(saver, [([_case("a", [1.0], 0.8)[0]], [_case("a", [1.0], 0.8)[1]])])
    _run(saver, [([_case("b", [1.0], 0.8)[0]], [_case("b", [1.0], 0.8)[1]])])
    assert [row["case_id"] for row in _read(tmp_path / "predictions.csv")] == ["b"]


def test_logits_instead_of_probabilities_are_refused(tmp_path: Path) -> None:
    item, output = _case("vol", [0.5, 0.5], prob=0.5)
    output["pred"] = torch.tensor([2.0, -1.0])  # sums to 1, but not probabilities
    with pytest.raises(ValueError, match="class probabilities"):
        _run(SliceAttentionSaver(tmp_path, save_figures=False), [([item], [output])])


def test_mismatched_slice_indices_are_refused(tmp_path: Path) -> None:
    item, output = _case("vol", [0.5, 0.5], prob=0.5, indices=[0, 1, 2])
    with pytest.raises(ValueError, match="3 slice indices for 2 attention weights"):
        _run(SliceAttentionSaver(tmp_path, save_figures=False), [([item], [output])])


def test_atomic_writes_replace_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    write_csv(path, ["a", "b"], [[1, "x,y"], [2, "z"]])
    write_csv(path, ["a", "b"], [[3, "w"]])
    assert _read(path) == [{"a": "3", "b": "w"}]
    atomic_write_text(tmp_path / "sub" / "note.txt", "hello")
    assert (tmp_path / "sub" / "note.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["note.txt", "sub", "table.csv"]


def test_top_slices_orders_by_weight_then_position() -> None:
    assert top_slices(np.array([0.1, 0.4, 0.4, 0.1]), np.array([10, 11, 12, 13]), 3) == [11, 12, 10]


def test_roc_curve_matches_known_values() -> None:
    fpr, tpr, auc = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert auc == pytest.approx(0.75)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert roc_curve([0, 1, 1], [0.2, 0.5, 0.9])[2] == pytest.approx(1.0)
    assert roc_curve([0, 1], [0.5, 0.5])[2] == pytest.approx(0.5)  # ties count half
    assert np.isnan(roc_curve([1, 1], [0.2, 0.3])[2])


def test_plot_roc_returns_the_areas(tmp_path: Path) -> None:
    areas = plot_roc(tmp_path / "roc.png", {"volume": ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])})
    assert areas == {"volume": pytest.approx(0.75)}
    assert matplotlib.image.imread(tmp_path / "roc.png").ndim == 3


def test_slice_attention_figure_without_thumbnails(tmp_path: Path) -> None:
    path = plot_slice_attention(tmp_path / "a.png", [0.2, 0.3, 0.5], prob_covid=None, thumbnails=None)
    assert matplotlib.image.imread(path).shape[1] > 600


def test_training_curves_from_tensorboard_events_and_from_a_log(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=tmp_path / "tb")
    for step in range(1, 61):
        writer.add_scalar("train_loss", 1.0 / step, step)
    for epoch in range(1, 4):
        writer.add_scalar("val_auc", 0.5 + 0.1 * epoch, epoch)
    writer.close()
    assert plot_training_curves(tmp_path / "curves.png", tmp_path / "tb") == ["train_loss", "val_auc"]
    assert matplotlib.image.imread(tmp_path / "curves.png").ndim == 3

    log = tmp_path / "metrics.csv"
    log.write_text("epoch,loss,note\n1,0.9,a\n2,0.5,b\n")
    assert read_scalar_log(log) == {"loss": ([1, 2], [0.9, 0.5])}
    (tmp_path / "no_events").mkdir()
    with pytest.raises(ValueError, match="no scalar series"):
        plot_training_curves(tmp_path / "empty.png", tmp_path / "no_events")
