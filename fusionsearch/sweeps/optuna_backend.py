"""Optuna-only backend, for users without Ray: the same search space, an Optuna pruner, shared storage.

The study lives in a JournalStorage file (``<sweep>/optuna.journal``, safe for several processes on
one machine or on a shared disk) or in an RDB given by URL. Any number of worker processes -- the
``--workers K`` processes one command starts, or further ``fusionsearch sweep --backend optuna``
commands with the same ``--name`` -- take trials from the one study until ``num_samples`` trials
exist. Each trial reports its validation metric every epoch (``trial.report``) and is pruned when the
pruner says so; a trial that raises is retried ``max_failures`` times (continuing from its last
checkpoint) and then recorded as failed. ``--resume`` re-queues the trials whose worker process died
(Ctrl-C, a killed command): they continue from their run directory's checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusionsearch.errors import ConfigError
from fusionsearch.sweeps.plan import SweepPlan
from fusionsearch.sweeps.results import COMPLETED, FAILED, RUNNING, STOPPED, TrialRecord
from fusionsearch.sweeps.trial import count_attempts, run_trial

JOURNAL = "optuna.journal"
LOCK = "optuna.lock"
PRUNERS = ("halving", "median", "none")


@dataclass
class OptunaSettings:
    """How the workers find the study and how they prune, retry and share the trial budget."""

    storage: str | None  # an RDB URL, or None for the journal file in the sweep folder
    study_name: str
    num_samples: int
    seed: int
    pruner: str
    grace_period: int
    reduction_factor: int
    max_failures: int
    threads: int


def _storage(plan: SweepPlan, settings: OptunaSettings) -> Any:
    import optuna

    if settings.storage:
        try:
            return optuna.storages.RDBStorage(settings.storage)
        except Exception as exc:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            raise ConfigError(
                f"cannot open the Optuna storage '{settings.storage}' ({type(exc).__name__}: {exc})",
                field="--storage",
                fix="Give a database URL such as postgresql://user:pass@host/db or sqlite:///study.db, "
                "or leave --storage as a folder to use a journal file",
            ) from None
    from optuna.storages.journal import JournalFileBackend

    plan.path.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(plan.path / JOURNAL)))


def _pruner(settings: OptunaSettings) -> Any:
    import optuna

    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=settings.grace_period, reduction_factor=settings.reduction_factor
        )
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=max(0, settings.grace_period - 1))
    return optuna.pruners.NopPruner()


def open_study(plan: SweepPlan, settings: OptunaSettings, *, sampler_seed: int | None = None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=settings.study_name,
        storage=_storage(plan, settings),
        sampler=optuna.samplers.TPESampler(seed=settings.seed if sampler_seed is None else sampler_seed),
        pruner=_pruner(settings),
        direction="maximize" if plan.mode == "max" else "minimize",
        load_if_exists=True,
    )


@contextlib.contextmanager
def _budget_lock(plan: SweepPlan, settings: OptunaSettings) -> Iterator[None]:
    """Serialise 'count the trials, then ask for one' between processes sharing a journal file.

    An RDB may be shared by several machines, where a file lock means nothing; there the budget
    can be overshot by at most one trial per extra worker.
    """
    if settings.storage:
        yield
        return
    with (plan.path / LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _superseded(trials: list[Any]) -> set[int]:
    """Numbers of trials that were re-queued (their worker died) and live on as another trial."""
    return {int(t.user_attrs["resumes"]) for t in trials if "resumes" in t.user_attrs}


def _worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_dead_trials(plan: SweepPlan, settings: OptunaSettings) -> int:
    """Re-queue RUNNING trials whose worker process on this machine has died; returns how many.

    The re-queued trial keeps the parameters, the run directory (so the runner resumes from its
    checkpoint) and the intermediate values of the one it replaces; the dead one is marked failed
    and left out of the results. Trials running on other machines are left to their workers.
    """
    from optuna.trial import TrialState

    study = open_study(plan, settings)
    host = socket.gethostname()
    count = 0
    with _budget_lock(plan, settings):
        trials = study.get_trials(deepcopy=False)
        done = _superseded(trials)
        for trial in trials:
            if trial.state != TrialState.RUNNING or trial.number in done:
                continue
            worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
            if worker_host != host or not pid.isdigit() or _process_alive(int(pid)):
                continue
            study.enqueue_trial(
                trial.params,
                user_attrs={"run_dir": trial.user_attrs.get("run_dir"), "resumes": trial.number},
            )
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            count += 1
    return count


def _next_trial(study: Any, plan: SweepPlan, settings: OptunaSettings) -> Any | None:
    from optuna.trial import TrialState

    with _budget_lock(plan, settings):
        trials = study.get_trials(deepcopy=False)
        gone = _superseded(trials)
        live = [t for t in trials if t.number not in gone]
        waiting = any(t.state == TrialState.WAITING for t in live)
        if not waiting and len(live) >= settings.num_samples:
            return None
        trial = study.ask()
        trial.set_user_attr("worker", _worker_tag())
    return trial


def _run_one(study: Any, trial: Any, plan: SweepPlan, settings: OptunaSettings, progress: bool) -> None:
    import optuna
    from optuna.trial import TrialState

    plan.space.sample(trial)
    overrides = plan.space.decode(trial.params)
    run_dir = Path(trial.user_attrs.get("run_dir") or plan.run_dir(f"{trial.number:04d}"))
    trial.set_user_attr("run_dir", str(run_dir))
    epoch_metrics: dict[str, dict[str, Any]] = {}
    if "resumes" in trial.user_attrs:  # carry the history of the trial this one continues
        old = study.get_trials(deepcopy=False)[int(trial.user_attrs["resumes"])]
        for step, value in sorted(old.intermediate_values.items()):
            trial.report(value, step)
        epoch_metrics.update(old.user_attrs.get("epoch_metrics", {}))

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None, final: bool) -> None:
        epoch = int(metrics["epoch"])
        trial.report(float(metrics[plan.metric]), epoch)
        epoch_metrics[str(epoch)] = metrics
        trial.set_user_attr("epoch_metrics", epoch_metrics)
        if not final and trial.should_prune():  # after the last epoch there is nothing left to save
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    for attempt in range(settings.max_failures + 1):
        try:
            run_trial(plan, f"{trial.number:04d}", overrides, report, run_dir=run_dir, progress=progress)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return
        except KeyboardInterrupt:
            raise  # the trial stays RUNNING; --resume re-queues it
        except Exception as exc:
            text = str(exc).strip().splitlines()
            message = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
            trial.set_user_attr("error", message)
            if attempt < settings.max_failures:
                print(f"trial {trial.number} failed ({message}); retrying ({attempt + 1}/{settings.max_failures})")
                continue
            study.tell(trial, state=TrialState.FAIL)
            return
        break
    values = list(study.get_trials(deepcopy=False)[trial.number].intermediate_values.values())
    if not values:
        trial.set_user_attr("error", f"the run never reported '{plan.metric}'")
        study.tell(trial, state=TrialState.FAIL)
        return
    best = max(values) if plan.mode == "max" else min(values)
    trial.set_user_attr("error", "")
    study.tell(trial, best)


def worker(plan: SweepPlan, settings: OptunaSettings, index: int = 0, progress: bool = True) -> None:
    """Take trials from the shared study until it holds ``num_samples`` trials."""
    import torch

    torch.set_num_threads(max(1, settings.threads))
    study = open_study(plan, settings)
    # a different sampler stream per worker, so parallel workers do not propose the same start points
    sampler_seed = settings.seed + 1000 * index + len(study.get_trials(deepcopy=False))
    study = open_study(plan, settings, sampler_seed=sampler_seed)
    while (trial := _next_trial(study, plan, settings)) is not None:
        _run_one(study, trial, plan, settings, progress)


def _worker_process(plan: SweepPlan, settings: OptunaSettings, index: int, device: str | None) -> None:
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        worker(plan, settings, index, progress=False)
    except KeyboardInterrupt:
        pass


def run_optuna(
    plan: SweepPlan, settings: OptunaSettings, *, workers: int, resume: bool, progress: bool = True
) -> list[TrialRecord]:
    """Run ``workers`` workers (in this process when 1) and return the records of the whole study.

    ``progress`` shows the runner's progress bars when the single worker runs in this process.
    """
    if resume:
        count = requeue_dead_trials(plan, settings)
        if count:
            print(f"re-queued {count} interrupted trial(s); they continue from their checkpoints")
    if workers <= 1:
        worker(plan, settings, progress=progress)
    else:
        devices = _devices()
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(
                target=_worker_process,
                args=(plan, settings, index, devices[index % len(devices)] if devices else None),
                name=f"fusionsearch-sweep-worker-{index}",
            )
            for index in range(workers)
        ]
        for process in processes:
            process.start()
        try:
            for process in processes:
                while process.is_alive():
                    process.join(timeout=1.0)
        except KeyboardInterrupt:
            for process in processes:
                process.join(timeout=30)
            raise
        crashed = [p.name for p in processes if p.exitcode not in (0, None)]
        if crashed:
            print(f"worker process(es) {', '.join(crashed)} exited with an error; see the messages above")
    return collect_records(plan, settings)


def _devices() -> list[str]:
    """GPU indices to spread worker processes over (round-robin), or none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def collect_records(plan: SweepPlan, settings: OptunaSettings) -> list[TrialRecord]:
    """One record per trial of the study (re-queued predecessors left out)."""
    from optuna.trial import TrialState

    study = open_study(plan, settings)
    trials = study.get_trials(deepcopy=False)
    gone = _superseded(trials)
    states = {
        TrialState.COMPLETE: COMPLETED,
        TrialState.PRUNED: STOPPED,
        TrialState.FAIL: FAILED,
        TrialState.RUNNING: RUNNING,
        TrialState.WAITING: RUNNING,
    }
    records = []
    for trial in trials:
        if trial.number in gone:
            continue
        epoch_metrics = trial.user_attrs.get("epoch_metrics", {})
        history = []
        for step, value in sorted(trial.intermediate_values.items()):
            row = dict(epoch_metrics.get(str(step), {}))
            row.update({"epoch": int(step), plan.metric: float(value)})
            history.append(row)
        run_dir = str(trial.user_attrs.get("run_dir", ""))
        try:
            params = plan.space.decode(trial.params)
        except ConfigError:
            params = dict(trial.params)
        records.append(
            TrialRecord(
                trial_id=f"{trial.number:04d}",
                status=states.get(trial.state, RUNNING),
                params=params,
                history=history,
                run_dir=run_dir,
                attempts=count_attempts(Path(run_dir)) if run_dir else 0,
                error=str(trial.user_attrs.get("error", "")) if trial.state == TrialState.FAIL else "",
            )
        )
    return records

