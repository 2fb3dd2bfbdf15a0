"""``fusionsearch sweep`` refuses bad input before any trial starts: one located message, exit 2, no traceback."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from fusionsearch.cli import main


def sweep_cli(capsys, *args):
    start = time.monotonic()
    code = main(["sweep", *args])
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    return code, " ".join(captured.err.split()), elapsed, captured.out  # the CLI wraps long messages


@pytest.mark.parametrize(
    ("tune", "field", "words"),
    [
        ("{optim.lrr: {uniform: [0.1, 0.2]}}", "tune.optim.lrr", "'optim.lrr' is not a known field"),
        ("{optim.lr: {uniform: [0.2, 0.1]}}", "tune.optim.lr", "greater than high"),
        ("{optim.lr: {loguniform: [0.0, 0.1]}}", "tune.optim.lr", "low > 0"),
        ("{space.operators: {choice: [[add, mul], [add, nope]]}}", "tune.space.operators", "Unknown operator 'nope'"),
        ("{epochs: {int: [1, 3], step: 0.5}}", "tune.epochs", "whole step"),
        (
            "{optim.lr: {uniform: [0.1, 0.2], when: {space.weighting.kinds: softplus}}}",
            "tune.optim.lr.when",
            "neither searched nor a field",
        ),
    ],
)
def test_bad_tune_sections_name_the_field(capsys, tmp_path, tune, field, words):
    code, err, _, out = sweep_cli(
        capsys, "demo", "--set", f"tune={tune}", "--set", "space.tune={}", "--storage", str(tmp_path)
    )
    assert code == 2
    assert f"field '{field}'" in err and words in err
    assert "Traceback" not in err and out == ""
    assert not any(tmp_path.iterdir())  # nothing was started


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_address_fails_within_seconds(capsys, tmp_path):
    port = free_port()
    code, err, elapsed, _ = sweep_cli(
        capsys, "demo", "--address", f"127.0.0.1:{port}", "--data-root", str(tmp_path), "--storage", str(tmp_path)
    )
    assert code == 2 and elapsed < 15
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err and "ray start --head" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--num-samples", "0"], "--num-samples"),
        (["--workers", "2"], "worker processes belong to the optuna backend"),
        (["--backend", "optuna", "--address", "auto"], "--address joins a Ray cluster"),
        (["--resume", "--name", "never-ran"], "no sweep to resume"),
        (["--grace-period", "0"], "--grace-period"),
    ],
)
def test_bad_options_are_refused(capsys, tmp_path, args, words):
    code, err, _, _ = sweep_cli(capsys, "demo", "--data-root", str(tmp_path), "--storage", str(tmp_path), *args)
    assert code == 2 and words in err and "Traceback" not in err


def doc_tune_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    return [b for b in blocks if b.startswith("tune:")]


@pytest.mark.parametrize("block", doc_tune_blocks())
def test_the_documented_tune_examples_are_valid_sweeps(block, tmp_path):
    import yaml

    from fusionsearch.recipe import load_recipe
    from fusionsearch.sweeps.plan import SweepPlan

    tune = yaml.safe_load(block)["tune"]
    recipe = load_recipe("demo", overrides={"tune": tune, "space.tune": {}})
    plan = SweepPlan.from_recipe(recipe, metric="val_dice", mode="max", sweep_dir=tmp_path)
    assert sorted(plan.space.paths) == sorted(tune)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "a sweep already exists"),
        (["--resume", "--num-samples", "5"], "started with 4 trials"),
        (["--resume", "--backend", "optuna"], "was run with the ray backend"),
        (["--resume", "--num-samples", "4", "--set", "optim.weight_decay=0.01"], "different recipe"),
    ],
)
def test_an_existing_sweep_is_continued_only_as_it_was_started(capsys, tmp_path, args, words):
    from fusionsearch.recipe import load_recipe
    from fusionsearch.sweeps.plan import SweepPlan

    data = tmp_path / "data"
    data.mkdir()
    recipe = load_recipe("demo", overrides={"data.root": str(data)})
    plan = SweepPlan.from_recipe(recipe, metric="val_dice", mode="max", sweep_dir=tmp_path / "demo")
    plan.write({"backend": "ray", "num_samples": 4, "seed": 0, "storage": None})
    code, err, _, _ = sweep_cli(capsys, "demo", "--data-root", str(data), "--storage", str(tmp_path), *args)
    assert code == 2 and words in err and "Traceback" not in err
