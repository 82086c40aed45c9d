"""The ``python -m pipeline`` command line: one sub-command a job."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.synthetic.base_ct import AUTO_BASE_CT, CACHE_ENV


def _make_demo_data(args: argparse.Namespace) -> int:
    from pipeline.synthetic.demo_data import make_demo_data

    make_demo_data(
        args.out_dir,
        n_positive=args.n_positive,
        n_negative=args.n_negative,
        size=args.size,
        slices=args.slices,
        seed=args.seed,
        base_ct=args.base_ct,
    )
    print(f"demo data written to {args.out_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.jobs.demo import DEFAULT, QUICK, run_demo, summary_line, with_overrides

    if args.fetch_base_ct and not args.phantoms_only and os.fspath(args.base_ct) == AUTO_BASE_CT:
        _fetch_or_say_why(None, then="; the demo goes on with phantoms only")
    pretrained = os.fspath(args.pretrained) if args.pretrained else None
    settings = with_overrides(QUICK if args.quick else DEFAULT, seed=args.seed, pretrained=pretrained)
    command = "python -m pipeline demo" + (" --quick" if args.quick else "")
    command += f" --pretrained {pretrained}" if pretrained else ""
    base_ct = _base_ct(args)
    result = run_demo(args.out, settings, base_ct=base_ct, progress=not args.no_progress, command=command)
    print(summary_line(result))
    return 0


def _benchmark_accuracy(args: argparse.Namespace) -> int:
    from pipeline.jobs.accuracy_benchmark import run_accuracy_benchmark, select_runs

    command = f"python -m pipeline benchmark-accuracy --out {args.out} --budget {args.budget}"
    command += f" --seed {args.seed}" + (f" --seeds {args.seeds}" if args.seeds != 1 else "")
    command += " --phantoms-only" if args.phantoms_only else ""
    command += f" --runs {','.join(args.runs)}" if args.runs else ""
    threads = os.environ.get("OMP_NUM_THREADS")
    command = f"OMP_NUM_THREADS={threads} {command}" if threads else command
    base_ct = _base_ct(args)

    def announce(name: str, result: object) -> None:
        if result is None:
            print(f"[{time.strftime('%H:%M:%S')}] run {name}: training and evaluating", flush=True)
        else:
            volume = result.metrics["volume"]
            print(
                f"[{time.strftime('%H:%M:%S')}] run {name}: test volume AUC {volume.get('auc')}, "
                f"ACC {volume.get('acc')}; training {result.train_seconds:.0f} s",
                flush=True,
            )

    try:
        runs = select_runs(args.runs)
    except ValueError as error:
        raise SystemExit(f"benchmark-accuracy: {error}") from None
    result = run_accuracy_benchmark(
        args.out,
        args.budget,
        seed=args.seed,
        seeds=args.seeds,
        base_ct=base_ct,
        runs=runs,
        command=command,
        on_run=announce,
    )
    trainings = sum(len(runs_of_seed) for runs_of_seed in result.seeds.values()) or len(result.runs)
    print(f"{trainings} runs in {result.total_seconds / 60:.1f} min; tables: {result.results_md}")
    return 0


def _add_base_ct_arguments(parser: argparse.ArgumentParser) -> None:
    """``--base-ct`` and ``--phantoms-only``: where the demo volumes' real CT comes from."""
    parser.add_argument(
        "--base-ct",
        type=Path,
        default=Path(AUTO_BASE_CT),
        help="real CT (NIfTI file or DICOM folder, in HU) to insert lesions into (default: the series "
        f"fetched by `python -m pipeline fetch-base-ct` into ${CACHE_ENV} "
        "or ~/.cache/covid19-ct-resnextplus; "
        "phantoms only when absent)",
    )
    parser.add_argument("--phantoms-only", action="store_true", help="do not use the real CT")


def _base_ct(args: argparse.Namespace) -> Path | None:
    """The real CT chosen by :func:`_add_base_ct_arguments`' options (``None``: phantoms only)."""
    from pipeline.synthetic.base_ct import resolve_base_ct

    return None if args.phantoms_only else resolve_base_ct(args.base_ct)


def _fetch_or_say_why(cache: Path | None, then: str = "") -> Path | None:
    """Fetch the base CT into ``cache``; on failure print one line (ending in ``then``), return ``None``."""
    from pipeline.synthetic.base_ct import BaseCTChecksumError, BaseCTDownloadError, fetch_base_ct

    try:
        return fetch_base_ct(cache)
    except (BaseCTDownloadError, BaseCTChecksumError) as error:
        print(f"base CT not fetched: {error}{then}")
        return None


def _fetch_base_ct(args: argparse.Namespace) -> int:
    from pipeline.synthetic.base_ct import BASE_CT_SERIES

    print(f"fetching {BASE_CT_SERIES.collection} {BASE_CT_SERIES.patient_id} ({BASE_CT_SERIES.citation})")
    folder = _fetch_or_say_why(args.cache)
    if folder is None:
        return 1
    print(f"base CT ready: {folder}")
    return 0


def _make_datalist(args: argparse.Namespace) -> int:
    from pipeline.data.collections import CollectionError, make_datalist

    try:
        result = make_datalist(
            args.root,
            args.out_dir,
            layout=args.layout,
            positive=args.positive,
            negative=args.negative,
            patient_regex=args.patient_regex,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            all_test=args.all_test,
        )
    except CollectionError as error:
        raise SystemExit(f"make-datalist: {error}") from None
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    print(f"{result.datalist}: {counts}; {result.failed} cases could not be used (see {result.errors})")
    return 0


def _compare_heatmaps(args: argparse.Namespace) -> int:
    from pipeline.jobs.heatmap_study import best_setting, compare_heatmaps, study_table

    results = compare_heatmaps(args.run, splits=args.splits)
    table = study_table(results)
    print(table)
    if "validation" in results:
        print(f"best on validation (pixel ROC AUC): {best_setting(results['validation'])}")
    print(f"numbers: {args.run / 'heatmap_study.json'}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pipeline``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo_data = commands.add_parser("make-demo-data", help="write synthetic chest CT volumes and a datalist")
    demo_data.add_argument("out_dir", type=Path)
    demo_data.add_argument("--n-positive", type=int, default=8)
    demo_data.add_argument("--n-negative", type=int, default=16)
    demo_data.add_argument("--size", type=int, default=128, help="in-plane size in pixels")
    demo_data.add_argument("--slices", type=int, default=32, help="axial slices per volume")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument(
        "--base-ct", type=Path, default=None, help="real CT (NIfTI file or DICOM folder, in HU) to build on"
    )
    demo_data.set_defaults(func=_make_demo_data)

    demo = commands.add_parser(
        "demo", help="make demo data, train, evaluate, run batch inference and write report.md (CPU: minutes)"
    )
    demo.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    demo.add_argument("--quick", action="store_true", help="a one- to two-minute smoke run on tiny data")
    demo.add_argument("--seed", type=int, default=None, help="seed of the data and of training (default: 0)")
    demo.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="ImageNet weights of resnext50_32x4d (a local torchvision state-dict file) to start from",
    )
    _add_base_ct_arguments(demo)
    demo.add_argument(
        "--fetch-base-ct",
        action="store_true",
        help="first download the real CT into the cache (see fetch-base-ct); without network, phantoms",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    accuracy = commands.add_parser(
        "benchmark-accuracy",
        help="the paper's enhancement and ablation tables: six runs on one split, results.md (CPU: ~50 min)",
    )
    accuracy.add_argument(
        "--out", type=Path, default=Path("runs/accuracy"), help="output folder (default: runs/accuracy)"
    )
    accuracy.add_argument(
        "--budget",
        choices=("smoke", "cpu", "gpu"),
        default="cpu",
        help="smoke: tiny end-to-end check; cpu: ~50 min on 2 cores; gpu: the paper's settings "
        "(default: cpu)",
    )
    accuracy.add_argument("--seed", type=int, default=0, help="seed of the data, split and runs (default: 0)")
    accuracy.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="train every run this many times, with training seeds SEED, SEED+1, ... on the same data; "
        "the tables show mean ± SD over them (default: 1)",
    )
    _add_base_ct_arguments(accuracy)
    accuracy.add_argument(
        "--runs",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help="comma-separated subset of proposed,n_sca,n_sla,n_msca,tone,stochastic (default: all); "
        "runs already finished with the same settings are reused, not retrained",
    )
    accuracy.set_defaults(func=_benchmark_accuracy)

    fetch = commands.add_parser(
        "fetch-base-ct",
        help="download the demo's real chest CT (TCIA Lung-PET-CT-Dx A0001, CC BY 4.0, 34 MB) and check it",
    )
    fetch.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"cache folder (default: ${CACHE_ENV}, else ~/.cache/covid19-ct-resnextplus)",
    )
    fetch.set_defaults(func=_fetch_base_ct)

    datalist = commands.add_parser(
        "make-datalist",
        help="datalist.json (training/validation/test by patient) and errors.csv "
        "from a CT collection on disk",
    )
    datalist.add_argument("root", type=Path, help="the collection's folder (for --layout csv: the CSV file)")
    datalist.add_argument("out_dir", type=Path, help="where datalist.json and errors.csv are written")
    datalist.add_argument(
        "--layout",
        choices=("folders", "csv", "mosmed"),
        required=True,
        help="folders: ROOT/<class>/<case>; csv: image,label[,mask][,patient] rows; "
        "mosmed: studies/CT-0..CT-4 with optional masks/",
    )
    datalist.add_argument(
        "--positive",
        type=_names,
        default=[],
        metavar="NAMES",
        help="comma-separated positive class folders (folders) or label texts meaning 1 (csv), "
        "e.g. covid,ncp",
    )
    datalist.add_argument(
        "--negative",
        type=_names,
        default=None,
        metavar="NAMES",
        help="comma-separated negative class folders (folders; default: all others) "
        "or label texts meaning 0 (csv)",
    )
    datalist.add_argument(
        "--patient-regex",
        default=None,
        metavar="REGEX",
        help="folders: regular expression finding the patient in a case's path below ROOT "
        "(group 1 if any; default: the case's first path part below its class folder)",
    )
    datalist.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    datalist.add_argument(
        "--val-fraction", type=float, default=0.15, help="share of patients (default: 0.15)"
    )
    datalist.add_argument(
        "--test-fraction", type=float, default=0.15, help="share of patients (default: 0.15)"
    )
    datalist.add_argument(
        "--all-test",
        action="store_true",
        help="put every case in the test split (the fractions are ignored): a collection for "
        "evaluating a trained model with evaluate.json (external validation)",
    )
    datalist.set_defaults(func=_make_datalist)

    heatmaps = commands.add_parser(
        "compare-heatmaps",
        help="score every heatmap layer, weighting and lung masking of a demo run against its lesion masks",
    )
    heatmaps.add_argument("run", type=Path, help="the folder of a finished `python -m pipeline demo` run")
    heatmaps.add_argument(
        "--splits",
        type=_names,
        default=["validation", "test"],
        metavar="NAMES",
        help="comma-separated splits to score (default: validation,test)",
    )
    heatmaps.set_defaults(func=_compare_heatmaps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command of ``python -m pipeline`` and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)
