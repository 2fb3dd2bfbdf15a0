"""Real Ray Tune sweeps on tiny phantoms: ASHA stopping, the exported best recipe, crashing trials.

One local Ray (2 CPUs, no dashboard) is shared by the tests of this module and shut down at the end.
Every trial is a real run of the bundled demo recipe (shrunk: 32 px phantoms, a 3-output small UNet).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import fusionsearch as fs
from fusionsearch.data.phantoms import make_synapse
from fusionsearch.sweep.results import COMPLETED, FAILED, STOPPED

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
