"""The bundle end to end on tiny demo data: train, resume, evaluate, 2-process training, Model Zoo checks.

Training, resuming, evaluating and the ``torchrun`` run go through real ``python -m monai.bundle``
subprocesses; one training run (one epoch, 64 x 64 x 8 volumes cropped to 32 x 32, 4 slices
sampled, a small LSTM and classifier) is shared by the tests that need a checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.workflow.checkpoints import load_checkpoint
from tests.conftest import BUNDLE_DIR, METADATA_SCHEMA, REPO_ROOT

CONFIGS = BUNDLE_DIR / "configs"
TRAIN = str(CONFIGS / "train.json")
META = str(CONFIGS / "metadata.json")
SMALL_NETWORK = {"lstm_hidden": 8, "fc_hidden": 16}
TINY = [
    "--num_slices", "4",
    "--resize_size", "36",
    "--spatial_size", "32",
    "--lstm_hidden", "8",
    "--fc_hidden", "16",
    "--num_workers", "0",
]  # fmt: skip


def _bundle(*args: str, processes: int = 1, timeout: int = 400, one_thread: bool = False) -> str:
    """Run ``python -m monai.bundle *args`` (under ``torchrun`` for several processes); return its log.

    ``one_thread``: one CPU thread, as ``torchrun`` gives each process, so that one process and
    several compute the same numbers.
    """
    launcher = [sys.executable, "-m", "monai.bundle"]
    if processes > 1:
        torchrun = ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launcher = [sys.executable, "-m", *torchrun, "-m", "monai.bundle"]
    result = subprocess.run(
        [*launcher, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def _train(root: Path, dataset: Path, *extra: str, config: str = TRAIN, processes: int = 1) -> str:
    places = ["--bundle_root", str(root), "--dataset_dir", str(dataset)]
    return _bundle("run", "--config_file", config, *places, *TINY, *extra, processes=processes)


def _places(root: Path, dataset: Path, out: Path) -> list[str]:
    """Command-line options placing a run: bundle root, data set and output folder."""
    return ["--bundle_root", str(root), "--dataset_dir", str(dataset), "--output_dir", str(out)]


def _scalars(log_dir: Path) -> dict[str, list[int]]:
    """Steps of every scalar tag in the TensorBoard event files of ``log_dir``."""
    steps: dict[str, list[int]] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(event.step for event in accumulator.Scalars(tag))
    return steps


def _scalar_values(log_dir: Path, tag: str) -> list[float]:
    """Values of one scalar tag in the TensorBoard event files of ``log_dir``, in step order."""
    values = []
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return [value for _, value in sorted(values)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_demo_dataset: Path) -> Path:
    """Bundle root after one training epoch on the tiny demo data."""
    root = tmp_path_factory.mktemp("trained_bundle")
    log = _train(root, tiny_demo_dataset, "--epochs", "1")
    (root / "train.log").write_text(log)
    return root


@pytest.mark.slow
def test_one_epoch_writes_checkpoints_and_tensorboard_events(trained: Path) -> None:
    best = load_checkpoint(trained / "models" / "model.pt")
    last = load_checkpoint(trained / "models" / "checkpoint_last.pt")

    assert set(best) == set(last["model"])  # the network's bare state dict, as in the Model Zoo
    assert set(last) == {"model", "optimizer", "lr_scheduler", "best_model", "trainer"}
    assert last["trainer"]["iteration"] == 4  # 4 training volumes, batch size 1
    assert last["best_model"]["best_epoch"] == 1
    for name, tensor in best.items():
        assert torch.equal(tensor, last["model"][name]), name  # the only epoch is the best
    steps = _scalars(trained / "eval")
    assert steps["train_loss"] == [1, 2, 3, 4]
    assert steps["val_auc"] == [1]
    assert {"volume_acc", "volume_auc", "slice_acc", "slice_auc", "slice_tuned_tau"} <= set(steps)
    # the slice rule tuned on the validation split travels in the best checkpoint
    tuned_tau = _scalar_values(trained / "eval", "slice_tuned_tau")[-1]
    tuned_threshold = _scalar_values(trained / "eval", "slice_tuned_threshold")[-1]
    assert float(best["slice_rule.tau"]) == pytest.approx(tuned_tau, rel=1e-5)
    assert float(best["slice_rule.threshold"]) == pytest.approx(tuned_threshold, rel=1e-5)
    assert "Epoch[1] Metrics" in (trained / "train.log").read_text()


@pytest.mark.slow
def test_batch_size_stacks_volumes_into_fewer_steps(tiny_demo_dataset: Path, tmp_path: Path) -> None:
    _train(tmp_path, tiny_demo_dataset, "--epochs", "1", "--batch_size", "2")
    last = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] == 2  # 4 training volumes, 2 per step
    assert _scalars(tmp_path / "eval")["train_loss"] == [1, 2]


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(
    trained: Path, tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    shutil.copytree(trained / "models", tmp_path / "models")
    before = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")

    log = _train(tmp_path, tiny_demo_dataset, "--epochs", "2", "--resume", "True", "--cache_dir", "False")

    after = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")
    assert "resumed from" in log and "epochs done 1 of 2" in log
    assert "Epoch: 2/2" in log and "Epoch: 1/2" not in log  # the first epoch is not trained again
    assert after["trainer"]["iteration"] == 8
    assert after["lr_scheduler"]["last_epoch"] == before["lr_scheduler"]["last_epoch"] + 4
    assert _scalars(tmp_path / "eval")["train_loss"] == [5, 6, 7, 8]
    assert not list((tmp_path / "eval").glob("cache*"))  # --cache_dir False: no persistent cache


@pytest.mark.slow
def test_evaluate_writes_metrics_at_volume_and_slice_level(
    trained: Path, tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    config = f"['{TRAIN}','{CONFIGS / 'evaluate.json'}']"

    places = _places(trained, tiny_demo_dataset, tmp_path)
    _bundle("run", "--config_file", config, *places, "--save_slice_attention", "True", *TINY)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["checkpoint"] == str(trained / "models" / "model.pt")
    assert metrics["volume"]["count"] == 2
    assert metrics["slice"]["count"] == 16 and metrics["slice"]["volumes"] == 2  # every slice scored
    stored = load_checkpoint(trained / "models" / "model.pt")
    assert metrics["slice"]["tau"] == pytest.approx(float(stored["slice_rule.tau"]))
    assert metrics["slice"]["threshold"] == pytest.approx(float(stored["slice_rule.threshold"]))
    assert (metrics["slice_paper"]["tau"], metrics["slice_paper"]["threshold"]) == (1.0, 0.5)
    test_items = json.loads((tiny_demo_dataset / "datalist.json").read_text())["test"]
    test_slices = [label for item in test_items for label in item["slice_labels"]]
    positive_slices = [label for item in test_items if item["label"] for label in item["slice_labels"]]
    for level in ("slice", "slice_paper"):
        assert metrics[level]["prevalence"] == pytest.approx(sum(test_slices) / len(test_slices))
        assert metrics[level]["prevalence_positive"] == pytest.approx(
            sum(positive_slices) / len(positive_slices)
        )
        assert metrics[level]["trivial_f1"] is None or 0.0 <= metrics[level]["trivial_f1"] <= 1.0
    for level in ("volume", "slice", "slice_paper"):
        values = metrics[level]
        (tn, fp), (fn, tp) = values["confusion_matrix"]
        assert tn + fp + fn + tp == values["count"]
        assert values["acc"] == pytest.approx((tp + tn) / values["count"])
        for name in ("acc", "pre", "rec", "f1", "sen", "spe", "auc"):
            assert values[name] is None or 0.0 <= values[name] <= 1.0, (level, name)
            interval = values[f"{name}_ci"]  # bootstrap interval, or null when undefined
            assert interval is None or 0.0 <= interval[0] <= interval[1] <= 1.0, (level, name)
    with (tmp_path / "predictions.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 and all(int(row["n_slices"]) == 8 for row in rows)


@pytest.mark.slow
def test_two_process_gloo_training(tiny_demo_dataset: Path, tmp_path: Path) -> None:
    config = f"['{TRAIN}','{CONFIGS / 'multi_gpu_train.json'}']"

    log = _train(tmp_path, tiny_demo_dataset, "--epochs", "1", config=config, processes=2)

    last = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] == 2  # 4 training volumes shared by 2 processes
    assert (tmp_path / "models" / "model.pt").is_file()
    assert (
        len(list((tmp_path / "eval").glob("events.out.tfevents.*"))) == 2
    )  # trainer and evaluator of rank 0
    assert len(re.findall(r"saved the training state of epoch 1", log)) == 1  # rank 0 only


@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process(
    trained: Path, tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    configs = [TRAIN, str(CONFIGS / "evaluate.json")]
    outputs = {}
    for processes, extra in ((1, []), (2, [str(CONFIGS / "multi_gpu_evaluate.json")])):
        out = tmp_path / f"processes_{processes}"
        places = _places(trained, tiny_demo_dataset, out)
        config = "[" + ",".join(f"'{name}'" for name in configs + extra) + "]"
        options = ["--eval_split", "validation", "--save_slice_attention", "True", *TINY]
        _bundle("run", "--config_file", config, *places, *options, processes=processes, one_thread=True)
        outputs[processes] = {
            name: (out / name).read_text() for name in ("metrics.json", "predictions.csv", "errors.csv")
        }

    assert outputs[2] == outputs[1]  # metrics gathered over both processes; rows in case order
    assert json.loads(outputs[2]["metrics.json"])["volume"]["count"] == 2


def test_metadata_follows_the_schema() -> None:
    pytest.importorskip("jsonschema")
    if not METADATA_SCHEMA.is_file():
        pytest.skip(f"metadata schema not found at {METADATA_SCHEMA}")

    verify_metadata(meta_file=META, filepath=str(METADATA_SCHEMA))


def test_network_input_and_output_match_the_metadata() -> None:
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=TRAIN, device="cpu", any=2)


@pytest.mark.slow
def test_checkpoint_exports_to_torchscript(trained: Path, tmp_path: Path) -> None:
    exported = tmp_path / "model.ts"

    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=META,
        config_file=TRAIN,
        **SMALL_NETWORK,
    )

    scripted = torch.jit.load(str(exported))
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(SMALL_NETWORK)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(load_checkpoint(trained / "models" / "model.pt"))
    network.eval()
    inputs = torch.rand(1, 2, 32, 32, 5)
    with torch.no_grad():
        assert torch.allclose(scripted(inputs), network(inputs), atol=1e-5)
        logits, attention = scripted.forward_with_attention(inputs)
    assert logits.shape == (1, 2) and attention.shape == (1, 5)


def _documented_ids() -> set[str]:
    readme = (BUNDLE_DIR / "docs" / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_readme_documents_every_config_id() -> None:
    documented = _documented_ids()
    expected = set()
    for name in (
        "train.json",
        "evaluate.json",
        "multi_gpu_train.json",
        "multi_gpu_evaluate.json",
        "inference.json",
        "multi_gpu_inference.json",
    ):
        config = json.loads((CONFIGS / name).read_text())
        expected |= {key.removeprefix("+") for key in config}
        for section in ("train", "validate"):
            expected |= {f"{section}#{key}" for key in config.get(section, {})}

    assert expected - documented == set()
