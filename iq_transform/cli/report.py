"""``iq-report``: one table and plot from a folder of ``iq-quantize`` runs.

Example::

    iq-quantize -m model=tiny-planted transform=none,spikefree \\
        quant=w8a8_static,w8a8_dynamic
    iq-report multirun/quantize/2026-01-01_12-00-00

writes ``results.csv``, ``results.md`` and ``ppl.png`` into that folder (or
``--output``) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loguru import logger

from iq_transform.reports.sweep import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``iq-report``.

    :param argv: arguments (default: ``sys.argv[1:]``)
    """
    parser = argparse.ArgumentParser(
        prog="iq-report",
        description="Aggregate every results.json below a (multirun) folder into "
        "results.csv, results.md and ppl.png.",
    )
    parser.add_argument("runs", type=Path, help="folder holding the runs")
    parser.add_argument(
        "--output", type=Path, default=None, help="where to write (default: runs)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status.

    :param argv: arguments (default: ``sys.argv[1:]``)
    """
    args = parse_args(argv)
    if not args.runs.is_dir():
        logger.error(f"{args.runs} is not a folder")
        return 2
    try:
        runs, text = write_report(args.runs, args.output)
    except FileNotFoundError as error:
        logger.error(str(error))
        return 1
    print(text)
    failed = sum(run.status != "ok" for run in runs)
    logger.info(f"{len(runs)} runs, {failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
