"""The accuracy study of the paper, ``python -m pipeline benchmark-accuracy``: Tables 1 and 2.

One data set, one split and one seed; six runs of the bundle, each trained with
``configs/train.json`` and evaluated on the test split with ``configs/train.json`` +
``configs/evaluate.json`` (MONAI's ``ConfigWorkflow``, as ``python -m monai.bundle run`` would),
differing only in their overrides:

=====================  ==================================================  =========
run                    overrides                                           table
=====================  ==================================================  =========
proposed               (none)                                              1 and 2
n_sca                  ``use_cbam=False``                                  2
n_sla                  ``use_slice_attention=False``                       2
n_msca                 ``use_mask=False``, ``use_cbam=False``              2
tone                   ``enhancement=tone``                                1
stochastic             ``enhancement=stochastic`` (cached once a volume)   1
=====================  ==================================================  =========

The data are demo volumes (:func:`pipeline.jobs.demo.make_demo_datalist`): lesions inserted into the
real chest CT beside the repository plus synthetic phantoms, with slice labels from the lesion
voxels. A :class:`Budget` sizes data and training: ``smoke`` (a test-suite run of a minute or
two), ``cpu`` (about an hour on a 2-core CPU) and ``gpu`` (the paper's settings for a CUDA
machine). The tables go to ``OUT/results.md`` (:mod:`pipeline.export.results_tables`), the numbers to
``OUT/results.json``.

A run whose ``run.json`` was written with the same budget, seed and data is not repeated, so an
interrupted study picks up where it stopped.

With ``seeds=N`` every run is trained N times, with training seeds ``seed .. seed + N - 1`` on
the same data and split (made with ``seed``); the tables then show the mean and the standard
deviation over the seeds, and each seed's own tables, with their bootstrap confidence
intervals, follow. The runs of the first seed are those of a one-seed study, in
``runs/<run>/``; the others go to ``runs/<run>-seed<k>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.data.atomic_files import atomic_write_text
from pipeline.export.results_tables import (
    ABLATION_COLUMNS,
    ENHANCEMENT_COLUMNS,
    LEVELS,
    RunResult,
    metrics_table,
    render_results,
    seed_summary,
)
from pipeline.jobs.demo import (
    BUNDLE_DIR,
    DEFAULT,
    DemoSettings,
    learning_rate_text,
    make_demo_datalist,
    run_bundle,
)
from pipeline.synthetic.base_ct import AUTO_BASE_CT, resolve_base_ct
from pipeline.synthetic.demo_data import split_volumes
from pipeline.workflow.precision import cpu_has_native_bf16

__all__ = [
    "BUDGETS",
    "RUNS",
    "BenchmarkResult",
    "Budget",
    "RunSpec",
    "bundle_overrides",
    "run_accuracy_benchmark",
    "select_runs",
]

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
RUN_RECORD = "run.json"


@dataclass(frozen=True)
class Budget:
    """Sizes of the study's data and of each run's training.

    Attributes:
        name: the budget's name (``smoke``, ``cpu``, ``gpu``).
        real_positive, real_negative: volumes built from the real CT (phantoms when it is absent).
        phantom_positive, phantom_negative: synthetic phantom volumes.
        size: in-plane size of the generated volumes, in pixels.
        slices: axial slices per generated volume (all of them scored in evaluation).
        resize_size, spatial_size: the network input: resize, then central crop (paper: 256, 224).
        num_slices: slices sampled per training volume (paper: 50).
        epochs: training epochs.
        batch_size: training volumes per step (batch-norm statistics span them).
        val_fraction, test_fraction: share of each class and source in validation and test.
        lstm_hidden, fc_hidden: sizes of the BiLSTM (per direction) and of the classifier.
        lr_min, lr_max, lr_half_cycle_epochs: the cyclic learning rate.
        num_workers: data loader processes.
        bf16_training: train under bfloat16 autocast where the CPU has native bfloat16 (as the
            demo does); float32 elsewhere.
        overrides: more bundle overrides shared by every run of the budget.
        description: one line on what the budget is for.
    """

    name: str
    real_positive: int
    real_negative: int
    phantom_positive: int
    phantom_negative: int
    size: int
    slices: int
    resize_size: int
    spatial_size: int
    num_slices: int
    epochs: int
    val_fraction: float
    test_fraction: float
    batch_size: int = 1
    lstm_hidden: int = 512
    fc_hidden: int = 1024
    lr_min: float = 1e-5
    lr_max: float = 1e-4
    lr_half_cycle_epochs: float = 2.0
    num_workers: int = 1
    bf16_training: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_demo_settings(cls, settings: DemoSettings, name: str, description: str) -> Budget:
        """The demo's data and training recipe as a budget: the network input is the whole slice.

        ``description`` is prefixed with the recipe's numbers (volumes, size, test volumes,
        epochs, volumes per step, slices sampled per step).
        """
        sources = (
            (settings.real_positive, settings.real_negative),
            (settings.phantom_positive, settings.phantom_negative),
        )
        test = sum(
            len(indices)
            for positive, negative in sources
            if positive + negative
            for indices in split_volumes(
                positive, negative, settings.val_fraction, settings.test_fraction, settings.seed
            )["test"].values()
        )
        slices = settings.train_slices or settings.slices
        recipe = (
            f"{settings.volumes} volumes of {settings.size} x {settings.size} x {settings.slices} "
            f"({test} test), "
            f"{settings.epochs} epochs of {settings.batch_size} volumes per step on {slices} slices each"
        )
        return cls(
            name=name,
            real_positive=settings.real_positive,
            real_negative=settings.real_negative,
            phantom_positive=settings.phantom_positive,
            phantom_negative=settings.phantom_negative,
            size=settings.size,
            slices=settings.slices,
            resize_size=settings.size,
            spatial_size=settings.size,
            num_slices=settings.train_slices or settings.slices,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction,
            lr_min=settings.lr_min,
            lr_max=settings.lr_max,
            lr_half_cycle_epochs=settings.lr_half_cycle_epochs,
            num_workers=settings.num_workers,
            bf16_training=settings.bf16_training,
            overrides=dict(settings.overrides),
            description=f"{recipe}, {description}",
        )

    def demo_settings(self, seed: int) -> DemoSettings:
        """The data part of the budget, as :func:`pipeline.jobs.demo.make_demo_datalist` takes it."""
        return DemoSettings(
            real_positive=self.real_positive,
            real_negative=self.real_negative,
            phantom_positive=self.phantom_positive,
            phantom_negative=self.phantom_negative,
            size=self.size,
            slices=self.slices,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=seed,
        )


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        name="smoke",
        real_positive=4,
        real_negative=4,
        phantom_positive=4,
        phantom_negative=4,
        size=32,
        slices=8,
        resize_size=32,
        spatial_size=32,
        num_slices=8,
        epochs=1,
        val_fraction=0.25,
        test_fraction=0.25,
        lstm_hidden=16,
        fc_hidden=16,
        lr_min=1e-4,
        lr_max=5e-4,
        lr_half_cycle_epochs=1.0,
        num_workers=0,
        description="end-to-end check of the study on 16 tiny volumes; the numbers mean nothing",
    ),
    "cpu": Budget.from_demo_settings(
        DEFAULT,
        name="cpu",
        description="from scratch, the demo's recipe; sized for about an hour on a 2-core CPU",
    ),
    "gpu": Budget(
        name="gpu",
        real_positive=120,
        real_negative=120,
        phantom_positive=120,
        phantom_negative=120,
        size=256,
        slices=64,
        resize_size=256,
        spatial_size=224,
        num_slices=50,
        epochs=40,
        val_fraction=0.1,
        test_fraction=0.2,
        num_workers=4,
        description="the paper's settings: 256 resize, 224 crop, 50 training slices, 40 epochs; "
        "480 volumes (96 test); for a CUDA machine",
    ),
}
"""The budgets of ``--budget``."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the study: a row label and the bundle overrides that make it.

    Attributes:
        name: identifier and folder name.
        label: row label in the paper's tables.
        overrides: bundle overrides on top of the budget's.
        tables: the tables the run appears in (1: enhancement, 2: ablation).
    """

    name: str
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    tables: tuple[int, ...] = ()

    @property
    def slice_level(self) -> bool:
        """Whether the run's attention can single out slices (not without slice attention)."""
        return bool(self.overrides.get("use_slice_attention", True))


RUNS: tuple[RunSpec, ...] = (
    RunSpec("proposed", "Proposed", {}, (1, 2)),
    RunSpec("n_sca", "N-SCA", {"use_cbam": False}, (2,)),
    RunSpec("n_sla", "N-SLA", {"use_slice_attention": False}, (2,)),
    RunSpec("n_msca", "N-MSCA", {"use_mask": False, "use_cbam": False}, (2,)),
    RunSpec("tone", "Tone Enh.", {"enhancement": "tone"}, (1,)),
    # The enhancer's parallel numba kernels hang in forked data loader workers once the parent
    # process has used OpenMP (torch); enhancing in the main process avoids the fork. Each
    # volume is enhanced once and then read from the cache.
    RunSpec("stochastic", "Stoc. Enh.", {"enhancement": "stochastic", "num_workers": 0}, (1,)),
)
"""The six runs, in the order they are trained."""


def select_runs(names: Sequence[str] | None = None) -> list[RunSpec]:
    """The runs of :data:`RUNS` named in ``names``, in their study order (all of them for ``None``).

    Raises:
        ValueError: a name that is not a run of the study.
    """
    if not names:
        return list(RUNS)
    unknown = sorted(set(names) - {spec.name for spec in RUNS})
    if unknown:
        raise ValueError(
            f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(spec.name for spec in RUNS)}"
        )
    return [spec for spec in RUNS if spec.name in names]


ENHANCEMENT_ORDER = ("proposed", "stochastic", "tone")
"""Table 1's rows, in the paper's order (``proposed`` is the paper's "Orig.")."""
ABLATION_ORDER = ("n_sca", "n_msca", "n_sla", "proposed")
"""Table 2's rows, in the paper's order."""


@dataclass
class BenchmarkResult:
    """Where the study put its results and what it measured."""

    out_dir: Path
    results_md: Path
    results_json: Path
    runs: dict[str, RunResult]
    data_seconds: float
    total_seconds: float
    seeds: dict[int, dict[str, RunResult]] = field(default_factory=dict)


def bundle_overrides(budget: Budget, seed: int, datalist: Path, run_dir: Path, cache_dir: Path) -> dict:
    """The bundle overrides every run of ``budget`` shares (its own come on top)."""
    return {
        "bundle_root": os.fspath(BUNDLE_DIR),
        "dataset_dir": os.fspath(datalist.parent),
        "datalist": os.fspath(datalist),
        "ckpt_dir": os.fspath(run_dir / "models"),
        "cache_dir": os.fspath(cache_dir),
        "seed": seed,
        "num_workers": budget.num_workers,
        "resize_size": budget.resize_size,
        "spatial_size": budget.spatial_size,
        "num_slices": budget.num_slices,
        "lstm_hidden": budget.lstm_hidden,
        "fc_hidden": budget.fc_hidden,
        "progress_bar": False,
        "cpu_bf16_training": budget.bf16_training and cpu_has_native_bf16(),
        **dict(budget.overrides),
    }


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep the workflows' per-iteration INFO logging off the console; warnings still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _fingerprint(budget: Budget, seed: int, base_ct: Path | None) -> str:
    """Identifies the data and training settings (not the budget's description)."""
    settings = {k: v for k, v in asdict(budget).items() if k != "description"}
    text = json.dumps({"budget": settings, "seed": seed, "base_ct": str(base_ct)}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _cache_dir(out_dir: Path, spec: RunSpec) -> Path:
    """One preprocessing cache per enhancement and input (with or without the lung mask channel).

    The cached evaluation items already hold the network input, so runs with and without the
    mask channel must not share them; runs that differ only in the network do.
    """
    enhancement = spec.overrides.get("enhancement", "none")
    mask = "mask" if spec.overrides.get("use_mask", True) else "nomask"
    return out_dir / "cache" / f"{enhancement}-{mask}"


def _run_dir(out_dir: Path, spec: RunSpec, seed: int, first_seed: int) -> Path:
    """``runs/<run>`` for the first training seed, ``runs/<run>-seed<k>`` for the others."""
    return out_dir / "runs" / (spec.name if seed == first_seed else f"{spec.name}-seed{seed}")


def _train_and_evaluate(
    spec: RunSpec, budget: Budget, seed: int, datalist: Path, out_dir: Path, run_dir: Path
) -> RunResult:
    configs = BUNDLE_DIR / "configs"
    common = {
        **bundle_overrides(budget, seed, datalist, run_dir, _cache_dir(out_dir, spec)),
        **dict(spec.overrides),
    }
    start = time.perf_counter()
    run_bundle(
        [configs / "train.json"],
        {
            **common,
            "output_dir": os.fspath(run_dir / "train"),
            "epochs": budget.epochs,
            "batch_size": budget.batch_size,
            "lr_min": budget.lr_min,
            "lr_max": budget.lr_max,
            "lr_half_cycle_epochs": budget.lr_half_cycle_epochs,
        },
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run_bundle(
        [configs / "train.json", configs / "evaluate.json"],
        {
            **common,
            "output_dir": os.fspath(run_dir / "eval"),
            "ckpt_path": os.fspath(run_dir / "models" / "model.pt"),
            "eval_split": "test",
        },
    )
    eval_seconds = time.perf_counter() - start
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return RunResult(
        name=spec.name,
        label=spec.label,
        metrics={level: metrics[level] for level in LEVELS if level in metrics},
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        slice_level=spec.slice_level,
        settings=dict(spec.overrides),
    )


def _table1_row(result: RunResult) -> RunResult:
    """Table 1 calls the proposed model without enhancement "Orig."."""
    return replace(result, label="Orig.") if result.name == "proposed" else result


def _load_record(path: Path, fingerprint: str, spec: RunSpec) -> RunResult | None:
    """A finished run's result when it was made with the same budget, seed, data and overrides."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    result = record.get("result", {})
    if record.get("fingerprint") != fingerprint or result.get("settings") != dict(spec.overrides):
        return None
    return RunResult(**result)


def _machine() -> str:
    device = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    return (
        f"{device}, {os.cpu_count()} CPU cores{memory}, {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads: {torch.get_num_threads()}"
    )


def _time_summary(results: Iterable[RunResult]) -> str:
    """Training and evaluation time over all runs (kept in each run's record, so a resumed study
    still reports the time its runs took)."""
    results = list(results)
    train = sum(r.train_seconds for r in results)
    evaluation = sum(r.eval_seconds for r in results)
    return (
        f"{(train + evaluation) / 60:.1f} min for the {len(results)} runs "
        f"({train / 60:.1f} min training, {evaluation / 60:.1f} min test evaluation), data generation apart"
    )


def _notes(budget: Budget) -> list[str]:
    return [
        "## How to read the tables",
        "Volume level: a test volume is positive when its COVID-19 probability is at least 0.5. "
        "Slice level, paper rule: a slice is positive when its volume is predicted positive and its "
        "attention weight exceeds 1/N (N slices scored). Slice level, tuned rule: the attention "
        "threshold (tau/N) and the least volume probability are chosen for the best slice F1 on the "
        "validation split and stored with the checkpoint (`slice_tau`, `slice_threshold`); the test "
        "slice labels are never used. The labels are the slices holding lesion voxels. The "
        "slice-level AUC ranks the slices of the positive test volumes by their attention. REC and "
        "SEN are the same number. `n/a`: undefined (no predicted positive for PRE, one class only "
        "for the AUC). N-SLA pools the slices by their mean, so its attention is uniform and it has "
        "no slice-level prediction (`NA`, as in the paper).",
        "In brackets: the 95% bootstrap confidence interval of a test metric (2000 resamples of the "
        "test volumes, drawn with replacement within each class, at slice level each volume with all "
        "its slices; percentile intervals, seeded; SciPy's `bootstrap`). `mean ± SD`: the mean and "
        "the sample standard deviation over training seeds on the same data and split; a difference "
        "between settings smaller than their SDs and inside each other's intervals is not one the "
        "study can tell apart from chance.",
        f"Each run trains from scratch ({budget.epochs} epoch{'' if budget.epochs == 1 else 's'}, "
        f"{budget.batch_size} volume{'' if budget.batch_size == 1 else 's'} per step, "
        f"{learning_rate_text(budget.lr_min, budget.lr_max)}); the best network by validation ROC AUC is "
        "evaluated on the test split. Training time is wall-clock time; it includes the validation "
        "after each epoch and, unless the cache was filled beforehand, the first pass that fills the "
        "preprocessing cache of a new setting (the stochastic enhancer's is the costly one).",
    ]


def run_accuracy_benchmark(
    out_dir: str | os.PathLike = "runs/accuracy",
    budget: Budget | str = "cpu",
    seed: int = 0,
    seeds: int = 1,
    base_ct: str | os.PathLike | None = AUTO_BASE_CT,
    runs: Sequence[RunSpec] = RUNS,
    command: str = "python -m pipeline benchmark-accuracy",
    on_run: Callable[[str, RunResult | None], None] | None = None,
) -> BenchmarkResult:
    """Make the data, train and evaluate every run, and write ``results.md`` and ``results.json``.

    Args:
        out_dir: the study's folder: ``data/``, ``cache/``, ``runs/<run>/`` (checkpoints,
            TensorBoard events, ``eval/metrics.json``, ``run.json``), ``results.md``,
            ``results.json``.
        budget: a :class:`Budget` or the name of one in :data:`BUDGETS`.
        seed: seed of the data, the split and every run's training.
        seeds: trainings of every run, with training seeds ``seed .. seed + seeds - 1`` on the
            same data; the tables show their mean and standard deviation.
        base_ct: the real chest CT to insert lesions into; by default the series in the cache
            (:func:`pipeline.synthetic.base_ct.resolve_base_ct`); phantoms only when ``None`` or missing.
        runs: the runs to make (all six by default); the tables show those made.
        command: the command line recorded in ``results.md``.
        on_run: called with a run's name before it starts (result ``None``) and when it is done;
            with several seeds the name carries the seed (``proposed-seed1``).

    Returns:
        Paths and results of the study.
    """
    budget = BUDGETS[budget] if isinstance(budget, str) else budget
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_ct = resolve_base_ct(base_ct)
    base = base_ct if base_ct is not None and base_ct.exists() else None
    fingerprint = _fingerprint(budget, seed, base)
    start_all = time.perf_counter()

    with _quiet_logs():
        start = time.perf_counter()
        datalist = out_dir / "data" / "datalist.json"
        stamp = out_dir / "data" / "fingerprint.txt"
        if not (datalist.is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint):
            datalist, _ = make_demo_datalist(out_dir / "data", budget.demo_settings(seed), base)
            atomic_write_text(stamp, fingerprint + "\n")
        data_seconds = time.perf_counter() - start
        splits = json.loads(datalist.read_text())

        by_seed: dict[int, dict[str, RunResult]] = {}
        for train_seed in range(seed, seed + seeds):
            # the first seed's runs keep the one-seed study's fingerprint, so they are reused
            run_print = fingerprint if train_seed == seed else f"{fingerprint}-train{train_seed}"
            by_seed[train_seed] = {}
            for spec in runs:
                run_dir = _run_dir(out_dir, spec, train_seed, seed)
                record_path = run_dir / RUN_RECORD
                result = _load_record(record_path, run_print, spec)
                if result is None:
                    if on_run is not None:
                        on_run(run_dir.name, None)
                    result = _train_and_evaluate(spec, budget, train_seed, datalist, out_dir, run_dir)
                    atomic_write_text(
                        record_path,
                        json.dumps({"fingerprint": run_print, "result": asdict(result)}, indent=1) + "\n",
                    )
                by_seed[train_seed][spec.name] = result
                if on_run is not None:
                    on_run(run_dir.name, result)
    total_seconds = time.perf_counter() - start_all
    results = by_seed[seed]
    shown = (
        results
        if seeds == 1
        else {spec.name: seed_summary([by_seed[k][spec.name] for k in by_seed]) for spec in runs}
    )

    sources = "lesions inserted into the real CT series plus phantoms" if base else "phantoms only"
    split_text = ", ".join(
        f"{len(items)} {split} ({sum(int(item['label']) for item in items)} positive)"
        for split, items in splits.items()
    )
    seed_text = (
        f"{seed} (data, split and every run)"
        if seeds == 1
        else f"{seed} (data and split); training seeds {seed}..{seed + seeds - 1}: the tables show "
        f"mean ± SD over the {seeds} seeds, each seed's own tables follow"
    )
    summary = {
        "command": f"`{command}`",
        "seed": seed_text,
        "budget": f"`{budget.name}`: {budget.description}",
        "machine": _machine(),
        "data": f"{sum(len(items) for items in splits.values())} volumes of {budget.size} x "
        f"{budget.size} x {budget.slices}, {sources}; {split_text}",
        "network input": f"resize to {budget.resize_size}, crop {budget.spatial_size}; "
        f"{budget.num_slices} slices sampled per training volume, all slices scored in evaluation; "
        f"BiLSTM {budget.lstm_hidden} x 2, FC {budget.fc_hidden}",
        "time": _time_summary(run for runs_of_seed in by_seed.values() for run in runs_of_seed.values()),
    }
    text = render_results(
        "ResNext+ accuracy study: enhancement and ablation",
        summary,
        [_table1_row(shown[name]) for name in ENHANCEMENT_ORDER if name in shown],
        [shown[name] for name in ABLATION_ORDER if name in shown],
        notes=_notes(budget) + (_seed_tables(by_seed) if seeds > 1 else []),
    )
    results_md = out_dir / RESULTS_MD
    atomic_write_text(results_md, text)
    results_json = out_dir / RESULTS_JSON
    atomic_write_text(
        results_json,
        json.dumps(
            {
                "command": command,
                "seed": seed,
                "budget": asdict(budget),
                "machine": _machine(),
                "data_seconds": data_seconds,
                "total_seconds": total_seconds,
                "runs": {name: asdict(result) for name, result in results.items()},
                **(
                    {
                        "seeds": {str(k): {n: asdict(r) for n, r in v.items()} for k, v in by_seed.items()},
                        "summary": {name: asdict(result) for name, result in shown.items()},
                    }
                    if seeds > 1
                    else {}
                ),
            },
            indent=1,
        )
        + "\n",
    )
    return BenchmarkResult(
        out_dir=out_dir,
        results_md=results_md,
        results_json=results_json,
        runs=results,
        data_seconds=data_seconds,
        total_seconds=total_seconds,
        seeds=by_seed,
    )


def _seed_tables(by_seed: Mapping[int, Mapping[str, RunResult]]) -> list[str]:
    """Tables 1 and 2 of each training seed, with the bootstrap intervals of its test metrics."""
    parts = []
    for train_seed, results in by_seed.items():
        enhancement = [_table1_row(results[name]) for name in ENHANCEMENT_ORDER if name in results]
        ablation = [results[name] for name in ABLATION_ORDER if name in results]
        parts.append(f"## Training seed {train_seed}")
        if enhancement:
            parts += ["Table 1 (enhancement):", metrics_table(enhancement, ENHANCEMENT_COLUMNS)]
        if ablation:
            parts += ["Table 2 (ablation):", metrics_table(ablation, ABLATION_COLUMNS)]
    return parts
