"""Export of volume predictions and slice attention: an Ignite handler writing CSV files and figures.

For every case an evaluator scores, :class:`SliceAttentionSaver` writes

- ``output_dir/<case_id>/slice_attention.csv``: ``slice_index, attention, slice_pred`` (plus
  ``slice_label`` when the case has slice labels), one row per scored slice, indices in the
  original volume's axial order;
- ``output_dir/<case_id>/slice_attention.png``: the attention curve with thumbnails of the
  highest-attention slices (:func:`pipeline.export.figures.plot_slice_attention`);
- with ``heatmaps`` (e.g. :class:`pipeline.export.heatmap_export.SliceHeatmapWriter`):
  ``heatmap.nii.gz`` and ``heatmap_slice_<index>.png`` in the case's folder;
- a row of ``output_dir/predictions.csv``: ``case_id, image, prob_covid, pred, n_slices,
  top_slices`` (plus ``label`` when the cases have labels);

and every case that could not be preprocessed (see :mod:`pipeline.workflow.inference`) becomes a row
``image, error`` of ``output_dir/errors.csv``. All files are written to a temporary file in
the same folder, then renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import decollate_batch
from monai.utils import min_version, optional_import

from pipeline.data.atomic_files import atomic_write_csv
from pipeline.data.cases import safe_case_id, unique_case_ids
from pipeline.workflow.inference import ERROR_KEY
from pipeline.workflow.metrics import slice_predictions
from pipeline.workflow.slice_rule import network_slice_rule

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = [
    "ERRORS_FILE",
    "PREDICTIONS_FILE",
    "SliceAttentionSaver",
    "top_slices",
    "write_csv",
    "write_prediction_tables",
]

PREDICTIONS_FILE = "predictions.csv"
ERRORS_FILE = "errors.csv"
ATTENTION_CSV = "slice_attention.csv"
ATTENTION_PNG = "slice_attention.png"
PREDICTION_COLUMNS = ("case_id", "image", "prob_covid", "pred", "n_slices", "top_slices")
ERROR_COLUMNS = ("image", "error")


write_csv = atomic_write_csv
"""Write a CSV file with a header row, atomically (:func:`~pipeline.data.atomic_files.atomic_write_csv`)."""


def top_slices(attention: np.ndarray, slice_indices: np.ndarray, k: int) -> list[int]:
    """The original indices of the ``k`` slices with the highest attention, highest first."""
    order = np.argsort(-np.asarray(attention, dtype=float), kind="stable")[:k]
    return [int(np.asarray(slice_indices)[i]) for i in order]


def write_prediction_tables(
    output_dir: str | os.PathLike, predictions: Sequence[Mapping[str, Any]], errors: Sequence[Sequence[str]]
) -> None:
    """Write ``predictions.csv`` (rows as :meth:`SliceAttentionSaver.save_case` makes them, with
    ``label`` when any has one) and ``errors.csv`` (``(image, error)`` pairs), each atomically."""
    columns = list(PREDICTION_COLUMNS)
    if any("label" in row for row in predictions):
        columns.append("label")
    rows = [[row.get(column, "") for column in columns] for row in predictions]
    write_csv(Path(output_dir) / PREDICTIONS_FILE, columns, rows)
    write_csv(Path(output_dir) / ERRORS_FILE, ERROR_COLUMNS, errors)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def _first(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value


class SliceAttentionSaver:
    """Ignite handler: per-case slice attention CSV and figure, ``predictions.csv``, ``errors.csv``.

    Attach it to an evaluator whose output after post-processing holds, per case, the class
    probabilities under ``pred_key`` (``(2,)``; index 1 is COVID-19) and the slice attention
    under ``attention_key`` (``(S,)``), e.g. :class:`pipeline.workflow.inference.FailSafeEvaluator` or
    MONAI's ``SupervisedEvaluator``. Outputs and batches may be collated or decollated.

    From the batch it reads: the case id under ``case_id_key`` (else the image file's name),
    the image's ``filename_or_obj`` meta data, the original axial indices of the scored slices
    under ``slice_indices_key`` (else ``0..S-1``), the network input under ``image_key`` for the
    thumbnails (channel 0), and, when present, ``label_key`` and ``slice_labels_key``.

    Args:
        output_dir: folder of the outputs (created).
        pred_key: key of the class probabilities in the output.
        attention_key: key of the slice attention in the output.
        cam_key: key of the per-slice Grad-CAM maps ``(S, h, w)`` in the output, when the
            inferer computed them (passed on to ``heatmaps``).
        image_key: key of the (preprocessed) image in the batch.
        case_id_key: key of the case id in the batch.
        slice_indices_key: key of the original slice indices in the batch.
        label_key: key of the volume label in the batch or output, written when present.
        slice_labels_key: key of the per-slice labels in the batch, written when present.
        slice_tau: the slice rule's threshold factor (see
            :func:`pipeline.workflow.metrics.slice_predictions`); ``None``: the one stored in
            the engine's network (:func:`pipeline.workflow.slice_rule.network_slice_rule`).
        slice_threshold: least probability of COVID-19 for a volume's slices to be called;
            ``None``: the one stored in the engine's network.
        threshold: probability of COVID-19 at or above which a volume is predicted positive.
        top_k: number of top slices listed in ``predictions.csv`` and shown as thumbnails.
        save_figures: write ``slice_attention.png`` per case (about 0.3 s each on a CPU).
        figure_kwargs: extra arguments of :func:`pipeline.export.figures.plot_slice_attention`.
        heatmaps: called for each scored case as ``heatmaps(case_dir, image, slice_pred,
            slice_indices, case_id, cams)`` with the network input ``(C, H, W, S)`` and the
            maps under ``cam_key`` (``None`` when absent) and, as ``lesion=``, the item's lesion
            mask under ``lesion_key`` when it was loaded, e.g. a
            :class:`~pipeline.export.heatmap_export.SliceHeatmapWriter`; ``None``: no heatmaps.
        tables: write ``predictions.csv`` and ``errors.csv`` after each case; ``False`` when a
            :class:`~pipeline.export.batch_tables.BatchTables` merges them at the end instead.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        attention_key: str = "attention",
        cam_key: str = "cam",
        lesion_key: str = "lesion",
        image_key: str = "image",
        case_id_key: str = "case_id",
        slice_indices_key: str = "slice_indices",
        label_key: str = "label",
        slice_labels_key: str = "slice_labels",
        slice_tau: float | None = None,
        slice_threshold: float | None = None,
        threshold: float = 0.5,
        top_k: int = 5,
        save_figures: bool = True,
        figure_kwargs: Mapping[str, Any] | None = None,
        heatmaps: Callable[..., Any] | None = None,
        tables: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key = pred_key
        self.attention_key = attention_key
        self.cam_key = cam_key
        self.lesion_key = lesion_key
        self.image_key = image_key
        self.case_id_key = case_id_key
        self.slice_indices_key = slice_indices_key
        self.label_key = label_key
        self.slice_labels_key = slice_labels_key
        self.slice_tau = slice_tau
        self.slice_threshold = slice_threshold
        self.threshold = threshold
        self.slice_rule = network_slice_rule(None, slice_tau, slice_threshold)
        self.top_k = top_k
        self.save_figures = save_figures
        self.figure_kwargs = dict(figure_kwargs or {})
        self.heatmaps = heatmaps
        self.tables = tables
        self.logger = logging.getLogger(__name__)
        self.predictions: list[dict[str, Any]] = []
        self.errors: list[tuple[str, str]] = []
        self._case_ids: set[str] = set()

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``: reset at ``STARTED``, read the slice rule at ``EPOCH_STARTED``
        (after a checkpoint restored at ``STARTED``), save at each ``ITERATION_COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.EPOCH_STARTED, self.read_slice_rule)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if self.tables:
            engine.add_event_handler(Events.COMPLETED, self.write_tables)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget earlier cases and start fresh tables (an evaluator may run once per epoch)."""
        self.predictions, self.errors, self._case_ids = [], [], set()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.tables:
            self.write_tables()

    def read_slice_rule(self, engine: Engine) -> None:
        """Take the slice rule for this run: the given values, else the engine network's stored ones."""
        self.slice_rule = network_slice_rule(
            getattr(engine, "network", None), self.slice_tau, self.slice_threshold
        )

    def __call__(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list):
            output = decollate_batch(output, detach=True)
        if not isinstance(batch, list):
            batch = decollate_batch(batch, detach=True)
        for item, result in zip(batch, output):
            if ERROR_KEY in result:
                self.record_error(
                    str(_first(result.get("image", "<unknown>"))), str(_first(result[ERROR_KEY]))
                )
            else:
                self.save_case(item, result)
        if self.tables:
            self.write_tables()

    def record_error(self, image: str, message: str) -> None:
        """Add a row to ``errors.csv`` for a case that could not be processed."""
        self.logger.warning("skipped %s: %s", image, message)
        self.errors.append((image, message))

    def _case_id(self, item: Mapping[str, Any], image: str) -> str:
        raw = _first(item.get(self.case_id_key)) or Path(image).name or "case"
        case_id = unique_case_ids([safe_case_id(str(raw))], taken=self._case_ids)[0]
        self._case_ids.add(case_id.lower())
        return case_id

    def save_case(self, item: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
        """Write one case's attention CSV and figure and add its row to ``predictions.csv``."""
        image_tensor = item.get(self.image_key)
        meta = getattr(image_tensor, "meta", None)
        if meta is None:
            meta = item.get(f"{self.image_key}_meta_dict") or {}
        image = str(_first(meta.get("filename_or_obj", "")))
        case_id = self._case_id(item, image)
        case_dir = self.output_dir / case_id
        if case_dir.resolve().parent != self.output_dir.resolve():
            raise ValueError(f"case id {case_id!r} would write outside {self.output_dir}")

        probabilities = _numpy(result[self.pred_key]).reshape(-1)
        valid = probabilities.size >= 2 and ((probabilities >= 0) & (probabilities <= 1)).all()
        if not (valid and np.isclose(probabilities.sum(), 1.0, atol=1e-3)):
            raise ValueError(
                f"{self.pred_key!r} must hold class probabilities (softmax applied in post-processing), "
                f"got {probabilities.tolist()}"
            )
        prob_covid = float(probabilities[1])
        volume_pred = int(prob_covid >= self.threshold)
        attention = _numpy(result[self.attention_key]).reshape(-1).astype(float)
        n_slices = attention.size
        indices = item.get(self.slice_indices_key)
        indices = np.arange(n_slices) if indices is None else _numpy(indices).reshape(-1).astype(int)
        if indices.size != n_slices:
            raise ValueError(f"{case_id}: {indices.size} slice indices for {n_slices} attention weights")
        slice_tau, slice_threshold = self.slice_rule
        slice_pred = slice_predictions(attention, prob_covid >= slice_threshold, slice_tau)
        slice_labels = item.get(self.slice_labels_key)
        if slice_labels is not None:
            slice_labels = _numpy(slice_labels).reshape(-1).astype(int)
            if slice_labels.size != n_slices:  # labels of the whole volume, scored slices a subset
                slice_labels = slice_labels[indices] if slice_labels.size > indices.max() else None

        columns = ["slice_index", "attention", "slice_pred"]
        rows: list[list[Any]] = [
            [int(i), f"{a:.6g}", int(p)] for i, a, p in zip(indices, attention, slice_pred)
        ]
        if slice_labels is not None:
            columns.append("slice_label")
            for row, label in zip(rows, slice_labels):
                row.append(int(label))
        write_csv(case_dir / ATTENTION_CSV, columns, rows)

        top = top_slices(attention, indices, self.top_k)
        label = _first(result.get(self.label_key, item.get(self.label_key)))
        row = {
            "case_id": case_id,
            "image": image,
            "prob_covid": f"{prob_covid:.6f}",
            "pred": volume_pred,
            "n_slices": n_slices,
            "top_slices": ";".join(str(i) for i in top),
        }
        if label is not None:
            row["label"] = int(_numpy(label).reshape(-1)[0])
        self.predictions.append(row)

        if self.heatmaps is not None and isinstance(image_tensor, torch.Tensor) and image_tensor.ndim == 4:
            cams, lesion = result.get(self.cam_key), item.get(self.lesion_key)
            lesion = lesion if isinstance(lesion, torch.Tensor) else None  # a path when not loaded
            self.heatmaps(case_dir, image_tensor, slice_pred, indices, case_id, cams, lesion=lesion)
        if self.save_figures:
            from pipeline.export.figures import plot_slice_attention

            thumbnails = None
            if isinstance(image_tensor, torch.Tensor) and image_tensor.ndim == 4:
                thumbnails = _numpy(image_tensor[0])
            plot_slice_attention(
                case_dir / ATTENTION_PNG,
                attention,
                indices,
                thumbnails=thumbnails,
                prob_covid=prob_covid,
                slice_tau=slice_tau,
                slice_labels=slice_labels,
                top_k=self.top_k,
                title=case_id,
                **self.figure_kwargs,
            )
        return row

    def write_tables(self, engine: Engine | None = None) -> None:
        """Write ``predictions.csv`` and ``errors.csv`` as they stand (both always exist after a run)."""
        write_prediction_tables(self.output_dir, self.predictions, self.errors)
