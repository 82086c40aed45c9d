"""CPU bfloat16 autocast against float32 on a trained run's test split; prints a table.

``evaluate.json`` scores the test split of a finished ``python -m pipeline demo`` run (its data,
checkpoint and settings) in this process, once to warm up, then with ``cpu_bf16`` off and on, and writes every
case's P(COVID-19) and slice attention. The table shows the time of each evaluation, the volume
ROC AUC and the slice F1 of the stored (tuned) rule, and how far bfloat16 moves each case's
probability and attention (attention x N, N slices, so that 1 is a uniform share) and how many
volume and slice calls it changes.

Usage:
    python benchmarks/bench_precision.py runs/demo
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="output folder of `python -m pipeline demo`")
    parser.add_argument("--split", default="test", help="datalist split to score (default: test)")
    return parser.parse_args(argv)


def _evaluate(run_dir: Path, split: str, cpu_bf16: bool, out_dir: Path) -> tuple[float, dict, dict]:
    from pipeline.jobs.demo import BUNDLE_DIR, demo_run_overrides, run_bundle

    configs = [BUNDLE_DIR / "configs" / "train.json", BUNDLE_DIR / "configs" / "evaluate.json"]
    overrides = {
        **demo_run_overrides(run_dir),
        "output_dir": os.fspath(out_dir),
        "cache_dir": "none",
        "eval_split": split,
        "save_slice_attention": True,
        "cpu_bf16": cpu_bf16,
        "num_workers": 0,
        "progress_bar": False,
    }
    start = time.perf_counter()
    workflow = run_bundle(configs, overrides)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    seconds = float(evaluator.state.times["COMPLETED"] or time.perf_counter() - start)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    cases = {}
    with (out_dir / "predictions.csv").open(newline="") as stream:
        for row in csv.DictReader(stream):
            with (out_dir / row["case_id"] / "slice_attention.csv").open(newline="") as slices:
                rows = list(csv.DictReader(slices))
            cases[row["case_id"]] = {
                "prob": float(row["prob_covid"]),
                "pred": int(row["pred"]),
                "attention": np.array([float(r["attention"]) for r in rows]) * len(rows),
                "calls": np.array([int(r["slice_pred"]) for r in rows]),
            }
    return seconds, metrics, cases


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from pipeline.workflow.precision import cpu_has_native_bf16

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for cpu_bf16 in (False, True):
            results[cpu_bf16] = _evaluate(
                args.run_dir, args.split, cpu_bf16, Path(scratch) / f"bf16_{cpu_bf16}"
            )
    reference = results[False][2]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"native CPU bf16: {cpu_has_native_bf16()}, load average {os.getloadavg()[0]:.1f}; "
        f"{len(reference)} {args.split} volumes of {args.run_dir}"
    )
    print(
        "\n| cpu_bf16 | evaluation s | volume ROC AUC | slice F1 (stored rule) | max abs change of P "
        "| mean abs change of P | max abs change of attention x N | volume calls changed "
        "| slice calls changed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cpu_bf16, (seconds, metrics, cases) in results.items():
        dp = np.array([abs(cases[k]["prob"] - reference[k]["prob"]) for k in reference])
        da = max(float(np.abs(cases[k]["attention"] - reference[k]["attention"]).max()) for k in reference)
        volume_changes = sum(cases[k]["pred"] != reference[k]["pred"] for k in reference)
        slice_changes = sum(int((cases[k]["calls"] != reference[k]["calls"]).sum()) for k in reference)
        print(
            f"| {cpu_bf16} | {seconds:.1f} | {metrics['volume']['auc']:.4f} | {metrics['slice']['f1']:.4f} "
            f"| {dp.max():.2e} | {dp.mean():.2e} | {da:.2e} | {volume_changes} | {slice_changes} |"
        )


if __name__ == "__main__":
    main()
