"""Snapshots of Ray's experiment state: taken only of complete files, put back over damaged ones."""

from __future__ import annotations

import json

import pytest

from fusionsearch.errors import ConfigError
from fusionsearch.sweeps.state_snapshots import SNAPSHOT_DIR, StateSnapshots, repair_states

NAME = "experiment_state-2026-12-04_10-00-00.json"


def write_state(folder, text: str, name: str = NAME):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("damage", ["", '{"trial_data": [', "\x00\x00"], ids=["empty", "cut_off", "garbage"])
def test_a_damaged_state_gets_its_last_complete_snapshot_back(tmp_path, damage):
    snapshots = StateSnapshots(tmp_path)
    path = write_state(tmp_path, json.dumps({"trial_data": [1]}))
    snapshots.update()
    write_state(tmp_path, json.dumps({"trial_data": [1, 2]}))
    snapshots.update()  # the newer complete state replaces the older snapshot
    path.write_text(damage, encoding="utf-8")
    snapshots.update()  # a file caught mid-write is never snapshot
    assert json.loads((tmp_path / SNAPSHOT_DIR / NAME).read_text()) == {"trial_data": [1, 2]}
    assert repair_states(tmp_path) == [NAME]
    assert json.loads(path.read_text()) == {"trial_data": [1, 2]}
    assert repair_states(tmp_path) == []  # nothing left to repair


def test_intact_states_are_left_alone_and_a_damaged_one_without_snapshot_is_a_clear_error(tmp_path):
    intact = write_state(tmp_path, '{"a": 1}', name="experiment_state-1.json")
    assert repair_states(tmp_path) == [] and intact.read_text() == '{"a": 1}'
    write_state(tmp_path, '{"a": ', name="experiment_state-2.json")
    with pytest.raises(ConfigError, match="experiment_state-2.json is damaged.*start a new sweep"):
        repair_states(tmp_path)
