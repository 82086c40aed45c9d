"""The ``python -m pipeline`` command line: one sub-command a job."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

DEFAULT_BASE_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lung-pet-ct-dx-A0001"


def _make_demo_data(args: argparse.Namespace) -> int:
    from pipeline.demo_data import make_demo_data

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command of ``python -m pipeline`` and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)
