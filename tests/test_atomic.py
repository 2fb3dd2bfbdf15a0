"""Atomic artefact writes: a failed write leaves the previous file and no temporary behind."""

from __future__ import annotations

import pytest

from fusionsearch.atomic import atomic_path, write_text_atomic


@pytest.mark.parametrize("existing", [True, False])
def test_failed_write_keeps_previous_file_and_cleans_up(tmp_path, existing):
    target = tmp_path / "sub" / "table.csv"
    if existing:
        write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    if existing:
        assert target.read_text() == "old\n"
    else:
        assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == (["table.csv"] if existing else [])


def test_successful_write_replaces_and_keeps_suffix(tmp_path):
    target = tmp_path / "plot.png"
    write_text_atomic(target, "v1")
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == target.parent and tmp != target
        tmp.write_text("v2")
    assert target.read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
