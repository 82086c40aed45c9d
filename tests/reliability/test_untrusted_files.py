"""Untrusted files: checkpoints that would run code, names that would escape, data that looks like code.

- A checkpoint or pretrained file whose unpickling would run code (a ``__reduce__`` that writes
  a marker file) is refused with a clear message by every loader (pretrained weights, training
  resume, ``evaluate.json``, ``inference.json``) and the code never runs: the marker is absent.
- A ``.pt`` file that is no checkpoint (a cached dataset item from the run's cache folder) is
  refused by every loader in one line that names the model and says what the file holds.
- Data list entries written like config expressions (``$...``, ``@...``, ``%...``) stay data:
  the bundle's configs never evaluate them.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow
from monai.data import PersistentDataset
from monai.transforms import Compose

from networks import NoModelWeightsError, ResNextPlus, load_pretrained, resnext50_32x4d
from pipeline.data.datalist import DatalistError, load_datalist
from pipeline.workflow.checkpoints import UnsafeCheckpointError, load_checkpoint
from pipeline.workflow.handlers import CheckpointRestorer
from pipeline.workflow.preprocessing import cache_subdir, evaluation_transforms
from tests.conftest import BUNDLE_DIR, with_absolute_paths
from tests.reliability.conftest import SMALL_NETWORK

CONFIGS = BUNDLE_DIR / "configs"
TINY = {
    "num_slices": 4,
    "resize_size": 36,
    "spatial_size": 32,
    "num_workers": 0,
    "progress_bar": False,
    "cache_dir": False,
    **SMALL_NETWORK,
}


class RunsCodeWhenUnpickled:
    """An object whose unpickling runs ``exec`` to write ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({os.fspath(self.marker)!r}, 'w').write('code ran')",)


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint file that holds real weights plus a code-running object, and its marker path."""
    marker = tmp_path / "code_ran.txt"
    weights = {f"layer.{i}": torch.zeros(2) for i in range(3)}
    path = tmp_path / "hostile.pt"
    torch.save({"model": weights, "extra": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):  # the file really is refused by weights-only loading
        torch.load(path, weights_only=True)
    assert not marker.exists()
    return path, marker


def _workflow(configs: list[Path], **overrides: Any) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[os.fspath(c) for c in configs],
        logging_file=False,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    return workflow


def _run(workflow: ConfigWorkflow) -> None:
    try:
        workflow.run()
    finally:
        workflow.finalize()


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _batch_inference_error(ckpt_path: Path, dataset: Path, output_dir: Path) -> BaseException:
    """The root cause of ``inference.json`` failing with ``ckpt_path``; no prediction was written."""
    workflow = _workflow(
        [CONFIGS / "inference.json"],
        dataset_dir=os.fspath(dataset / "images"),
        ckpt_path=os.fspath(ckpt_path),
        output_dir=os.fspath(output_dir),
        resize_size=32,
        spatial_size=32,
        num_workers=0,
        progress=False,
        **SMALL_NETWORK,
    )
    with pytest.raises(Exception) as caught:
        _run(workflow)
    assert not (output_dir / "predictions.csv").exists()
    return _root_cause(caught.value)


def test_load_checkpoint_refuses_code_without_running_it(hostile: tuple[Path, Path]) -> None:
    path, marker = hostile

    with pytest.raises(UnsafeCheckpointError, match=r"refused: the checkpoint holds pickled Python objects"):
        load_checkpoint(path)

    assert not marker.exists()


def test_pretrained_loader_refuses_code_without_running_it(hostile: tuple[Path, Path]) -> None:
    path, marker = hostile

    with pytest.raises(ValueError, match=r"refused: the file holds pickled Python objects \(\S*exec\)"):
        load_pretrained(resnext50_32x4d(in_channels=1), path)
    with pytest.raises(ValueError, match="refused"):
        ResNextPlus(pretrained=path, **SMALL_NETWORK)

    assert not marker.exists()


@pytest.mark.slow
def test_training_resume_refuses_a_hostile_checkpoint(
    hostile: tuple[Path, Path], tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    path, marker = hostile
    (tmp_path / "models").mkdir()
    os.replace(path, tmp_path / "models" / "checkpoint_last.pt")
    workflow = _workflow(
        [CONFIGS / "train.json"],
        bundle_root=os.fspath(tmp_path),
        dataset_dir=os.fspath(tiny_demo_dataset),
        resume=True,
        epochs=1,
        **TINY,
    )

    with pytest.raises(Exception) as caught:
        _run(workflow)

    error = _root_cause(caught.value)
    assert isinstance(error, UnsafeCheckpointError), repr(caught.value)
    assert "checkpoint_last.pt: refused" in str(error) and "weights_only=True" in str(error)
    assert not marker.exists()
    assert workflow.parser.get_parsed_content("train#trainer").state.iteration == 0  # never trained


@pytest.mark.slow
def test_evaluation_refuses_a_hostile_checkpoint(
    hostile: tuple[Path, Path], tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    path, marker = hostile
    workflow = _workflow(
        [CONFIGS / "train.json", CONFIGS / "evaluate.json"],
        bundle_root=os.fspath(tmp_path),
        dataset_dir=os.fspath(tiny_demo_dataset),
        ckpt_path=os.fspath(path),
        **TINY,
    )

    with pytest.raises(Exception) as caught:
        _run(workflow)

    error = _root_cause(caught.value)
    assert isinstance(error, UnsafeCheckpointError), repr(caught.value)
    assert "hostile.pt: refused" in str(error)
    assert not marker.exists()
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_batch_inference_refuses_a_hostile_checkpoint(
    hostile: tuple[Path, Path], tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    path, marker = hostile

    error = _batch_inference_error(path, tiny_demo_dataset, tmp_path / "out")

    assert isinstance(error, UnsafeCheckpointError), repr(error)
    assert "hostile.pt: refused" in str(error)
    assert not marker.exists()


@pytest.fixture(scope="module")
def cached_item(tiny_demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cache file of ``PersistentDataset`` (a preprocessed test case), as a run folder holds."""
    item = load_datalist(tiny_demo_dataset / "datalist.json", "test")[0]
    sizes = {"resize_size": TINY["resize_size"], "spatial_size": TINY["spatial_size"]}
    folder = cache_subdir(tmp_path_factory.mktemp("run") / "cache", enhancement="none", **sizes)
    PersistentDataset([item], Compose(evaluation_transforms(**sizes)), cache_dir=folder, track_meta=True)[0]
    (path,) = Path(folder).glob("*.pt")
    return path


def _assert_one_line_naming(error: BaseException, path: Path, model: str) -> None:
    message = str(error).strip("'\"")  # KeyError quotes its message
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(f"{path}: ")
    assert model in message
    assert "image (MetaTensor 2x32x32x8 float16)" in message and "a data item" in message  # compact cache


def test_every_loader_refuses_a_cached_data_item_in_one_line(cached_item: Path) -> None:
    network = ResNextPlus(**SMALL_NETWORK)

    engine = Engine(lambda e, b: None)  # inference and evaluation: the model alone
    CheckpointRestorer(cached_item, {"model": network}, missing_ok=False, engine_key=None).attach(engine)
    with pytest.raises(NoModelWeightsError) as caught:
        engine.run([0], max_epochs=1)
    _assert_one_line_naming(caught.value, cached_item, "holds no ResNextPlus weights; it holds a dict")
    trainer = Engine(lambda e, b: None)  # resume: the training state
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    CheckpointRestorer(cached_item, {"model": network, "optimizer": optimizer}).attach(trainer)
    with pytest.raises(KeyError) as caught:
        trainer.run([0], max_epochs=1)
    _assert_one_line_naming(caught.value, cached_item, "has no model, optimizer, trainer to restore")
    with pytest.raises(NoModelWeightsError) as caught:  # pretrained backbone weights
        load_pretrained(network, cached_item)
    _assert_one_line_naming(caught.value, cached_item, "holds no ResNeXt weights")
    assert issubclass(NoModelWeightsError, ValueError)


@pytest.mark.slow
def test_batch_inference_names_a_cached_data_item_given_as_checkpoint(
    cached_item: Path, tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    error = _batch_inference_error(cached_item, tiny_demo_dataset, tmp_path / "out")

    assert isinstance(error, NoModelWeightsError), repr(error)
    _assert_one_line_naming(error, cached_item, "holds no ResNextPlus weights")


CODE_LIKE = "$__import__('pathlib').Path('code_ran.txt').touch()"
"""A data list value written like a config expression; were it evaluated, ``code_ran.txt`` would appear."""


def _code_like_datalist(folder: Path, dataset: Path) -> Path:
    splits = json.loads((dataset / "datalist.json").read_text())
    items = [with_absolute_paths(item, dataset) for item in splits["test"]]
    items[0]["case_id"] = CODE_LIKE
    items[1]["note"] = "@network_def"
    items.append({"image": CODE_LIKE, "label": 0})
    other = os.fspath(dataset / splits["training"][0]["image"])
    items.append({"image": other, "label": "%train.json#epochs", "case_id": "@network_def"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": items, "validation": items, "test": items}))
    return path


def test_data_list_entries_stay_data_when_loaded(
    tiny_demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    datalist = _code_like_datalist(tmp_path, tiny_demo_dataset)

    with pytest.raises(DatalistError) as caught:
        load_datalist(datalist, "training")

    assert len(caught.value.problems) == 2
    assert f"training[2] ({CODE_LIKE}): file not found" in caught.value.problems[0]
    assert "label '%train.json#epochs' is not 0 or 1" in caught.value.problems[1]
    assert not (tmp_path / "code_ran.txt").exists()


def test_training_config_never_evaluates_data_list_entries(
    tiny_demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    datalist = _code_like_datalist(tmp_path, tiny_demo_dataset)
    workflow = _workflow(
        [CONFIGS / "train.json"],
        bundle_root=os.fspath(tmp_path),
        dataset_dir=os.fspath(tiny_demo_dataset),
        datalist=os.fspath(datalist),
        epochs=1,
        **TINY,
    )

    with pytest.raises(Exception) as caught:
        _run(workflow)

    assert isinstance(_root_cause(caught.value), DatalistError)
    assert not (tmp_path / "code_ran.txt").exists()


@pytest.mark.slow
def test_batch_inference_never_evaluates_data_list_entries(
    tiny_demo_dataset: Path, small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    datalist = _code_like_datalist(tmp_path, tiny_demo_dataset)
    workflow = _workflow(
        [CONFIGS / "inference.json"],
        datalist=os.fspath(datalist),
        ckpt_path=os.fspath(small_checkpoint),
        output_dir=os.fspath(tmp_path / "out"),
        resize_size=32,
        spatial_size=32,
        num_workers=0,
        progress=False,
        save_figures=False,
        **SMALL_NETWORK,
    )

    _run(workflow)

    assert not (tmp_path / "code_ran.txt").exists()
    errors = (tmp_path / "out" / "errors.csv").read_text()
    assert CODE_LIKE.removeprefix("$") in errors  # the missing "image" is reported as a path
    predictions = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 3  # header, the two test volumes and the "%..." labelled one
    case_ids = [line.split(",")[0] for line in predictions[1:]]
    assert all("/" not in case_id and "$" not in case_id for case_id in case_ids)
