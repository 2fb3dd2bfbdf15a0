"""``fusionsearch demo``: LoMix against last-layer-only supervision on phantoms, in a few CPU minutes.

Writes Synapse-form phantoms (if absent), trains the bundled ``demo`` recipe twice on the small
UNet, once with the LoMix space and once with the last-layer-only space (same seed, same data), and
prints both test tables, how LoMix's term weights moved, and where the reports are.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "train LoMix and last-layer-only side by side on synthetic phantoms (a few minutes on a CPU)"

PHANTOMS = {"cases": 6, "test_cases": 3, "slices": 12, "size": 64, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", metavar="DIR", default="fusionsearch_demo", help="demo folder (default: ./fusionsearch_demo)"
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs per run (default: the demo recipe's)")


def ensure_phantoms(data_root: Path) -> bool:
    """Write the demo's Synapse-form phantoms under ``data_root`` unless a dataset is already there."""
    from fusionsearch.data.phantoms import make_synapse

    if (data_root / "train_npz").is_dir():
        return False
    make_synapse(data_root, **PHANTOMS)
    return True


def top_weights(log: object, row: int, count: int = 5) -> list[tuple[str, float]]:
    """The ``count`` largest effective weights of a term log row (0 = at the start)."""
    import numpy as np

    weights = log.weights[row]  # type: ignore[attr-defined]
    order = np.argsort(-weights, kind="stable")[:count]
    return [(log.terms[k], float(weights[k])) for k in order]  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> int:
    from fusionsearch.errors import ConfigError
    from fusionsearch.recipe import load_recipe
    from fusionsearch.report import read_terms
    from fusionsearch.runner import run as run_recipe

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"must be at least 1, got {args.epochs}", field="--epochs")
    start = time.perf_counter()
    output = Path(args.output).expanduser().resolve()
    data_root = output / "data"
    if ensure_phantoms(data_root):
        print(f"wrote Synapse-form phantoms to {data_root}")
    overrides: dict[str, object] = {"data.root": str(data_root)}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    lomix = load_recipe("demo", overrides)
    baseline = lomix.with_overrides({"space": "last_layer", "name": "demo_last_layer"})
    runs = output / "runs" / time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for label, recipe in (("LoMix", lomix), ("last layer only", baseline)):
        print(f"\n== training {label} (space '{recipe.space}')")
        results[label] = run_recipe(recipe, run_dir=runs / ("lomix" if label == "LoMix" else "last_layer"))

    print()
    for label, result in results.items():
        print(f"== {label} (selected epoch {result.best_epoch}, validation Dice {result.val_dice:.2f} %)")
        print(result.evaluation.format_table())
        print()
    log = read_terms(results["LoMix"].run_dir / "terms.csv")
    if log is not None:
        print(f"LoMix term weights ({len(log.terms)} terms), top 5 at the start and after {log.epochs[-1]} epochs:")
        for (name0, w0), (name1, w1) in zip(top_weights(log, 0), top_weights(log, -1), strict=True):
            print(f"  start {name0:<14} {w0:.4f}    end {name1:<14} {w1:.4f}")
        moved = float(abs(log.weights[-1] - log.weights[0]).max())
        print(f"  largest change of any weight: {moved:.4f}")
    lomix_dice = results["LoMix"].metrics["mean_dice"]
    ll_dice = results["last layer only"].metrics["mean_dice"]
    print(f"\nmean test Dice: LoMix {lomix_dice:.2f} % vs last layer only {ll_dice:.2f} %")
    for label, result in results.items():
        print(f"report ({label}): {result.run_dir / 'report.md'}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0
