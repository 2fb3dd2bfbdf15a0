"""Ray Tune backend: OptunaSearch (seeded TPE) proposes, ASHA stops weak trials, trials are runs.

Every trial runs :func:`fusionsearch.sweeps.trial.run_trial` inside a Ray worker and reports each
epoch with ``tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(...))``. A trial that
raises is restarted by Ray from its last reported checkpoint (``FailureConfig(max_failures)``),
which the trial copies into its run directory before resuming the runner. The experiment lives in
``<sweep>/tune`` and is continued with ``Tuner.restore`` (finished trials are kept, not rerun).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from fusionsearch.errors import ConfigError
from fusionsearch.sweeps.plan import SweepPlan
from fusionsearch.sweeps.results import COMPLETED, FAILED, RUNNING, STOPPED, TrialRecord
from fusionsearch.sweeps.state_snapshots import StateSnapshots, repair_states
from fusionsearch.sweeps.trial import count_attempts, read_done, run_trial

EXPERIMENT = "tune"
# bookkeeping Ray adds to every reported result (left out of the trial histories)
_RAY_COLUMNS = {
    "timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", "hostname", "date", "trial_id", "experiment_tag",
    "checkpoint_dir_name", "should_checkpoint",
}


def _trainable(config: dict[str, Any], plan: SweepPlan) -> None:
    """The Ray Tune function trainable: decode the sampled values and run the trial."""
    from ray import tune

    # Ray logs every persisted checkpoint at INFO level in the driver's console
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial_id = tune.get_context().get_trial_id()
    overrides = plan.space.decode(config)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None, final: bool) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restore_dir:
        run_trial(plan, trial_id, overrides, report, restore_from=Path(restore_dir) if restore_dir else None)


class _Progress:
    """A tqdm bar over trials plus one line per finished/stopped/failed trial, instead of Ray's tables.

    Built as a Ray Tune callback by :func:`_progress_callback` (Ray is imported lazily).
    """

    def __init__(self, plan: SweepPlan, total: int) -> None:
        self.plan = plan
        self.total = total
        self.bar: Any = None
        self.best: float | None = None
        self.trial_best: dict[str, tuple[float, Any]] = {}  # trial id -> (best value, its epoch)

    def __getstate__(self) -> dict[str, Any]:  # the experiment state pickles callbacks; a bar cannot be
        return {**self.__dict__, "bar": None}

    def _bar(self) -> Any:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="sweep", unit="trial")
        return self.bar

    def _describe(self, trial: Any) -> str:
        try:
            values = self.plan.space.decode(trial.config)
        except ConfigError:
            values = dict(trial.config)
        from fusionsearch.sweeps.space import format_value

        return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.plan.mode == "max" else value < than)

    def result(self, trial: Any, result: dict[str, Any]) -> None:
        value = result.get(self.plan.metric)
        if value is None:
            return
        known = self.trial_best.get(trial.trial_id)
        if self._better(float(value), known[0] if known else None):
            self.trial_best[trial.trial_id] = (float(value), result.get("epoch"))
        if self._better(float(value), self.best):
            self.best = float(value)
            self._bar().set_postfix({f"best {self.plan.metric}": f"{self.best:.4g}"})

    def finished(self, trial: Any, how: str) -> None:
        bar = self._bar()
        best = self.trial_best.get(trial.trial_id)
        shown = f"best {self.plan.metric} {best[0]:.4g} at epoch {best[1]}" if best else "no metric"
        bar.write(f"trial {trial.trial_id} {how}: {shown} ({self._describe(trial)})")
        bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_callback(plan: SweepPlan, total: int) -> Any:
    from ray.tune import Callback

    class ProgressCallback(Callback):
        def __init__(self) -> None:
            self.progress = _Progress(plan, total)

        def setup(self, **info: Any) -> None:
            self.progress._bar()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.progress.result(trial, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.progress.finished(trial, "finished")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.progress.finished(trial, "failed")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.progress.close()

    return ProgressCallback()


def _snapshot_callback(experiment_dir: Path) -> Any:
    """A Ray Tune callback that keeps intact copies of the experiment state (see ``state_snapshots``)."""
    from ray.tune import Callback

    class SnapshotCallback(Callback):
        def __init__(self) -> None:
            self.snapshots = StateSnapshots(experiment_dir)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            self.snapshots.update()

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.snapshots.update()

    return SnapshotCallback()


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def experiment_path(plan: SweepPlan) -> Path:
    return plan.path / EXPERIMENT


def run_ray(
    plan: SweepPlan,
    *,
    num_samples: int,
    seed: int,
    max_epochs: int | None,
    max_concurrent: int | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
    max_failures: int,
    grace_period: int,
    reduction_factor: float,
    resume: bool,
    retry_failed: bool,
    points: list[dict[str, Any]],
    verbose: bool,
) -> list[TrialRecord]:
    """Run (or continue) the sweep on the Ray already connected by the caller; return one record per trial."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    # num_to_keep=1 snapshots the experiment state at every checkpoint, which is what resuming wants
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, plan=plan), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    )
    path = experiment_path(plan)
    if resume:
        if not (path / "tuner.pkl").exists():
            raise ConfigError(
                f"there is no Ray Tune experiment to resume in {path}",
                field="--resume",
                fix="Start the sweep without --resume (or give the --name/--storage it was started with)",
            )
        for name in repair_states(path):
            print(f"Ray's experiment state {name} was cut short when the sweep stopped; its last snapshot is back")
        _restore_missing_checkpoints(plan)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=retry_failed)
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(
            space=plan.space.sample,
            metric=plan.metric,
            mode=plan.mode,
            sampler=optuna.samplers.TPESampler(seed=seed),
            points_to_evaluate=[plan.space.encode(point) for point in points] or None,
        )
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=plan.metric,
            mode=plan.mode,
            # a trial ends by itself after its last epoch (reported after the run has finished)
            max_t=max(max_epochs or 10**6, grace_period),
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname,
                # a finished trial's worker process runs the next trial: no new Python + torch import per trial
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(plan.path),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
                callbacks=[_snapshot_callback(path)] + ([_progress_callback(plan, num_samples)] if verbose else []),
            ),
        )
    tuner.fit()
    return collect_records(plan, max_epochs=max_epochs)


def _restore_missing_checkpoints(plan: SweepPlan) -> None:
    """Recreate checkpoint folders the saved experiment state points to but Ray already deleted.

    Ray keeps one checkpoint per trial and deletes the older one as soon as a new one arrives, but
    it writes the experiment state asynchronously: a driver killed in between leaves a state that
    names a deleted folder, and Ray would then fail the trial on resume. The trial's newest surviving
    checkpoint (Ray's, else its run directory's) is put in its place; it is at least as recent.
    """
    import shutil

    from ray.tune import ExperimentAnalysis

    for trial in ExperimentAnalysis(str(experiment_path(plan))).trials:
        checkpoint = trial.checkpoint
        if checkpoint is None or Path(checkpoint.path).exists():
            continue
        target = Path(checkpoint.path)
        newer = sorted(target.parent.glob("checkpoint_*"))
        source = newer[-1] if newer else plan.run_dir(trial.trial_id) / "checkpoints"
        if source.is_dir():
            shutil.copytree(source, target)


def collect_records(plan: SweepPlan, *, max_epochs: int | None) -> list[TrialRecord]:
    """Read every trial of the experiment back from its saved state."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path(plan)), default_metric=plan.metric, default_mode=plan.mode)
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        history = _history(frame, plan.metric)
        run_dir = plan.run_dir(trial.trial_id)
        try:
            params = plan.space.decode(trial.config)
        except ConfigError:
            params = dict(trial.config)
        error = ""
        if trial.status == "ERROR":
            status, error = FAILED, _error_text(trial)
        elif trial.status == "TERMINATED":
            last = history[-1]["epoch"] if history else 0
            finished = read_done(run_dir) is not None or (max_epochs is not None and last >= max_epochs)
            status = COMPLETED if finished else STOPPED
        else:
            status = RUNNING
        attempts = count_attempts(run_dir) or trial.num_failures + 1
        records.append(
            TrialRecord(
                trial_id=trial.trial_id,
                status=status,
                params=params,
                history=history,
                run_dir=str(run_dir),
                attempts=attempts,
                error=error,
            )
        )
    return records


def _history(frame: Any, metric: str) -> list[dict[str, Any]]:
    """Reported rows with the metric, one per epoch (a re-reported epoch keeps its last value)."""
    if frame is None or len(frame) == 0 or metric not in frame or "epoch" not in frame:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in frame.to_dict("records"):
        if row.get(metric) is None or row.get("epoch") is None or row["epoch"] != row["epoch"]:  # NaN check
            continue
        clean = {
            k: v
            for k, v in row.items()
            if k not in _RAY_COLUMNS and not k.startswith("config/") and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
        clean["epoch"] = int(row["epoch"])
        by_epoch[clean["epoch"]] = clean
    return [by_epoch[e] for e in sorted(by_epoch)]


def _error_text(trial: Any) -> str:
    """One line saying why a trial failed (the trial's own exception, not Ray's wrapper)."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # the error file may be unreadable; fall back to the text file
        error = None
    cause = getattr(error, "cause", None) or error
    if cause is not None:
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0] if text else ''}".strip()
    if trial.error_file and Path(trial.error_file).is_file():
        lines = [ln for ln in Path(trial.error_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines[-1] if lines else "unknown error"
    return "unknown error"
