"""Ignite handlers of the training and evaluation workflows: checkpoints, resume, NaN guard, metrics file.

- :class:`LastCheckpointSaver` and :class:`BestCheckpointSaver` write checkpoints atomically
  (temporary file in the same folder, flushed, then renamed over the old one): a run killed
  while saving leaves the previous checkpoint intact. Neither ever writes a network whose
  weights are not finite.
- :class:`CheckpointRestorer` restores a checkpoint when a run starts (the last training state
  to resume, or the model to evaluate), loading with ``torch.load(weights_only=True)`` only:
  a file that carries pickled objects is refused with a clear message, and so, in one line
  saying what it holds, is a file without the model's weights (a cached data item, say).
- :class:`NonFiniteLossGuard` stops training with a clear message when the loss is NaN or
  infinite, or skips that step (no weight update, batch-norm estimates restored).
- :class:`MetricsJsonWriter` writes an evaluator's metrics to a JSON file, atomically.
- :class:`ProgressBarHandler` is Ignite's progress bar in the form MONAI workflows attach.

Under ``torch.distributed`` the files are written by the process of rank 0 only; the other
processes keep the same bookkeeping. Checkpoint files hold ``{name: state_dict}`` for each
object given, except that a single object is saved as its bare state dict (the best model:
the network's ``state_dict()``), as Ignite and the MONAI Model Zoo do; MONAI's
``CheckpointLoader`` and ``ckpt_export`` read both.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, ProgressBar
from monai.engines.utils import IterationEvents
from torch import nn

from networks.checkpoint_contents import describe_contents, require_model_weights
from pipeline.data.atomic_files import atomic_torch_save, atomic_write_json
from pipeline.workflow.checkpoints import load_checkpoint, non_finite_entries
from pipeline.workflow.distributed import is_main_process
from pipeline.workflow.inferer import unwrap_network
from transforms.validation import source_name

__all__ = [
    "BestCheckpointSaver",
    "CheckpointRestorer",
    "LastCheckpointSaver",
    "MetricsJsonWriter",
    "NonFiniteError",
    "NonFiniteLossGuard",
    "ProgressBarHandler",
]

logger = logging.getLogger(__name__)

ON_NON_FINITE_OPTIONS = ("raise", "skip")
SCALER_KEY = "scaler"


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weights."""


def _state_dict(obj: Any) -> Any:
    if isinstance(obj, nn.Module):
        return unwrap_network(obj).state_dict()
    return obj.state_dict()


def _checked_state(save_dict: Mapping[str, Any], what: str) -> dict[str, Any]:
    states = {name: _state_dict(obj) for name, obj in save_dict.items()}
    bad = [
        n
        for name, obj in save_dict.items()
        if isinstance(obj, nn.Module)
        for n in non_finite_entries(states[name])
    ]
    if bad:
        raise NonFiniteError(
            f"not saving the {what}: the network has non-finite weights ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the checkpoints on disk are unchanged"
        )
    return states


class LastCheckpointSaver:
    """Save the training state (network, optimizer, scheduler, engine, ...) every ``interval`` epochs.

    The file is replaced atomically, so it always holds one complete state to resume from.
    The engine it is attached to is saved too, under ``engine_key``, and so is its AMP
    gradient scaler (under ``"scaler"``) when it has one: a config cannot name the trainer
    inside the trainer's own handler list.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: objects with ``state_dict()``, e.g. ``{"model": net, "optimizer": opt,
            "lr_scheduler": sched}``; networks are saved without their
            ``DistributedDataParallel`` wrapper.
        filename: checkpoint file name.
        interval: save every this many epochs.
        engine_key: name of the engine's own state; ``None`` leaves it out.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_last.pt",
        interval: int = 1,
        engine_key: str | None = "trainer",
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.interval = interval
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        objects = {**self.save_dict, **_engine_objects(engine, self.engine_key)}
        state = _checked_state(objects, "training state")
        if is_main_process():
            atomic_torch_save(state, self.path)
            engine.logger.info(f"saved the training state of epoch {engine.state.epoch} to {self.path}")


def _engine_objects(engine: Engine, engine_key: str | None) -> dict[str, Any]:
    """The engine under ``engine_key`` and its AMP gradient scaler, when it has one.

    Read when saving or loading, not when attaching: MONAI's trainer creates its scaler after
    attaching its handlers.
    """
    objects: dict[str, Any] = {}
    if engine_key is not None:
        objects[engine_key] = engine
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False):
            objects[SCALER_KEY] = scaler
    return objects


class BestCheckpointSaver:
    """Save the network whenever an evaluator's key metric beats the best so far.

    With one object in ``save_dict`` (the usual ``{"model": network}``) the file is that
    object's bare state dict, the Model Zoo's ``model.pt`` layout.

    A NaN metric never counts as better, and a network with non-finite weights is never saved
    (:class:`NonFiniteError`), so the best checkpoint on disk is always a finite model. Its
    ``state_dict()`` (best value and epoch) goes into the last training state, so a resumed run
    keeps comparing against the true best.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: objects to save, usually ``{"model": network}``.
        metric_name: key of ``engine.state.metrics`` to compare.
        filename: checkpoint file name.
        greater_is_better: ``False`` for error-like metrics.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        metric_name: str,
        filename: str = "model.pt",
        greater_is_better: bool = True,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.metric_name = metric_name
        self.greater_is_better = greater_is_better
        self.best_value = -math.inf if greater_is_better else math.inf
        self.best_epoch = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def is_better(self, value: float) -> bool:
        """Whether ``value`` is finite and strictly better than the best so far."""
        if not math.isfinite(value):
            return False
        return value > self.best_value if self.greater_is_better else value < self.best_value

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if not self.is_better(value):
            engine.logger.info(
                f"{self.metric_name}={value:.4f}: best stays {self.best_value:.4f} (epoch {self.best_epoch})"
            )
            return
        state = _checked_state(self.save_dict, "best model")
        if is_main_process():
            atomic_torch_save(next(iter(state.values())) if len(state) == 1 else state, self.path)
        self.best_value, self.best_epoch = value, int(engine.state.epoch)
        engine.logger.info(
            f"new best {self.metric_name}={value:.4f} at epoch {self.best_epoch}: saved {self.path}"
        )

    def state_dict(self) -> dict[str, float]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value = float(state["best_value"])
        self.best_epoch = int(state["best_epoch"])


class CheckpointRestorer:
    """Restore objects from a checkpoint when the engine starts (``Events.STARTED``).

    A file holding a single object's bare state dict is read as ``{name: file}`` when
    ``load_dict`` names one object. Resuming training: the engine continues after the saved
    epoch up to its own ``max_epochs``, so a run can be resumed with more epochs than it was
    started with. The engine's own state is restored from ``engine_key`` (and its AMP gradient
    scaler when both it and the file have one), as :class:`LastCheckpointSaver` saved them.
    Loading a model to evaluate: ``load_dict={"model": network}``, ``engine_key=None``,
    ``missing_ok=False``.

    Args:
        load_path: the checkpoint written by :class:`LastCheckpointSaver`.
        load_dict: the objects to restore, same names as when saved.
        map_location: where to load the tensors (e.g. the training device).
        missing_ok: start from scratch with a warning when ``load_path`` does not exist (a run
            killed before its first checkpoint); ``False`` raises ``FileNotFoundError``.
        engine_key: name of the engine's state in the checkpoint; ``None`` skips it.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: Mapping[str, Any],
        map_location: Any = "cpu",
        missing_ok: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        if not load_dict:
            raise ValueError("load_dict must name at least one object to restore")
        self.load_path = Path(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.missing_ok = missing_ok
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.load_path.is_file() and self.missing_ok:
            engine.logger.warning(f"no checkpoint {self.load_path} to resume: training starts at epoch 1")
            return
        checkpoint = load_checkpoint(self.load_path, self.map_location)
        objects = {**self.load_dict, **_engine_objects(engine, self.engine_key)}
        to_load = {k: v for k, v in objects.items() if k != SCALER_KEY or k in checkpoint}
        (name,) = to_load if len(to_load) == 1 else (None,)
        if name is not None and name not in checkpoint:  # a single object's bare state dict
            checkpoint = {name: checkpoint}
        missing = sorted(set(to_load) - set(checkpoint))
        if missing:
            raise KeyError(
                f"{self.load_path}: the checkpoint has no {', '.join(missing)} to restore; "
                f"it holds {describe_contents(checkpoint)}"
            )
        for key, obj in to_load.items():
            if isinstance(obj, nn.Module):
                require_model_weights(checkpoint[key], unwrap_network(obj), os.fspath(self.load_path))
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        if max_epochs is not None:
            if engine.state.epoch > max_epochs:
                raise ValueError(
                    f"{self.load_path} was saved after epoch {engine.state.epoch}, beyond "
                    f"epochs={max_epochs}: give more epochs to continue training"
                )
            engine.state.max_epochs = max_epochs
        if self.engine_key is None:
            engine.logger.info(f"loaded {', '.join(to_load)} from {self.load_path}")
        else:
            done = f"{engine.state.epoch} of {max_epochs}"
            engine.logger.info(f"resumed from {self.load_path}: epochs done {done}")


class NonFiniteLossGuard:
    """Stop (or skip the step) when a training loss is NaN or infinite.

    Attach to a MONAI ``SupervisedTrainer``. With ``on_non_finite="raise"`` the trainer stops
    with :class:`NonFiniteError` naming the epoch, iteration and image, before the bad
    gradients reach the weights; nothing is saved after it. With ``"skip"`` the step is
    dropped instead: no weight update (gradients discarded, or left to AMP's gradient scaler,
    which skips steps with non-finite gradients) and the network's buffers (batch-norm running
    estimates) restored to their values before the step. Without AMP the gradients are checked
    too, so under ``DistributedDataParallel`` (whose gradients are averaged over the processes)
    every process drops the same step; under AMP, overflowing gradients are the scaler's
    business and only a non-finite loss counts. More than
    ``max_consecutive_skips`` skipped steps in a row raise.

    Args:
        on_non_finite: ``"raise"`` or ``"skip"``.
        loss_key: key of the loss in ``engine.state.output``.
        max_consecutive_skips: skipped steps in a row before giving up.
    """

    def __init__(
        self, on_non_finite: str = "raise", loss_key: str = "loss", max_consecutive_skips: int = 10
    ) -> None:
        if on_non_finite not in ON_NON_FINITE_OPTIONS:
            raise ValueError(f"on_non_finite must be one of {ON_NON_FINITE_OPTIONS}, got {on_non_finite!r}")
        self.on_non_finite = on_non_finite
        self.loss_key = loss_key
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self._consecutive = 0
        self._bad_loss = False
        self._buffers: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        if self.on_non_finite == "skip":
            engine.add_event_handler(Events.ITERATION_STARTED, self._snapshot_buffers)
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._drop_bad_step)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check_loss)

    def _describe(self, engine: Engine, what: str) -> str:
        image = (
            source_name(engine.state.batch.get("image")) if isinstance(engine.state.batch, Mapping) else "?"
        )
        return f"{what} at epoch {engine.state.epoch}, iteration {engine.state.iteration} (image {image})"

    def _snapshot_buffers(self, engine: Engine) -> None:
        self._buffers = [buffer.detach().clone() for buffer in engine.network.buffers()]
        self._bad_loss = False

    def _check_loss(self, engine: Engine) -> None:
        loss = engine.state.output[self.loss_key]
        if bool(torch.isfinite(loss.detach()).all()):
            return
        message = self._describe(engine, f"non-finite loss {loss.detach().float().cpu().tolist()}")
        if self.on_non_finite == "raise":
            raise NonFiniteError(
                f"{message}: training stopped before updating the weights; the saved checkpoints are "
                "unchanged. Check that input, lower the learning rate, or set on_non_finite_loss to 'skip'."
            )
        self._bad_loss = True

    def _drop_bad_step(self, engine: Engine) -> None:
        # Under AMP, gradients overflow now and then by design: the gradient scaler skips those
        # steps and lowers its scale. Only a non-finite loss is then a fault of the training.
        amp = bool(getattr(engine, "amp", False)) and getattr(engine, "scaler", None) is not None
        grads = [] if amp else [p.grad for p in engine.network.parameters() if p.grad is not None]
        bad_grads = not all(bool(torch.isfinite(g).all()) for g in grads)
        if not (self._bad_loss or bad_grads):
            self._consecutive = 0
            return
        self.skipped += 1
        self._consecutive += 1
        what = "non-finite loss" if self._bad_loss else "non-finite gradients"
        message = self._describe(engine, what)
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{message}: {self._consecutive} steps in a row were not finite; training stopped"
            )
        logger.warning(f"{message}: step skipped ({self.skipped} so far)")
        with torch.no_grad():
            for buffer, saved in zip(engine.network.buffers(), self._buffers):
                buffer.copy_(saved)
        if not amp:  # AMP's scaler skips steps with non-finite gradients itself
            engine.optimizer.zero_grad(set_to_none=True)


class MetricsJsonWriter:
    """Write an evaluator's metrics to a JSON file when it completes, atomically.

    Each group in ``metric_names`` is a dictionary-valued metric (e.g. ``"volume"`` from
    :class:`~pipeline.workflow.metrics.VolumeMetrics`); its entries are written without the group's
    ``<name>_`` prefix under the group's name. Scalar metrics are written as they are.
    NaN (an undefined ratio) becomes ``null``.

    Args:
        output_path: the JSON file.
        metric_names: names in ``engine.state.metrics`` to write; all of them when ``None``.
        extra: more fields to record (e.g. the split and checkpoint evaluated).
    """

    def __init__(
        self,
        output_path: str | os.PathLike,
        metric_names: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_path = Path(output_path)
        self.metric_names = None if metric_names is None else list(metric_names)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        names = list(metrics) if self.metric_names is None else self.metric_names
        missing = [name for name in names if name not in metrics]
        if missing:
            raise KeyError(f"no metric {', '.join(missing)} in the evaluator (has {', '.join(metrics)})")
        content: dict[str, Any] = dict(self.extra)
        for name in names:
            value = metrics[name]
            if isinstance(value, Mapping):
                value = {k.removeprefix(f"{name}_"): v for k, v in value.items()}
            content[name] = value
        if is_main_process():
            atomic_write_json(content, self.output_path)
            engine.logger.info(f"metrics written to {self.output_path}")


class ProgressBarHandler:
    """Ignite's ``ProgressBar`` as a handler MONAI workflows attach with ``attach(engine)``.

    Args:
        output_transform: maps ``engine.state.output`` to what the bar shows (e.g. the loss).
        persist: keep the bar of each finished epoch on screen.
        kwargs: more ``tqdm`` options.
    """

    def __init__(
        self, output_transform: Callable | None = None, persist: bool = False, **kwargs: Any
    ) -> None:
        self.bar = ProgressBar(persist=persist, **kwargs)
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)
