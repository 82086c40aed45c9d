"""Command line: ``python -m pipeline <command> ...``."""

from pipeline.jobs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
