"""``fusionsearch operators``: the registered fusion operators, their kind, options and summary."""

from __future__ import annotations

import argparse
import inspect

from fusionsearch.operator_api import OperatorInfo, describe_operator
from fusionsearch.registry import list_operators

HELP = "list the registered fusion operators (built-ins and plugins) with their options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugins",
        nargs="*",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import these plugin modules or .py files first, so that their operators are listed too",
    )


def run(args: argparse.Namespace) -> int:
    if args.plugins:
        from fusionsearch.registry import import_plugins

        import_plugins(args.plugins, source="--plugins")
    infos = [describe_operator(name) for name in list_operators()]
    rows = [
        (info.name, "parametric" if info.parametric else "stateless", _options(info), info.summary) for info in infos
    ]
    header = ("name", "kind", "options", "description")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    print(f"\n{len(rows)} operators. Register your own: see docs/operators.md.")
    return 0


def _options(info: OperatorInfo) -> str:
    parts = []
    for name, param in info.options.items():
        parts.append(name if param.default is inspect.Parameter.empty else f"{name}={param.default!r}")
    if info.accepts_any_option:
        parts.append("**options")
    return ", ".join(parts) or "-"
