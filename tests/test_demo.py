"""`fusionsearch demo`: phantoms written when absent, both runs trained, both tables and the weights printed."""

from __future__ import annotations

import re
from pathlib import Path

import fusionsearch as fs
from fusionsearch.cli import main
from fusionsearch.commands.demo import PHANTOMS, ensure_phantoms
from fusionsearch.data.phantoms import make_synapse


def test_phantoms_are_written_only_when_absent(tmp_path: Path) -> None:
    root = tmp_path / "data"
    assert ensure_phantoms(root) is True
    train = fs.build_dataset("synapse", root=str(root), split="train", size=PHANTOMS["size"], val_fraction=0.2)
    test = fs.build_dataset("synapse", root=str(root), split="test")
    assert train[0]["image"].shape == (1, PHANTOMS["size"], PHANTOMS["size"])
    assert len(test) == PHANTOMS["test_cases"]
    stamp = (root / "train_npz").stat().st_mtime_ns
    assert ensure_phantoms(root) is False
    assert (root / "train_npz").stat().st_mtime_ns == stamp


def test_demo_trains_both_and_prints_tables_weights_and_reports(tmp_path: Path, capsys) -> None:
    # small phantoms placed where the demo looks keep this test short; the demo uses them as they are
    make_synapse(tmp_path / "demo" / "data", cases=3, test_cases=1, slices=4, size=32, seed=0, progress=False)
    code = main(["demo", "--output", str(tmp_path / "demo"), "--epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "== LoMix (selected epoch 1" in out and "== last layer only (selected epoch 1" in out
    assert out.count("paper protocol, head 'last', 1 cases") == 2
    assert len(re.findall(r"^mean\s+\d+\.\d\d\s+\d+\.\d\d$", out, flags=re.M)) == 2
    starts = re.findall(r"start (\S+)\s+([\d.]+)\s+end (\S+)\s+([\d.]+)", out)
    assert len(starts) == 5
    assert all(abs(float(w) - 0.6931) < 1e-4 for _, w, _, _ in starts)  # softplus(0) = ln 2 at the start
    assert "largest change of any weight" in out
    reports = re.findall(r"^report \(.+\): (.+report\.md)$", out, flags=re.M)
    assert len(reports) == 2 and all(Path(p).is_file() for p in reports)
    assert re.search(r"demo finished in \d+ s", out)


def test_demo_rejects_zero_epochs(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--output", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
