"""Sweep results (ranking, CSV, table, plot) and the cluster/address checks, without running trials."""

from __future__ import annotations

import csv
import socket
import time

import matplotlib.image
import pytest

from fusionsearch.errors import ConfigError, DataError
from fusionsearch.sweeps.cluster import check_data_root, check_reachable, requested_address
from fusionsearch.sweeps.results import (
    COMPLETED,
    FAILED,
    STOPPED,
    TrialRecord,
    format_table,
    plot_metric,
    rank,
    write_csv,
)
from fusionsearch.sweeps.space import SweepSpace
from fusionsearch.tune_spec import parse_tune_section

BASE = {"optim": {"lr": 1e-4}, "space": {"operators": ["add", "mul"], "weighting": {"kind": "softplus"}}}
TUNE = {
    "optim.lr": {"loguniform": [1e-5, 1e-2]},
    "space.operators": {"choice": [["add", "mul"], ["add", "awf"]]},
    "space.weighting.kind": {"choice": ["softplus", "uncertainty"], "when": {"space.operators": {"contains": "awf"}}},
}


@pytest.fixture
def space():
    return SweepSpace.build([("", parse_tune_section(TUNE, source="r.yaml"), "r.yaml")], BASE)


def history(values, start=1):
    return [{"epoch": start + i, "val_dice": v, "train_loss": 1.0 / (i + 1)} for i, v in enumerate(values)]


def records():
    return [
        TrialRecord("a", COMPLETED, {"optim.lr": 1e-3, "space.operators": ["add", "mul"]}, history([10, 30, 20])),
        TrialRecord("b", STOPPED, {"optim.lr": 1e-5, "space.operators": ["add", "awf"],
                                   "space.weighting.kind": "uncertainty"}, history([40])),
        TrialRecord("c", FAILED, {"optim.lr": 5e-3, "space.operators": ["add", "mul"]}, [], attempts=2,
                    error="DataError: gone"),
        TrialRecord("d", COMPLETED, {"optim.lr": 2e-4, "space.operators": ["add", "awf"],
                                     "space.weighting.kind": "softplus"}, history([5, 25, 35])),
    ]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_rank_orders_by_each_trials_best_epoch(space, mode):
    rows = rank(records(), space, "val_dice", mode)
    # independent expectation: best epoch per trial by a plain loop
    best = {}
    for rec in records():
        for row in rec.history:
            cur = best.get(rec.trial_id)
            if cur is None or (row["val_dice"] > cur[0] if mode == "max" else row["val_dice"] < cur[0]):
                best[rec.trial_id] = (row["val_dice"], row["epoch"])
    expected = sorted(best, key=lambda t: best[t][0], reverse=(mode == "max"))
    assert [r["trial"] for r in rows] == [*expected, "c"]
    assert [r["rank"] for r in rows] == [1, 2, 3, None]
    for row in rows[:3]:
        assert (row["val_dice"], row["best_epoch"]) == best[row["trial"]]
    failed = rows[-1]
    assert failed["status"] == FAILED and failed["val_dice"] is None and failed["attempts"] == 2
    epochs = {rec.trial_id: max((r["epoch"] for r in rec.history), default=0) for rec in records()}
    assert all(row["epochs"] == epochs[row["trial"]] for row in rows)
    # an inactive conditional parameter is empty, not invented
    assert next(r for r in rows if r["trial"] == "a")["space.weighting.kind"] is None


def test_csv_round_trips_the_ranked_rows(space, tmp_path):
    rows = rank(records(), space, "val_dice", "max")
    path = write_csv(rows, tmp_path / "results.csv")
    with path.open() as handle:
        read = list(csv.DictReader(handle))
    assert [r["trial"] for r in read] == [r["trial"] for r in rows]
    assert read[0]["val_dice"] == "40" and read[0]["space.operators"] == "[add, awf]"
    assert float(read[1]["optim.lr"]) == pytest.approx(2e-4)
    assert read[-1]["val_dice"] == "" and read[-1]["error"] == "DataError: gone"
    assert set(read[0]) >= {"rank", "trial", "status", "val_dice", "best_epoch", "epochs", "attempts", "run_dir"}


def test_table_text_lists_every_trial_in_rank_order(space):
    rows = rank(records(), space, "val_dice", "max")
    text = format_table(rows, "val_dice", space.paths)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["rank", "trial", "status", "val_dice"]
    order = [line.split()[1] for line in lines[2:6]]
    assert order == ["b", "d", "a", "c"]
    assert "trial c failed: DataError: gone" in text


def test_plot_has_one_panel_per_searched_value(space, tmp_path):
    rows = rank(records(), space, "val_dice", "max")
    path = plot_metric(rows, space, "val_dice", tmp_path / "plot.png")
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width > height > 100  # three panels side by side
    assert image.std() > 0.01  # not blank


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_address_is_a_clear_error_within_seconds():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    assert f"127.0.0.1:{port}" in str(info.value) and info.value.field == "--address"


@pytest.mark.parametrize("address", ["no-port", "host:notaport", ":6379"])
def test_malformed_address_is_refused(address):
    with pytest.raises(ConfigError, match="not a Ray address"):
        check_reachable(address)


def test_listening_address_is_accepted():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}")


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [(None, None, None), (None, "10.0.0.1:6379", "10.0.0.1:6379"), ("auto", "10.0.0.1:6379", "auto")],
)
def test_address_comes_from_the_flag_then_ray_address(monkeypatch, flag, env, expected):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert requested_address(flag) == expected


def test_missing_data_root_names_the_node(tmp_path):
    check_data_root(tmp_path)
    with pytest.raises(DataError) as info:
        check_data_root(tmp_path / "gone")
    assert socket.gethostname() in str(info.value) and "every node" in str(info.value).lower()
