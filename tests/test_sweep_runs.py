"""Real sweeps on tiny phantoms: Ray local (ASHA, best recipe, crashing trials), a killed driver resumed,
a Ray cluster on loopback joined by address, and the Optuna backend with two worker processes.

Every trial is a real run of the bundled demo recipe (shrunk: 32 px phantoms, a 3-output small UNet).
The in-process Ray tests share one local Ray (2 CPUs, no dashboard); the others drive the CLI in
subprocesses that start (and the test stops) their own Ray.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fusionsearch as fs
from fusionsearch.data.phantoms import make_synapse
from fusionsearch.sweeps.results import COMPLETED, FAILED, RUNNING, STOPPED
from fusionsearch.sweeps.state_snapshots import SNAPSHOT_DIR

# the demo recipe made tiny; only the learning rate is searched unless a test says otherwise
TINY = {
    "data.size": 32,
    "evaluation.size": 32,
    "evaluation.overlays": 0,
    "evaluation.test": False,
    "model.options": {"base_channels": 8, "depth": 2, "num_outputs": 3},
    "epochs": 2,
    "batch_size": 4,
    "space.tune": {},
    "space.operators": ["add", "mul"],
    "tune": {"optim.lr": {"loguniform": [1.0e-6, 1.0e-1]}},
}
GOOD_LR, BAD_LR = 1.0e-2, 1.0e-6  # after one epoch: val Dice ~1.7 % versus ~0.1 % on these phantoms
EPOCHS = 6  # of the trials a test interrupts: time enough to kill one before it ends


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synapse(tmp_path_factory.mktemp("phantoms"), cases=4, test_cases=1, slices=8, size=32, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_asha_stops_weak_trials_and_the_best_recipe_reproduces_its_trial(local_ray, data_root, tmp_path):
    result = fs.sweep(
        "demo",
        num_samples=4,
        overrides=TINY,
        data_root=data_root,
        storage=tmp_path,
        name="asha",
        seed=1,
        grace_period=1,
        reduction_factor=4,  # with max_t = 2 epochs: one rung, at epoch 1, keeping the top quarter
        max_concurrent=2,
        points=[{"optim.lr": GOOD_LR}, {"optim.lr": BAD_LR}, {"optim.lr": 2 * BAD_LR}],
        verbose=False,
    )
    table = result.table
    assert len(table) == 4
    by_lr = {row["optim.lr"]: row for row in table}
    # the weak third point reaches epoch 1 after the good one has recorded a much better value there
    assert by_lr[2 * BAD_LR]["status"] == STOPPED and by_lr[2 * BAD_LR]["epochs"] == 1
    assert by_lr[GOOD_LR]["status"] == COMPLETED and by_lr[GOOD_LR]["epochs"] == 2
    assert all(row["status"] in (COMPLETED, STOPPED) for row in table)
    assert all(row["epochs"] == (2 if row["status"] == COMPLETED else 1) for row in table)

    # every trial is an ordinary run directory whose own history agrees with the sweep's table
    for row in table:
        run_dir = Path(row["run_dir"])
        assert (run_dir / "recipe.yaml").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
        with (run_dir / "history.csv").open() as handle:
            history = [r for r in csv.DictReader(handle)]
        assert len(history) == row["epochs"]
        assert max(float(r["val_dice"]) for r in history) == pytest.approx(row["val_dice"], abs=1e-9)
        assert fs.load_recipe(run_dir / "recipe.yaml").optim.lr == pytest.approx(row["optim.lr"])

    # ranked by best validation Dice, written as CSV, plotted
    scores = [row["val_dice"] for row in table]
    assert scores == sorted(scores, reverse=True)
    with result.csv_path.open() as handle:
        assert [r["trial"] for r in csv.DictReader(handle)] == [row["trial"] for row in table]
    assert result.plot_path.stat().st_size > 1000

    # the exported best recipe is the base recipe with the best values, and running it reproduces the trial
    best = table[0]
    assert result.best_metrics["val_dice"] == pytest.approx(best["val_dice"])
    recipe = fs.load_recipe(result.best_recipe_path)
    assert recipe.optim.lr == pytest.approx(best["optim.lr"]) and recipe.tune == {}
    assert recipe.epochs == 2 and recipe.data.root == str(data_root.resolve())
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trial ran on one CPU: same reduction order, same numbers
    try:
        rerun = fs.run(recipe, run_dir=tmp_path / "rerun", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert rerun.val_dice == pytest.approx(best["val_dice"], abs=1e-6)


def test_resume_recreates_a_checkpoint_the_saved_state_names_but_ray_deleted(local_ray, data_root, tmp_path):
    from ray.tune import ExperimentAnalysis

    from fusionsearch.sweeps.plan import SweepPlan
    from fusionsearch.sweeps.ray_backend import _restore_missing_checkpoints, experiment_path

    fs.sweep("demo", num_samples=1, overrides={**TINY, "epochs": 1}, data_root=data_root, storage=tmp_path,
             name="state", verbose=False)
    recipe = fs.load_recipe("demo", overrides={**TINY, "epochs": 1, "data.root": str(data_root)})
    plan = SweepPlan.from_recipe(recipe, metric="val_dice", mode="max", sweep_dir=tmp_path / "state")
    (trial,) = ExperimentAnalysis(str(experiment_path(plan))).trials
    named = Path(trial.checkpoint.path)
    files = sorted(p.name for p in named.iterdir())
    # what a killed driver can leave: the state names checkpoint k, Ray already replaced it by k + 1
    named.rename(named.with_name("checkpoint_999999"))
    _restore_missing_checkpoints(plan)
    assert sorted(p.name for p in named.iterdir()) == files
    assert (named / "last.pt").read_bytes() == (named.with_name("checkpoint_999999") / "last.pt").read_bytes()


def test_a_crashing_trial_is_retried_then_reported_failed_without_stopping_the_sweep(local_ray, data_root, tmp_path):
    missing = tmp_path / "moved_away"
    overrides = {**TINY, "epochs": 1, "tune": {"data.root": {"choice": [str(data_root), str(missing)]}}}
    result = fs.sweep(
        "demo",
        num_samples=2,
        overrides=overrides,
        storage=tmp_path,
        name="crash",
        max_failures=1,
        points=[{"data.root": str(missing)}, {"data.root": str(data_root)}],
        verbose=False,
    )
    rows = {row["data.root"]: row for row in result.table}
    failed, good = rows[str(missing)], rows[str(data_root)]
    assert failed["status"] == FAILED and failed["rank"] is None
    assert failed["attempts"] == 2  # the first attempt and one retry
    assert "DataError" in failed["error"] and str(missing) in failed["error"]
    assert good["status"] == COMPLETED and good["rank"] == 1
    assert fs.load_recipe(result.best_recipe_path).data.root == str(data_root)
    attempts = (Path(failed["run_dir"]) / "attempts.log").read_text().splitlines()
    assert len(attempts) == 2 and all("started" in line for line in attempts)
    assert json.loads((Path(good["run_dir"]) / "trial_done.json").read_text())["last"]["epoch"] == 1


# -- subprocess helpers --------------------------------------------------------------------------------
def write_recipe(folder: Path, **changes) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(fs.load_recipe("demo", overrides={**TINY, **changes}).to_yaml(), encoding="utf-8")
    return path


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fusionsearch.cli", "sweep", *args]


def session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL a subprocess started with start_new_session=True and everything it started (its Ray).

    Repeated until the session is empty: Ray may start a worker while the first pass runs.
    """
    deadline = time.monotonic() + 30
    while (pids := [p for p in session_processes(process.pid) if not _is_zombie(p)]) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    process.wait(timeout=30)
    assert not [p for p in session_processes(process.pid) if not _is_zombie(p)]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_for(condition, *, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended early:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s:\n{log.read_text()[-3000:] if log else ''}")


def run_to_end(command: list[str], log: Path, *, timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own session; on a timeout kill all it started and show its output."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process)
        raise AssertionError(f"timed out after {timeout} s:\n{log.read_text()[-4000:]}") from None
    return subprocess.CompletedProcess(command, code, stdout=log.read_text(), stderr="")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("state", ["intact", "cut_short"])
def test_a_killed_driver_resumes_without_rerunning_finished_trials(data_root, tmp_path, state):
    recipe = write_recipe(tmp_path, epochs=EPOCHS)  # a margin between the kill and the end
    args = [str(recipe), "--data-root", str(data_root), "--num-samples", "2", "--max-concurrent", "1",
            "--grace-period", "10", "--storage", str(tmp_path), "--name", "killed", "--quiet"]
    runs, tune_dir = tmp_path / "killed" / "runs", tmp_path / "killed" / "tune"
    log = tmp_path / "first.log"

    def one_finished_and_the_next_checkpointed() -> bool:
        done = list(runs.glob("*/trial_done.json"))
        # both trials have a checkpoint (one trial alone briefly has two, its new and its old one)
        checkpointed = {path.parent for path in tune_dir.glob("trial_*/checkpoint_*")}
        if len(done) != 1 or len(checkpointed) < 2:
            return False
        # Ray saves its experiment state asynchronously: a kill loses what the saved state does not
        # know yet (an unfinished trial it never saw starts again), so kill once it knows both trials
        saved = " ".join(p.read_text(errors="replace") for p in tune_dir.glob("experiment_state*.json"))
        # and so does the snapshot a resume falls back on when the kill cuts the state short
        snapshot = " ".join(p.read_text(errors="replace") for p in tune_dir.glob(f"{SNAPSHOT_DIR}/*.json"))
        return all(run.name.removeprefix("trial_") in saved and run.name.removeprefix("trial_") in snapshot
                   for run in runs.iterdir())

    with log.open("w") as handle:
        driver = subprocess.Popen(sweep_command(*args), stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(one_finished_and_the_next_checkpointed, timeout=300, process=driver, log=log)
    finally:
        kill_session(driver)  # SIGKILL: no chance to save anything
    finished = [d for d in runs.iterdir() if (d / "trial_done.json").is_file()]
    interrupted = [d for d in runs.iterdir() if not (d / "trial_done.json").is_file()]
    assert len(finished) == 1 and len(interrupted) == 1
    stamp = (finished[0] / "trial_done.json").stat().st_mtime_ns
    if state == "cut_short":  # as if the kill had come while Ray was rewriting its experiment state
        for path in tune_dir.glob("experiment_state-*.json"):
            path.write_text(path.read_text()[:25])

    resumed = run_to_end(sweep_command(*args, "--resume"), tmp_path / "resumed.log", timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert ("its last snapshot is back" in resumed.stdout) is (state == "cut_short")
    rows = read_rows(tmp_path / "killed" / "results.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {COMPLETED}
    assert {r["epochs"] for r in rows} == {str(EPOCHS)}
    # the finished trial was not run again
    assert len((finished[0] / "attempts.log").read_text().splitlines()) == 1
    assert (finished[0] / "trial_done.json").stat().st_mtime_ns == stamp
    # the interrupted one continued from its checkpoint instead of starting over
    attempts = (interrupted[0] / "attempts.log").read_text().splitlines()
    assert len(attempts) == 2 and "resumed from the last checkpoint" in attempts[1]
    assert [int(r["epoch"]) for r in read_rows(interrupted[0] / "history.csv")] == list(range(1, EPOCHS + 1))


def test_ctrl_c_stops_the_sweep_cleanly_and_leaves_it_resumable(data_root, tmp_path):
    recipe = write_recipe(tmp_path, epochs=1)
    args = [str(recipe), "--data-root", str(data_root), "--num-samples", "3", "--max-concurrent", "1",
            "--grace-period", "10", "--storage", str(tmp_path), "--name", "ctrl-c"]
    runs = tmp_path / "ctrl-c" / "runs"
    log = tmp_path / "first.log"
    with log.open("w") as handle:
        driver = subprocess.Popen(sweep_command(*args), stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        # trials run one at a time: once the second has started, Ray has recorded the first as finished
        wait_for(lambda: len(list(runs.glob("*/trial_done.json"))) >= 1 and len(list(runs.iterdir())) >= 2,
                 timeout=300, process=driver, log=log)
        driver.send_signal(signal.SIGINT)
        code = driver.wait(timeout=120)
    finally:
        kill_session(driver)
    output = log.read_text()
    assert code == 130 and "did not finish: continue with --resume" in output and "Traceback" not in output
    statuses = [r["status"] for r in read_rows(tmp_path / "ctrl-c" / "results.csv")]
    assert COMPLETED in statuses and RUNNING in statuses
    # Ray saved the experiment on the way out: what --resume restores (tested after a SIGKILL above)
    state = json.loads(next((tmp_path / "ctrl-c" / "tune").glob("experiment_state*.json")).read_text())
    assert len(state["trial_data"]) == len(statuses)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_sweep_joins_a_ray_cluster_on_loopback_by_address(data_root, tmp_path):
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = tmp_path / "head.log"
    with log.open("w") as handle:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard", "false", "--temp-dir", temp_dir, "--block"],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(lambda: reachable(port), timeout=90, process=head, log=log)
        recipe = write_recipe(tmp_path, epochs=1)
        # 'ray start' enables token authentication; a driver joining by address opts in explicitly
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
        with (tmp_path / "driver.log").open("w") as handle:
            driver = subprocess.Popen(
                sweep_command(str(recipe), "--address", f"127.0.0.1:{port}", "--num-samples", "2", "--data-root",
                              str(data_root), "--storage", str(tmp_path), "--name", "cluster"),
                stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        try:
            driver.wait(timeout=300)
        finally:
            kill_session(driver)
        done = subprocess.CompletedProcess(driver.args, driver.returncode, (tmp_path / "driver.log").read_text())
        assert done.returncode == 0, done.stdout[-3000:]
        assert f"running on the Ray cluster at 127.0.0.1:{port}" in done.stdout
        rows = read_rows(tmp_path / "cluster" / "results.csv")
        assert len(rows) == 2 and {r["status"] for r in rows} == {COMPLETED}
        # each trial ran in a worker process of the cluster started above: its logs are named by that pid
        cluster_pids = {p.stem.rsplit("-", 1)[-1] for p in Path(temp_dir).glob("session_*/logs/worker-*")}
        for row in rows:
            attempt = (Path(row["run_dir"]) / "attempts.log").read_text().splitlines()[0]
            assert attempt.split(" pid ")[1].split(":")[0] in cluster_pids
    finally:
        kill_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_optuna_backend_shares_one_journal_between_two_worker_processes(data_root, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    result = fs.sweep(
        "demo",
        num_samples=4,
        backend="optuna",
        workers=2,
        overrides=TINY,
        data_root=data_root,
        storage=tmp_path,
        name="journal",
        pruner="halving",
        reduction_factor=2,
        points=[{"optim.lr": GOOD_LR}, {"optim.lr": 3 * GOOD_LR}, {"optim.lr": BAD_LR}],
        verbose=False,
    )
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "journal" / "optuna.journal")))
    trials = optuna.load_study(study_name="journal", storage=storage).trials
    assert len(trials) == 4
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)
    # the weak point is pruned at its first epoch: two better values already sit on that rung
    (bad,) = [t for t in trials if t.params["optim.lr"] == BAD_LR]
    assert bad.state == optuna.trial.TrialState.PRUNED and list(bad.intermediate_values) == [1]
    for trial in trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert sorted(trial.intermediate_values) == [1, 2]
            assert trial.value == max(trial.intermediate_values.values())
            history = read_rows(Path(trial.user_attrs["run_dir"]) / "history.csv")
            assert [float(r["val_dice"]) for r in history] == pytest.approx(
                [trial.intermediate_values[1], trial.intermediate_values[2]]
            )
    rows = {row["trial"]: row for row in result.table}
    assert rows[f"{bad.number:04d}"]["status"] == STOPPED and rows[f"{bad.number:04d}"]["epochs"] == 1
    best = max((t for t in trials if t.value is not None), key=lambda t: t.value)
    assert result.table[0]["trial"] == f"{best.number:04d}"
    assert fs.load_recipe(result.best_recipe_path).optim.lr == pytest.approx(best.params["optim.lr"])


def test_the_optuna_backend_resumes_the_trials_of_a_killed_worker(data_root, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    recipe = write_recipe(tmp_path, epochs=EPOCHS)
    args = [str(recipe), "--backend", "optuna", "--pruner", "none", "--data-root", str(data_root), "--num-samples",
            "2", "--storage", str(tmp_path), "--name", "study", "--quiet"]
    runs = tmp_path / "study" / "runs"
    log = tmp_path / "first.log"

    def one_finished_and_the_next_checkpointed() -> bool:
        return len(list(runs.glob("*/trial_done.json"))) == 1 and len(list(runs.glob("*/checkpoints/last.pt"))) == 2

    with log.open("w") as handle:
        worker = subprocess.Popen(sweep_command(*args), stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(one_finished_and_the_next_checkpointed, timeout=300, process=worker, log=log)
    finally:
        kill_session(worker)
    (finished,) = [d for d in runs.iterdir() if (d / "trial_done.json").is_file()]
    (interrupted,) = [d for d in runs.iterdir() if not (d / "trial_done.json").is_file()]

    resumed = run_to_end(sweep_command(*args, "--resume"), tmp_path / "resumed.log", timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "re-queued 1 interrupted trial" in resumed.stdout
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "study" / "optuna.journal")))
    trials = optuna.load_study(study_name="study", storage=storage).trials
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and len(trials) == 3  # + the killed attempt
    (replacement,) = [t for t in trials if "resumes" in t.user_attrs]
    assert replacement.user_attrs["run_dir"] == str(interrupted)
    # its history spans the epochs before and after the kill, and matches the run directory's
    history = read_rows(interrupted / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    assert [replacement.intermediate_values[e] for e in range(1, EPOCHS + 1)] == pytest.approx(
        [float(r["val_dice"]) for r in history]
    )
    assert len((finished / "attempts.log").read_text().splitlines()) == 1
    attempts = (interrupted / "attempts.log").read_text().splitlines()
    assert len(attempts) == 2 and "resumed from the last checkpoint" in attempts[1]
    rows = read_rows(tmp_path / "study" / "results.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {COMPLETED}


def test_the_optuna_backend_keeps_its_study_in_a_database_given_by_url(data_root, tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    overrides = {**TINY, "epochs": 1, "output_dir": str(tmp_path / "out")}
    result = fs.sweep("demo", num_samples=2, backend="optuna", storage=url, overrides=overrides, data_root=data_root,
                      name="rdb", verbose=False)
    trials = optuna.load_study(study_name="rdb", storage=url).trials
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert result.sweep_dir == (tmp_path / "out" / "sweeps" / "rdb").resolve()  # run directories stay on disk
    assert {row["optim.lr"] for row in result.table} == {t.params["optim.lr"] for t in trials}
    assert all(Path(row["run_dir"]).parent == result.sweep_dir / "runs" for row in result.table)
