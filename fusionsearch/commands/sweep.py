"""``fusionsearch sweep RECIPE``: search the recipe's tune: distributions with Ray Tune + Optuna (or Optuna alone)."""

from __future__ import annotations

import argparse

HELP = "search a recipe's tune: distributions (Ray Tune + Optuna TPE + ASHA, or --backend optuna)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="bundled recipe name or path to a recipe YAML file")
    parser.add_argument("--num-samples", type=int, default=8, help="number of trials (default 8)")
    parser.add_argument("--backend", choices=["ray", "optuna"], default="ray", help="ray (default) or optuna")
    parser.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster: HOST:PORT of the head, or 'auto' (default: RAY_ADDRESS, else a local Ray)",
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs each trial reserves (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs each trial reserves, may be 0.5")
    parser.add_argument("--max-concurrent", type=int, default=None, help="at most M trials at once (ray)")
    parser.add_argument(
        "--storage",
        default=None,
        help="folder that holds sweeps (default RECIPE's output_dir/sweeps); with --backend optuna also an RDB URL",
    )
    parser.add_argument("--name", default=None, help="sweep name, a folder under --storage (default: recipe name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: also rerun failed trials")
    parser.add_argument("--workers", type=int, default=1, help="optuna backend: worker processes (default 1)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field before the sweep, e.g. --set epochs=3 (repeatable)",
    )
    parser.add_argument("--data-root", default=None, help="dataset folder; must exist on every node that runs trials")
    parser.add_argument("--metric", default="val_dice", help="metric to optimise (default val_dice)")
    parser.add_argument("--mode", choices=["max", "min"], default="max", help="maximise (default) or minimise")
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a crashing trial (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    parser.add_argument("--grace-period", type=int, default=1, help="epochs before a trial may be stopped (default 1)")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA / successive-halving factor (default 2)")
    parser.add_argument(
        "--pruner", choices=["halving", "median", "none"], default="halving",
        help="optuna backend: successive halving (default), median, or none",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final table")


def run(args: argparse.Namespace) -> int:
    from fusionsearch.overrides import parse_set_arguments
    from fusionsearch.sweeps.api import sweep

    result = sweep(
        args.recipe,
        num_samples=args.num_samples,
        backend=args.backend,
        address=args.address,
        name=args.name,
        storage=args.storage,
        resume=args.resume,
        overrides=parse_set_arguments(args.overrides),
        data_root=args.data_root,
        metric=args.metric,
        mode=args.mode,
        seed=args.seed,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_failures=args.max_failures,
        retry_failed=args.retry_failed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        workers=args.workers,
        pruner=args.pruner,
        verbose=not args.quiet,
    )
    if args.quiet:
        print(result.format())
    if result.interrupted:
        return 130  # as for Ctrl-C elsewhere: the sweep did not finish
    return 0 if result.best_trial is not None else 1
