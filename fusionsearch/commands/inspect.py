"""``fusionsearch inspect SPACE``: what a search space compiles to for a given model shape."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusionsearch.compile import Graph

HELP = "show the terms a search space compiles to, K, the parameter count and the operator/size breakdown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("space", help="a bundled space name (e.g. lomix) or a path to a space YAML file")
    parser.add_argument("--scales", type=int, required=True, help="number of model outputs L (P0 = coarsest)")
    parser.add_argument("--classes", type=int, required=True, help="number of classes C, background included")
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3), help="spatial dimensions (default: 2)")


def run(args: argparse.Namespace) -> int:
    from fusionsearch.criterion import build_criterion
    from fusionsearch.spec import load_space

    space = load_space(args.space)
    criterion = build_criterion(space, args.scales, args.classes, args.dims)
    graph = criterion.graph

    print(f"space: {args.space} ({space.source})")
    if space.description:
        print(textwrap.fill(space.description, width=100, initial_indent="  ", subsequent_indent="  "))
    used = ", ".join(f"P{s}" for s in graph.used_scales)
    print(f"model: L={graph.num_scales} scales, C={graph.num_classes} classes, {graph.spatial_dims}D; used: {used}")
    loss = space.loss
    print(f"loss per term: {loss.ce} * CE + {loss.dice} * Dice ({loss.dice_kind}); weighting: {space.weighting.kind}")

    operator_params = sum(p.numel() for p in criterion.mixer.parameters())
    weighting_params = sum(p.numel() for p in criterion.weighting.parameters())
    print(
        f"\nK = {graph.K} terms; {operator_params + weighting_params:,} trainable parameters "
        f"(operators {operator_params:,}, weighting {weighting_params:,})"
    )
    _print_breakdown(graph.breakdown)
    print("\nterms (in order):")
    for operator, names in _names_by_operator(graph).items():
        line = " ".join(names)
        print(textwrap.fill(line, width=100, initial_indent=f"  {operator + ':':<10}", subsequent_indent=" " * 12))
    return 0


def _print_breakdown(breakdown: dict[str, dict[int, int]]) -> None:
    sizes = sorted({size for counts in breakdown.values() for size in counts})
    header = ["operator", *(f"k={s}" for s in sizes), "total"]
    rows = [
        [op, *(str(counts.get(s, "-")) for s in sizes), str(sum(counts.values()))] for op, counts in breakdown.items()
    ]
    totals = [sum(counts.get(s, 0) for counts in breakdown.values()) for s in sizes]
    rows.append(["total", *(str(t) for t in totals), str(sum(totals))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("\nterms by operator and subset size (k = members per term):")
    for row in [header, *rows]:
        print(
            "  "
            + "  ".join(
                cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _names_by_operator(graph: Graph) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for term in graph.terms:
        grouped.setdefault(term.operator or "original", []).append(term.name)
    return grouped
