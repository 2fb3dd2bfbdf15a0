"""``fusionsearch report RUN_DIR``: regenerate a run's Markdown report and plots."""

from __future__ import annotations

import argparse

HELP = "regenerate the Markdown report and PNG plots of a run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'fusionsearch run'")


def run(args: argparse.Namespace) -> int:
    from fusionsearch.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0
