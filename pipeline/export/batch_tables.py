"""One ``predictions.csv`` and one ``errors.csv`` for a batch run, over processes and resumed runs.

:class:`BatchTables` follows a :class:`~pipeline.export.attention_export.SliceAttentionSaver`
(made with ``tables=False``): after each case it takes the saver's new row or error and, with
``record_cases``, writes the case's completion record
(:mod:`pipeline.workflow.case_records`); when the run ends it gathers every process's results,
puts them back in case order and has rank 0 write both tables, atomically. With the run's full
case list, the tables also hold the cases scored by an earlier run into the same folder (read
from their records), so a resumed run ends with the tables of an uninterrupted one.
:func:`run_batch` runs the evaluator, or, for a process left without a case, only the merge.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.data import decollate_batch

from pipeline.export.attention_export import SliceAttentionSaver, write_prediction_tables
from pipeline.workflow.case_records import read_record, write_record
from pipeline.workflow.distributed import gather_objects, interleave, is_main_process
from pipeline.workflow.inference import ERROR_KEY

__all__ = ["BatchTables", "run_batch"]


def _first(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value


class BatchTables:
    """Ignite handler: per-case completion records, and the merged tables at the end of a run.

    Attach it after ``saver``. The merge assumes each process scored its share in the order of
    :func:`pipeline.workflow.distributed.shard_sampler` (one process: the data order).

    Args:
        saver: the saver of the cases' files and rows, made with ``tables=False``.
        output_dir: the run's output folder (``saver``'s).
        cases: the run's full case list (``image``, ``case_id``, ...), in order, including the
            cases an earlier run scored; ``None``: the tables hold this run's cases only.
        record_cases: write a completion record per scored case (needs ``cases``), so that
            :func:`pipeline.workflow.case_records.pending_cases` skips it in a rerun.
    """

    def __init__(
        self,
        saver: SliceAttentionSaver,
        output_dir: str | os.PathLike,
        cases: Sequence[Mapping[str, Any]] | None = None,
        record_cases: bool = True,
    ) -> None:
        if saver.tables:
            raise ValueError("give the saver tables=False: BatchTables writes predictions.csv and errors.csv")
        if record_cases and cases is None:
            raise ValueError("record_cases needs the run's case list (cases)")
        self.saver = saver
        self.output_dir = Path(output_dir)
        self.cases = None if cases is None else {str(case["case_id"]): case for case in cases}
        self.record_cases = record_cases
        self.outcomes: list[dict[str, Any]] = []
        self._rows_taken = self._errors_taken = 0

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``: reset at ``STARTED``, collect each iteration, merge at ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.merge)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the outcomes of an earlier run of the engine."""
        self.outcomes = []
        self._rows_taken = self._errors_taken = 0

    def collect(self, engine: Engine) -> None:
        """Take the saver's outcome of each case of this iteration; record the scored ones."""
        output = engine.state.output
        results = output if isinstance(output, list) else decollate_batch(output, detach=True)
        for result in results:
            if ERROR_KEY in result:
                image, message = self.saver.errors[self._errors_taken]
                self._errors_taken += 1
                case_id = str(_first(result.get("case_id", "")))
                self.outcomes.append({"case_id": case_id, "error": [image, message]})
                continue
            row = self.saver.predictions[self._rows_taken]
            self._rows_taken += 1
            self.outcomes.append({"case_id": row["case_id"], "row": row})
            if self.record_cases:
                write_record(self.output_dir, self.cases[row["case_id"]], row)

    def merge(self, engine: Engine | None = None) -> None:
        """Gather the outcomes of every process and, on rank 0, write both tables (a collective call)."""
        outcomes = interleave(gather_objects(self.outcomes))
        if not is_main_process():
            return
        if self.cases is not None:
            by_case = {outcome["case_id"]: outcome for outcome in outcomes}
            outcomes = []
            for case_id, case in self.cases.items():
                outcome = by_case.get(case_id)
                if outcome is None:
                    row = read_record(self.output_dir, case)
                    outcome = None if row is None else {"case_id": case_id, "row": row}
                if outcome is not None:
                    outcomes.append(outcome)
        write_prediction_tables(
            self.output_dir,
            [outcome["row"] for outcome in outcomes if "row" in outcome],
            [tuple(outcome["error"]) for outcome in outcomes if "error" in outcome],
        )


def run_batch(evaluator: Any, tables: BatchTables) -> None:
    """Score this process's cases with ``evaluator``; without any (all scored by an earlier run,
    or fewer cases than processes), only take part in the merge of the tables."""
    if len(evaluator.data_loader) > 0:
        evaluator.run()
    else:
        evaluator.logger.info("no case left to score in this process")
        tables.merge()
