"""Resume after a real kill: SIGKILL once the first epoch's checkpoint exists, then --resume.

The resumed run must end with exactly the weights, history and test metrics of an uninterrupted
run of the same recipe (bit for bit: same data order, augmentation and RNG streams).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import fusionsearch as fs
from fusionsearch.checkpoint import load_checkpoint
from fusionsearch.data.phantoms import make_synapse
from fusionsearch.recipe import load_recipe


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    root = tmp_path / "synapse"
    make_synapse(root, cases=3, test_cases=1, slices=6, size=32, seed=0, progress=False)
    recipe = load_recipe(
        "demo",
        {
            "data.root": str(root),
            "data.size": 32,
            "model.options.base_channels": 4,
            "model.options.depth": 3,
            "epochs": 3,
            "batch_size": 4,
            "evaluation.size": 32,
            "evaluation.overlays": 1,
        },
    )
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())

    # the interrupted run, in a child process with the same thread count (same float reductions)
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    child = subprocess.Popen(
        [sys.executable, "-m", "fusionsearch.cli", "run", str(recipe_file), "--output", str(killed_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = killed_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    try:
        while not last.exists():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else "child exited"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        if child.stderr:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(last)["state"]["epoch"] == 1  # killed during epoch 2
    assert not (killed_dir / "test_summary.json").exists()

    reference = fs.run(recipe, run_dir=tmp_path / "reference", progress=False)
    resumed = fs.run(load_recipe(killed_dir), run_dir=killed_dir, resume=True, progress=False)

    ref_state = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    new_state = load_checkpoint(last)
    for part in ("model", "criterion"):
        assert ref_state[part].keys() == new_state[part].keys()
        for name, value in ref_state[part].items():
            assert torch.equal(value, new_state[part][name]), f"{part}.{name}"
    def without_timing(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert without_timing(ref_state["state"]["history"]) == without_timing(new_state["state"]["history"])
    assert torch.equal(ref_state["state"]["term_weights"], new_state["state"]["term_weights"])
    assert (reference.best_epoch, reference.val_dice) == (resumed.best_epoch, resumed.val_dice)
    assert reference.metrics == resumed.metrics
    ref_summary = json.loads((tmp_path / "reference" / "test_summary.json").read_text())
    new_summary = json.loads((killed_dir / "test_summary.json").read_text())
    for key in ("mean_dice", "mean_hd95", "per_class", "best_epoch", "val_dice"):
        assert ref_summary[key] == new_summary[key], key
    assert (tmp_path / "reference" / "terms.csv").read_text() == (killed_dir / "terms.csv").read_text()


def test_resume_of_a_finished_run_only_re_tests(tmp_path: Path) -> None:
    epochs = 1
    root = tmp_path / "synapse"
    make_synapse(root, cases=3, test_cases=1, slices=4, size=32, seed=1, progress=False)
    recipe = load_recipe(
        "demo",
        {
            "data.root": str(root),
            "data.size": 32,
            "model.options.base_channels": 4,
            "model.options.depth": 3,
            "epochs": epochs,
            "batch_size": 4,
            "evaluation.size": 32,
            "evaluation.overlays": 0,
            "space": "last_layer",
        },
    )
    first = fs.run(recipe, run_dir=tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    again = fs.run(recipe, run_dir=tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before  # no further training
    assert again.metrics == first.metrics and again.best_epoch == first.best_epoch == epochs
