"""Faults during training: SIGKILL mid-epoch then resume, a kill while saving, NaN loss, determinism.

The kill tests use real subprocesses (``python -m monai.bundle run`` and a saving loop); the
NaN and determinism tests run the bundle's ``train.json`` in this process through MONAI's
``ConfigWorkflow``, on the tiny demo data with a small LSTM and classifier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigWorkflow
from torch import nn

from pipeline.workflow.checkpoints import load_checkpoint
from pipeline.workflow.handlers import NonFiniteError
from tests.conftest import BUNDLE_DIR, REPO_ROOT

TRAIN = BUNDLE_DIR / "configs" / "train.json"
TINY = {
    "num_slices": 4,
    "resize_size": 36,
    "spatial_size": 32,
    "lstm_hidden": 8,
    "fc_hidden": 16,
    "num_workers": 0,
    "progress_bar": False,
    "cache_dir": False,
}
ITERATIONS_PER_EPOCH = 4  # training volumes of the tiny demo data, batch size 1


def _command_line(overrides: dict[str, Any]) -> list[str]:
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.fspath(TRAIN)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_from_its_last_checkpoint(
    tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    places = {"bundle_root": tmp_path, "dataset_dir": tiny_demo_dataset, **TINY}
    last = tmp_path / "models" / "checkpoint_last.pt"
    run = subprocess.Popen(
        _command_line({**places, "epochs": 2}),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert last.exists(), "the run saved no checkpoint"
        os.kill(run.pid, signal.SIGKILL)  # the second epoch has just started
    finally:
        run.kill()
        run.wait()
    assert run.returncode == -signal.SIGKILL
    # the complete state of the finished first epoch, never a partial file
    assert load_checkpoint(last)["trainer"]["iteration"] == ITERATIONS_PER_EPOCH

    resumed = subprocess.run(
        _command_line({**places, "epochs": 2, "resume": True}),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "epochs done 1 of 2" in log
    assert "Epoch: 1/2" not in log and "Epoch: 2/2" in log  # finished epochs are not trained again
    final = load_checkpoint(last)
    assert final["trainer"]["iteration"] == 2 * ITERATIONS_PER_EPOCH
    assert load_checkpoint(tmp_path / "models" / "model.pt")  # the best model is readable


SAVING_LOOP = textwrap.dedent(
    """
    import sys, torch
    from pipeline.data.atomic_files import atomic_torch_save
    path, i = sys.argv[1], 0
    while True:
        i += 1
        atomic_torch_save({"step": torch.tensor(i), "weights": torch.full((4_000_000,), float(i))}, path)
    """
)


@pytest.mark.slow
def test_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_last.pt"
    for delay in (0.15, 0.4):  # the loop spends nearly all its time writing: the kill lands mid-save
        saver = subprocess.Popen([sys.executable, "-c", SAVING_LOOP, os.fspath(path)], cwd=REPO_ROOT)
        try:
            deadline = time.monotonic() + 120
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            os.kill(saver.pid, signal.SIGKILL)
        finally:
            saver.kill()
            saver.wait()

        checkpoint = load_checkpoint(path)  # loads: complete, never half-written

        step = int(checkpoint["step"])
        assert step >= 1
        assert checkpoint["weights"].shape == (4_000_000,)
        assert bool((checkpoint["weights"] == step).all())  # one save's data, whole


class NonFiniteLossAfter(nn.CrossEntropyLoss):
    """Cross-entropy that turns NaN from call number ``after + 1`` on (a diverging run)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.calls = 0

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = super().forward(input, target)
        return loss * float("nan") if self.calls > self.after else loss


def _train_in_process(root: Path, dataset: Path, **overrides: Any) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=os.fspath(TRAIN),
        logging_file=False,
        workflow_type=None,
        **{"bundle_root": os.fspath(root), "dataset_dir": os.fspath(dataset), **TINY, **overrides},
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow


def _cause(error: BaseException, kind: type) -> BaseException | None:
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


NAN_AFTER_FIRST_EPOCH = {
    "_target_": f"{__name__}.NonFiniteLossAfter",
    "after": ITERATIONS_PER_EPOCH + 1,  # the second iteration of epoch 2
}


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_the_best_checkpoint(
    tiny_demo_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(Exception) as caught:
        _train_in_process(tmp_path, tiny_demo_dataset, epochs=2, loss=NAN_AFTER_FIRST_EPOCH)

    error = _cause(caught.value, NonFiniteError)
    assert error is not None, caught.value
    assert "non-finite loss nan at epoch 2, iteration 6 (image " in str(error)
    assert "training stopped before updating the weights" in str(error)
    best = load_checkpoint(tmp_path / "models" / "model.pt")
    last = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] == ITERATIONS_PER_EPOCH  # nothing saved after the NaN
    assert last["best_model"]["best_epoch"] == 1
    for name, tensor in best.items():  # the best model is epoch 1's, finite and not overwritten
        assert torch.isfinite(tensor.float()).all(), name
        assert torch.equal(tensor, last["model"][name]), name


@pytest.mark.slow
def test_nan_loss_steps_are_skipped_when_configured(tiny_demo_dataset: Path, tmp_path: Path) -> None:
    nan_after_one_step = {**NAN_AFTER_FIRST_EPOCH, "after": 1}
    workflow = _train_in_process(
        tmp_path, tiny_demo_dataset, epochs=1, loss=nan_after_one_step, on_non_finite_loss="skip"
    )

    guard = next(h for h in workflow.parser.get_parsed_content("train#handlers") if hasattr(h, "skipped"))
    assert guard.skipped == ITERATIONS_PER_EPOCH - 1  # every step after the first
    last = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] == ITERATIONS_PER_EPOCH  # the epoch ran to its end
    assert not any(not torch.isfinite(t.float()).all() for t in last["model"].values())


@pytest.mark.slow
def test_same_seed_cpu_runs_give_the_same_metrics(tiny_demo_dataset: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("first", "second"):
        workflow = _train_in_process(tmp_path / name, tiny_demo_dataset, epochs=1, seed=7, num_workers=2)
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        runs.append((dict(evaluator.state.metrics), load_checkpoint(tmp_path / name / "models" / "model.pt")))

    (metrics, weights), (metrics_again, weights_again) = runs
    assert metrics.keys() == metrics_again.keys()
    assert repr(metrics) == repr(metrics_again)  # NaN ratios compare equal as text
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
