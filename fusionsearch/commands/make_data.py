"""``fusionsearch make-data synapse|acdc OUT_DIR``: write a small synthetic dataset in a benchmark's exact form."""

from __future__ import annotations

import argparse

HELP = "write synthetic phantoms in the exact Synapse or ACDC (MT-UNet) on-disk form"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("form", choices=["synapse", "acdc"], help="which benchmark's layout to write")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into (created if needed)")
    parser.add_argument(
        "--cases",
        type=int,
        default=None,
        help="Synapse: training cases (default 4, at most 18); ACDC: patients (default 10, split 70/10/20)",
    )
    parser.add_argument("--test-cases", type=int, default=2, help="Synapse: test cases (default 2, at most 12)")
    parser.add_argument("--slices", type=int, default=None, help="slices per volume (default 12 Synapse, 8 ACDC)")
    parser.add_argument("--size", type=int, default=80, help="in-plane size in pixels (default 80)")
    parser.add_argument(
        "--labels",
        choices=["btcv14", "synapse9"],
        default="btcv14",
        help="Synapse label form: raw BTCV 0..13 (default) or the TransUNet 9-class release",
    )
    parser.add_argument("--hu", action="store_true", help="Synapse: write raw Hounsfield units instead of [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the output is deterministic given it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier phantom set in OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from fusionsearch.data.phantoms import make_acdc, make_synapse

    if args.form == "synapse":
        out = make_synapse(
            args.out_dir,
            cases=4 if args.cases is None else args.cases,
            test_cases=args.test_cases,
            slices=12 if args.slices is None else args.slices,
            size=args.size,
            labels=args.labels,
            seed=args.seed,
            hu=args.hu,
            overwrite=args.overwrite,
        )
        extra = f", labels: {args.labels}"
    else:
        out = make_acdc(
            args.out_dir,
            cases=10 if args.cases is None else args.cases,
            slices=8 if args.slices is None else args.slices,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        extra = ""
    print(f"wrote {args.form} phantoms to {out}")
    print(f"use them in a recipe with:  data: {{name: {args.form}, root: {out.resolve()}{extra}, size: {args.size}}}")
    return 0
