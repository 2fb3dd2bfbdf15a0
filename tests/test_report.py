"""The report: read back from the files of a run directory written here by hand, with known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusionsearch.errors import FusionSearchError
from fusionsearch.report import read_terms, term_group, write_report

TERMS = ["P0", "P1", "P2", "add(0,1)", "add(0,2)", "add(1,2)", "add(0,1,2)", "mul(0,1)", "mul(0,1,2)"]


@pytest.mark.parametrize(
    ("name", "group"),
    [("P0", ("original", "0")), ("P12", ("original", "12")), ("add(0,1)", ("add", "0,1")),
     ("mul(0,2,3)", ("mul", "0,2,3")), ("my_op(1,4)", ("my_op", "1,4"))],
)
def test_term_group(name: str, group: tuple[str, str]) -> None:
    assert term_group(name) == group


def _write_run(run_dir: Path, *, epochs: int = 3, with_test: bool = True) -> np.ndarray:
    """A run directory with made-up numbers; returns the weight table [epochs + 1, K]."""
    run_dir.mkdir(parents=True)
    recipe = {"name": "handmade", "model": {"name": "small_unet"},
              "data": {"name": "synapse", "root": "/d", "size": 32},
              "space": {"weighting": {"kind": "softplus"}}, "seed": 7, "batch_size": 2, "optim": {"lr": 0.001}}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rng = np.random.default_rng(0)
    weights = np.vstack([np.full(len(TERMS), np.log(2)), rng.uniform(0.1, 1.0, (epochs, len(TERMS)))])
    with open(run_dir / "terms.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "term", "weight", "loss"])
        for epoch in range(epochs + 1):
            for k, term in enumerate(TERMS):
                writer.writerow([epoch, term, weights[epoch, k], "" if epoch == 0 else 0.5])
    with open(run_dir / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "iteration", "train_loss", "lr", "seconds", "validated", "val_dice"])
        for epoch in range(1, epochs + 1):
            writer.writerow([epoch, 10 * epoch, 2.0 / epoch, 0.001, 1.0, 1, 30.0 + epoch])
    if with_test:
        summary = {
            "protocol": "paper", "head": "last", "num_cases": 2, "mean_dice": 0.55, "mean_hd95": 7.5,
            "per_class": {"liver": {"dice": 0.9, "hd95": 3.0}, "aorta": {"dice": 0.2, "hd95": 12.0}},
            "best_epoch": 2, "val_dice": 32.0,
        }
        (run_dir / "test_summary.json").write_text(json.dumps(summary))
        labels = np.zeros((16, 16), dtype=np.int64)
        labels[4:9, 4:9] = 1
        np.savez(run_dir / "qualitative.npz", names=np.array(["case0001 slice 3"]),
                 image_0=rng.random((16, 16)).astype(np.float32), truth_0=labels, prediction_0=np.roll(labels, 1, 0))
    return weights


def test_report_tables_carry_the_run_numbers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    weights = _write_run(run_dir)
    text = write_report(run_dir).read_text()
    assert "| liver | 90.00 | 3.00 |" in text
    assert "| aorta | 20.00 | 12.00 |" in text
    assert "| **mean** | **55.00** | **7.50** |" in text
    assert "selected checkpoint: epoch 2 (validation mean Dice 32.00 %)" in text
    # top terms by final weight, ranked independently here
    final, initial = weights[-1], weights[0]
    ranked = sorted(range(len(TERMS)), key=lambda k: -final[k])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(TERMS)
    for rank, (k, row) in enumerate(zip(ranked, rows, strict=True)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(rank + 1) and cells[1] == f"`{TERMS[k]}`"
        assert float(cells[2]) == pytest.approx(initial[k], abs=5e-5)
        assert float(cells[3]) == pytest.approx(final[k], abs=5e-5)
        assert float(cells[4]) == pytest.approx(final[k] - initial[k], abs=1e-4)
    for png in ("curves.png", "weights.png", "final_weights.png", "per_class_dice.png", "overlays.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in text


def test_read_terms_round_trip(tmp_path: Path) -> None:
    weights = _write_run(tmp_path / "run", epochs=2)
    log = read_terms(tmp_path / "run" / "terms.csv")
    assert log.terms == TERMS and log.epochs == [0, 1, 2]
    assert np.allclose(log.weights, weights)
    assert np.isnan(log.losses[0]).all() and np.allclose(log.losses[1:], 0.5)


def test_report_of_a_run_in_progress(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_run(run_dir, epochs=1, with_test=False)
    text = write_report(run_dir).read_text()
    assert "No test evaluation yet" in text
    assert (run_dir / "weights.png").is_file() and not (run_dir / "per_class_dice.png").exists()


def test_report_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FusionSearchError, match="not a fusionsearch run directory"):
        write_report(tmp_path)
