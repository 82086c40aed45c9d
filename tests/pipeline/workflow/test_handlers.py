"""Checkpoint files and the Ignite handlers of the bundle: atomic saves, resume, NaN guard, metrics.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from torch import nn

from pipeline.data.atomic_files import atomic_torch_save
from pipeline.workflow.checkpoints import UnsafeCheckpointError, load_checkpoint, non_finite_entries
from pipeline.workflow.handlers import (
    BestCheckpointSaver,
    CheckpointRestorer,
    LastCheckpointSaver,
    MetricsJsonWriter,
    NonFiniteError,
    NonFiniteLossGuard,
    ProgressBarHandler,
)


class _Marker:
    """Unpickling it would create a file: it must never be unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_atomic_save_keeps_the_previous_file_when_saving_fails(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    atomic_torch_save({"model": {"w": torch.ones(2)}}, path)

    with pytest.raises(Exception, match="pickle"):
        atomic_torch_save({"model": {"w": torch.zeros(2)}, "bad": lambda: None}, path)

    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary file left


def test_checkpoints_with_pickled_objects_are_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Marker(marker)}, path)

    with pytest.raises(
        UnsafeCheckpointError, match=r"refused: the checkpoint holds pickled Python objects \(\w+"
    ):
        load_checkpoint(path)

    assert not marker.exists()


def test_load_checkpoint_reports_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(UnsafeCheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")


def _training_engine(model: nn.Module, optimizer: torch.optim.Optimizer) -> Engine:
    def step(engine: Engine, batch: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def test_last_state_round_trip_resumes_after_the_saved_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = [torch.randn(4, 3) for _ in range(3)]
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    trainer = _training_engine(model, optimizer)
    objects = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}
    LastCheckpointSaver(tmp_path, objects).attach(trainer)
    trainer.run(data, max_epochs=2)

    saved = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert set(saved) == {"model", "optimizer", "lr_scheduler", "trainer"}
    assert saved["trainer"]["iteration"] == 6

    fresh = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=2)
    resumed = _training_engine(fresh, fresh_optimizer)
    restored = {"model": fresh, "optimizer": fresh_optimizer, "lr_scheduler": fresh_scheduler}
    CheckpointRestorer(tmp_path / "checkpoint_last.pt", restored).attach(resumed)
    seen_epochs: list[int] = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: seen_epochs.append(e.state.epoch))
    weights_at_start: list[torch.Tensor] = []
    resumed.add_event_handler(
        Events.STARTED, lambda e: weights_at_start.append(fresh.weight.detach().clone())
    )

    resumed.run(data, max_epochs=4)

    assert torch.equal(weights_at_start[0], saved["model"]["weight"])
    assert seen_epochs == [3, 4]
    assert resumed.state.iteration == 12
    assert fresh_scheduler.last_epoch == scheduler.last_epoch  # restored, not restarted
    assert fresh_optimizer.state_dict()["state"][0]["momentum_buffer"] is not None


def test_amp_gradient_scaler_is_saved_and_restored(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    trainer = Engine(lambda e, b: None)
    LastCheckpointSaver(tmp_path, {"model": model}).attach(trainer)
    trainer.amp, trainer.scaler = True, torch.amp.GradScaler("cpu", init_scale=256.0)  # set after attaching
    trainer.run([0], max_epochs=1)

    resumed = Engine(lambda e, b: None)
    CheckpointRestorer(tmp_path / "checkpoint_last.pt", {"model": model}).attach(resumed)
    resumed.amp, resumed.scaler = True, torch.amp.GradScaler("cpu", init_scale=65536.0)
    resumed.run([0], max_epochs=2)

    assert "scaler" in load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert resumed.scaler.get_scale() == 256.0


def test_restorer_starts_fresh_without_a_checkpoint_unless_required(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    CheckpointRestorer(tmp_path / "missing.pt", {"model": model}).attach(engine)
    engine.run([0], max_epochs=1)
    assert engine.state.epoch == 1

    strict = Engine(lambda e, b: None)
    CheckpointRestorer(tmp_path / "missing.pt", {"model": model}, missing_ok=False).attach(strict)
    with pytest.raises(FileNotFoundError):
        strict.run([0], max_epochs=1)


def test_restorer_refuses_a_checkpoint_beyond_the_epochs(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    LastCheckpointSaver(tmp_path, {"model": model}).attach(engine)
    engine.run([0, 1], max_epochs=3)

    again = Engine(lambda e, b: None)
    CheckpointRestorer(tmp_path / "checkpoint_last.pt", {"model": model}).attach(again)
    with pytest.raises(ValueError, match="give more epochs"):
        again.run([0, 1], max_epochs=2)


def test_restorer_reads_a_bare_state_dict_for_one_object(tmp_path: Path) -> None:
    source, target = nn.Linear(2, 1), nn.Linear(2, 1)
    atomic_torch_save(source.state_dict(), tmp_path / "model.pt")
    engine = Engine(lambda e, b: None)
    CheckpointRestorer(tmp_path / "model.pt", {"model": target}, missing_ok=False, engine_key=None).attach(
        engine
    )

    engine.run([0], max_epochs=1)

    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_restorer_names_what_the_checkpoint_lacks(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    atomic_torch_save({"model": model.state_dict()}, tmp_path / "model.pt")
    engine = Engine(lambda e, b: None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CheckpointRestorer(tmp_path / "model.pt", {"model": model, "optimizer": optimizer}).attach(engine)

    with pytest.raises(KeyError, match="has no optimizer, trainer"):
        engine.run([0], max_epochs=1)


def _evaluator_with_metrics(values: list[float]) -> Engine:
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["val_auc"] = values[e.state.epoch - 1]

    return engine


def test_best_saver_keeps_the_best_finite_metric(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    engine = _evaluator_with_metrics([0.5, math.nan, 0.4, 0.7])
    saver = BestCheckpointSaver(tmp_path, {"model": model}, metric_name="val_auc")
    saver.attach(engine)
    saved_weights: dict[int, torch.Tensor] = {}

    @engine.on(Events.EPOCH_STARTED)
    def _change_weights(e: Engine) -> None:
        with torch.no_grad():
            model.weight.fill_(float(e.state.epoch))
        saved_weights[e.state.epoch] = model.weight.detach().clone()

    engine.run([0], max_epochs=4)

    assert saver.state_dict() == {"best_value": 0.7, "best_epoch": 4}
    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["weight"], saved_weights[4])  # bare state dict

    restored = BestCheckpointSaver(tmp_path, {"model": model}, metric_name="val_auc")
    restored.load_state_dict(saver.state_dict())
    assert not restored.is_better(0.7) and restored.is_better(0.71)


def test_best_saver_never_writes_non_finite_weights(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    engine = _evaluator_with_metrics([0.5, 0.9])
    BestCheckpointSaver(tmp_path, {"model": model}, metric_name="val_auc").attach(engine)
    good = model.weight.detach().clone()

    @engine.on(Events.EPOCH_STARTED(once=2))
    def _poison(e: Engine) -> None:
        with torch.no_grad():
            model.weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteError, match=r"non-finite weights \(weight\)"):
        engine.run([0], max_epochs=2)

    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["weight"], good)


def test_non_finite_entries_names_the_tensors() -> None:
    state = {"a": torch.ones(2), "b": {"c": torch.tensor([1.0, float("inf")])}, "n": torch.tensor([1, 2])}

    assert non_finite_entries(state) == ["b.c"]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def _batch(index: int, bad: float | None = None) -> dict:
    generator = torch.Generator().manual_seed(index)
    image = torch.randn(4, 3, generator=generator)
    if bad is not None:
        image[0, 0] = bad
    return {
        "image": MetaTensor(image, meta={"filename_or_obj": f"case_{index}.nii.gz"}),
        "label": torch.tensor([0, 1, 0, 1]),
    }


def _train(
    batches: list[dict], network: nn.Module | None = None, loss=None, **guard_args
) -> tuple[nn.Module, NonFiniteLossGuard]:
    torch.manual_seed(0)
    network = network or _Tiny()
    optimizer = torch.optim.Adam(network.parameters(), lr=0.1)
    guard = NonFiniteLossGuard(**guard_args)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=network,
        optimizer=optimizer,
        loss_function=loss or nn.CrossEntropyLoss(),
        train_handlers=[guard],
    )
    trainer.run()
    return network, guard


def test_guard_stops_training_before_a_nan_loss_reaches_the_weights() -> None:
    batches = [_batch(0), _batch(1, bad=float("nan")), _batch(2)]
    expected, _ = _train(batches[:1])
    torch.manual_seed(0)
    network = _Tiny()

    with pytest.raises(NonFiniteError, match=r"non-finite loss .* iteration 2 \(image case_1.nii.gz\)"):
        _train(batches, network=network)

    assert torch.equal(network.linear.weight, expected.linear.weight)  # updated by the first batch only


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guard_skips_non_finite_steps_as_if_they_never_happened(bad: float) -> None:
    clean = [_batch(0), _batch(2)]
    expected, _ = _train(clean)

    network, guard = _train([_batch(0), _batch(1, bad=bad), _batch(2)], on_non_finite="skip")

    assert guard.skipped == 1
    for name, value in network.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name  # weights and batch-norm estimates


def test_guard_skips_non_finite_gradients_of_a_finite_loss() -> None:
    def sqrt_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(pred.sum() * 0.0)  # 0, with a NaN gradient

    network, guard = _train([_batch(0)], loss=sqrt_loss, on_non_finite="skip")

    assert guard.skipped == 1
    assert not non_finite_entries(network.state_dict())


def test_guard_gives_up_after_too_many_skips_in_a_row() -> None:
    batches = [_batch(i, bad=float("nan")) for i in range(3)]

    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        _train(batches, on_non_finite="skip", max_consecutive_skips=2)
    with pytest.raises(ValueError, match="on_non_finite must be one of"):
        NonFiniteLossGuard("ignore")


def test_metrics_json_writer_groups_and_nulls(tmp_path: Path) -> None:
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metrics(e: Engine) -> None:
        e.state.metrics.update(
            {
                "volume": {
                    "volume_acc": 0.5,
                    "volume_pre": math.nan,
                    "volume_confusion_matrix": [[1, 0], [1, 0]],
                },
                "val_auc": torch.tensor(0.75),
            }
        )

    path = tmp_path / "out" / "metrics.json"
    MetricsJsonWriter(path, ["volume", "val_auc"], extra={"split": "test"}).attach(engine)
    engine.run([0], max_epochs=1)

    assert json.loads(path.read_text()) == {
        "split": "test",
        "volume": {"acc": 0.5, "pre": None, "confusion_matrix": [[1, 0], [1, 0]]},
        "val_auc": 0.75,
    }


def test_metrics_json_writer_names_missing_metrics(tmp_path: Path) -> None:
    engine = Engine(lambda e, b: None)
    MetricsJsonWriter(tmp_path / "metrics.json", ["slice"]).attach(engine)

    with pytest.raises(KeyError, match="no metric slice"):
        engine.run([0], max_epochs=1)


def test_progress_bar_shows_the_loss(capsys: pytest.CaptureFixture) -> None:
    engine = Engine(lambda e, b: {"loss": 0.25})
    ProgressBarHandler(output_transform=lambda output: output).attach(engine)

    engine.run([0, 1], max_epochs=1)

    assert "loss=0.25" in capsys.readouterr().err
