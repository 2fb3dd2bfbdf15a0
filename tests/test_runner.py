"""fs.run end to end on tiny phantoms: artefacts, selection, re-evaluation, and bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import fusionsearch as fs
from fusionsearch.checkpoint import load_checkpoint
from fusionsearch.cli import main
from fusionsearch.data.phantoms import make_synapse
from fusionsearch.errors import ConfigError, DataError, FusionSearchError
from fusionsearch.recipe import load_recipe
from fusionsearch.runner import evaluate_run


def tiny_overrides(root: Path) -> dict:
    return {
        "data.root": str(root),
        "data.size": 32,
        "model.options.base_channels": 4,
        "model.options.depth": 3,
        "epochs": 2,
        "batch_size": 4,
        "evaluation.size": 32,
        "evaluation.overlays": 2,
    }


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synapse"
    make_synapse(root, cases=3, test_cases=2, slices=6, size=32, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def finished(phantoms: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real 2-epoch LoMix run; returns (result, epoch callback records)."""
    calls: list[tuple[int, dict, Path]] = []
    recipe = load_recipe("demo", tiny_overrides(phantoms))
    run_dir = tmp_path_factory.mktemp("runs") / "lomix"
    result = fs.run(recipe, run_dir=run_dir, on_epoch_end=lambda e, m, d: calls.append((e, m, d)), progress=False)
    return result, calls


ARTEFACTS = [
    "recipe.yaml",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "history.csv",
    "terms.csv",
    "test_cases.csv",
    "test_summary.json",
    "qualitative.npz",
    "report.md",
    "curves.png",
    "weights.png",
    "final_weights.png",
    "per_class_dice.png",
    "overlays.png",
]


@pytest.mark.parametrize("name", ARTEFACTS)
def test_two_epoch_run_writes_every_artefact(finished, name: str) -> None:
    result, _ = finished
    path = result.run_dir / name
    assert path.is_file() and path.stat().st_size > 0
    if name.endswith(".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_and_no_leftover_temporary_files(finished) -> None:
    result, _ = finished
    assert list((result.run_dir / "tb").glob("events.out.tfevents.*"))
    assert not [p for p in result.run_dir.rglob(".*") if p.is_file()]


def test_history_and_callback_follow_the_runner_contract(finished) -> None:
    result, calls = finished
    with open(result.run_dir / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in history] == [1, 2]
    assert [e for e, _, _ in calls] == [1, 2]
    for (epoch, metrics, checkpoint_dir), row in zip(calls, history, strict=True):
        assert {"epoch", "val_dice", "train_loss"} <= set(metrics)
        assert metrics["epoch"] == epoch
        assert 0.0 <= metrics["val_dice"] <= 100.0
        assert float(row["val_dice"]) == pytest.approx(metrics["val_dice"])
        assert (checkpoint_dir / "last.pt").is_file()
    best = max(range(2), key=lambda i: (calls[i][1]["val_dice"], -i))  # first epoch wins ties
    assert result.best_epoch == best + 1
    assert result.val_dice == pytest.approx(calls[best][1]["val_dice"])
    assert load_checkpoint(result.best_checkpoint)["epoch"] == result.best_epoch


def test_test_summary_agrees_with_the_per_case_table(finished) -> None:
    result, _ = finished
    summary = json.loads((result.run_dir / "test_summary.json").read_text())
    with open(result.run_dir / "test_cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["case0001", "case0002"]
    classes = list(summary["per_class"])
    assert classes == ["spleen", "right kidney", "left kidney", "gallbladder", "pancreas", "liver", "stomach", "aorta"]
    per_class = [np.mean([float(row[f"{name}_dice"]) for row in rows]) for name in classes]
    assert summary["mean_dice"] == pytest.approx(float(np.mean(per_class)), abs=1e-9)
    assert result.metrics["mean_dice"] == pytest.approx(100 * float(np.mean(per_class)), abs=1e-7)
    for name, value in zip(classes, per_class, strict=True):
        assert result.metrics["per_class"][name]["dice"] == pytest.approx(100 * value, abs=1e-7)
    assert summary["best_epoch"] == result.best_epoch
    assert summary["checkpoint"].endswith("best.pt")


def test_recipe_yaml_is_resolved_and_reloadable(finished, phantoms: Path) -> None:
    result, _ = finished
    stored = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert isinstance(stored["space"], dict) and stored["space"]["operators"] == ["add", "mul", "awf", "concat"]
    assert stored["data"]["root"] == str(phantoms)
    again = load_recipe(result.run_dir)
    assert again.search_space().to_dict() == fs.load_space("lomix").to_dict()


def test_re_evaluation_reproduces_the_test_metrics(finished) -> None:
    result, _ = finished
    evaluation, folder = evaluate_run(result.run_dir, progress=False)
    assert evaluation.mean_dice * 100 == pytest.approx(result.metrics["mean_dice"], abs=1e-9)
    assert np.array_equal(evaluation.dice, result.evaluation.dice, equal_nan=True)
    assert (folder / "test_cases.csv").is_file() and (folder / "test_summary.json").is_file()


@pytest.mark.parametrize(("head", "protocol", "split"), [("sum", "strict", "test"), ("mixture", "paper", "valid")])
def test_cli_evaluate_any_head_protocol_and_split(finished, capsys, head: str, protocol: str, split: str) -> None:
    result, _ = finished
    target = result.run_dir / "checkpoints" / "last.pt"
    code = main(["evaluate", str(target), "--head", head, "--protocol", protocol, "--split", split])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{protocol} protocol, head '{head}'" in out
    folder = result.run_dir / "evaluations" / f"last-{split}-{head}-{protocol}"
    summary = json.loads((folder / f"{split}_summary.json").read_text())
    assert (summary["head"], summary["protocol"]) == (head, protocol)
    assert summary["num_cases"] == (2 if split == "test" else 1)


def test_cli_report_regenerates(finished, capsys) -> None:
    result, _ = finished
    (result.run_dir / "report.md").unlink()
    assert main(["report", str(result.run_dir)]) == 0
    assert str(result.run_dir / "report.md") in capsys.readouterr().out
    text = (result.run_dir / "report.md").read_text()
    assert "## Test metrics" in text and "| **mean** |" in text and "weights.png" in text


def test_evaluating_a_run_whose_data_root_moved(finished, phantoms: Path, tmp_path: Path, capsys) -> None:
    result, _ = finished
    moved = tmp_path / "moved_synapse"
    shutil.move(str(phantoms), moved)
    try:
        code = main(["evaluate", str(result.run_dir)])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2
        assert str(phantoms) in err and "does not exist" in err and "--data-root" in err
        assert "Traceback" not in err
        assert main(["evaluate", str(result.run_dir), "--data-root", str(moved)]) == 0
        assert "mean" in capsys.readouterr().out
    finally:
        shutil.move(str(moved), phantoms)


# -- bad input -------------------------------------------------------------------------------------------
def test_data_root_not_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        fs.run(load_recipe("lomix_synapse"), run_dir=tmp_path / "r")
    assert info.value.field == "data.root" and "--data-root" in str(info.value)


def test_data_root_missing(tmp_path: Path) -> None:
    recipe = load_recipe("demo", {"data.root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="does not exist") as info:
        fs.run(recipe, run_dir=tmp_path / "r")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_data_root_of_the_wrong_form_says_what_was_found_and_expected(tmp_path: Path, phantoms: Path) -> None:
    wrong = tmp_path / "not_synapse"
    (wrong / "images").mkdir(parents=True)
    (wrong / "images" / "scan.nii.gz").write_bytes(b"")
    recipe = load_recipe("demo", {**tiny_overrides(phantoms), "data.root": str(wrong)})
    with pytest.raises(DataError) as info:
        fs.run(recipe, run_dir=tmp_path / "r")
    message = str(info.value)
    assert str(wrong) in message and "train_npz" in message
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_space_needing_more_scales_than_the_model_gives(tmp_path: Path, phantoms: Path) -> None:
    recipe = load_recipe(
        "demo", {**tiny_overrides(phantoms), "model.options.num_outputs": 3, "space.scales": 4}
    )
    with pytest.raises(ConfigError) as info:
        fs.run(recipe, run_dir=tmp_path / "r")
    assert info.value.field == "space" and "3 output(s)" in str(info.value)


def test_existing_run_needs_resume_and_resume_needs_a_run(finished, tmp_path: Path, phantoms: Path) -> None:
    result, _ = finished
    recipe = load_recipe("demo", tiny_overrides(phantoms))
    with pytest.raises(FusionSearchError, match="already holds a run"):
        fs.run(recipe, run_dir=result.run_dir)
    with pytest.raises(FusionSearchError, match="Nothing to resume"):
        fs.run(recipe, run_dir=tmp_path / "empty", resume=True)


def test_resume_with_a_different_recipe_is_refused(finished, phantoms: Path) -> None:
    result, _ = finished
    changed = load_recipe("demo", {**tiny_overrides(phantoms), "optim.lr": 0.5, "space.loss.ce": 0.9})
    with pytest.raises(ConfigError) as info:
        fs.run(changed, run_dir=result.run_dir, resume=True)
    assert "optim.lr" in str(info.value) and "space.loss.ce" in str(info.value)


def test_metrics_are_finite_percentages(finished) -> None:
    result, _ = finished
    assert 0.0 <= result.metrics["mean_dice"] <= 100.0
    assert math.isfinite(result.metrics["mean_hd95"])
