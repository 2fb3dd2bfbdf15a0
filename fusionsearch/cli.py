"""The ``fusionsearch`` command line.

Each sub-command lives in its own module under ``fusionsearch.commands`` with ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used, so
``fusionsearch --help`` stays fast. User errors are printed as one paragraph, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from fusionsearch.allocator import use_huge_pages
from fusionsearch.errors import FusionSearchError

# name -> module; the order is the order shown in --help
COMMANDS: dict[str, str] = {
    "demo": "fusionsearch.commands.demo",
    "run": "fusionsearch.commands.run",
    "evaluate": "fusionsearch.commands.evaluate",
    "report": "fusionsearch.commands.report",
    "sweep": "fusionsearch.commands.sweep",
    "operators": "fusionsearch.commands.operators",
    "inspect": "fusionsearch.commands.inspect",
    "inspect-model": "fusionsearch.commands.inspect_model",
    "make-data": "fusionsearch.commands.make_data",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the command
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionsearch",
        description="Searchable multi-scale logit mixing (LoMix and beyond) for medical image segmentation.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _print_error(message: str) -> None:
    width = min(100, max(60, os.get_terminal_size(2).columns if sys.stderr.isatty() else 100))
    print(textwrap.fill(f"error: {message}", width=width, subsequent_indent="  "), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    use_huge_pages()  # before anything imports torch (see fusionsearch.allocator)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except FusionSearchError as exc:
        if args.debug:
            raise
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in fusionsearch: say so, briefly
        if args.debug:
            raise
        _print_error(
            f"internal error {type(exc).__name__}: {exc}. This is a bug in fusionsearch; rerun with "
            f"'fusionsearch --debug {args.command} ...' for the traceback and report it."
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
