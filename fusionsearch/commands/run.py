"""``fusionsearch run RECIPE``: train one recipe end to end and print its test table."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a recipe (data, model, search space), select on validation, test once, write the report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="bundled recipe name (lomix_synapse, ...), recipe YAML file or run directory")
    parser.add_argument("--data-root", metavar="PATH", help="dataset folder (overrides data.root)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set optim.lr=3e-4 --set space.loss.ce=0.5 (repeatable)",
    )
    parser.add_argument("--output", metavar="DIR", help="run directory (default: OUTPUT_DIR/NAME from the recipe)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory from last.pt")


def recipe_overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--set`` pairs plus ``--data-root`` (made absolute, so the run directory records where the data was)."""
    from fusionsearch.overrides import parse_set_arguments

    overrides: dict[str, object] = parse_set_arguments(args.overrides)
    if args.data_root:
        overrides["data.root"] = str(Path(args.data_root).expanduser().resolve())
    return overrides


def run(args: argparse.Namespace) -> int:
    from fusionsearch.recipe import load_recipe
    from fusionsearch.runner import run as run_recipe

    recipe = load_recipe(args.recipe, recipe_overrides(args))
    run_dir = args.output
    given = Path(args.recipe).expanduser()
    if run_dir is None and given.is_dir() and (given / "recipe.yaml").is_file():
        run_dir = given  # `fusionsearch run RUN_DIR --resume` continues that run in place
    result = run_recipe(recipe, run_dir=run_dir, resume=args.resume)
    print()
    print(f"run directory: {result.run_dir}")
    if result.val_dice is not None:
        print(f"selected epoch {result.best_epoch} (validation mean Dice {result.val_dice:.2f} %)")
    if result.evaluation is not None:
        print(result.evaluation.format_table())
    print(f"report: {result.run_dir / 'report.md'}")
    return 0
