"""``fs.sweep(recipe, ...)``: check everything, run the chosen backend, write and return the results.

The sweep folder (``--storage``/``--name``, default ``<recipe.output_dir>/sweeps/<recipe name>``)::

    sweep.yaml            what is searched and how (checked again by --resume and joining workers)
    runs/trial_<id>/      each trial's ordinary run directory (recipe.yaml, checkpoints/, history.csv, ...)
    tune/                 the Ray Tune experiment (ray backend) | optuna.journal (optuna backend)
    results.csv           the ranked table
    best_recipe.yaml      the best trial's full recipe: fusionsearch run best_recipe.yaml
    metric_vs_params.png  the metric against every searched value
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fusionsearch.errors import ConfigError
from fusionsearch.sweeps.plan import PLAN_FILE, SweepPlan
from fusionsearch.sweeps.results import (
    BEST_RECIPE,
    PLOT_PNG,
    RESULTS_CSV,
    RUNNING,
    SweepResult,
    TrialRecord,
    plot_metric,
    rank,
    write_csv,
)

BACKENDS = ("ray", "optuna")


def sweep(
    recipe: Any,
    num_samples: int = 8,
    backend: str = "ray",
    address: str | None = None,
    *,
    name: str | None = None,
    storage: str | Path | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    metric: str = "val_dice",
    mode: str = "max",
    seed: int = 0,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_failures: int = 1,
    retry_failed: bool = False,
    grace_period: int = 1,
    reduction_factor: int = 2,
    workers: int = 1,
    pruner: str = "halving",
    points: list[dict[str, Any]] | None = None,
    verbose: bool = True,
) -> SweepResult:
    """Search the recipe's ``tune:`` distributions (and its space's) and return the ranked trials.

    ``recipe``: a Recipe, a bundled recipe name or a YAML path; ``overrides`` and ``data_root`` are
    applied first, as ``--set`` and ``--data-root`` would be. Each of the ``num_samples`` trials is an
    ordinary run whose ``metric`` (reported each epoch; ``mode`` max or min) is ranked by its best
    epoch. ``backend="ray"`` uses Ray Tune (OptunaSearch TPE seeded with ``seed`` + ASHA with
    ``grace_period`` and ``reduction_factor``) on a local Ray or the cluster at ``address`` (or
    ``RAY_ADDRESS``); ``backend="optuna"`` uses Optuna alone (``pruner``: halving, median or none)
    with ``workers`` processes sharing a journal file, or the RDB whose URL is given as ``storage``.
    A crashing trial is retried ``max_failures`` times, then reported as failed. ``resume`` continues
    an interrupted sweep of the same name without rerunning finished trials (``retry_failed`` also
    retries the failed ones). ``points`` are value sets to try first (``{"optim.lr": 1e-4}``).
    """
    _check_options(
        num_samples=num_samples, backend=backend, mode=mode, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial, max_failures=max_failures, grace_period=grace_period,
        reduction_factor=reduction_factor, workers=workers, pruner=pruner, max_concurrent=max_concurrent,
    )
    recipe = _load(recipe, overrides, data_root)
    rdb_url = str(storage) if backend == "optuna" and storage is not None and "://" in str(storage) else None
    name = name or recipe.run_name
    root = Path(recipe.output_dir) / "sweeps" if storage is None or rdb_url else Path(storage)
    sweep_dir = (root.expanduser() / name).resolve()
    plan = SweepPlan.from_recipe(recipe, metric=metric, mode=mode, sweep_dir=sweep_dir)
    for point in points or []:
        plan.space.encode(point)  # unknown paths are an error now, not in a trial
    _check_folder(plan, backend=backend, resume=resume, num_samples=num_samples)
    plan.write({"backend": backend, "num_samples": num_samples, "seed": seed, "storage": rdb_url})
    say = print if verbose else _silent
    say(f"sweep '{name}' ({backend}) in {sweep_dir}: {num_samples} trials, {metric} ({mode}), searching")
    for path, text in plan.space.describe():
        say(f"  {path}: {text}")

    try:
        records = _run_backend(
            plan, backend=backend, num_samples=num_samples, seed=seed, address=address,
            max_epochs=_max_epochs(recipe, plan), max_concurrent=max_concurrent,
            cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, max_failures=max_failures,
            grace_period=grace_period, reduction_factor=reduction_factor, resume=resume,
            retry_failed=retry_failed, points=points or [], workers=workers, pruner=pruner, rdb_url=rdb_url,
            name=name, verbose=verbose,
        )
    except KeyboardInterrupt:
        say(f"\ninterrupted: continue with the same command and --resume (sweep folder {sweep_dir})")
        raise
    unfinished = sum(1 for record in records if record.status == RUNNING)
    # Ray returns from an interrupted run; the optuna backend raises instead, so its running trials
    # belong to other workers that still train them
    result = finish(plan, records, interrupted=backend == "ray" and unfinished > 0)
    say(result.format())
    if result.interrupted:
        say(f"{unfinished} trial(s) did not finish: continue with --resume")
    elif unfinished:
        say(f"{unfinished} trial(s) are still running in other workers of this study")
    say(f"results: {result.csv_path}\nplot: {result.plot_path}")
    if result.best_recipe_path:
        say(f"best recipe: {result.best_recipe_path}  (fusionsearch run {result.best_recipe_path})")
    return result


def _silent(*_: Any, **__: Any) -> None:
    return None


def _max_epochs(recipe: Any, plan: SweepPlan) -> int | None:
    """The most epochs a trial can run (ASHA's max_t); None when the length is set by iterations."""
    if recipe.iterations is not None or "iterations" in plan.space.paths:
        return None
    for param in plan.space.params:
        if param.path == "epochs":
            values = param.dist.choice if param.dist.kind == "choice" else param.dist.bounds
            return int(max(values or [recipe.epochs]))
    return recipe.epochs


def _check_options(**options: Any) -> None:
    def bad(flag: str, message: str) -> ConfigError:
        return ConfigError(message, field=flag)

    if options["backend"] not in BACKENDS:
        raise bad("--backend", f"unknown backend '{options['backend']}'; choose ray or optuna")
    if options["mode"] not in ("max", "min"):
        raise bad("--mode", f"mode must be max or min, got '{options['mode']}'")
    if int(options["num_samples"]) < 1:
        raise bad("--num-samples", f"must be at least 1, got {options['num_samples']}")
    if float(options["cpus_per_trial"]) <= 0:
        raise bad("--cpus-per-trial", f"must be positive, got {options['cpus_per_trial']}")
    if float(options["gpus_per_trial"]) < 0:
        raise bad("--gpus-per-trial", f"cannot be negative, got {options['gpus_per_trial']}")
    if int(options["max_failures"]) < 0:
        raise bad("--max-failures", f"cannot be negative, got {options['max_failures']}")
    if int(options["grace_period"]) < 1:
        raise bad("--grace-period", f"must be at least 1 epoch, got {options['grace_period']}")
    if int(options["reduction_factor"]) < 2:
        raise bad("--reduction-factor", f"must be at least 2, got {options['reduction_factor']}")
    if int(options["workers"]) < 1:
        raise bad("--workers", f"must be at least 1, got {options['workers']}")
    if options["pruner"] not in ("halving", "median", "none"):
        raise bad("--pruner", f"unknown pruner '{options['pruner']}'; choose halving, median or none")
    if options["max_concurrent"] is not None and int(options["max_concurrent"]) < 1:
        raise bad("--max-concurrent", f"must be at least 1, got {options['max_concurrent']}")
    if options["workers"] > 1 and options["backend"] != "optuna":
        raise bad("--workers", "worker processes belong to the optuna backend; Ray runs trials in parallel itself "
                  "(use --max-concurrent)")


def _load(recipe: Any, overrides: dict[str, Any] | None, data_root: str | Path | None) -> Any:
    from fusionsearch.recipe import Recipe, load_recipe

    changes = dict(overrides or {})
    if data_root is not None:
        changes["data.root"] = str(Path(data_root).expanduser().resolve())
    if isinstance(recipe, Recipe):
        loaded = recipe.with_overrides(changes) if changes else recipe
    else:
        loaded = load_recipe(recipe, overrides=changes or None)
    return _absolute_paths(loaded)


def _absolute_paths(recipe: Any) -> Any:
    """Trials run in other processes and other folders: make the recipe's relative paths absolute."""
    changes = {}
    for field in ("data.root", "model.pretrained_file"):
        section, key = field.split(".")
        value = getattr(getattr(recipe, section), key)
        if value and not Path(value).expanduser().is_absolute():
            changes[field] = str(Path(value).expanduser().resolve())
    return recipe.with_overrides(changes) if changes else recipe


def _check_folder(plan: SweepPlan, *, backend: str, resume: bool, num_samples: int) -> None:
    exists = (plan.path / PLAN_FILE).is_file()
    if resume and not exists:
        raise ConfigError(
            f"there is no sweep to resume in {plan.path}",
            field="--resume",
            fix="Give the --name and --storage the sweep was started with, or start it without --resume",
        )
    if exists:
        if not resume and backend == "ray":
            raise ConfigError(
                f"a sweep already exists in {plan.path}",
                field="--name",
                fix="Continue it with --resume, or start another with a different --name",
            )
        saved = plan.check_same_as_saved()
        if saved.get("backend") != backend:
            raise ConfigError(
                f"the sweep in {plan.path} was run with the {saved.get('backend')} backend",
                field="--backend",
                fix=f"Continue it with --backend {saved.get('backend')}, or start another with a different --name",
            )
        if backend == "ray" and saved.get("num_samples") != num_samples:
            raise ConfigError(
                f"the sweep in {plan.path} was started with {saved.get('num_samples')} trials; a resumed Ray Tune "
                f"experiment keeps its number of trials",
                field="--num-samples",
                fix=f"Resume with --num-samples {saved.get('num_samples')}, or start another sweep with a different "
                "--name (the optuna backend can extend a study)",
            )


def _run_backend(plan: SweepPlan, *, backend: str, **options: Any) -> list[TrialRecord]:
    if backend == "ray":
        from fusionsearch.sweeps.cluster import ray_session
        from fusionsearch.sweeps.ray_backend import run_ray

        with ray_session(options["address"]) as where:
            if options["verbose"]:
                print(f"running on {where}")
            return run_ray(
                plan,
                num_samples=options["num_samples"],
                seed=options["seed"],
                max_epochs=options["max_epochs"],
                max_concurrent=options["max_concurrent"],
                cpus_per_trial=options["cpus_per_trial"],
                gpus_per_trial=options["gpus_per_trial"],
                max_failures=options["max_failures"],
                grace_period=options["grace_period"],
                reduction_factor=options["reduction_factor"],
                resume=options["resume"],
                retry_failed=options["retry_failed"],
                points=options["points"],
                verbose=options["verbose"],
            )
    from fusionsearch.sweeps.optuna_backend import OptunaSettings, run_optuna

    if options["address"]:
        raise ConfigError("--address joins a Ray cluster; the optuna backend shares a --storage instead",
                          field="--address")
    settings = OptunaSettings(
        storage=options["rdb_url"],
        study_name=options["name"],
        num_samples=options["num_samples"],
        seed=options["seed"],
        pruner=options["pruner"],
        grace_period=options["grace_period"],
        reduction_factor=options["reduction_factor"],
        max_failures=options["max_failures"],
        threads=max(1, int(options["cpus_per_trial"])),
    )
    if options["points"]:
        _enqueue_points(plan, settings, options["points"], resume=options["resume"])
    return run_optuna(
        plan, settings, workers=options["workers"], resume=options["resume"], progress=options["verbose"]
    )


def _enqueue_points(plan: SweepPlan, settings: Any, points: list[dict[str, Any]], *, resume: bool) -> None:
    from fusionsearch.sweeps.optuna_backend import open_study

    study = open_study(plan, settings)
    if resume or study.get_trials(deepcopy=False):
        return  # given points were queued when the study was created
    for point in points:
        study.enqueue_trial(plan.space.encode(point))


def finish(plan: SweepPlan, records: list[TrialRecord], *, interrupted: bool = False) -> SweepResult:
    """Rank the trials and write results.csv, best_recipe.yaml and the plot into the sweep folder."""
    table = rank(records, plan.space, plan.metric, plan.mode)
    csv_path = write_csv(table, plan.path / RESULTS_CSV)
    plot_path = plot_metric(table, plan.space, plan.metric, plan.path / PLOT_PNG)
    best_recipe = best_metrics = best_path = None
    by_id = {record.trial_id: record for record in records}
    if table and table[0]["rank"] == 1:
        best = by_id[table[0]["trial"]]
        best_recipe = plan.trial_recipe(best.params, label=f"best trial {best.trial_id}")
        best_metrics = copy.deepcopy(best.best(plan.metric, plan.mode))
        data = best_recipe.to_dict()
        data["name"] = f"{plan.base.get('name') or 'sweep'}_best"
        data["description"] = (
            f"Best trial {best.trial_id} of the sweep in {plan.path} ({plan.metric} {table[0][plan.metric]:.4g} "
            f"at epoch {table[0]['best_epoch']}). " + str(data.get("description") or "")
        ).strip()
        best_recipe = type(best_recipe).from_dict(data, source=str(plan.path / BEST_RECIPE), base_dir=None)
        best_path = plan.path / BEST_RECIPE
        tmp = best_path.with_suffix(".tmp")
        tmp.write_text(best_recipe.to_yaml(), encoding="utf-8")
        tmp.replace(best_path)
    return SweepResult(
        table=table,
        best_recipe=best_recipe,
        best_metrics=best_metrics,
        sweep_dir=plan.path,
        metric=plan.metric,
        mode=plan.mode,
        csv_path=csv_path,
        best_recipe_path=best_path,
        plot_path=plot_path,
        searched=plan.space.paths,
        interrupted=interrupted,
    )
