"""``fusionsearch evaluate RUN_DIR_OR_CHECKPOINT``: re-evaluate any checkpoint of a run."""

from __future__ import annotations

import argparse

HELP = "re-evaluate a run's checkpoint (best.pt by default) on its test or validation split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a .pt file inside one")
    parser.add_argument("--data-root", metavar="PATH", help="dataset folder, if it moved since the run")
    parser.add_argument("--head", choices=["last", "sum", "mixture"], help="inference head (default: the recipe's)")
    parser.add_argument("--protocol", choices=["paper", "strict"], help="metric protocol (default: the recipe's)")
    parser.add_argument("--split", choices=["test", "valid"], default="test", help="which split (default: test)")


def run(args: argparse.Namespace) -> int:
    from fusionsearch.runner import evaluate_run

    result, folder = evaluate_run(
        args.target, data_root=args.data_root, head=args.head, protocol=args.protocol, split=args.split
    )
    print(result.format_table())
    print(f"results: {folder}")
    return 0
