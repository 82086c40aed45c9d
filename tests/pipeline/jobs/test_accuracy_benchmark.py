"""``python -m pipeline benchmark-accuracy --budget smoke`` end to end, and the table rendering."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.export.results_tables import (
    ABLATION_COLUMNS,
    ENHANCEMENT_COLUMNS,
    RunResult,
    format_cell,
    format_value,
    metrics_table,
    seed_summary,
    slice_baseline_table,
)
from pipeline.jobs.accuracy_benchmark import (
    BUDGETS,
    RUNS,
    bundle_overrides,
    run_accuracy_benchmark,
    select_runs,
)
from pipeline.jobs.cli import main
from pipeline.jobs.demo import DEFAULT
from pipeline.workflow.precision import cpu_has_native_bf16

TABLE1_ROWS = ("Orig.", "Stoc. Enh.", "Tone Enh.")
TABLE2_ROWS = ("N-SCA", "N-MSCA", "N-SLA", "Proposed")
METRICS = ("acc", "pre", "rec", "f1", "sen", "spe", "auc")


def _section(text: str, heading: str) -> str:
    """The markdown between ``heading`` and the next ``## `` heading."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else None]


def _table_rows(section: str) -> list[list[str]]:
    """Cells of the body rows of the first markdown table in ``section``."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _check_metrics_table(section: str, labels: tuple[str, ...], columns: tuple[str, ...]) -> None:
    rows = _table_rows(section)
    # volume block, then the slice blocks: the paper's rule, the rule tuned on validation
    assert [row[1] for row in rows] == list(labels) * 3
    assert [rows[block * len(labels)][0] for block in range(3)] == [
        "Volume level",
        "Slice level, paper rule",
        "Slice level, tuned rule",
    ]
    for level_index, row in enumerate(rows):
        values = row[2:]
        assert len(values) == len(columns)
        if row[1] == "N-SLA" and level_index >= len(labels):
            assert values == ["NA"] * len(columns)  # uniform attention: no slice prediction
            continue
        for value in values:  # a value, then its interval in brackets or its SD over seeds
            assert value == "n/a" or 0.0 <= float(value.split(" ")[0]) <= 1.0, row


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole study at the smoke budget, through the command line (run once for this module)."""
    out = tmp_path_factory.mktemp("accuracy") / "study"
    threads = torch.get_num_threads()
    # Tiny tensors: one thread is as fast, and avoids OpenMP spin-waits when other work shares the cores.
    torch.set_num_threads(1)
    try:
        assert main(["benchmark-accuracy", "--budget", "smoke", "--out", str(out), "--seed", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_smoke_study_tables_have_every_row_in_range(smoke_study: Path) -> None:
    text = (smoke_study / "results.md").read_text()
    assert f"`python -m pipeline benchmark-accuracy --out {smoke_study} --budget smoke --seed 3`" in text
    assert "**seed**: 3" in text
    assert "torch" in text and "CPU cores" in text
    _check_metrics_table(_section(text, "## Table 1"), TABLE1_ROWS, ENHANCEMENT_COLUMNS)
    _check_metrics_table(_section(text, "## Table 2"), TABLE2_ROWS, ABLATION_COLUMNS)
    baselines = _table_rows(_section(text, "## Slice F1 against the trivial rule"))
    assert len(baselines) == 2 * (len(RUNS) - 1)  # both slice rules of every run but N-SLA
    for row in baselines:
        assert all(value == "n/a" or 0.0 <= float(value) <= 1.0 for value in row[2:6]), row
        assert row[6] == "n/a" or -1.0 <= float(row[6]) <= 1.0, row

    runs = _table_rows(_section(text, "## Runs"))
    assert sorted(row[0] for row in runs) == sorted(spec.name for spec in RUNS)
    for row in runs:
        assert float(row[3]) >= 0 and float(row[4]) >= 0  # training and evaluation seconds


@pytest.mark.slow
def test_smoke_study_runs_share_split_and_record_bundle_metrics(smoke_study: Path) -> None:
    datalist = json.loads((smoke_study / "data" / "datalist.json").read_text())
    test_count = len(datalist["test"])
    results = json.loads((smoke_study / "results.json").read_text())
    assert results["seed"] == 3 and results["budget"]["name"] == "smoke"
    assert set(results["runs"]) == {spec.name for spec in RUNS}
    for spec in RUNS:
        run = results["runs"][spec.name]
        # the table values are the ones the bundle's evaluate.json wrote
        written = json.loads((smoke_study / "runs" / spec.name / "eval" / "metrics.json").read_text())
        assert written["split"] == "test"
        assert Path(written["datalist"]) == smoke_study / "data" / "datalist.json"
        for level in ("volume", "slice_paper", "slice"):
            assert run["metrics"][level] == written[level]
            for name in METRICS:
                value = written[level][name]
                assert value is None or 0.0 <= value <= 1.0
        assert written["volume"]["count"] == test_count
        assert sum(map(sum, written["volume"]["confusion_matrix"])) == test_count
        assert (
            written["slice"]["count"]
            == written["slice_paper"]["count"]
            == test_count * BUDGETS["smoke"].slices
        )
        assert run["settings"] == dict(spec.overrides)
        assert (smoke_study / "runs" / spec.name / "models" / "model.pt").is_file()
        assert list((smoke_study / "runs" / spec.name / "train").glob("events.out.tfevents.*"))
    # N-SLA's mean pooling reports uniform attention, so the paper's rule never singles out a slice
    assert results["runs"]["n_sla"]["metrics"]["slice_paper"]["confusion_matrix"][0][1] == 0
    assert results["runs"]["n_sla"]["metrics"]["slice_paper"]["confusion_matrix"][1][1] == 0


@pytest.mark.slow
def test_smoke_study_resumes_without_retraining(smoke_study: Path) -> None:
    records = sorted((smoke_study / "runs").glob("*/run.json"))
    assert len(records) == len(RUNS)
    before = {path: path.stat().st_mtime_ns for path in records}
    first = json.loads((smoke_study / "results.json").read_text())

    result = run_accuracy_benchmark(smoke_study, "smoke", seed=3, command="again")
    assert {path: path.stat().st_mtime_ns for path in records} == before
    assert {name: run.metrics for name, run in result.runs.items()} == {
        name: run["metrics"] for name, run in first["runs"].items()
    }
    assert "`again`" in result.results_md.read_text()

    # a subset of finished runs re-renders the tables with their rows only
    args = ["benchmark-accuracy", "--budget", "smoke", "--out", str(smoke_study), "--seed", "3"]
    assert main([*args, "--runs", "tone,proposed"]) == 0
    assert {path: path.stat().st_mtime_ns for path in records} == before
    text = (smoke_study / "results.md").read_text()
    assert [row[1] for row in _table_rows(_section(text, "## Table 1"))] == ["Orig.", "Tone Enh."] * 3
    assert [row[1] for row in _table_rows(_section(text, "## Table 2"))] == ["Proposed"] * 3


@pytest.mark.slow
def test_smoke_study_with_two_seeds_reports_mean_and_sd(smoke_study: Path) -> None:
    result = run_accuracy_benchmark(smoke_study, "smoke", seed=3, seeds=2, runs=select_runs(["proposed"]))

    assert set(result.seeds) == {3, 4}
    assert (smoke_study / "runs" / "proposed-seed4" / "run.json").is_file()  # seed 3's run is reused
    second = json.loads((smoke_study / "runs" / "proposed-seed4" / "eval" / "metrics.json").read_text())
    first = result.seeds[3]["proposed"].metrics["volume"]
    volume = [first["acc"], second["volume"]["acc"]]
    text = result.results_md.read_text()
    row = _table_rows(_section(text, "## Table 1"))[0]
    assert row[2] == f"{np.mean(volume):.3f} ± {np.std(volume, ddof=1):.3f}"
    assert "## Training seed 3" in text and "## Training seed 4" in text
    seed_row = _table_rows(_section(text, "## Training seed 4"))[0]
    low, high = second["volume"]["acc_ci"]
    assert seed_row[2] == f"{second['volume']['acc']:.3f} [{low:.2f}, {high:.2f}]"
    summary = json.loads(result.results_json.read_text())["summary"]["proposed"]["metrics"]["volume"]
    assert summary["acc_seeds"] == 2


def test_seed_summary_and_cells() -> None:
    runs = [_result("proposed", "Proposed", acc=acc, pre=pre) for acc, pre in ((0.5, 0.2), (0.7, None))]
    summary = seed_summary(runs).metrics["volume"]
    assert summary["acc"] == pytest.approx(0.6) and summary["acc_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["pre"] == 0.2 and summary["pre_sd"] is None and summary["pre_seeds"] == 1
    assert summary["count"] == 4 and isinstance(summary["count"], int)
    assert format_cell(summary, "acc") == "0.600 ± 0.141"
    assert format_cell(summary, "pre") == "0.200 (1 seed)"
    assert format_cell({"auc": 0.9, "auc_ci": [0.81, 0.97]}, "auc") == "0.900 [0.81, 0.97]"
    assert format_cell({"auc": None, "auc_ci": None}, "auc") == "n/a"


def test_select_runs_keeps_study_order_and_rejects_unknown_names() -> None:
    assert select_runs(None) == list(RUNS)
    assert [spec.name for spec in select_runs(["stochastic", "proposed"])] == ["proposed", "stochastic"]
    with pytest.raises(ValueError, match=r"unknown run.*n_xyz"):
        select_runs(["n_xyz"])
    with pytest.raises(SystemExit, match="n_xyz"):
        main(["benchmark-accuracy", "--budget", "smoke", "--runs", "proposed,n_xyz"])


def _result(name: str, label: str, slice_level: bool = True, **volume: float) -> RunResult:
    metrics = {name: 0.5 for name in METRICS}
    return RunResult(
        name=name,
        label=label,
        metrics={
            "volume": {**metrics, **volume, "count": 4},
            "slice_paper": dict(metrics),
            "slice": {name: 0.4 for name in METRICS},
        },
        train_seconds=12.3,
        eval_seconds=1.2,
        slice_level=slice_level,
    )


def test_format_value_marks_undefined_metrics() -> None:
    assert format_value(0.81949) == "0.819"
    assert format_value(1) == "1.000"
    assert format_value(None) == "n/a"
    assert format_value(math.nan) == "n/a"


def test_metrics_table_volume_then_slice_blocks() -> None:
    rows = [_result("n_sla", "N-SLA", slice_level=False, acc=0.25), _result("proposed", "Proposed", pre=None)]
    table = metrics_table(rows, ABLATION_COLUMNS)
    lines = table.splitlines()
    assert lines[0] == "| Level | Setting | ACC | PRE | F1 | SEN | SPE | AUC |"
    assert re.fullmatch(r"\|(---\|){8}", lines[1])
    assert lines[2] == "| Volume level | N-SLA | 0.250 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |"
    assert lines[3] == "|  | Proposed | 0.500 | n/a | 0.500 | 0.500 | 0.500 | 0.500 |"
    assert lines[4] == "| Slice level, paper rule | N-SLA | NA | NA | NA | NA | NA | NA |"
    assert lines[5] == "|  | Proposed | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |"
    assert lines[6] == "| Slice level, tuned rule | N-SLA | NA | NA | NA | NA | NA | NA |"
    assert lines[7] == "|  | Proposed | 0.400 | 0.400 | 0.400 | 0.400 | 0.400 | 0.400 |"
    assert len(lines) == 8


def test_slice_baseline_table_puts_the_trivial_rule_beside_the_model() -> None:
    proposed = _result("proposed", "Proposed")
    measured = {"prevalence": 0.2, "prevalence_positive": 0.4, "trivial_f1": 0.3}
    proposed.metrics["slice"].update(measured)
    proposed.metrics["slice_paper"].update(measured, trivial_f1=None)
    rows = [_result("n_sla", "N-SLA", slice_level=False), proposed]

    lines = slice_baseline_table(rows).splitlines()

    assert len(lines) == 2 + 2, "no rows for a run without slice attention"
    assert lines[2] == "| Proposed | paper rule | 0.200 | 0.400 | 0.500 | n/a | n/a |"
    assert lines[3] == "| Proposed | tuned rule | 0.200 | 0.400 | 0.400 | 0.300 | 0.100 |"


def test_the_cpu_budget_trains_as_the_default_demo_does(tmp_path: Path) -> None:
    budget = BUDGETS["cpu"]
    overrides = bundle_overrides(budget, 0, tmp_path / "datalist.json", tmp_path / "run", tmp_path / "cache")

    assert (budget.size, budget.slices, budget.epochs, budget.batch_size) == (
        DEFAULT.size,
        DEFAULT.slices,
        DEFAULT.epochs,
        DEFAULT.batch_size,
    )
    assert overrides["num_slices"] == DEFAULT.train_slices  # sampled per training step, as in the demo
    assert overrides["cpu_bf16_training"] == (DEFAULT.bf16_training and cpu_has_native_bf16())
    volumes = budget.real_positive + budget.real_negative + budget.phantom_positive + budget.phantom_negative
    assert budget.description.startswith(
        f"{volumes} volumes of {DEFAULT.size} x {DEFAULT.size} x {DEFAULT.slices} ("
    )
    assert f"on {DEFAULT.train_slices} slices each" in budget.description
