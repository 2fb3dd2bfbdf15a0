"""One trial = one ordinary run: same runner, same trainer, same run-directory layout.

Both backends call :func:`run_trial`. It writes the sampled values into the recipe, checks that the
data root exists on the node running the trial, resumes from a checkpoint when one is handed over
(a retry after a crash, a resumed sweep), calls :func:`fusionsearch.runner.run` and forwards each
epoch's metrics and checkpoint folder to the backend's ``report`` callback (Ray's ``tune.report``,
or Optuna's ``trial.report`` + pruning). A trial that already finished (its run directory holds
``trial_done.json``) is never trained again: its stored history is reported instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusionsearch.sweeps.cluster import check_data_root
from fusionsearch.sweeps.plan import SweepPlan

DONE_FILE = "trial_done.json"
ATTEMPTS_FILE = "attempts.log"
CHECKPOINT_SUBDIR = "checkpoints"

# report(metrics, checkpoint_dir, final): final is True for the run's last epoch, reported once the run
# has finished, so that a scheduler's decision on it cannot cut off the final evaluation and report
Report = Callable[[dict[str, Any], Path | None, bool], None]


def scalar_metrics(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an epoch's metrics (backends store flat scalars), with ``epoch`` set."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            flat[key] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
            flat[key] = value.item()
    flat["epoch"] = int(epoch)
    return flat


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The record a finished trial left in its run directory, or None."""
    path = run_dir / DONE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def count_attempts(run_dir: Path) -> int:
    path = run_dir / ATTEMPTS_FILE
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _log_attempt(run_dir: Path, text: str) -> None:
    with (run_dir / ATTEMPTS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} pid {os.getpid()}: {text}\n")


def _adopt_checkpoint(source: Path, run_dir: Path) -> None:
    """Put a checkpoint folder handed over by the backend where the runner resumes from."""
    target = run_dir / CHECKPOINT_SUBDIR
    if source.resolve() == target.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
        elif item.is_dir():
            shutil.copytree(item, target / item.name, dirs_exist_ok=True)


def _has_checkpoint(run_dir: Path) -> bool:
    from fusionsearch.checkpoint import LAST

    return (run_dir / CHECKPOINT_SUBDIR / LAST).is_file()


def run_trial(
    plan: SweepPlan,
    trial_id: str,
    overrides: dict[str, Any],
    report: Report,
    *,
    restore_from: Path | None = None,
    run_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one trial to the end (or until the backend stops it) and return its done-record.

    ``report(metrics, checkpoint_dir, final)`` is called after every epoch that has the sweep metric;
    the last epoch's call (``final=True``) comes after the run has written all its results.
    ``restore_from`` is a checkpoint folder to continue from; without it, a checkpoint already in
    the run directory (an interrupted attempt on a shared disk) is continued. ``progress`` shows
    the runner's progress bars (off where several trials share one terminal).
    """
    from fusionsearch.runner import run

    run_dir = run_dir or plan.run_dir(trial_id)
    done = read_done(run_dir)
    if done is not None:
        if done.get("last"):
            report(done["last"], None, True)
        return done

    run_dir.mkdir(parents=True, exist_ok=True)
    if restore_from is not None:
        _adopt_checkpoint(Path(restore_from), run_dir)
    resume = _has_checkpoint(run_dir)
    _log_attempt(run_dir, "resumed from the last checkpoint" if resume else "started")
    recipe = plan.trial_recipe(overrides, label=f"trial {trial_id}")
    check_data_root(recipe.data.root)
    (run_dir / "trial_params.json").write_text(json.dumps(overrides, indent=2, default=str), encoding="utf-8")

    last: dict[str, Any] = {}
    held: list[tuple[dict[str, Any], Path]] = []  # the final epoch's report, sent after the run ends

    def on_epoch_end(epoch: int, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        row = scalar_metrics(epoch, metrics)
        value = row.get(plan.metric)
        if value is None or not math.isfinite(float(value)):
            return  # no validation this epoch: nothing to rank or prune on
        last.clear()
        last.update(row)
        if _is_final(recipe, row):
            held.append((row, Path(checkpoint_dir)))
        else:
            report(row, Path(checkpoint_dir), False)

    result = run(recipe, run_dir=run_dir, resume=resume, on_epoch_end=on_epoch_end, progress=progress)
    record = {
        "trial": trial_id,
        "params": overrides,
        "last": last or None,  # the last reported epoch, re-reported if the backend asks again
        "best_epoch": getattr(result, "best_epoch", None),
        "val_dice": getattr(result, "val_dice", None),
    }
    tmp = run_dir / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    tmp.replace(run_dir / DONE_FILE)
    for row, checkpoint_dir in held:
        report(row, checkpoint_dir, True)
    return record


def _is_final(recipe: Any, row: dict[str, Any]) -> bool:
    """Whether the reported epoch is the run's last (by epochs, or by the iteration budget)."""
    if recipe.iterations is not None:
        return int(row.get("iteration", 0)) >= int(recipe.iterations)
    return recipe.epochs is not None and int(row["epoch"]) >= int(recipe.epochs)
