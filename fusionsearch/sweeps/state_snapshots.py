"""Snapshots of Ray Tune's experiment state, so that a sweep killed at any moment can resume.

Ray rewrites its ``experiment_state-*.json`` in place (open, truncate, write). A driver killed
during that write leaves an empty or cut-off file, and ``Tuner.restore`` then fails with a bare
JSON error. While a sweep runs, :class:`StateSnapshots` copies each state file that parses into a
snapshot folder (atomically, whenever the file has changed); before a resume,
:func:`repair_states` puts the snapshot back over a state file that does not parse. Snapshots are
taken between steps of Ray's event loop, so one can lag the damaged file by a save: a trial may
then repeat the epochs since an earlier checkpoint, and a trial started in that moment is unknown
to it and not resumed (its run folder stays, as an interrupted trial).
"""

from __future__ import annotations

import json
from pathlib import Path

from fusionsearch.atomic import atomic_path
from fusionsearch.errors import ConfigError

SNAPSHOT_DIR = ".state_snapshots"
STATE_PATTERN = "experiment_state-*.json"


def _complete(path: Path) -> bytes | None:
    """The file's bytes if they are one complete JSON document, else None (missing, empty, cut off)."""
    try:
        data = path.read_bytes()
        json.loads(data)
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None
    return data


class StateSnapshots:
    """Keeps the last complete copy of every experiment state file of ``experiment_dir``."""

    def __init__(self, experiment_dir: Path) -> None:
        self.experiment_dir = Path(experiment_dir)
        self._taken: dict[str, tuple[int, int]] = {}  # file name -> (mtime_ns, size) of the last snapshot

    def update(self) -> None:
        """Snapshot the state files that changed since the last call and parse (cheap when none did)."""
        for path in self.experiment_dir.glob(STATE_PATTERN):
            try:
                status = path.stat()
            except OSError:
                continue
            stamp = (status.st_mtime_ns, status.st_size)
            if self._taken.get(path.name) == stamp:
                continue
            data = _complete(path)
            if data is None:
                continue  # caught in the middle of a write: try again next time
            with atomic_path(self.experiment_dir / SNAPSHOT_DIR / path.name) as tmp:
                tmp.write_bytes(data)
            self._taken[path.name] = stamp


def repair_states(experiment_dir: Path) -> list[str]:
    """Put the snapshot back over every state file that does not parse; return the names repaired.

    Raises :class:`ConfigError` for a damaged state file without a snapshot (a sweep started by an
    older fusionsearch), naming the file and what to do instead.
    """
    experiment_dir = Path(experiment_dir)
    repaired = []
    for path in sorted(experiment_dir.glob(STATE_PATTERN)):
        if _complete(path) is not None:
            continue
        snapshot = _complete(experiment_dir / SNAPSHOT_DIR / path.name)
        if snapshot is None:
            raise ConfigError(
                f"Ray's experiment state {path} is damaged (the sweep was stopped while Ray was writing it) "
                f"and there is no intact snapshot of it to put back",
                field="--resume",
                fix="start a new sweep under another --name; the finished trials' results stay in this sweep's "
                "runs/ folder",
            )
        with atomic_path(path) as tmp:
            tmp.write_bytes(snapshot)
        repaired.append(path.name)
    return repaired
